"""lipcert: certify the robustness of 1-Lipschitz neural networks from the deployed model file.

The command line is a thin layer over this API::

    import lipcert

    model = lipcert.load_model("sample_models/digits_conv.onnx")
    result = lipcert.verify(model)                      # VerifyResult: per-layer bounds and the verdict
    report = lipcert.certify(model, "sample_models/digits_test.npz", eps="36/255,72/255",
                             attack=lipcert.AttackConfig(steps=20))
    print(result.status, report.clean_accuracy, report.eps[0].certified_accuracy)
    report.write("lipcert-report")                       # report.json, report.md, samples.csv, plot
"""

__version__ = "0.1.0"

from .attack import AttackConfig, AttackSummary, Violation  # noqa: E402
from .errors import ConfigError, DataError, LipcertError, ModelError  # noqa: E402
from .gates import Gate, report_gates, verify_gates  # noqa: E402
from .graph import Graph  # noqa: E402
from .loader import load_model  # noqa: E402
from .pipeline import attack, certify  # noqa: E402
from .report import EpsResult, Report  # noqa: E402
from .verify import LayerResult, VerifyResult, verify  # noqa: E402

__all__ = [
    "AttackConfig", "AttackSummary", "ConfigError", "DataError", "EpsResult", "Gate", "Graph", "LayerResult",
    "LipcertError", "ModelError", "Report", "VerifyResult", "Violation", "attack", "certify", "load_model",
    "report_gates", "verify", "verify_gates", "__version__",
]
