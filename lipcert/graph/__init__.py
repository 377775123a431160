"""The model representation and how it runs: ``Graph`` and ``Node``, the operator registry, the executor and linear
operators."""
