"""lipcert.report.gates on hand-built verify results and reports: every gate at its threshold, baselines, JUnit XML."""

from __future__ import annotations

import json
import math
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch

from lipcert.bounds.results import PROVEN, SCHEMA, UNPROVEN, VIOLATED, LayerResult, VerifyResult
from lipcert.errors import ConfigError
from lipcert.report.gates import (
    baseline_gates,
    gates_markdown,
    junit_xml,
    load_baseline,
    report_gates,
    verify_gates,
)
from lipcert.report.model import (
    AttackSection,
    BoundSection,
    DatasetSection,
    EpsResult,
    Histogram,
    MeanRadius,
    ModelSection,
    Report,
    SampleTable,
    TimingsSection,
)

from .conftest import one_line


def layer(name: str, status: str) -> LayerResult:
    return LayerResult(name=name, op="Conv", nodes=[name], in_shape=[1, 4, 4], out_shape=[2, 4, 4], lower=1.2,
                       lower_method="power iteration", lower_iterations=10, upper=1.3, upper_method="svd",
                       exact=True, gap=0.1, status=status)


def verify_result(status: str, upper: float = 1.0, layers: list[LayerResult] | None = None) -> VerifyResult:
    return VerifyResult(schema=SCHEMA, lipcert_version="0", model="m.onnx", claimed=1.0, claim_source="default",
                        tol=1e-5, device="cpu", seed=0, layers=layers or [], network_upper=upper, network_lower=0.5,
                        network_lower_method="pairs", empirical_budget=None, network_lower_steps=0,
                        network_lower_stopped=False, status=status, top_contributors=[], no_rule=[],
                        combinations=[])


def report(clean: float = 0.9, certified: dict[float, float] | None = None, *, value: float = 1.0,
           claimed: float | None = None, proven: bool = True, violations: int | None = None,
           empirical: dict[float, float] | None = None) -> Report:
    """A report of 10 samples with the given clean and certified accuracies (by eps), bound and attack result."""
    certified = {0.0: clean, 0.5: 0.6} if certified is None else certified
    eps = [EpsResult(e, f"{e:g}", acc, round(acc * 10), {"empirical robust": empirical[e]} if empirical else {})
           for e, acc in certified.items()]
    bound = BoundSection(value=value, method="computed", computed_upper=value, declared=None, normalisation_factor=1.0,
                         rule="sqrt(2) margin", error_base=0.0, error_slope=0.0, claimed=claimed,
                         claim_source="model metadata", claim_proven=proven)
    attack = None if violations is None else AttackSection(
        "PGD-L2", 10, 1, "alpha", 0, [], [], "", violation_count=violations, consistent=not violations,
        median_gap=None, gap_histogram=Histogram([], []), curve=[])
    zeros = torch.zeros(10)
    return Report(model=ModelSection("m.onnx", "", "onnx"),
                  dataset=DatasetSection("d.npz", "npz", "", 10, "NC", "float 0-1", 2, [16]), device="cpu",
                  backend="torch", batch_size=10, norm="l2", input_dim=16, bound=bound, clean_accuracy=clean,
                  mean_radius=MeanRadius(0.25, 0.2), eps=eps,
                  curve=[], timings=TimingsSection(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 1), notes=[],
                  samples=SampleTable(zeros.long(), zeros.long(), zeros, zeros), attack=attack)


def gates_of(rep: Report, **settings) -> list:
    """The gates a test asks for, without the empty-table gate (tested on its own below)."""
    return report_gates(rep, allow_empty_certificates=True, **settings)


def by_name(gates) -> dict[str, bool]:
    return {g.name: g.passed for g in gates}


# ------------------------------------------------------------------------------------------ verify gates


@pytest.mark.parametrize("status, require, passed", [
    (PROVEN, "proven", True), (UNPROVEN, "proven", False), (VIOLATED, "proven", False),
    (PROVEN, "not-violated", True), (UNPROVEN, "not-violated", True), (VIOLATED, "not-violated", False)])
def test_verify_claim_gate_by_status_and_requirement(status: str, require: str, passed: bool) -> None:
    (gate,) = verify_gates(verify_result(status), require=require)
    assert gate.name == f"lipschitz claim 1 is {require}"
    assert (gate.passed, gate.measured, gate.required) == (passed, status, require)
    assert (gate.message == "") == passed


