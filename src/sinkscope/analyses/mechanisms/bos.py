"""BOS removal (seed 001 Fig. 3): the same prompts with BOS, without it, and with BOS replaced by another token.

Removing BOS from LLaMA-3.1-8B removes its layer-1 sink and norm jump, yet a position-0 sink re-emerges on the
first real token a layer later (seed 001). Three variants per prompt, built from the text's own token ids b:

- ``with_bos``: [BOS] + b (the tokenizer's own encoding when it adds BOS; otherwise its BOS id prepended by hand,
  e.g. SmolLM2, whose tokenizer adds none);
- ``no_bos``:   b — the with-BOS sequence minus its first token, so position 0 is the first real token;
- ``replaced``: [t] + b — BOS swapped for an ordinary token t; differs from ``with_bos`` only at position 0.

Per variant and layer: the sink share and mean α at position 0, α at the first real token, and the position-0
norm ratio after attention and after the block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from sinkscope.analyses.mechanisms.norms import formation, norm_profile, sink_share_table
from sinkscope.analyses.mechanisms.residual import MechTrace
from sinkscope.errors import SinkscopeError

VARIANTS = ("with_bos", "no_bos", "replaced")


@dataclass
class BosVariants:
    """Token ids per variant and prompt; `native` names the variant equal to the tokenizer's own encoding."""

    with_bos: list[list[int]]
    no_bos: list[list[int]]
    replaced: list[list[int]]
    bos_id: int
    replace_id: int
    native: str

    def get(self, variant: str) -> list[list[int]]:
        return getattr(self, variant)


def bos_variants(native_ids: Sequence[Sequence[int]], adds_bos: bool, bos_id: int, replace_id: int) -> BosVariants:
    """Build the three variants from the tokenizer's own encodings (pure function).

    adds_bos: whether `native_ids` already start with BOS (then it is stripped for `no_bos`); otherwise `bos_id`
    is prepended for `with_bos`. Raises SinkscopeError if a prompt has no real token or `replace_id == bos_id`.
    """
    if replace_id == bos_id:
        raise SinkscopeError("the replacement token must differ from the BOS token")
    with_bos, no_bos, replaced = [], [], []
    for ids in native_ids:
        ids = [int(i) for i in ids]
        body = ids[1:] if adds_bos else ids
        if adds_bos and (not ids or ids[0] != bos_id):
            raise SinkscopeError(f"the tokenizer was said to add BOS ({bos_id}) but a prompt starts with {ids[:1]}")
        if not body:
            raise SinkscopeError("a prompt has no token besides BOS")
        with_bos.append([bos_id, *body])
        no_bos.append(body)
        replaced.append([replace_id, *body])
    return BosVariants(with_bos, no_bos, replaced, bos_id, replace_id, "with_bos" if adds_bos else "no_bos")


def resolve_bos(tokenizer: Any, adds_bos: bool, bos_id: int | None = None, replace_with: str = "the"
                ) -> tuple[int, int]:
    """The BOS id (given, the tokenizer's `bos_token_id`, or the first token it adds) and the replacement id
    (the first token of `replace_with` encoded without special tokens)."""
    if bos_id is None:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None and adds_bos:
            bos_id = tokenizer("a")["input_ids"][0]
    if bos_id is None:
        raise SinkscopeError("the tokenizer has no BOS token; pass bos_id (--bos-id) to study BOS removal")
    rep = tokenizer(replace_with, add_special_tokens=False)["input_ids"]
    if not rep:
        raise SinkscopeError(f"the replacement text {replace_with!r} encodes to no token")
    return int(bos_id), int(rep[0])


