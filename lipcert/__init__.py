"""lipcert: certify the robustness of 1-Lipschitz neural networks from the deployed model file.

The command line is a thin layer over this API::

    import lipcert

    model = lipcert.load_model("sample_models/digits_conv.onnx")
    result = lipcert.verify(model)                      # VerifyResult: per-layer bounds and the verdict
    report = lipcert.certify(model, "sample_models/digits_test.npz", eps="36/255,72/255",
                             attack=lipcert.AttackConfig(steps=20))
    print(result.status, report.clean_accuracy, report.eps[0].certified_accuracy)
    report.write("lipcert-report")                       # report.json, report.md, samples.csv, plot

The names below are imported on first use, so that ``import lipcert`` (and ``lipcert --help``) does not load
torch until the API is called.
"""

from __future__ import annotations

import sys
import types
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "AttackConfig", "AttackSummary", "ConfigError", "DataError", "EpsResult", "Gate", "Graph", "LayerResult",
    "LipcertError", "ModelError", "Progress", "Report", "VerifyResult", "Violation", "attack", "certify",
    "load_model", "report_gates", "verify", "verify_gates", "__version__",
]


def __getattr__(name: str) -> Any:
    """Import the API (and torch) the first time one of its names is used."""
    if name not in __all__:
        raise AttributeError(f"module 'lipcert' has no attribute {name!r}")
    from .attack import AttackConfig, AttackSummary, Violation
    from .errors import ConfigError, DataError, LipcertError, ModelError
    from .gates import Gate, report_gates, verify_gates
    from .graph import Graph
    from .loader import load_model
    from .pipeline import Progress, attack, certify
    from .report import EpsResult, Report
    from .verify import LayerResult, VerifyResult, verify

    api = locals()
    globals().update({key: api[key] for key in __all__ if key in api})
    return globals()[name]


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """``lipcert.attack``, ``lipcert.certify`` and ``lipcert.verify`` name API functions, not the submodules of the
    same names: importing such a submodule leaves the package's attribute alone (the submodule stays in
    ``sys.modules``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("attack", "certify", "verify") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