def test_failed_verify_claim_names_the_breaking_layers() -> None:
    result = verify_result(VIOLATED, layers=[layer("conv_a", VIOLATED), layer("conv_b", PROVEN),
                                             layer("conv_c", VIOLATED)])
    (gate,) = verify_gates(result)
    assert gate.message == "the claim is violated; breaking layers: conv_a, conv_c"


def test_verify_max_lipschitz_passes_at_the_cap_and_fails_above() -> None:
    at_cap = verify_gates(verify_result(PROVEN, upper=1.5), max_lipschitz=1.5)
    assert [g.passed for g in at_cap] == [True, True] and at_cap[1].name == "network upper bound <= 1.5"
    above = verify_gates(verify_result(PROVEN, upper=1.5000001), max_lipschitz=1.5)[1]
    assert not above.passed and above.measured == "1.5" and above.required == "<= 1.5"
    assert above.message == "the sound upper bound is above the cap"


def test_verify_unknown_requirement_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="require must be one of proven, not-violated, got 'maybe'"):
        verify_gates(verify_result(PROVEN), require="maybe")


# ------------------------------------------------------------------------------------------ report gates


def test_no_thresholds_no_gates() -> None:
    assert gates_of(report()) == []


def test_min_clean_accuracy_at_its_threshold() -> None:
    assert by_name(gates_of(report(clean=0.9), min_clean_acc=0.9)) == {"clean accuracy >= 0.9": True}
    (gate,) = gates_of(report(clean=0.8999), min_clean_acc=0.9)
    assert not gate.passed and gate.measured == "0.8999" and gate.required == ">= 0.9"


def test_min_mean_radius_at_its_threshold() -> None:
    assert by_name(gates_of(report(), min_mean_radius=0.25)) == {"mean certified radius >= 0.25": True}
    (gate,) = gates_of(report(), min_mean_radius=0.2501)
    assert not gate.passed and gate.measured == "0.25" and gate.required == ">= 0.2501"


def test_min_certified_accuracy_at_a_radius() -> None:
    gates = gates_of(report(certified={0.0: 0.9, 0.5: 0.6, 1.0: 0.3}),
                         min_certified=[("0.5", 0.5, 0.6), ("1", 1.0, 0.31), ("2", 2.0, 0.0), ("3", 3.0, 0.1)])
    assert by_name(gates) == {"certified accuracy at 0.5 >= 0.6": True, "certified accuracy at 1 >= 0.31": False,
                              "certified accuracy at 2 >= 0": True, "certified accuracy at 3 >= 0.1": False}
    assert gates[3].measured == "0.0000"  # a radius the report did not certify counts as 0


def test_attack_violations_and_empirical_robust_accuracy() -> None:
    """Attack gates appear whenever the report has an attack result, with the default of no violations."""
    certified, empirical = {0.0: 0.9, 0.5: 0.6}, {0.0: 0.9, 0.5: 0.59}
    ok = gates_of(report(certified=certified, violations=0, empirical={0.0: 0.9, 0.5: 0.6}))
    assert by_name(ok) == {"attack violations <= 0": True, "empirical robust accuracy >= certified at 0": True,
                           "empirical robust accuracy >= certified at 0.5": True}
    broken = gates_of(report(certified=certified, violations=2, empirical=empirical), max_violations=1)
    assert by_name(broken) == {"attack violations <= 1": False, "empirical robust accuracy >= certified at 0": True,
                               "empirical robust accuracy >= certified at 0.5": False}
    assert "the attack broke certified points" in broken[0].message
    assert by_name(gates_of(report(violations=2), max_violations=2)) == {"attack violations <= 2": True}


def test_max_lipschitz_on_the_bound_used() -> None:
    assert by_name(gates_of(report(value=2.0), max_lipschitz=2.0)) == {"Lipschitz bound used <= 2": True}
    assert by_name(gates_of(report(value=2.01), max_lipschitz=2.0)) == {"Lipschitz bound used <= 2": False}


@pytest.mark.parametrize("require_claim, claimed, proven, expected", [
    (None, None, True, {}),
    (None, 1.0, True, {"Lipschitz claim 1 (model metadata) is proven": True}),
    (None, 1.0, False, {"Lipschitz claim 1 (model metadata) is proven": False}),
    (True, 2.0, False, {"Lipschitz claim 2 (model metadata) is proven": False}),
    (False, 1.0, False, {}),
])
def test_claim_gate(require_claim: bool | None, claimed: float | None, proven: bool, expected: dict) -> None:
    """By default the claim is checked whenever one is declared; ``require_claim=False`` skips it."""
    assert by_name(gates_of(report(claimed=claimed, proven=proven), require_claim=require_claim)) == expected


