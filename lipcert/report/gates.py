"""CI gates: thresholds on a verify result or a report, each one a named pass/fail with its numbers."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from lipcert.bounds.results import PROVEN, VIOLATED, VerifyResult
from lipcert.errors import ConfigError
from lipcert.parse import REQUIRE, choice, fraction_problem
from lipcert.report.model import Gate, Report

__all__ = ["Gate", "baseline_gates", "claim_gate", "empty_gate", "gates_markdown", "junit_xml", "load_baseline",
           "missing_baseline_gate", "report_gates", "verify_gates"]


def verify_gates(result: VerifyResult, *, require: str = "proven", max_lipschitz: float | None = None) -> list[Gate]:
    """The claim's status (``require``: proven, or only not violated) and an optional cap on the bound."""
    try:
        require = choice(require, REQUIRE)
    except ValueError:
        raise ConfigError(f"require must be one of {', '.join(REQUIRE)}, got {require!r}",
                          parameter="require") from None
    passed = result.status == PROVEN if require == "proven" else result.status != VIOLATED
    gates = [Gate(f"lipschitz claim {result.claimed:g} is {require}", passed, result.status, require,
                  "" if passed else f"the claim is {result.status}" + (
                      f"; breaking layers: {', '.join(layer.name for layer in result.breaking_layers)}"
                      if result.breaking_layers else ""))]
    if max_lipschitz is not None:
        ok = result.network_upper <= max_lipschitz
        gates.append(Gate(f"network upper bound <= {max_lipschitz:g}", ok, f"{result.network_upper:.6g}",
                          f"<= {max_lipschitz:g}", "" if ok else "the sound upper bound is above the cap"))
    return gates


def _find_eps(report: Report, eps: float):
    return next((e for e in report.eps if math.isclose(e.eps, eps, rel_tol=1e-9, abs_tol=1e-12)), None)


def _check_fractions(values: list[tuple[str, str, float | None]]) -> None:
    """Every accuracy threshold (setting, as shown, value) is a fraction in [0, 1]; a percentage gets a hint."""
    for name, shown, value in values:
        problem = None if value is None else fraction_problem(value)
        if problem:
            raise ConfigError(f"{name} {shown}: {problem}", parameter=name)


def claim_gate(report: Report) -> Gate:
    """The model's Lipschitz claim (its metadata, or the lipschitz setting) against lipcert's sound upper bound."""
    b = report.bound
    if b.claimed is None:
        raise ConfigError("require_claim: there is no Lipschitz claim to check: the model has no "
                          "lipcert.claimed_lipschitz metadata and no lipschitz was given",
                          parameter=("require_claim", "lipschitz"))
    upper = b.computed_upper / b.normalisation_factor
    return Gate(f"Lipschitz claim {b.claimed:g} ({b.claim_source}) is proven", bool(b.claim_proven),
                f"computed upper bound {upper:.6g}", f"<= {b.claimed:g}",
                "" if b.claim_proven else "lipcert's sound upper bound is above the claim: the certificates "
                                             "cannot rest on it (run lipcert verify to find the layer)")


def empty_gate(report: Report, gate_on: str = "float") -> Gate:
    """Something is certified (by the radius kind ``gate_on``): the bound is finite and some sample is certified at
    a requested radius above 0 (a run that certifies nothing, from a model ending in Softmax or a radius in the
    wrong unit, must not pass CI)."""
    positive = [e for e in report.eps if e.eps > 0]
    best = max(positive, key=lambda e: e.count(gate_on) or 0, default=None)
    if not math.isfinite(report.bound.value):
        passed, measured, why = False, "Lipschitz bound inf", "lipcert could not bound the model's Lipschitz constant"
    elif best is None:
        passed, measured, why = True, "no radius above 0 requested", ""
    else:
        certified = best.count(gate_on) or 0
        passed = certified > 0
        measured = f"{certified} of {report.num_samples} sample(s) at {best.label}"
        why = "no sample is certified at any requested radius above 0"
    return Gate("something is certified", passed, measured, "a finite bound, and 1 sample at a radius above 0",
                "" if passed else f"{why}: the report certifies nothing (see its notes; allow_empty_certificates "
                                  "passes this gate)")


def missing_baseline_gate(path: str) -> Gate:
    """The baseline gate of a run whose baseline file does not exist yet (``missing_baseline`` skip): passed."""
    return Gate("certified accuracy vs baseline", True, f"skipped: no baseline at {path}", "missing_baseline skip",
                "the baseline does not exist yet; copy this run's report.json there to make it the next baseline")