def bos_layers(traces: dict[str, MechTrace], eps: float = 0.2) -> pd.DataFrame:
    """Per variant and layer: alpha0, sink_share (α₀ > ε), first_real_alpha (α at the first real token: position 1
    with a BOS or replacement in front, else 0), pos0_ratio_attn and pos0_ratio_block (‖h₀‖/median after the
    attention and after the block), pos0_norm_block."""
    frames = []
    for variant, mt in traces.items():
        shares = sink_share_table(mt, eps)
        prof = norm_profile(mt)
        first_real = 0 if variant == "no_bos" else 1
        real = mt.trace.key_mass[..., first_real].mean(dim=(0, 2)).numpy()  # [L]
        attn = prof[prof["sublayer"] == "attn"].set_index("layer")
        block = prof[prof["sublayer"] == "block"].set_index("layer")
        frame = shares[["layer", "alpha0", "sink_share"]].copy()
        frame.insert(0, "variant", variant)
        frame["first_real_position"] = first_real
        frame["first_real_alpha"] = real
        frame["pos0_ratio_attn"] = attn.loc[frame["layer"], "pos0_ratio"].to_numpy()
        frame["pos0_ratio_block"] = block.loc[frame["layer"], "pos0_ratio"].to_numpy()
        frame["pos0_norm_block"] = block.loc[frame["layer"], "pos0_norm"].to_numpy()
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def bos_summary(traces: dict[str, MechTrace], layers: pd.DataFrame, *, min_share: float = 0.5, ratio: float = 4.0
                ) -> pd.DataFrame:
    """Per variant: the layer where the position-0 sink forms, where its norm departs, the mean sink share."""
    rows = []
    for variant, mt in traces.items():
        sub = layers[layers["variant"] == variant]
        shares = sub[["layer", "sink_share"]].reset_index(drop=True)
        form = formation(norm_profile(mt), shares, min_share=min_share, ratio=ratio).iloc[0]
        rows.append({
            "variant": variant,
            "sink_layer": form["sink_layer"],
            "norm_depth": form["norm_depth"],
            "peak_ratio": form["peak_ratio"],
            "mean_sink_share": float(sub["sink_share"].mean()),
            "mean_alpha0": float(sub["alpha0"].mean()),
            "mean_first_real_alpha": float(sub["first_real_alpha"].mean()),
        })
    return pd.DataFrame(rows).astype({"sink_layer": "Int64"})


def bos_verdict(summary: pd.DataFrame, layers: pd.DataFrame, min_share: float = 0.5) -> str:
    """One sentence: does a position-0 sink re-emerge on the first real token without BOS?"""
    by = summary.set_index("variant")

    def where(v: str) -> str:
        layer = by.loc[v, "sink_layer"]
        return f"from layer {int(layer)}" if not pd.isna(layer) else "in no layer"

    def first(v: str) -> float:
        return float(by.loc[v, "mean_first_real_alpha"])

    def share(v: str) -> str:
        return f"{by.loc[v, 'mean_sink_share']:.0%}"

    with_sink = not pd.isna(by.loc["with_bos", "sink_layer"])
    no_sink = not pd.isna(by.loc["no_bos", "sink_layer"])
    detail = (f"with BOS the position-0 sink forms {where('with_bos')} (mean share {share('with_bos')}), without "
              f"BOS {where('no_bos')} (share {share('no_bos')}), with BOS replaced {where('replaced')} "
              f"(share {share('replaced')}); the first real token's mean α is {first('with_bos'):.2f} behind BOS "
              f"vs {first('no_bos'):.2f} at position 0")
    if no_sink:
        lag = ""
        if with_sink:
            d = int(by.loc["no_bos", "sink_layer"]) - int(by.loc["with_bos", "sink_layer"])
            lag = f", {d} layer(s) later than with BOS" if d > 0 else (" as early as with BOS" if d == 0 else
                                                                         f", {-d} layer(s) earlier than with BOS")
        return f"re-emerges: without BOS a position-0 sink forms on the first real token{lag}; {detail}"
    if with_sink:
        return f"removed: without BOS no position-0 sink reaches {min_share:.0%} of heads; {detail}"
    return f"absent: no position-0 sink with or without BOS; {detail}"
