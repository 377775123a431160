"""``verify`` with its CI gates: what ``lipcert.verify`` returns, as ``lipcert.certify`` returns a report with its."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from lipcert.bounds.results import VerifyResult
from lipcert.bounds.verify import verify as verify_claim
from lipcert.graph.core import Graph
from lipcert.model.loader import as_graph
from lipcert.report.gates import verify_gates
from lipcert.report.model import Gate
from lipcert.report.sanity import output_note

#: how the result names a claim given as ``bound``, and one a config file gave
BOUND_SOURCE, CONFIG_BOUND_SOURCE = "bound", "bound in the config file"


@dataclass
class GatedVerifyResult(VerifyResult):
    """A ``VerifyResult`` and the gates it was checked against (``verify_gates``)."""

    gates: list[Gate] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every gate passes."""
        return all(g.passed for g in self.gates)


def verify(graph: Graph | str | Path | torch.nn.Module, bound: float | None = None, *, require: str = "proven",
           max_lipschitz: float | None = None, bound_in_config: bool = False, example_input: Any = None,
           **settings: Any) -> GatedVerifyResult:
    """Check the model's Lipschitz claim (``bound``, else its metadata claim, else 1) and gate the result.

    ``graph`` is a loaded ``Graph``, a model file, or a ``torch.nn.Module`` exported to ONNX in memory with
    ``example_input`` (one batch of inputs): the exported graph is what is verified (see ``load_model``).
    ``require`` (proven, or only not-violated) and ``max_lipschitz`` are the gates' settings; the other settings
    are those of ``bounds.verify.verify``. ``bound_in_config`` says the bound came from a config file, which the
    result states as its claim's source.

    Example::

        result = lipcert.verify(lipcert.load_model("sample_models/digits_broken.onnx"))
        print(result.status, result.passed, [g.name for g in result.gates if not g.passed])
    """
    model = as_graph(graph, example_input)
    result = verify_claim(model, bound, **settings)
    if (squashed := output_note(model, result.network_upper)) is not None:
        result.notes.append(squashed)
    if bound is not None:
        result.claim_source = CONFIG_BOUND_SOURCE if bound_in_config else BOUND_SOURCE
    gates = verify_gates(result, require=require, max_lipschitz=max_lipschitz)
    return GatedVerifyResult(**{f.name: getattr(result, f.name) for f in fields(result)}, gates=gates)
