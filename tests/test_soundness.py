"""Property-based soundness harness: random small ONNX programs, checked against ground-truth oracles.

hypothesis draws a *program* (``tests/soundness/generator.py``: a sample shape, an opset, weights and a list
of blocks over every registered operator and every pattern, near misses included), builds it with
``onnx.helper``, keeps it when onnxruntime runs it, and hands it to the oracles (``tests/soundness/oracle.py``):

1. every row's upper bound is at least the spectral norm of the Jacobian of its step, run on its own with its
   input injected, and the step does not depend on anything but its declared inputs;
2. every value's bound in ``Propagation.bounds`` bounds the Jacobian of that value w.r.t. the input;
3. the network bound is at least every Jacobian norm and secant ratio found (inside and outside [0, 1], at
   points that open gated branches, by a pair gradient ascent), and ``verify`` never proves a claim below one;
4. every certified radius of ``lipcert.certify`` survives PGD on the exact function and a random search of the
   deployed float32 function (onnxruntime): no confirmed adversarial example is closer.

A model lipcert refuses with a LipcertError counts as refused; any other exception is a failure.

Profiles (``LIPCERT_SOUNDNESS_PROFILE``):

- ``ci`` (default): deterministic (derandomized, no shrinking), one program for every variant of every block
  (about 170) plus 24 random programs; about 50 s on 2 CPU cores (60 s with the regression file)::

      python -m pytest tests/test_soundness.py tests/test_soundness_regressions.py -q

- ``long``: 25 programs per block variant plus 2500 random ones (about 6800 models), random seeds, shrinking
  on, stronger oracles (more points, longer pair ascent, PGD 150 steps x 6 restarts, 512 random directions);
  about 0.9 s per model, 1.5 to 2 hours on 2 cores::

      LIPCERT_SOUNDNESS_PROFILE=long python -m pytest tests/test_soundness.py -q

  Add ``-x`` to stop at the first counterexample; ``LIPCERT_SOUNDNESS_VERBOSE=1`` (with ``-s``) prints every
  program. A failure prints the program and saves its model (``failing_*.onnx`` in the test's tmp folder).

The size-dependent paths: lipcert bounds small operators densely and large ones by their structure, so
``test_block_lowered`` and ``test_random_programs_lowered`` run programs with the thresholds lowered
(``lipcert.bounds.thresholds.override`` with a setting of ``tests/soundness/paths.py``'s ``LOWERED``), which sends
small programs down every structured path under the same oracles (ci: 28 variants around those paths, one setting
each, plus 8 random programs; long: 10 programs per variant of every block and 833 random ones, the setting drawn
per program); ``test_generator_reaches_every_bound_path`` checks that they reach every bound method and every
declared branch.

The terminal summary (tests/conftest.py) prints how many models were generated, refused and checked.
Counterexamples found are kept as named tests in tests/test_soundness_regressions.py.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from lipcert.bounds import thresholds
from lipcert.graph.ops import REGISTRY

from .soundness import oracle
from .soundness.generator import HypothesisDraw, RandomDraw, draw_program, focus_cases
from .soundness.paths import BRANCHES, LOWERED, METHODS, methods_of

PROFILE = os.environ.get("LIPCERT_SOUNDNESS_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"LIPCERT_SOUNDNESS_PROFILE={PROFILE!r}: expected ci or long")
FOCUSED = {"ci": 1, "long": 25}[PROFILE]  # programs per block kind and variant
FOCUSED_LOWERED = {"ci": 1, "long": 10}[PROFILE]  # the same under lowered thresholds
RANDOM = {"ci": 24, "long": 2500}[PROFILE]  # programs of 1-4 random blocks
EFFORT = oracle.CI if PROFILE == "ci" else oracle.LONG
PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if PROFILE == "long" else [])
COMMON = dict(deadline=None, derandomize=PROFILE == "ci", database=None, phases=PHASES, print_blob=PROFILE == "long",
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.filter_too_much, HealthCheck.data_too_large])
VERBOSE = bool(os.environ.get("LIPCERT_SOUNDNESS_VERBOSE"))  # print each program
#: counts for the terminal summary (models generated are counted by the oracle)
CASES = oracle.STATS

torch.set_num_threads(1)


def run_program(data, tmp_path: Path, focus: str | None, variant: str | None = None, max_blocks: int = 4,
                lowered: str | None = None) -> None:
    """Draw a program, keep it if onnxruntime runs it, and check every oracle on it (under the ``lowered``
    thresholds of ``LOWERED`` when given; "draw" draws one of them)."""
    program = draw_program(HypothesisDraw(data, f"{focus}/{variant}"), focus=focus, max_blocks=max_blocks,
                           variant=variant)
    if program.invalid:
        CASES["discarded"] += 1
    assume(program.invalid is None)
    if lowered == "draw":
        lowered = data.draw(st.sampled_from(sorted(LOWERED)), label="thresholds")
    described = program.describe() + (f"; thresholds {lowered} {LOWERED[lowered]}" if lowered else "")
    if VERBOSE:
        print(f"\n[{focus or 'random'}] {described}")
    path = tmp_path / f"{focus or 'random'}.onnx"
    onnx.save(program.model, path)
    seed = program.seed % 1000
    with thresholds.override(**(LOWERED[lowered] if lowered else {})):
        outcome = oracle.check_model(path, effort=EFFORT, seed=seed, backend="onnxruntime" if seed % 3 else "torch")
    if outcome.failures:
        keep = tmp_path / f"failing_{focus or 'random'}_{program.seed}.onnx"
        onnx.save(program.model, keep)
        pytest.fail(f"soundness counterexample ({keep}):\n  program: {described}\n  "
                    + "\n  ".join(outcome.failures), pytrace=False)


@pytest.mark.parametrize("kind,variant", focus_cases(), ids=[f"{k}-{v}" if v else k for k, v in focus_cases()])
def test_block(tmp_path: Path, kind: str, variant: str | None) -> None:
    """Programs built around one block kind in one variant (with an optional block before and after it)."""

    @settings(max_examples=FOCUSED, **COMMON)
    @given(st.data())
    def run(data) -> None:
        run_program(data, tmp_path, kind, variant)

    run()


@pytest.mark.slow
def test_random_programs(tmp_path: Path) -> None:
    """Programs of 1 to 4 blocks drawn from every kind (patterns and broadcasting favoured)."""

    @settings(max_examples=RANDOM, **COMMON)
    @given(st.data())
    def run(data) -> None:
        run_program(data, tmp_path, None)

    run()


# ---------------------------------------------------------------------------------------------- lowered thresholds

#: block variants around the structured paths, each run once in the ci profile under one lowered setting (in turn)
STRUCTURED = [("conv", "pads"), ("conv", "SAME_LOWER"), ("conv_transpose", "pads"), ("conv_transpose", "SAME_UPPER"),
              ("dense", "gemm_tB"), ("matmul_last", "right"), ("batchnorm", None), ("scale", "channel"),
              ("pad", "wrap"), ("pad", "two_wraps"), ("pad", "reflect"), ("wrap_conv", "ok"), ("wrap_conv", "double"),
              ("avgpool", "local"), ("linear_region", "identity_conv"), ("linear_region", "concat_branches"),
              ("linear_region", "two_branches"), ("region_forms", "circular"), ("region_forms", "grouped"),
              ("region_forms", "neg_sub"), ("region_forms", "concat_const"), ("rank_up", "scale"),
              ("rank_up", "broadcast_self"), ("slices", "concat_parts"), ("slices", "sum_parts"), ("sll", "ok"),
              ("sll", "chain"), ("split_residual", "concat"), ("region_whole", "sym_pad_conv"),
              ("region_whole", "centred"), ("region_whole", "tail"), ("sll", "orth_skip"),
              ("sll", "orth_skip_fused"), ("series", "skew"), ("series", "perturbed"), ("series", "cancelled")]
#: (kind, variant, thresholds): ci runs the structured variants, each under one setting; long every variant,
#: drawing the setting per program
LOWERED_CASES = [(k, v, sorted(LOWERED)[i % len(LOWERED)]) for i, (k, v) in enumerate(STRUCTURED)] \
    if PROFILE == "ci" else [(k, v, "draw") for k, v in focus_cases()]


@pytest.mark.parametrize("kind,variant,lowered", LOWERED_CASES,
                         ids=[f"{k}-{v}-{t}" if v else f"{k}-{t}" for k, v, t in LOWERED_CASES])
def test_block_lowered(tmp_path: Path, kind: str, variant: str | None, lowered: str) -> None:
    """Programs around one block variant with the thresholds lowered: small operators take the structured paths
    (DFT, Gram iteration, Schur test, one convolution per region, SLL kernels, chunked evaluation)."""

    @settings(max_examples=FOCUSED_LOWERED, **COMMON)
    @given(st.data())
    def run(data) -> None:
        run_program(data, tmp_path, kind, variant, lowered=lowered)

    run()


@pytest.mark.slow
def test_random_programs_lowered(tmp_path: Path) -> None:
    """Random programs (as ``test_random_programs``) under a lowered threshold setting drawn per program."""

    @settings(max_examples=RANDOM // 3, **COMMON)
    @given(st.data())
    def run(data) -> None:
        run_program(data, tmp_path, None, lowered="draw")

    run()


#: (kind, variant) of the sweep that must reach every path, in the order tried (later ones only if needed)
PATH_SWEEP = [("sll", "ok"), ("sll", "split_b"), ("region_forms", "circular"), ("linear_region", "identity_conv"),
              ("wrap_conv", "ok"), ("pad", "reflect"), ("batchnorm", None), ("scale", "full"), ("dense", "gemm"),
              ("split_residual", "concat"), ("slices", "concat_parts"), ("region_whole", "sym_pad_conv"),
              ("region_whole", "centred"), ("region_whole", "tail")] + STRUCTURED + [("sll", "factored")]


def test_generator_reaches_every_bound_path(tmp_path: Path) -> None:
    """Like ``test_generator_covers_every_registered_operator`` for the size-dependent paths: under the lowered
    thresholds, valid generated programs reach every bound method a row can name and every branch the bounds
    declare, and every branch recorded is declared (stable names)."""
    from lipcert.bounds.propagate import propagate
    from lipcert.model.loader import load_model

    methods: set[str] = set()
    before = Counter(thresholds.TAKEN)
    for k, (kind, variant) in enumerate(PATH_SWEEP):
        for seed in range(3):
            taken = set(thresholds.TAKEN - before)
            if methods >= set(METHODS) and taken >= set(BRANCHES):
                break
            program = draw_program(RandomDraw(500 * k + seed), focus=kind, variant=variant)
            if program.invalid:
                continue
            path = tmp_path / "model.onnx"
            onnx.save(program.model, path)
            try:
                graph = load_model(path)
            except Exception:  # noqa: BLE001 - refusals are the property tests' business
                continue
            for name in sorted(LOWERED):
                with thresholds.override(**LOWERED[name]):
                    for row in propagate(graph, max_iter=50).layers:
                        methods |= methods_of(row.upper_method)
    taken = set(thresholds.TAKEN - before)
    assert not sorted(set(METHODS) - methods), f"bound methods never reached: {sorted(set(METHODS) - methods)}"
    assert not sorted(set(BRANCHES) - taken), f"branches never taken: {sorted(set(BRANCHES) - taken)}"
    assert taken <= set(BRANCHES), f"branches recorded but not declared: {sorted(taken - set(BRANCHES))}"


# ---------------------------------------------------------------------------------------------- coverage


def sweep(seeds: int = 3) -> tuple[set[str], dict[str, int]]:
    """Operators written by valid programs of a deterministic sweep over every block variant, and the number of
    valid programs per block kind."""
    ops: set[str] = set()
    valid: dict[str, int] = {}
    for k, (kind, variant) in enumerate(focus_cases()):
        valid.setdefault(kind, 0)
        for seed in range(seeds):
            program = draw_program(RandomDraw(100 * k + seed), focus=kind, variant=variant)
            if program.invalid is None:
                ops.update(program.ops)
                valid[kind] += 1
    return ops, valid


def test_generator_covers_every_registered_operator() -> None:
    """Like tests/test_ops_conformance.py: every operator in lipcert's registry appears in valid programs, and
    every block kind yields valid programs."""
    ops, valid = sweep()
    missing = sorted(set(REGISTRY) - ops)
    assert not missing, f"the soundness generator never writes {missing}: add them to a block"
    never = sorted(k for k, n in valid.items() if n == 0)
    assert not never, f"block kinds that never gave a valid model: {never}"


def test_generator_covers_every_pattern(tmp_path: Path) -> None:
    """Each pattern of lipcert/patterns.py is recognised in some generated program (so the oracles see it)."""
    from lipcert.bounds.propagate import propagate
    from lipcert.model.loader import load_model

    wanted = {"sll": ("SLL",), "groupsort": ("GroupSort",),
              "maxmin": ("MaxMin (Split", "MaxMin pairs", "selected coordinates"),
              "relu_neg": ("Relu(x), Relu(-x)",), "l2pool": ("L2-norm pool",), "wrap_conv": ("wrap", "circular"),
              "l2norm": ("L2-norm combination",), "linear_region": ("linear region",),
              "split_residual": ("disjoint parts",), "maxmin_indexed": ("selected coordinates",),
              "householder": ("HouseHolder",), "householder2": ("HouseHolder by angle",)}
    found: dict[str, bool] = {}
    for kind, label in wanted.items():
        found[kind] = False
        for seed in range(40):
            variant = {"maxmin": "split", "sll": "ok", "groupsort": "ok", "relu_neg": "ok", "wrap_conv": "ok",
                       "l2norm": "ok", "linear_region": "identity_conv", "split_residual": "concat",
                       "maxmin_indexed": "gather", "householder": "ok", "householder2": "ok"}.get(kind)
            program = draw_program(RandomDraw(77 * seed + 5), focus=kind, variant=variant)
            if program.invalid:
                continue
            path = tmp_path / f"{kind}.onnx"
            onnx.save(program.model, path)
            try:
                prop = propagate(load_model(path), lower_bounds=False)
            except Exception:  # noqa: BLE001 - refusals and crashes are the property tests' business
                continue
            labels = [s.label for s in prop.steps] + [n for s in prop.steps for n in s.nodes]
            labels += [getattr(layer, "op", "") for layer in prop.layers]
            labels += [c["rule"] for c in prop.combinations]
            if any(word in text for text in labels for word in label):
                found[kind] = True
                break
    assert all(found.values()), f"patterns never recognised in generated programs: " \
                                f"{[k for k, v in found.items() if not v]}"
