"""lipcert: certify the robustness of 1-Lipschitz neural networks from the deployed model file.

The command line is a thin layer over this API::

    import lipcert

    model = lipcert.load_model("sample_models/digits_conv.onnx")
    result = lipcert.verify(model)                      # VerifyResult: per-layer bounds and the verdict
    report = lipcert.certify(model, "sample_models/digits_test.npz", eps="36/255,72/255",
                             attack=lipcert.AttackConfig(steps=20), min_clean_acc=0.9)
    print(result.status, report.clean_accuracy, report.eps[0].certified_accuracy, report.gates)
    report.write("lipcert-report")                       # report.json, report.md, samples.csv, plot
    # or certify(..., out="lipcert-report"): checkpointed as it runs (resume=True continues), written at the end

The names below are imported on first use, so that ``import lipcert`` (and ``lipcert --help``) does not load
torch until the API is called.
"""

from __future__ import annotations

from typing import Any

from lipcert.version import __version__

__all__ = [
    "AttackConfig", "AttackSummary", "CertifyOptions", "ConfigError", "DataError", "EpsResult", "Gate", "Graph",
    "LayerResult", "LipcertError", "ModelError", "Progress", "Report", "VerifyResult", "Violation", "attack",
    "certify", "load_model", "report_gates", "verify", "verify_gates", "__version__",
]


def __getattr__(name: str) -> Any:
    """Import the API (and torch) the first time one of its names is used."""
    if name not in __all__:
        raise AttributeError(f"module 'lipcert' has no attribute {name!r}")
    from lipcert.bounds.results import LayerResult, VerifyResult
    from lipcert.bounds.verify import verify
    from lipcert.certification.attack import AttackConfig, AttackSummary, Violation
    from lipcert.certification.options import CertifyOptions
    from lipcert.certification.run import attack, certify
    from lipcert.errors import ConfigError, DataError, LipcertError, ModelError
    from lipcert.graph.core import Graph
    from lipcert.model.loader import load_model
    from lipcert.progress import Progress
    from lipcert.report.gates import Gate, report_gates, verify_gates
    from lipcert.report.model import EpsResult, Report

    api = locals()
    globals().update({key: api[key] for key in __all__ if key in api})
    return globals()[name]


def __dir__() -> list[str]:
    return __all__

