"""Figures for a profile run, an emergence trace and an evaluation table: each file a valid image of sensible size."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

from sinkscope.analyses.maps import add_maps, capture_maps
from sinkscope.errors import SinkscopeError
from sinkscope.report.figures import profile as plots
from sinkscope.report.palette import DASHES, MARKERS, OKABE_ITO, VIRIDIS
from sinkscope.store import Run, save_run

PROMPTS = ["The cat sat on the mat.", "Sinks draw attention."]


def check_image(path: Path, min_px: int = 150, max_px: int = 8000) -> None:
    """A real PNG/SVG/PDF of sensible size, not an empty or truncated file."""
    data = path.read_bytes()
    assert len(data) > 2_000, path
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
            assert min_px <= width <= max_px and min_px <= height <= max_px, (path, image.size)
            extrema = image.convert("L").getextrema()
            assert extrema[0] < extrema[1], f"{path} is a blank image"
    elif path.suffix == ".svg":
        root = ET.fromstring(data)
        assert root.tag.endswith("svg")
        width = float(root.attrib["width"].removesuffix("pt"))
        height = float(root.attrib["height"].removesuffix("pt"))
        assert 72 <= width <= 3000 and 72 <= height <= 3000, (path, width, height)
        assert len(list(root.iter())) > 20
    elif path.suffix == ".pdf":
        assert data.startswith(b"%PDF-") and b"%%EOF" in data[-1024:]
        assert b"/MediaBox" in data
    else:
        pytest.fail(f"unexpected file {path}")


@pytest.fixture(scope="module")
def profile_run(tiny_llama, tmp_path_factory) -> Path:
    from sinkscope.analyses.profile import profile

    result = profile(tiny_llama, PROMPTS)
    run = add_maps(result.run(tiny_llama), capture_maps(tiny_llama, PROMPTS))
    norms = pd.DataFrame({"layer": [0, 0, 1, 1], "position": [0, 1, 0, 1], "norm": [2.0, 1.0, 30.0, 1.5]})
    run.tables["norms"] = norms
    return save_run(tmp_path_factory.mktemp("plots") / "run", run)


def emergence_trace() -> pd.DataFrame:
    """An emergence-trace-shaped table: step, layer, head, alpha0, loss, entropy."""
    rng = np.random.default_rng(0)
    step, layer, head = np.meshgrid(np.arange(0, 2000, 100), np.arange(4), np.arange(3), indexing="ij")
    alpha0 = 1 / (1 + np.exp(-(step - 800 - 100 * layer) / 150)) + rng.normal(0, 0.02, step.shape)
    return pd.DataFrame({"step": step.ravel(), "layer": layer.ravel(), "head": head.ravel(),
                         "alpha0": alpha0.ravel(), "loss": (6 * np.exp(-step / 300) + 0.02).ravel(),
                         "entropy": rng.uniform(1, 2, step.size)})


def eval_table() -> pd.DataFrame:
    return pd.DataFrame({"task": ["sst2", "sst2", "boolq", "boolq", "rte", "rte"],
                         "method": ["raw", "detect-mask-renormalise"] * 3,
                         "accuracy": [0.81, 0.83, 0.62, 0.66, 0.55, 0.54], "n": [872, 872, 500, 500, 277, 277]})


def test_profile_run_figures(profile_run, tmp_path):
    written = plots.write_figures(profile_run, tmp_path / "figs", formats=("png", "svg", "pdf"))
    names = {p.stem for p in written}
    assert names == {"heads_sink_mass", "heads_top_alpha", "token_strip", "layer_curves", "attention_map"}
    assert len(written) == 15
    for path in written:
        check_image(path)


def test_trace_figures(tmp_path):
    table = emergence_trace()
    fig = plots.trace_curves(table, by="layer")  # 4 layers: one styled line each
    assert len([ax for ax in fig.axes if ax.get_visible() and ax.get_title()]) == 3
    assert len(fig.axes[0].lines) == 4
    assert fig.axes[1].get_yscale() == "log"  # loss spans > 100×
    written = plots.save_figure(fig, tmp_path / "trace_by_layer", formats=("png", "svg", "pdf"))
    many = table.assign(layer=table["layer"] * 8 + table["head"])  # 32 values: the heat ramp with a colour bar
    written += plots.save_figure(plots.trace_curves(many, metrics=["alpha0"], by="layer"), tmp_path / "trace_ramp.png")
    written += plots.save_figure(plots.trace_curves(table, metrics=["alpha0", "loss"]), tmp_path / "trace_mean.png")
    for path in written:
        check_image(path)
    with pytest.raises(SinkscopeError, match="no 'epoch' column"):
        plots.trace_curves(table, x="epoch")


def test_eval_figures(tmp_path):
    fig = plots.eval_bars(eval_table())
    ax = fig.axes[0]
    assert ax.get_ylabel() == "accuracy" and ax.get_xlabel() == "task"
    assert len(ax.patches) == 6 and [t.get_text() for t in ax.get_legend().get_texts()] == [
        "raw", "detect-mask-renormalise"]
    written = plots.save_figure(fig, tmp_path / "eval", formats=("png", "svg", "pdf"))
    rng = np.random.default_rng(1)
    per_example = pd.DataFrame({"task": rng.choice(["a", "b"], 200), "condition": rng.choice(["raw", "dmr"], 200),
                                "match": rng.uniform(size=200) < 0.7})
    written += plots.save_figure(plots.eval_bars(per_example), tmp_path / "eval_per_example.png")
    for path in written:
        check_image(path)


def test_write_figures_for_trace_and_eval_runs(tmp_path):
    summary = eval_table().assign(match=[0.5, 0.7, 0.4, 0.6, None, 0.5])
    run = Run(tables={"emergence": emergence_trace(), "summary": summary}, manifest={"command": "eval"})
    written = plots.write_figures(run, tmp_path)
    assert sorted(p.name for p in written) == ["eval_summary_accuracy.png", "eval_summary_match.png",
                                               "trace_emergence.png"]
    for path in written:
        check_image(path)


def test_style_does_not_depend_on_colour():
    styles = [plots.line_style(i) for i in range(len(OKABE_ITO))]
    assert len({s["marker"] for s in styles}) == len(styles) == len(MARKERS)
    assert len(set(DASHES)) == len(DASHES)
    assert len(set(plots.HATCHES)) == len(plots.HATCHES)
    lightness = [0.2126 * r + 0.7152 * g + 0.0722 * b for r, g, b in VIRIDIS]
    assert lightness == sorted(lightness)  # the heatmap ramp reads in greyscale


def test_save_figure_rejects_unknown_formats(tmp_path):
    fig = plots.head_heatmap(np.eye(3))
    with pytest.raises(SinkscopeError, match="jpg"):
        plots.save_figure(fig, tmp_path / "x.jpg")
    assert plots.save_figure(fig, tmp_path / "x.svg") == [tmp_path / "x.svg"]
