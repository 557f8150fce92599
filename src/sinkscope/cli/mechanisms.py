"""`sinkscope mechanisms`: where the position-0 sink comes from, as a run folder of tables and figures."""

from __future__ import annotations

from typing import Annotated

import typer

from sinkscope.cli.options import (
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    NoFiguresOpt,
    OutOpt,
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
    parse_selection,
    progress_bars,
    renamed,
    user_errors,
)
from sinkscope.errors import SinkscopeError


@user_errors
def mechanisms_command(
    model: ModelOpt,
    prompts: PromptsOpt = None,
    prompt: PromptOpt = None,
    out: described(OutOpt, ", with figures") = None,
    threshold: described(ThresholdOpt, "; here column_mass's ε at position 0: a head with α₀ > ε has a "
                                       "position-0 sink") = 0.2,
    min_share: Annotated[float, typer.Option(help="Share of sink heads that makes a layer's position 0 a sink")
                         ] = 0.5,
    norm_ratio: Annotated[float, typer.Option(help="‖h₀‖ / median ‖h_j‖ that counts as a departed norm")] = 4.0,
    ablate_layers: Annotated[str, typer.Option(help="Layers whose heads are ablated: '0,1', '0-2', or 'none'")
                             ] = "0,1",
    ablate_heads: Annotated[str, typer.Option(help="Heads to ablate one by one: 'all', '0,3', '1-4'")] = "all",
    massive_ratio: Annotated[float, typer.Option(
        help="|h| / median |h| that makes an activation massive (Sun et al.: 1000; the looser rule: 100 with "
             "--massive-min-value 0)")] = 1000.0,
    massive_min_value: Annotated[float, typer.Option(
        min=0, help="…and the least |h| that counts as massive (Sun et al.: 100)")] = 100.0,
    bos_id: Annotated[int | None, typer.Option(help="BOS token id (default: the tokenizer's)")] = None,
    replace_with: Annotated[str, typer.Option(help="Text whose first token replaces BOS")] = "the",
    no_bos: Annotated[bool, typer.Option("--no-bos", help="Skip the BOS-removal runs")] = False,
    no_figures: NoFiguresOpt = False,
    overwrite: OverwriteOpt = False,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
    eps: Annotated[float | None, typer.Option("--eps", hidden=True)] = None,
) -> None:
    """Where sinks come from: hidden-state norms per half layer, the layer where the position-0 sink forms, BOS
    removal, cross-input similarity, head ablation, massive activations and the implicit attention bias."""
    from sinkscope.analyses.mechanisms.analysis import analyze, write

    threshold = renamed(threshold, eps)
    if not 0 < threshold < 1:
        raise SinkscopeError(f"--threshold {threshold}: column_mass's ε must be in (0, 1)")
    if massive_ratio <= 1:
        raise SinkscopeError(f"--massive-ratio {massive_ratio}: a massive activation is a multiple of the median, so "
                             "pass a ratio above 1")
    texts, file_bad = gather_prompts(prompt, prompts)
    layers = [] if ablate_layers.strip().lower() == "none" else parse_selection(ablate_layers)
    heads = parse_selection(ablate_heads)
    loaded = load(model, device, dtype, trust_remote_code, allow_pickle)
    if layers is None:
        layers = list(range(loaded.info.n_layers))
    with progress_bars() as update:
        result = analyze(loaded, texts, eps=threshold, min_share=min_share, norm_ratio=norm_ratio,
                         ablate_layers=layers, ablate_heads=heads, massive_ratio=massive_ratio,
                         massive_min_value=massive_min_value, bos=not no_bos,
                         bos_id=bos_id, replace_with=replace_with, batch_size=batch_size, progress=update)
    for line in result.lines():
        console.print(line, highlight=False, soft_wrap=True)
    skipped = dict(result.skipped)
    skipped.update(dict(file_bad))
    for i, why in sorted(skipped.items()):
        err_console.print(f"[yellow]skipped[/] prompt {i + 1}: {why}", highlight=False)
    if out is not None:
        folder = write(result, loaded, out, figures=not no_figures, overwrite=overwrite)
        figures = sorted(p.name for p in folder.glob("*.png"))
        console.print(f"wrote {folder}/ ({', '.join(result.tables)} + manifest.json"
                      + (f"; figures {', '.join(figures)}" if figures else "") + ")")
