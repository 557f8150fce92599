"""`sinkscope mechanisms`: where the position-0 sink comes from, as a run folder of tables and figures.

Register with ``app.command("mechanisms")(mechanisms_command)`` in `sinkscope.cli.app`. The function prints a
`SinkscopeError` as one line and exits with status 2 itself, so it works with or without `user_errors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sinkscope.errors import SinkscopeError

console = Console(emoji=False, highlight=False)
err_console = Console(stderr=True, emoji=False, highlight=False)


def mechanisms_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Hub id, local folder, or built-in name")],
    prompts: Annotated[Path | None, typer.Option(help="File with one prompt per line (.txt) or JSONL")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt (repeat for several)")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write a run folder (tables, figures, manifest)")
                   ] = None,
    eps: Annotated[float, typer.Option(help="α₀ above which a head counts as a position-0 sink")] = 0.2,
    min_share: Annotated[float, typer.Option(help="Share of sink heads that makes a layer's position 0 a sink")
                         ] = 0.5,
    norm_ratio: Annotated[float, typer.Option(help="‖h₀‖ / median ‖h_j‖ that counts as a departed norm")] = 4.0,
    ablate_layers: Annotated[str, typer.Option(help="Layers whose heads are ablated: '0,1', '0-2', or 'none'")
                             ] = "0,1",
    ablate_heads: Annotated[str, typer.Option(help="Heads to ablate one by one: 'all', '0,3', '1-4'")] = "all",
    massive_ratio: Annotated[float, typer.Option(help="|h| / median |h| that makes an activation massive")] = 100.0,
    bos_id: Annotated[int | None, typer.Option(help="BOS token id (default: the tokenizer's)")] = None,
    replace_with: Annotated[str, typer.Option(help="Text whose first token replaces BOS")] = "the",
    no_bos: Annotated[bool, typer.Option("--no-bos", help="Skip the BOS-removal runs")] = False,
    no_figures: Annotated[bool, typer.Option("--no-figures", help="Write tables only")] = False,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass")] = 8,
    device: Annotated[str | None, typer.Option(help="Device, e.g. cpu or cuda")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow repository code")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (.bin) checkpoints")] = False,
) -> None:
    """Where sinks come from: hidden-state norms per half layer, the layer where the position-0 sink forms, BOS
    removal, cross-input similarity, head ablation, massive activations and the implicit attention bias."""
    try:
        _run(model, prompts, prompt, out, eps, min_share, norm_ratio, ablate_layers, ablate_heads, massive_ratio,
             bos_id, replace_with, no_bos, no_figures, batch_size, device, dtype, trust_remote_code, allow_pickle)
    except SinkscopeError as err:
        err_console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _run(model: str, prompts: Path | None, prompt: list[str] | None, out: Path | None, eps: float,
         min_share: float, norm_ratio: float, ablate_layers: str, ablate_heads: str, massive_ratio: float,
         bos_id: int | None, replace_with: str, no_bos: bool, no_figures: bool, batch_size: int, device: str | None,
         dtype: str, trust_remote_code: bool, allow_pickle: bool) -> None:
    from sinkscope.analyses.mechanisms.analysis import analyze, write
    from sinkscope.cli.app import gather_prompts, parse_selection  # lazy: sinkscope.cli.app imports this module
    from sinkscope.models import load_model

    texts, file_bad = gather_prompts(prompt, prompts)
    layers = [] if ablate_layers.strip().lower() == "none" else parse_selection(ablate_layers)
    heads = parse_selection(ablate_heads)
    with console.status(f"loading {model}"):
        loaded = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                            allow_pickle=allow_pickle)
    if layers is None:
        layers = list(range(loaded.info.n_layers))
    with console.status("running the mechanism probes"):
        result = analyze(loaded, texts, eps=eps, min_share=min_share, norm_ratio=norm_ratio, ablate_layers=layers,
                         ablate_heads=heads, massive_ratio=massive_ratio, bos=not no_bos, bos_id=bos_id,
                         replace_with=replace_with, batch_size=batch_size)
    for line in result.lines():
        console.print(line, highlight=False, soft_wrap=True)
    skipped = dict(result.skipped)
    skipped.update(dict(file_bad))
    for i, why in sorted(skipped.items()):
        err_console.print(f"[yellow]skipped[/] prompt {i + 1}: {why}", highlight=False)
    if out is not None:
        folder = write(result, loaded, out, figures=not no_figures)
        figures = sorted(p.name for p in folder.glob("*.png"))
        console.print(f"wrote {folder}/ ({', '.join(result.tables)} + manifest.json"
                      + (f"; figures {', '.join(figures)}" if figures else "") + ")")
