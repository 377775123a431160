"""``lipcert compare``: several reports side by side, their radii lined up (or named when not shared), refusals of
reports that do not compare, and every output file."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import matplotlib.image
import pytest

from lipcert.errors import ConfigError
from lipcert.report.compare import compare, radar_axes, table

from .conftest import SAMPLES, one_line, run_main

DIGITS = SAMPLES / "digits_test.npz"


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Report folders: digits_dense and digits_conv at 36/255 and 72/255, and digits_dense at 36/255 and 0.5."""
    from lipcert.cli.app import main

    runs = {"dense": ("digits_dense.onnx", "36/255,72/255"), "conv": ("digits_conv.onnx", "36/255,72/255"),
            "dense_half": ("digits_dense.onnx", "36/255,0.5")}
    folders = {}
    for name, (model, eps) in runs.items():
        out = tmp_path_factory.mktemp(name) / name
        code = main(["report", str(SAMPLES / model), "--data", str(DIGITS), "--out", str(out), "--no-attack",
                     "--eps", eps, "--quiet"])
        assert code == 0
        folders[name] = out
    return folders


def own_means(folder: Path) -> tuple[float, float]:
    """Mean and signed mean radius computed here from samples.csv."""
    with open(folder / "samples.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    right = [r["label"] == r["prediction"] for r in rows]
    radii = [float(r["radius"]) for r in rows]
    mean = sum(r for r, ok in zip(radii, right) if ok) / len(rows)
    signed = sum(r if ok else -r for r, ok in zip(radii, right)) / len(rows)
    return mean, signed


def test_two_reports_side_by_side(reports: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = compare([reports["dense"], reports["conv"] / "report.json"], out=out)
    assert [e.name for e in result.entries] == ["dense", "conv"]
    assert result.radii == ["36/255", "72/255"] and result.unmatched == {}
    header, rows = table(result)
    for entry, row, key in zip(result.entries, rows, ("dense", "conv")):
        report = json.loads((reports[key] / "report.json").read_text())
        for e in report["eps"]:
            assert entry.certified[e["label"]] == e["certified_accuracy"]
            assert row[header.index(f"certified @ {e['label']}")] == f"{100 * e['certified_accuracy']:.2f}%"
        assert entry.clean_accuracy == report["clean_accuracy"]
        mean, signed = own_means(reports[key])
        assert entry.mean_radius == pytest.approx(mean) and entry.signed_mean_radius == pytest.approx(signed)
        assert entry.signed_mean_radius <= entry.mean_radius
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "compare_curves.png",
                                                      "compare_radar.png", "compare_scatter.png"]
    saved = json.loads((out / "compare.json").read_text())
    assert saved["schema"] == "lipcert.compare/1" and [m["name"] for m in saved["models"]] == ["dense", "conv"]
    md = (out / "compare.md").read_text()
    assert "| dense |" in md and "| conv |" in md and "certified @ 72/255" in md
    for name in ("compare_curves.png", "compare_radar.png", "compare_scatter.png"):
        assert matplotlib.image.imread(out / name).shape[0] > 100


def test_radii_not_in_every_report_are_named(reports: dict[str, Path]) -> None:
    result = compare([reports["dense"], reports["dense_half"]])
    assert result.radii == ["36/255"]
    assert result.unmatched == {"72/255": ["dense"], "0.5": ["dense_half"]}
    header, rows = table(result)
    assert rows[0][header.index("certified @ 0.5")] == "-"  # never matched to 72/255


def test_radar_axes_are_scaled_by_the_best_model(reports: dict[str, Path]) -> None:
    result = compare([reports["dense"], reports["conv"]])
    axes, values = radar_axes(result)
    assert len(axes) == len(values[0]) and axes[0] == "clean"
    for i in range(len(axes)):
        column = [row[i] for row in values]
        assert all(0.0 <= v <= 1.0 for v in column) and max(column) in (0.0, 1.0)


def altered(folder: Path, tmp_path: Path, **fields: object) -> Path:
    """A copy of a report folder with report.json fields replaced (dotted keys reach one level down)."""
    copy = tmp_path / f"altered_{len(list(tmp_path.iterdir()))}"
    shutil.copytree(folder, copy)
    report = json.loads((copy / "report.json").read_text())
    for key, value in fields.items():
        *parents, last = key.split("__")
        target = report
        for p in parents:
            target = target[p]
        target[last] = value
    (copy / "report.json").write_text(json.dumps(report))
    return copy


@pytest.mark.parametrize("field,value,needle", [("norm", "linf", "different norms"),
                                               ("dataset__sha256", "0" * 64, "different datasets")])
def test_reports_that_do_not_compare_are_refused(reports: dict[str, Path], tmp_path: Path, field: str, value: str,
                                                 needle: str) -> None:
    other = altered(reports["conv"], tmp_path, **{field: value})
    with pytest.raises(ConfigError, match=needle) as info:
        compare([reports["dense"], other], out=tmp_path / "never")
    assert str(other) in str(info.value) and not (tmp_path / "never").exists()


def test_a_file_that_is_not_a_report_is_refused(tmp_path: Path, reports: dict[str, Path]) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"schema": "something else"}))
    with pytest.raises(ConfigError, match="not a lipcert report"):
        compare([reports["dense"], tmp_path / "x.json"])
    with pytest.raises(ConfigError, match="no report.json"):
        compare([tmp_path / "missing"])


def test_cli_compare(reports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cmp"
    code, stdout, _ = run_main(capsys, "compare", str(reports["dense"]), str(reports["conv"]), "--out", str(out))
    assert code == 0 and "dense" in stdout and "conv" in stdout and (out / "compare.md").is_file()
    code, stdout, _ = run_main(capsys, "compare", str(reports["dense"]), str(reports["conv"]), "--json", "-")
    assert code == 0 and json.loads(stdout)["models"][1]["name"] == "conv"
    other = altered(reports["conv"], tmp_path, norm="linf")
    code, _, err = run_main(capsys, "compare", str(reports["dense"]), str(other))
    assert code == 2 and "different norms" in one_line(err)


def test_a_report_without_mean_radii_shows_none(reports: dict[str, Path], tmp_path: Path) -> None:
    old = altered(reports["conv"], tmp_path, mean_radius=None)
    result = compare([reports["dense"], old])
    assert result.entries[1].mean_radius is None and result.entries[1].signed_mean_radius is None
    header, rows = table(result)
    assert rows[1][header.index("mean radius")] == "-" and rows[0][header.index("mean radius")] != "-"
