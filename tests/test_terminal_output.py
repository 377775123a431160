"""What a person reads: the verify table at 80 columns, live one-line progress, inference throughput, report.md's
jargon explained, and the plot's red "claim not proven"."""

from __future__ import annotations

import dataclasses
import io
import re
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from .conftest import SAMPLES

DENSE = str(SAMPLES / "digits_dense.onnx")
DATA = SAMPLES / "digits_test.npz"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 60 digits: enough for an attack to break points, fast enough for a unit test."""
    data = np.load(DATA)
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, x=data["x"][:60], y=data["y"][:60])
    return path


@pytest.fixture(scope="module")
def attacked(small_data: Path):
    from lipcert import AttackConfig, certify, load_model

    return certify(load_model(DENSE), small_data, "36/255,72/255", attack=AttackConfig(steps=2, restarts=1))


@pytest.fixture(scope="module")
def unproven(small_data: Path):
    """A claim lipcert cannot prove: 0.5 declared, lipcert's sound bound is 1."""
    from lipcert import certify, load_model

    return certify(load_model(DENSE), small_data, "36/255", lipschitz=0.5, attack=False)


# ---------------------------------------------------------------- the verify table


def _node_cells(text: str) -> list[str]:
    """Each table row's node cell, its lines joined (a row starts where the lower/upper cells have text)."""
    cells: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        parts = [p.strip() for p in line.split("│")[1:-1]]
        if parts[3] or parts[4] or not cells:
            cells.append([])
        cells[-1].append(parts[0])
    return ["".join(c) for c in cells]


@pytest.fixture(scope="module")
def verified():
    from lipcert import load_model
    from lipcert.report.verified import verify

    return verify(load_model(DENSE), empirical_budget=0.2)


def test_verify_table_at_80_columns_breaks_names_between_their_parts(verified) -> None:
    from lipcert.report.verify_render import render_verify

    long = [f"/encoder/block_{i}/attention/output_projection/MatMul_{i}" for i in range(len(verified.layers))]
    for names in ([layer.name for layer in verified.layers], long):
        result = dataclasses.replace(verified, layers=[dataclasses.replace(layer, name=name) for layer, name
                                                       in zip(verified.layers, names, strict=True)])
        out = Console(file=io.StringIO(), width=80, no_color=True)
        render_verify(result, out)
        text = out.file.getvalue()
        assert max(map(len, text.splitlines())) <= 80, text
        assert _node_cells(text) == names, text  # every name whole: its lines are its parts, nothing cut
        assert "…" not in text
    assert "│ /encoder " in text and "│ /block_0 " in text  # broken before "/", not inside a word


def test_names_wider_than_the_column_break_at_separators_or_lose_their_middle() -> None:
    from lipcert.report.verify_render import wrap_name

    assert wrap_name("/conv1/Conv", 8) == ["/conv1", "/Conv"]
    assert wrap_name("/conv1/Conv", 11) == ["/conv1/Conv"]
    assert wrap_name("onnx::Gemm_12", 9) == ["onnx::", "Gemm_12"]  # "::" is never split
    assert wrap_name("GroupSort2 (ReduceMax/ReduceMin/Concat)", 12) == ["GroupSort2", "(ReduceMax", "/ReduceMin",
                                                                        "/Concat)"]
    # a part wider than the column keeps both ends: layers differing at the end stay apart
    assert wrap_name("/AveragePool", 9) == ["/Ave…Pool"]
    assert wrap_name("layer_without_separators_in_it_1", 6) == ["layer_", "wit…t_", "sep…s_", "in_it_", "1"]
    for name in ("/a/b", "x" * 30, "/encoder/block_12/attention/output_projection/MatMul"):
        for width in range(1, 20):
            assert all(len(line) <= width for line in wrap_name(name, width))


# ---------------------------------------------------------------- progress


def _rows(bars, width: int) -> list[str]:
    out = Console(file=io.StringIO(), width=width, force_terminal=True)
    out.print(bars.bars.make_tasks_table(bars.bars.tasks))
    return ANSI.sub("", out.file.getvalue()).splitlines()