def report_gates(report: Report, *, min_clean_acc: float | None = None,
                 min_certified: Sequence[tuple[str, float, float]] = (), min_mean_radius: float | None = None,
                 max_violations: int = 0,
                 max_lipschitz: float | None = None, baseline: dict | None = None,
                 max_drop: float = 0.0, require_claim: bool | None = None, allow_empty_certificates: bool = False,
                 baseline_missing: str | None = None, gate_on: str = "float") -> list[Gate]:
    """Accuracy thresholds, the attack's soundness check, the regression check against a baseline, the model's
    Lipschitz claim (``require_claim``; by default checked whenever a claim is declared) and, unless
    ``allow_empty_certificates``, that something is certified. ``baseline_missing`` is the path of a baseline
    that does not exist (``missing_baseline`` skip): its gate passes, saying so. The certified-accuracy and
    mean-radius gates read the radius kind ``gate_on`` (float or exact), recorded in ``report.gate_on``."""
    _check_fractions([("min_clean_acc", str(min_clean_acc), min_clean_acc), ("max_drop", str(max_drop), max_drop)]
                     + [("min_certified_acc", f"{label}={acc:g}", acc) for label, _, acc in min_certified])
    if gate_on == "exact" and report.exact_mean_radius is None:
        raise ConfigError("gate_on exact: the report has no exact-arithmetic radii", parameter="gate_on")
    report.gate_on = gate_on
    kind = "" if gate_on == "float" else " (exact)"
    gates: list[Gate] = []
    if require_claim or (require_claim is None and report.bound.claimed is not None):
        gates.append(claim_gate(report))
    if not allow_empty_certificates:
        gates.append(empty_gate(report, gate_on))
    if min_clean_acc is not None:
        ok = report.clean_accuracy >= min_clean_acc
        gates.append(Gate(f"clean accuracy >= {min_clean_acc:g}", ok, f"{report.clean_accuracy:.4f}",
                          f">= {min_clean_acc:g}"))
    for label, eps, acc in min_certified:
        found = _find_eps(report, eps)
        measured = (found.accuracy(gate_on) if found else None) or 0.0
        gates.append(Gate(f"certified accuracy{kind} at {label} >= {acc:g}", measured >= acc, f"{measured:.4f}",
                          f">= {acc:g}"))
    if min_mean_radius is not None:
        chosen = report.radius_mean(gate_on)
        mean = chosen.mean if chosen is not None else 0.0
        gates.append(Gate(f"mean certified radius{kind} >= {min_mean_radius:g}", mean >= min_mean_radius, f"{mean:.4g}",
                          f">= {min_mean_radius:g}"))
    if report.attack is not None:
        n = report.attack.violation_count
        gates.append(Gate(f"attack violations <= {max_violations}", n <= max_violations, str(n),
                          f"<= {max_violations}",
                          "" if n <= max_violations else "the attack broke certified points inside their radius: "
                                                         "the Lipschitz claim or the certificate is wrong"))
        for e in report.eps:
            emp, cert = e.extra.get("empirical robust"), e.accuracy(gate_on)
            if emp is not None and cert is not None:
                gates.append(Gate(f"empirical robust accuracy >= certified{kind} at {e.label}", emp >= cert,
                                  f"{emp:.4f}", f">= {cert:.4f}"))
    if max_lipschitz is not None:
        value = report.bound.value
        gates.append(Gate(f"Lipschitz bound used <= {max_lipschitz:g}", value <= max_lipschitz, f"{value:.6g}",
                          f"<= {max_lipschitz:g}"))
    if baseline is not None:
        gates += baseline_gates(report, baseline, max_drop, gate_on)
    elif baseline_missing is not None:
        gates.append(missing_baseline_gate(baseline_missing))
    return gates


def load_baseline(path: Path, missing: str = "fail") -> dict | None:
    """A previous report.json to compare with; None when it does not exist and ``missing`` is ``skip``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing == "skip":
            return None
        raise ConfigError("no such baseline report (for a first run, before any baseline exists, set "
                          "missing_baseline skip)", source=str(path), parameter="missing_baseline") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"the baseline is not a readable JSON report ({type(exc).__name__})",
                          source=str(path)) from None
    if not isinstance(data, dict) or data.get("schema") != "lipcert.report/1" or not isinstance(data.get("eps"), list):
        raise ConfigError("the baseline is not a lipcert report.json (schema lipcert.report/1)", source=str(path))
    return data


def baseline_gates(report: Report, baseline: dict, max_drop: float, gate_on: str = "float") -> list[Gate]:
    """Certified accuracy (of the radius kind ``gate_on``) at every eps both reports share must not fall by more
    than ``max_drop``."""
    gates = []
    key = "exact_certified_accuracy" if gate_on == "exact" else "certified_accuracy"
    kind = "" if gate_on == "float" else " (exact)"
    for old in baseline["eps"]:
        try:
            eps, old_acc = float(old["eps"]), float(old[key])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"the baseline report has a malformed eps entry, or one without {key}") from None
        new = _find_eps(report, eps)
        accuracy = None if new is None else new.accuracy(gate_on)
        if new is None or accuracy is None:
            continue
        change = accuracy - old_acc
        ok = change >= -max_drop - 1e-12
        gates.append(Gate(f"certified accuracy{kind} at {new.label} vs baseline (max drop {max_drop:g})", ok,
                          f"{accuracy:.4f} (baseline {old_acc:.4f}, change {change:+.4f})",
                          f">= {old_acc - max_drop:.4f}"))
    if not gates:
        raise ConfigError("the baseline report shares no eps with this run")
    return gates


def junit_xml(suite: str, gates: list[Gate], seconds: float = 0.0) -> str:
    """JUnit XML with one test case per gate; failures carry the measured and required values."""
    from xml.etree import ElementTree as ET

    failures = sum(not g.passed for g in gates)
    root = ET.Element("testsuites", name="lipcert", tests=str(len(gates)), failures=str(failures))
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(gates)), failures=str(failures), errors="0",
                       time=f"{seconds:.3f}")
    for g in gates:
        case = ET.SubElement(ts, "testcase", classname=f"lipcert.{suite}", name=g.name)
        if not g.passed:
            fail = ET.SubElement(case, "failure", message=f"measured {g.measured}, required {g.required}")
            fail.text = g.message or f"measured {g.measured}, required {g.required}"
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def gates_markdown(gates: list[Gate]) -> str:
    lines = ["| gate | result | measured | required |", "| --- | --- | --- | --- |"]
    lines += [f"| {g.name} | {'pass' if g.passed else '**FAIL**'} | {g.measured} | {g.required} |" for g in gates]
    return "\n".join(lines) + "\n"
