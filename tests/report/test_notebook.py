"""Notebook display (#19 item 5): a Trace and the result objects render as escaped HTML with no script, the grid's
colour scale stated with its range."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sinkscope.report.notebook import heat_grid_html, result_html


def test_trace_shows_its_shape_tokens_and_grid(tiny_llama) -> None:
    from sinkscope.capture import CaptureConfig, run_capture

    trace = run_capture(tiny_llama, ["The cat sat."], CaptureConfig())
    page = trace._repr_html_()
    L, H = trace.n_layers, trace.n_heads
    assert f"{L} layers × {H} heads" in page and "α at position 0" in page
    assert page.count("<td title='layer ") == L * H
    assert "&#x27;&lt;s&gt;&#x27;" in page and "<s>" not in page and "<script" not in page  # tokens escaped
    highest = float(trace.key_mass[:, :, :, 0].mean(0).max())
    assert f"to {highest:.4f} (yellow)" in page


def test_profile_result_states_its_scale(tiny_llama) -> None:
    import sinkscope

    result = sinkscope.profile(tiny_llama, ["The cat sat.", "A dog ran."])
    page = result._repr_html_()
    highest = float(result.tables["heads"].groupby(["layer", "head"])["sink_alpha"].mean().max())
    assert f"to {highest:.4f} (yellow)" in page and "can exceed 1" in page


def test_grid_colours_follow_the_heat_ramp_and_mark_missing_cells() -> None:
    page = heat_grid_html(np.array([[0.0, 2.0], [np.nan, 1.0]]), "x <y>")
    assert "rgb(68,1,84)" in page and "rgb(253,231,37)" in page  # 0 → viridis' first anchor, 2 (the max) → its last
    assert "no value" in page and "x &lt;y&gt;" in page and "to 2.0000" in page


@pytest.mark.parametrize("path, name", [
    ("sinkscope.analyses.evaluate.run", "EvalResult"), ("sinkscope.analyses.tags", "TagResult"),
    ("sinkscope.analyses.kvquant", "KVQuantResult"), ("sinkscope.analyses.mechanisms.analysis", "MechanismsResult"),
    ("sinkscope.analyses.dormant", "DormantResult"), ("sinkscope.analyses.overmixing", "OvermixingResult"),
    ("sinkscope.analyses.profile", "ProfileResult"), ("sinkscope.capture.trace", "Trace"),
])
def test_results_have_a_notebook_view(path: str, name: str) -> None:
    import importlib

    assert callable(getattr(importlib.import_module(path), name)._repr_html_)


def test_result_tables_are_escaped_and_cut() -> None:
    from sinkscope.analyses.kvquant import KVQuantResult

    frame = pd.DataFrame({"cache": ["<script>alert(1)</script>"] * 20, "perplexity": np.linspace(1, 2, 20)})
    page = KVQuantResult(tables={"kvquant": frame})._repr_html_()
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "kvquant</b> (20 rows, first 8 shown)" in page and page.count("<td>&lt;script") == 8
    assert result_html(KVQuantResult()).startswith("<div><p><b>KVQuantResult</b>")