def test_progress_rows_stay_on_one_line_and_the_time_left_counts_down() -> None:
    from lipcert.cli.progress import BarProgress

    bars = BarProgress(Console(file=io.StringIO(), force_terminal=True, width=80))
    try:
        bars.start("computing the Lipschitz bound")
        bars.end("computing the Lipschitz bound")
        bars.start("empirical search: Jacobian power iteration", 200, unit="iterations")
        bars.start("attack", 54000, 1920)
        for _ in range(3):
            bars.advance("empirical search: Jacobian power iteration", 10)
            bars.advance("attack", 700)
            time.sleep(0.1)
        for width in (60, 80, 120):
            rows = _rows(bars, width)
            assert len(rows) == 3, rows  # one line per phase: nothing wrapped onto a second line
            assert all(len(r) <= width for r in rows)
            assert "4020/54000 samples" in rows[2] and re.search(r"\d+/s ", rows[2]) and rows[2].endswith("left")
        first = re.search(r"([0-9.]+) s left", _rows(bars, 80)[2])
        time.sleep(1.2)  # no advance meanwhile: the estimate still moves
        second = re.search(r"([0-9.]+) s left", _rows(bars, 80)[2])
        assert first and second and float(second[1]) <= float(first[1]) - 1
        assert "computing the Lipschitz bound" in _rows(bars, 120)[0]  # room enough: the whole name
    finally:
        bars.close()


# ---------------------------------------------------------------- throughput and report.md


def test_throughput_is_inference_over_inference_time(attacked) -> None:
    from lipcert.report.render import render_terminal, speed_text

    t = attacked.timings
    text = speed_text(attacked)
    shown = int(re.search(r"inference ([\d,]+) samples/s", text)[1].replace(",", ""))
    assert shown == round(60 / t.inference_seconds)  # samples over the seconds of inference, not of the run
    assert shown > 10 * 60 / t.total_seconds
    assert f"the whole run {t.total_seconds:.1f} s" in text
    out = Console(file=io.StringIO(), width=200, no_color=True)
    render_terminal(attacked, out)
    assert text in out.file.getvalue() and "over the whole run" not in out.file.getvalue()
    assert f"Timing: {text}." in attacked.to_markdown()


def test_report_markdown_explains_its_jargon(attacked) -> None:
    from lipcert.certification.radii import BINARY_RULE, PER_PAIR_RULE, SQRT2_RULE
    from lipcert.report.render import RULE_MEANING

    for rule in (SQRT2_RULE, PER_PAIR_RULE, BINARY_RULE):  # every rule has its one line
        assert sum(rule.startswith(start) for start in RULE_MEANING) == 1, rule

    markdown = attacked.to_markdown()
    assert attacked.bound.rule == PER_PAIR_RULE and attacked.attack.median_gap is not None
    lines = markdown.splitlines()
    for term in ("per-pair rule:", "Empirical robust accuracy:", "Median gap:", "`attack_radius = inf` means"):
        explained = [line for line in lines if term in line]
        assert len(explained) == 1, term  # once, in one line, where the term appears
    rule = lines.index(next(line for line in lines if line.startswith("- Certificate rule: per-pair")))
    assert "per-pair rule:" in lines[rule + 1]
    gap = lines.index(next(line for line in lines if line.startswith("- Median gap")))
    assert "Median gap:" in lines[gap + 1]


# ---------------------------------------------------------------- the plot


def _red_texts(fig) -> list[str]:
    from matplotlib.colors import to_rgba

    texts = [t for ax in fig.axes for t in ax.texts] + list(fig.texts)
    return [t.get_text() for t in texts if to_rgba(t.get_color()) == to_rgba("red")]


def test_plot_says_claim_not_proven_in_red(unproven, attacked) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    from lipcert.report.render import figure

    assert unproven.bound.claim_proven is False and not unproven.passed
    fig = figure(unproven)
    try:
        red = _red_texts(fig)
        assert len(red) == 1 and red[0].startswith("claim not proven: sound bound 1 > claim 0.5"), red
        ax = fig.axes[0]
        assert all(to_rgba(s.get_edgecolor()) == to_rgba("red") for s in ax.spines.values())
    finally:
        plt.close(fig)
    fig = figure(attacked)  # proven: no red
    try:
        assert _red_texts(fig) == [] and not any("not proven" in t.get_text() for t in fig.axes[0].texts)
    finally:
        plt.close(fig)
    # no finite bound at all (an operator without a rule) also says so
    bound = dataclasses.replace(attacked.bound, computed_upper=float("inf"), value=float("inf"))
    fig = figure(dataclasses.replace(attacked, bound=bound))
    try:
        assert _red_texts(fig) == ["claim not proven: no sound Lipschitz bound (an operator has no rule)"]
    finally:
        plt.close(fig)
