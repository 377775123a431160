"""lipcert: certify the robustness of 1-Lipschitz neural networks from the deployed model file."""

__version__ = "0.1.0"
