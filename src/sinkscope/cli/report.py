"""`sinkscope report RUN_DIR`: a thin front end over `sinkscope.report.write_report` and the figures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sinkscope.cli.options import OutPathOpt, console, described, parse_selection, user_errors
from sinkscope.errors import SinkscopeError


@user_errors
def report_command(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (Parquet tables + manifest.json)")],
    out: described(OutPathOpt, ": the HTML file (default: RUN_DIR/report.html)") = None,
    figures: Annotated[bool, typer.Option("--figures", help="Also draw figures into RUN_DIR/figures")] = False,
    formats: Annotated[str, typer.Option("--format", help="Figure formats, comma-separated: png, svg, pdf")] = "png",
    prompt_ids: Annotated[str | None, typer.Option(
        "--prompt-ids", help="Prompts given per-prompt views (grid, token view, maps): '0,5,9' or '10-20' "
                             "(default: the first 16)")] = None,
) -> None:
    """A self-contained HTML report of a run folder (works offline), and with --figures its PNG/SVG/PDF figures."""
    from sinkscope.report import write_report

    if not run_dir.is_dir():
        raise SinkscopeError(f"{run_dir} is not a folder: pass a run folder written with --out")
    chosen = [f.strip().lower() for f in formats.split(",") if f.strip()]
    bad = [f for f in chosen if f not in ("png", "svg", "pdf")]
    if bad or not chosen:
        raise SinkscopeError(f"--format {formats!r}: use png, svg and/or pdf, comma-separated")
    chosen_prompts = parse_selection(prompt_ids) if prompt_ids is not None else None
    path = write_report(run_dir, out, prompts=chosen_prompts)
    console.print(f"wrote {path}")
    if figures:
        from sinkscope.report.figures.profile import write_figures

        written = write_figures(run_dir, run_dir / "figures", formats=chosen)
        console.print(f"wrote {len(written)} figure file(s) to {run_dir / 'figures'}/")
