"""`profile_in_batches(..., maps=N)` (what `sinkscope profile --out` runs) keeps the attention maps of the first N
prompts of at most 64 tokens, the same maps a separate capture gives, so a click on a head in the report shows one."""

from __future__ import annotations

import pandas as pd

from sinkscope.analyses.maps import MAX_MAP_TOKENS, capture_maps
from sinkscope.analyses.profile import profile_in_batches
from sinkscope.report.data import ReportLimits, map_data
from sinkscope.store import load_run

PROMPTS = ["The cat.", "x" * 80, "Dogs bark.", "Birds fly.", "Fish swim."]  # tiny:llama reads bytes: 81 tokens


def test_profile_keeps_maps_of_the_first_short_prompts(tmp_path, tiny_llama) -> None:
    summary = profile_in_batches(tiny_llama, PROMPTS, out=tmp_path / "run", batch_size=2, maps=2)
    run = load_run(tmp_path / "run")
    maps = run["maps"]
    assert sorted(maps["prompt_id"].unique()) == [0, 2]  # prompt 1 is longer than 64 tokens; the cap is 2
    want = capture_maps(tiny_llama, [PROMPTS[0], PROMPTS[2]], [0, 2], MAX_MAP_TOKENS)
    pd.testing.assert_frame_equal(maps.reset_index(drop=True), want, check_exact=False, atol=1e-6, rtol=0)
    assert summary.rows["maps"] == len(maps) == run.manifest["tables"]["maps"]
    shown = map_data(run, ReportLimits())
    assert shown is not None and set(shown["prompts"]) == {"0", "2"}


def test_no_maps_without_a_folder_or_when_turned_off(tmp_path, tiny_llama) -> None:
    assert "maps" not in profile_in_batches(tiny_llama, PROMPTS[:1], maps=2).rows
    profile_in_batches(tiny_llama, PROMPTS[:1], out=tmp_path / "run", maps=0)
    assert "maps" not in load_run(tmp_path / "run").tables
