"""`sinkscope models`, `detectors` and `datasets`: the registries the other commands' options choose from."""

from __future__ import annotations

from sinkscope.cli.options import console, user_errors


@user_errors
def models_command() -> None:
    """List the built-in model names (any Hub id or local folder also works)."""
    from sinkscope.models import list_builtins

    for name in list_builtins():
        console.print(name, highlight=False)


@user_errors
def detectors_command() -> None:
    """List the sink detectors with their formula, defaults and source."""
    from sinkscope.detect import DETECTORS, list_detectors

    for name in list_detectors():
        d = DETECTORS[name]
        console.print(f"[bold]{name}[/] ({d.statistic}, {d.returns}) {dict(d.params)}: {d.doc} — {d.source}",
                      highlight=False)


@user_errors
def datasets_command() -> None:
    """List the classification datasets of eval, calibrate, bench-mitigation and sweep --dataset (seed 000 Table 1)."""
    from sinkscope.analyses.evaluate.datasets import get_spec, list_datasets

    for name in list_datasets():
        spec = get_spec(name)
        console.print(f"[bold]{name}[/] {spec.title}: {', '.join(spec.labels)}", highlight=False)
