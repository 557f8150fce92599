"""The `sinkscope` command: one typer app joining the thin command modules.

Every command module imports only typer, rich and `sinkscope.cli.options` at the top, and the library it runs inside
its command function, so `sinkscope --help` and `sinkscope COMMAND --help` import neither torch nor transformers.
"""

from __future__ import annotations

from typing import Annotated

import typer

from sinkscope.cli import (
    dormant,
    evaluate,
    generate,
    kvquant,
    listing,
    mechanisms,
    mitigation,
    overmixing,
    profile,
    report,
    stream,
    sweep,
    tags,
    toy,
    train,
    vision,
)
from sinkscope.cli.options import OneLineErrors, console

app = typer.Typer(
    cls=OneLineErrors,
    help="Measure, explain and remove attention sinks in transformer models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from sinkscope import __version__

        console.print(f"sinkscope {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit")] = False,
) -> None:
    """Measure, explain and remove attention sinks in transformer models."""


COMMANDS = {
    "profile": profile.profile_command,
    "explain": profile.explain_command,
    "sweep": sweep.sweep_command,
    "stream": stream.stream_command,
    "kv-quant": kvquant.kv_quant_command,
    "generate": generate.generate_command,
    "eval": evaluate.eval_command,
    "calibrate": mitigation.calibrate_command,
    "bench-mitigation": mitigation.bench_mitigation_command,
    "mechanisms": mechanisms.mechanisms_command,
    "dormant": dormant.dormant_command,
    "overmixing": overmixing.overmixing_command,
    "tags": tags.tags_command,
    "tags-sensitivity": tags.tags_sensitivity_command,
    "probe": tags.probe_command,
    "report": report.report_command,
    "demo": profile.demo_command,
    "train-lm": train.train_lm,
    "plot-trace": train.plot_trace,
    "models": listing.models_command,
    "detectors": listing.detectors_command,
    "datasets": listing.datasets_command,
    "vision": vision.vision_command,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)
app.add_typer(toy.app, name="toy", help="The synthetic averaging task of seed 003 (catch, tag, release)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
