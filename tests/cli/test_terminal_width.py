"""Every command's terminal tables fit 100 columns (#19 item 4): run at a 100-column console, no table line is wider
and no cell or header is cut to '…' (wide tables wrap or split; full precision stays in the run folder's Parquet).
Prose lines are left to the terminal to wrap (they may hold paths)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from rich.cells import cell_len
from test_fuzz import BASES, base_line, make_data  # tests/cli is on sys.path: the fuzz test's minimal inputs
from typer.testing import CliRunner

from sinkscope.cli import options
from sinkscope.cli.app import app

WIDTH = 100
SILENT = {"report", "plot-trace"}  # they print only the paths they wrote
SLOW = {"bench-mitigation"}  # its table is checked through its renderer below (the run takes half a minute)
COMMANDS = sorted(set(BASES) - SILENT - SLOW)
TABLE_CHARS = set("│┃┏┓┗┛━─┡┩└┘┌┐╇╈╷╵")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("width-data"))


def check_fits(output: str) -> int:
    """Assert that every table line fits and is not cut; returns how many table lines there were."""
    lines = [line for line in output.splitlines() if TABLE_CHARS & set(line)]
    for line in lines:
        assert cell_len(line) <= WIDTH, f"{cell_len(line)} columns: {line!r}"
        assert "…" not in line, f"a cell cut short: {line!r}"
    return len(lines)


@pytest.mark.parametrize("command", COMMANDS)
def test_summary_fits_100_columns(command: str, data: Path, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(options.console, "width", WIDTH)
    line = base_line(command, BASES[command], data, tmp_path)
    result = CliRunner().invoke(app, line, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.strip(), "printed nothing"
    check_fits(result.output)


def test_the_check_catches_a_wide_table() -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for i in range(12):
        table.add_column(f"a long column name {i}")
    table.add_row(*[f"{i / 7:.12f}" for i in range(12)])
    console = Console(width=WIDTH, record=True, file=io.StringIO())
    console.print(table)
    with pytest.raises(AssertionError):
        check_fits(console.export_text())


def test_a_wide_table_is_split_into_parts_that_fit() -> None:
    from rich.console import Console

    from sinkscope.cli.mitigation import render_mitigation_table
    from sinkscope.cli.render import print_table

    row = {"dataset": "boolq_long_name", "method": "act_searched_heads", "kind": "inference", "n": 1000,
           "accuracy": 0.8312, "changed_predictions": 0.125, "ms_per_example": 1234.5, "cost_vs_none": 12.34,
           "mismatch": 0.1234, "match": 0.5678, "spearman": -0.4321, "topk_overlap": 0.3, "n_causal": 200,
           "sink_share": 0.71, "null_mass": 0.0, "loss": 3.21}
    table = render_mitigation_table(pd.DataFrame([row, row | {"method": "none"}]), "tiny:llama: sst2 mitigations")
    console = Console(width=WIDTH, record=True, file=io.StringIO())
    print_table(console, table, keep=2)
    text = console.export_text()
    assert check_fits(text) > 0
    for value in ("83.1%", "12.5%", "1234", "12.34", "-0.43", "200", "0.71", "3.21", "act_searched_heads"):
        assert value in text  # every cell is shown in full, in one of the parts
    assert "(1/2)" in text or "(1/3)" in text
