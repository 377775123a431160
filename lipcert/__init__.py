"""lipcert: certify the robustness of 1-Lipschitz neural networks from the deployed model file.

The command line is a thin layer over this API::

    import lipcert

    model = lipcert.load_model("sample_models/digits_conv.onnx")
    result = lipcert.verify(model)                      # per-layer bounds, the verdict and its gates
    report = lipcert.certify(model, "sample_models/digits_test.npz", eps="36/255,72/255",
                             attack=lipcert.AttackConfig(steps=20), min_clean_acc=0.9)
    print(result.status, result.passed, report.clean_accuracy, report.eps[0].certified_accuracy, report.passed)
    report.write("lipcert-report")                       # report.json, report.md, samples.csv, plot
    # or certify(..., out="lipcert-report"): checkpointed as it runs (the same call after a crash continues)
    report = lipcert.certify(net, (x_test, y_test), eps="36/255", progress=True)  # a torch.nn.Module and arrays

The names below are imported on first use, so that ``import lipcert`` (and ``lipcert --help``) does not load
torch until the API is called.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from lipcert.version import __version__

if TYPE_CHECKING:
    from lipcert.bounds.results import LayerResult, VerifyResult
    from lipcert.certification.attack import AttackConfig, AttackSummary, EpsAttack, Violation
    from lipcert.certification.options import CertifyOptions
    from lipcert.certification.run import attack, certify
    from lipcert.errors import ConfigError, DataError, LipcertError, ModelError
    from lipcert.graph.core import Graph
    from lipcert.model.loader import load_model
    from lipcert.progress import Progress
    from lipcert.report.compare import Comparison, compare
    from lipcert.report.gates import Gate, report_gates, verify_gates
    from lipcert.report.model import EpsResult, Report
    from lipcert.report.verified import GatedVerifyResult, verify

#: where each name of the API is defined, imported on first use
_HOMES = {
    "LayerResult": "lipcert.bounds.results", "VerifyResult": "lipcert.bounds.results",
    "AttackConfig": "lipcert.certification.attack", "AttackSummary": "lipcert.certification.attack",
    "EpsAttack": "lipcert.certification.attack", "Violation": "lipcert.certification.attack",
    "CertifyOptions": "lipcert.certification.options",
    "attack": "lipcert.certification.run", "certify": "lipcert.certification.run",
    "ConfigError": "lipcert.errors", "DataError": "lipcert.errors", "LipcertError": "lipcert.errors",
    "ModelError": "lipcert.errors", "Graph": "lipcert.graph.core", "load_model": "lipcert.model.loader",
    "Progress": "lipcert.progress", "Gate": "lipcert.report.model", "report_gates": "lipcert.report.gates",
    "verify_gates": "lipcert.report.gates", "EpsResult": "lipcert.report.model", "Report": "lipcert.report.model",
    "GatedVerifyResult": "lipcert.report.verified", "verify": "lipcert.report.verified",
    "Comparison": "lipcert.report.compare", "compare": "lipcert.report.compare",
}

__all__ = [
    "AttackConfig", "AttackSummary", "CertifyOptions", "Comparison", "ConfigError", "DataError", "EpsAttack",
    "EpsResult", "Gate", "GatedVerifyResult", "Graph", "LayerResult", "LipcertError", "ModelError", "Progress",
    "Report", "VerifyResult", "Violation", "attack", "certify", "compare", "load_model", "report_gates", "verify",
    "verify_gates", "__version__",
]


def __getattr__(name: str) -> Any:
    """Import the API (and torch) the first time one of its names is used."""
    if name not in _HOMES:
        raise AttributeError(f"module 'lipcert' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