def test_required_claim_without_a_claim_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="there is no Lipschitz claim to check") as info:
        gates_of(report(claimed=None), require_claim=True)
    one_line(str(info.value))


@pytest.mark.parametrize("kwargs, needle", [
    ({"min_clean_acc": 90.0}, "min_clean_acc 90.0: expected a fraction between 0 and 1; 90 looks like a "
                              "percentage: write 0.9"),
    ({"min_clean_acc": -0.1}, "min_clean_acc -0.1: expected a fraction between 0 and 1"),
    ({"max_drop": 2.0}, "max_drop 2.0: expected a fraction"),
    ({"min_certified": [("36/255", 36 / 255, 1.5)]}, "min_certified_acc 36/255=1.5: expected a fraction"),
])
def test_thresholds_outside_0_1_are_config_errors(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        gates_of(report(), **kwargs)
    assert needle in one_line(str(info.value))


# ------------------------------------------------------------------------------------------ an empty table


@pytest.mark.parametrize("certified, value, passed, measured", [
    ({0.0: 0.9, 0.5: 0.1}, 1.0, True, "1 of 10 sample(s) at 0.5"),  # one sample is enough
    ({0.0: 0.9, 0.5: 0.0, 1.0: 0.0}, 1.0, False, "0 of 10 sample(s) at 0.5"),  # radius 0 does not count
    ({0.0: 0.9}, 1.0, True, "no radius above 0 requested"),
    ({0.0: 0.9, 0.5: 0.6}, math.inf, False, "Lipschitz bound inf"),  # an infinite bound fails whatever the table
])
def test_a_report_that_certifies_nothing_fails_unless_allowed(certified: dict[float, float], value: float,
                                                              passed: bool, measured: str) -> None:
    rep = report(certified=certified, value=value)
    (gate,) = [g for g in report_gates(rep) if g.name == "something is certified"]
    assert (gate.passed, gate.measured) == (passed, measured)
    assert passed or "allow_empty_certificates" in gate.message
    assert report_gates(rep, allow_empty_certificates=True) == []


# ------------------------------------------------------------------------------------------ baselines


def baseline(accuracies: dict[float, float]) -> dict:
    """A report.json document with these certified accuracies by eps."""
    return {"schema": "lipcert.report/1", "eps": [{"eps": e, "certified_accuracy": a} for e, a in accuracies.items()]}


def test_baseline_max_drop_at_its_threshold() -> None:
    """Each eps both reports share is compared; an eps only the baseline has is skipped."""
    now = report(certified={0.0: 0.9, 0.5: 0.6})
    gates = gates_of(now, baseline=baseline({0.0: 0.95, 0.5: 0.6, 1.0: 0.5}), max_drop=0.05)
    assert by_name(gates) == {"certified accuracy at 0 vs baseline (max drop 0.05)": True,
                              "certified accuracy at 0.5 vs baseline (max drop 0.05)": True}
    assert gates[0].measured == "0.9000 (baseline 0.9500, change -0.0500)" and gates[0].required == ">= 0.9000"
    (gate,) = baseline_gates(now, baseline({0.5: 0.9}), max_drop=0.3)
    assert gate.passed  # 0.6 - 0.9 is -0.30000000000000004 in floats: a drop of exactly max_drop passes
    (gate,) = baseline_gates(now, baseline({0.5: 0.62}), max_drop=0.01)
    assert not gate.passed and gate.measured == "0.6000 (baseline 0.6200, change -0.0200)"
    (gate,) = baseline_gates(now, baseline({0.5: 0.61}), max_drop=0.0)
    assert not gate.passed  # the default: no drop at all
    (gate,) = baseline_gates(now, baseline({0.5: 0.4}), max_drop=0.0)
    assert gate.passed and gate.measured.endswith("change +0.2000)")


@pytest.mark.parametrize("document, needle", [
    (baseline({2.0: 0.5}), "the baseline report shares no eps with this run"),
    ({"schema": "lipcert.report/1", "eps": [{"eps": 0.5}]}, "the baseline report has a malformed eps entry"),
    ({"schema": "lipcert.report/1", "eps": [{"eps": "wide", "certified_accuracy": 0.5}]}, "malformed eps entry"),
])
def test_baseline_that_cannot_be_compared_is_a_config_error(document: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        gates_of(report(), baseline=document)
    assert needle in one_line(str(info.value))


def test_load_baseline_reads_a_report(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(baseline({0.5: 0.6})))
    assert load_baseline(path) == baseline({0.5: 0.6})


def test_a_missing_baseline_fails_naming_the_setting_unless_skipped(tmp_path: Path) -> None:
    path = tmp_path / "baseline.json"
    with pytest.raises(ConfigError) as info:
        load_baseline(path)
    assert str(info.value).startswith(f"{path}: no such baseline report") and "missing_baseline skip" in str(info.value)
    assert info.value.parameter == ("missing_baseline",)
    assert load_baseline(path, missing="skip") is None
    (gate,) = gates_of(report(), baseline_missing=str(path))
    assert gate.passed and gate.measured == f"skipped: no baseline at {path}" and "report.json" in gate.message


@pytest.mark.parametrize("content, needle", [
    (None, "no such baseline report (for a first run, before any baseline exists, set missing_baseline skip)"),
    ("{not json", "the baseline is not a readable JSON report (JSONDecodeError)"),
    (b"\xff\xfe\x00", "the baseline is not a readable JSON report (UnicodeDecodeError)"),
    ("[1, 2]", "the baseline is not a lipcert report.json (schema lipcert.report/1)"),
    (json.dumps({"schema": "lipcert.verify/1", "eps": []}), "the baseline is not a lipcert report.json (schema "
                                                             "lipcert.report/1)"),
    (json.dumps({"schema": "lipcert.report/1", "eps": {"0.5": 0.6}}), "the baseline is not a lipcert report.json "
                                                                      "(schema lipcert.report/1)"),
], ids=["missing", "not json", "not utf-8", "a list", "verify schema", "eps not a list"])
def test_load_baseline_errors_name_the_file_on_one_line(tmp_path: Path, content: str | bytes | None,
                                                         needle: str) -> None:
    path = tmp_path / "old" / "report.json"
    if content is not None:
        path.parent.mkdir()
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as info:
        load_baseline(path)
    assert one_line(str(info.value)) == f"{path}: {needle}"


# ------------------------------------------------------------------------------------------ JUnit XML and Markdown


def test_junit_xml_has_one_case_per_gate_and_the_failures() -> None:
    gates = gates_of(report(clean=0.8, certified={0.0: 0.8, 0.5: 0.6}), min_clean_acc=0.9,
                         min_certified=[("0.5", 0.5, 0.5)], max_lipschitz=0.5)
    root = ElementTree.fromstring(junit_xml("report", gates, seconds=1.25))
    assert root.tag == "testsuites" and (root.get("tests"), root.get("failures")) == ("3", "2")
    (suite,) = root.findall("testsuite")
    assert (suite.get("name"), suite.get("tests"), suite.get("failures"), suite.get("time")) == \
        ("report", "3", "2", "1.250")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [g.name for g in gates]
    assert {c.get("classname") for c in cases} == {"lipcert.report"}
    failures = {c.get("name"): c.find("failure") for c in cases}
    assert failures["certified accuracy at 0.5 >= 0.5"] is None
    clean = failures["clean accuracy >= 0.9"]
    assert clean.get("message") == "measured 0.8000, required >= 0.9" and clean.text == clean.get("message")
    cap = failures["Lipschitz bound used <= 0.5"]
    assert cap.get("message") == "measured 1, required <= 0.5"


def test_junit_xml_failure_text_is_the_gate_message() -> None:
    gates = verify_gates(verify_result(VIOLATED, layers=[layer("conv_a", VIOLATED)]))
    root = ElementTree.fromstring(junit_xml("verify", gates))
    failure = root.find("testsuite/testcase/failure")
    assert failure.get("message") == "measured violated, required proven"
    assert failure.text == "the claim is violated; breaking layers: conv_a"


def test_junit_xml_with_no_gates_is_an_empty_passing_suite() -> None:
    root = ElementTree.fromstring(junit_xml("verify", []))
    assert (root.get("tests"), root.get("failures")) == ("0", "0") and root.find("testsuite/testcase") is None


def test_gates_markdown_marks_failures() -> None:
    gates = gates_of(report(clean=0.8), min_clean_acc=0.9, max_lipschitz=1.0)
    assert gates_markdown(gates).splitlines()[2:] == ["| clean accuracy >= 0.9 | **FAIL** | 0.8000 | >= 0.9 |",
                                                     "| Lipschitz bound used <= 1 | pass | 1 | <= 1 |"]
