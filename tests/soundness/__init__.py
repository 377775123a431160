"""The soundness harness: random ONNX programs (``generator``), a graph builder (``build``) and the ground-truth
oracles (``oracle``) used by tests/test_soundness.py and tests/test_soundness_regressions.py."""
