"""`sinkscope sweep`: a thin front end over `sinkscope.analyses.sweep` (prompt sources, process group, summary)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from sinkscope.cli.options import (
    DATA_HELP,
    BatchSizeOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    LimitOpt,
    MethodOpt,
    MinQueriesOpt,
    ModelOpt,
    OutPathOpt,
    OverwriteOpt,
    PickleOpt,
    PromptOpt,
    PromptsOpt,
    ThresholdOpt,
    TrustOpt,
    console,
    described,
    err_console,
    gather_prompts,
    load,
    method_params,
    progress_bars,
    user_errors,
)
from sinkscope.errors import SinkscopeError

MAX_SKIP_LINES = 10


def sweep_prompts(prompt: list[str] | None, prompts: Path | None, dataset: str | None, data: str | None,
                  limit: int | None) -> tuple[list[str], list[tuple[int, str]], dict[str, Any]]:
    """The prompt texts, (index, reason) for unreadable file lines, and a description of the source.

    With a dataset: each example's prompt as `sinkscope eval` renders it (instruction + template, ending just before
    the label), for `limit` examples drawn as `eval --limit` draws them (seed 0, source order).
    """
    if dataset is None:
        if data is not None or limit is not None:
            raise SinkscopeError("--data and --limit go with --dataset NAME")
        texts, file_bad = gather_prompts(prompt, prompts)
        return texts, file_bad, {"prompt_options": len(prompt or []), "prompts_file": str(prompts or "") or None}
    if prompt or prompts is not None:
        raise SinkscopeError("pass either --dataset or --prompt/--prompts, not both")
    from sinkscope.analyses.evaluate.datasets import get_spec, load_examples, sample

    spec = get_spec(dataset)
    rows = load_examples(spec, data)
    examples = sample(rows.examples, limit, seed=0)
    if not examples:
        raise SinkscopeError(f"{spec.name} has no usable rows in {rows.source}")
    source = {"dataset": spec.name, "data": rows.source, "limit": limit, "seed": 0, "rows_skipped": len(rows.skipped)}
    return [spec.prompt(ex.fields) for ex in examples], [], source


@user_errors
def sweep_command(
    model: ModelOpt,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", "-d", help="Profile a dataset's rendered prompts (sinkscope datasets lists them)")] = None,
    data: described(DataOpt, DATA_HELP) = None,
    limit: described(LimitOpt, " examples of --dataset (seed 0, as eval draws them)") = None,
    method: MethodOpt = "column_mass",
    threshold: ThresholdOpt = None,
    min_queries: MinQueriesOpt = None,
    out: described(OutPathOpt, ": the sweep folder (required): units in shards/, then the merged run folder; a rerun "
                               "resumes it") = None,
    overwrite: OverwriteOpt = False,
    batch_size: BatchSizeOpt = 8,
    unit_size: Annotated[int, typer.Option(help="Consecutive prompts per unit (what is written, resumed, shared)")
                         ] = 32,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """`profile` over many prompts, resumable and data-parallel.

    Run it again to resume, or under `torchrun --nproc_per_node N -m sinkscope sweep ...` to split the units across
    processes (one GPU each: on CUDA each process takes cuda:LOCAL_RANK unless --device says otherwise). --dataset
    profiles each example's prompt as `sinkscope eval` renders it (instruction + template, no label)."""
    from sinkscope.analyses.sweep import Ranks, SweepConfig, plan_sweep, process_group, sweep_run
    from sinkscope.cli.render import layer_table
    from sinkscope.detect import get_detector

    if out is None:
        raise SinkscopeError("sweep needs --out DIR: the folder its units are written to and resumed from")
    texts, file_bad, source = sweep_prompts(prompt, prompts, dataset, data, limit)
    params = method_params(method, threshold, min_queries)
    config = SweepConfig(method, params, unit_size, batch_size)
    ranks = Ranks.from_env()
    with process_group(ranks, device) as where:
        plan = plan_sweep(out, texts, model, dtype, config, ranks, overwrite=overwrite)
        loaded = load(model, where, dtype, trust_remote_code, allow_pickle)
        with progress_bars() if ranks.main else nullcontext() as progress:  # the bars on rank 0 only
            result = sweep_run(loaded, plan, ranks, progress, source)
    if result.summary is None:
        return
    summary, info = result.summary, loaded.info
    title = (f"{info.name}: {info.n_layers} layers × {info.n_heads} heads, {summary.n_prompts} prompt(s) in "
             f"{result.n_units} unit(s), method {method} {get_detector(method).params | params}")
    console.print(layer_table(summary.layers, title))
    skipped = dict(summary.skipped)
    skipped.update(dict(file_bad))
    for i, why in sorted(skipped.items())[:MAX_SKIP_LINES]:
        err_console.print(f"[yellow]skipped[/] prompt {i + 1}: {why}", highlight=False)
    if len(skipped) > MAX_SKIP_LINES:
        err_console.print(f"[yellow]… and {len(skipped) - MAX_SKIP_LINES} more skipped prompts[/] (see "
                          f"{out}/skipped.parquet)", highlight=False)
    if result.done_before == result.n_units:
        console.print(f"all {result.n_units} units were already done; merged them again")
    else:
        console.print(f"{result.n_units - result.done_before} unit(s) computed now by {ranks.world} process(es), "
                      f"{result.done_before} found done")
    console.print(f"wrote {out}/ ({', '.join(summary.rows)} + manifest.json)")
