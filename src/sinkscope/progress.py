"""The one progress callback of long library functions. Analyses never render: they call a `Progress` the caller
passes (the CLI's is `cli.options.progress_bars`'s update: one bar per task on stderr) and draw nothing themselves."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar

__all__ = ["Progress", "tracked"]

T = TypeVar("T")


class Progress(Protocol):
    """`progress(task, done, total)`, called after each unit of work (a batch, a forward pass, a training step).

    task: a short name of the loop ("capture", "mechanism passes", "train" …); one function may run several.
    done: units finished so far in that task; total: the units the task will do (None when not known). The last call
        of a task that runs to the end has done == total.
    status: a short text shown beside the bar, sent as a keyword by the tasks that have one (the trainer's
        "loss 3.530  α₀ 0.410"); a callback passed to those must accept it.
    """

    def __call__(self, task: str, done: int, total: int | None, *, status: str | None = None) -> None: ...


def tracked(items: Sequence[T], task: str, progress: Progress | None) -> Iterator[T]:
    """Yield the items; after the loop body has run on each, progress(task, done, len(items))."""
    for done, item in enumerate(items, 1):
        yield item
        if progress is not None:
            progress(task, done, len(items))
