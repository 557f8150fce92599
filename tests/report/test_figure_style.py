"""Every matplotlib figure sinkscope draws is drawn and saved in the one house style (`report.palette.apply_style`):
its fonts and colour cycle, no matplotlib default colours, readable font sizes, log axes labelled with plain numbers,
and titles that name things rather than file paths. Small synthetic tables; no model runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

import matplotlib
from matplotlib.colors import ListedColormap, to_hex
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.text import Text

from sinkscope.report.palette import DIVERGING_CMAP, FIGURE_STYLE, HEATMAP_CMAP, OKABE_ITO, apply_style

TAB10 = {to_hex(c) for c in matplotlib.colormaps["tab10"].colors}  # matplotlib's default colour cycle
A_PATH = "/tmp/some/deep/folder/run"


@pytest.fixture
def saved(monkeypatch) -> Iterator[list[tuple[Figure, dict[str, Any]]]]:
    """Every figure saved while the test runs, with the rc settings in force when it was saved (nothing is written:
    the style is what matters here, and rasterising takes most of the time)."""
    records: list[tuple[Figure, dict[str, Any]]] = []

    def spy(self: Figure, *args: Any, **kwargs: Any) -> Any:
        rc = matplotlib.rcParams
        records.append((self, {"font.size": rc["font.size"], "image.cmap": rc["image.cmap"],
                               "cycle": [to_hex(c) for c in rc["axes.prop_cycle"].by_key()["color"]]}))

    monkeypatch.setattr(Figure, "savefig", spy)
    yield records


def _texts(fig: Figure) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text()]


def _titles(fig: Figure) -> list[str]:
    titles = [ax.get_title(loc) for ax in fig.axes for loc in ("left", "center", "right")]
    if fig._suptitle is not None:
        titles.append(fig._suptitle.get_text())
    return [t for t in titles if t]


def check_style(fig: Figure, rc: dict[str, Any]) -> None:
    assert rc["font.size"] == FIGURE_STYLE["font.size"], "saved outside apply_style()"
    assert rc["cycle"] == [c.lower() for c in OKABE_ITO] and rc["image.cmap"] == HEATMAP_CMAP
    fig.draw_without_rendering()  # tick labels are formatted at draw time
    for title in _titles(fig):
        assert "deep/folder" not in title and "/tmp" not in title, f"a path in the title {title!r}"
    for text in _texts(fig):
        assert text.get_fontsize() >= 6.5, f"{text.get_text()!r} at {text.get_fontsize()} pt"
        assert "\\times" not in text.get_text() and "×10" not in text.get_text(), text.get_text()
    for line in (x for ax in fig.axes for x in ax.get_lines()):
        assert to_hex(line.get_color()) not in TAB10, f"a matplotlib default colour on {line.get_label()!r}"
    for image in (x for ax in fig.axes for x in ax.get_images() if isinstance(x, AxesImage)):
        if image.get_array() is not None and image.get_array().ndim == 2:
            cmap = image.get_cmap()
            assert cmap.name in (HEATMAP_CMAP, DIVERGING_CMAP) or (isinstance(cmap, ListedColormap) and cmap.N <= 8)


def test_apply_style_sets_fonts_and_colours() -> None:
    with apply_style():
        assert matplotlib.rcParams["font.size"] == FIGURE_STYLE["font.size"]
        assert [to_hex(c) for c in matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]] == \
            [c.lower() for c in OKABE_ITO]
    assert matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][0] != OKABE_ITO[0]  # restored afterwards


def test_a_figure_outside_the_style_fails_the_check(saved, tmp_path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [1, 10, 100])
    ax.set_yscale("log")
    ax.set_title(A_PATH)
    fig.savefig(tmp_path / "plain.png")
    with pytest.raises(AssertionError):
        check_style(*saved[0])
    plt.close(fig)


def _mechanisms() -> Any:
    depths = np.array([0.5, 1.0, 1.5, 2.0])
    norms = pd.DataFrame([(0, d, p, f"t{p}", 1.0 + 50 * (p == 0) * d) for d in depths for p in range(4)],
                         columns=["prompt_id", "depth", "position", "token", "norm"])
    tables = {
        "prompts": pd.DataFrame({"prompt_id": [0]}),
        "norms": norms,
        "norm_profile": pd.DataFrame({"depth": depths, "pos0_norm": [2.0, 40.0, 90.0, 95.0],
                                      "median_norm": [1.0, 1.2, 1.3, 1.4]}),
        "layers": pd.DataFrame({"layer": [0, 1], "sink_share": [0.2, 0.9]}),
        "bos_layers": pd.DataFrame([(v, layer, s, r) for v, s, r in (("with BOS", 0.9, 40.0), ("without", 0.3, 2.4))
                                    for layer in (0, 1)], columns=["variant", "layer", "sink_share",
                                                                   "pos0_ratio_block"]),
        "similarity": pd.DataFrame([(v, d, p, 0.5) for v in ("a", "b") for d in depths for p in range(3)],
                                   columns=["variant", "depth", "position", "cos_sim"]),
        "ablation_profile": pd.DataFrame([(a, layer, al, r) for a, al, r in (("baseline", 0.8, 30.0),
                                                                              ("L0H1", 0.5, 10.0))
                                          for layer in (0, 1)],
                                         columns=["ablation", "layer", "alpha0", "pos0_ratio_block"]),
    }
    return SimpleNamespace(tables=tables, summary={"model": A_PATH, "formation": {"sink_layer": 1,
                                                                                   "norm_depth": 1.0}})


def _draw_everything(tmp: Path) -> int:
    """Call every figure function of `sinkscope.report.figures` once; returns how many it called."""
    from sinkscope.report.figures import dormant, generate, kvquant, mechanisms, overmixing, tags, tinylm, toy, vision
    from sinkscope.report.figures import profile as plots
    from sinkscope.toy.averaging import catch_tag_release_model, make_batch
    from sinkscope.toy.tinylm import TRACE_COLUMNS

    calls = 0

    def count(_: Any = None) -> None:
        nonlocal calls
        calls += 1

    count(plots.save_figure(plots.head_heatmap(np.eye(3)), tmp / "heat.png"))
    curve = pd.DataFrame({"step": np.repeat(np.arange(5), 2), "layer": np.tile([0, 1], 5),
                          "ratio": np.geomspace(1, 2000, 10)})
    count(plots.save_figure(plots.trace_curves(curve, by="layer", title="ratio"), tmp / "trace.png"))
    count(plots.save_figure(plots.attention_map(np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None],
                                                ["<s>", "a", "b", "c"]), tmp / "map.png"))
    for name in mechanisms.FIGURES:
        mechanisms.FIGURES[name][0](_mechanisms(), tmp / name)
        count()
    view = pd.DataFrame({"sink_position": [0, 0, -1], "sink_token": ["<s>", "<s>", ""], "pc1": [0.0, 1, 2],
                         "pc2": [1.0, 0, 2], "res_pc1": [0.0, 1, 1], "res_pc2": [1.0, 1, 0], "layer": 1, "head": 0,
                         "residual_layer": 1})
    count(tags.plot_pca(view, tmp / "pca.png"))
    count(tags.plot_sensitivity({"tiny": pd.DataFrame({"eps": [0.1, 0.2], "mean_sinks": [2.0, 1.0],
                                                       "mean_var_explained": [0.5, 0.4]})}, tmp / "sens.png"))
    count(tags.plot_cosine_histogram(pd.DataFrame([(k, lo, lo + 0.5, 3) for k in ("same_head", "cross_head", "all")
                                                   for lo in (-1.0, -0.5, 0.0, 0.5)],
                                                  columns=["kind", "lo", "hi", "count"]), tmp / "cos.png"))
    heads = pd.DataFrame([(d, layer, h, s, st) for d, s, st in (("code", 0.9, "dormant"), ("prose", 0.1, "active"))
                          for layer in (0, 1) for h in (0, 1)],
                         columns=["domain", "layer", "head", "sink_share", "state"])
    count(dormant.plot_head_domains(heads, pd.DataFrame({"layer": [0], "head": [1]}), tmp / "dom.png", A_PATH))
    kv = pd.DataFrame([(c, b, k, 10.0 + (16 - b) * (k == "none")) for c in ("full", "sink_window")
                       for b in (16, 4, 2) for k in ("none", "sinks", "first")],
                      columns=["cache", "bits", "keep", "perplexity"])
    count(kvquant.plot_kvquant(kv, tmp / "kv.png", A_PATH))
    mix = pd.DataFrame([(c, layer, 0.01 * 10 ** layer, 2.0, 0.5, 3.0 * (layer + 1)) for c in ("intact", "masked")
                        for layer in (-1, 0, 1)],
                       columns=["condition", "layer", "spread_mean", "entropy", "sink_rate", "bos_ratio"])
    count(overmixing.plot_overmixing(mix, tmp / "mix.png", A_PATH, position=1))
    patches = pd.DataFrame([(0, 0, f"patch({r},{c})", "patch", r, c, 0.1 * (r + c), r == c == 0)
                            for r in range(2) for c in range(2)] + [(0, 0, "[CLS]", "cls", -1, -1, 0.5, False)],
                           columns=["prompt_id", "layer", "token", "kind", "row", "col", "key_mass", "sink"])
    vision.patch_figure(patches, None, None, 0, 0, tmp / "patch.png", name=A_PATH + "/cat.png")
    vision.layers_figure(pd.DataFrame({"layer": [0, 1], "cls_mass": [0.2, 0.5], "register_mass": [0.1, 0.3],
                                       "sink_patch_mass": [0.0, 0.1]}), tmp / "vl.png", A_PATH)
    count(), count()
    sink = pd.DataFrame([(0, p, layer, k, "<s>" if k == 0 else "x", 0.5) for p in (3, 4) for layer in (0, 1)
                         for k in (0, 2)], columns=["prompt_id", "position", "layer", "key_position", "key_token",
                                                    "attention"])
    count(plots.save_figure(generate.sink_mass_figure(sink, title="sinks"), tmp / "gen.png"))
    trace = pd.DataFrame([{c: 1.0 for c in TRACE_COLUMNS} | {"step": s, "layer": layer, "head": 0,
                                                            "norm_ratio": 1.0 + 30 * s}
                          for s in range(3) for layer in range(2)])
    count(tinylm.draw_trace(trace, tmp / "tl.png", title=A_PATH))
    batch = make_batch(2, seed=2)
    batch.values = batch.values.double()
    count(toy.plot_attention(catch_tag_release_model(10.0), batch, 0, tmp / "toy.png"))
    return calls


def test_every_figure_is_saved_in_the_house_style(saved, tmp_path) -> None:
    calls = _draw_everything(tmp_path)
    assert len(saved) == calls == 19
    for fig, rc in saved:
        check_style(fig, rc)
