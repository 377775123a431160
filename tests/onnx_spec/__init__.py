"""ONNX's own operator test cases (``onnx.backend.test.case.node``) run through lipcert's executor."""
