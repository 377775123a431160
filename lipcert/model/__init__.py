"""Loading a model file into a checked ``Graph``: ONNX, safetensors with a spec, folding, cross-checks and the
summary."""
