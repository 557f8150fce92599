"""The residual stream of a capture, as the mechanisms analyses read it: `MechTrace` (a `Trace` with its residual
sites) and `capture_ids`, which asks `run_capture` for the sites and, optionally, the attention column of one key.

The sites themselves (embed, attn = the half layer, block) and how each family's half layer is read are defined in
`sinkscope.capture.hidden`; nothing here registers hooks or runs a model itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from sinkscope.capture import CaptureConfig, Intervention, Trace, intervene, run_capture
from sinkscope.capture.hidden import (
    SUBLAYERS,
    HiddenRecorder,
    Site,
    decoder_layers,
    half_site_rule,
    hidden_summary,
    sites_for,
    unit_sum,
)
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel

__all__ = [
    "SUBLAYERS",
    "HiddenRecorder",
    "MechTrace",
    "Site",
    "capture_ids",
    "decoder_layers",
    "half_site_rule",
    "sites_for",
]


@dataclass
class MechTrace:
    """Attention statistics plus the residual stream of one capture (P prompts, S = 2L + 1 sites, N, d)."""

    trace: Trace  # key_mass [P, L, H, N] etc., in prompt coordinates (position 0 = first token)
    hidden: torch.Tensor  # [P, S, N, d]  residual stream; zeros past each prompt's length
    sites: list[Site]
    sink_column: torch.Tensor | None = None  # [P, L, H, N]  A_{i,s}: attention of query i to the sink key s

    @property
    def lengths(self) -> torch.Tensor:
        return self.trace.lengths

    def valid(self) -> torch.Tensor:
        """[P, N] bool: real token positions."""
        return self.trace.valid_keys()

    def norms(self) -> torch.Tensor:
        """‖h‖₂ at every site and position [P, S, N]: from the vectors, or as captured with `hidden="norms"`."""
        if self.trace.hidden_norms is not None:
            return self.trace.hidden_norms
        if self.hidden.numel() == 0:
            raise SinkscopeError("this capture has no residual stream; capture with hidden=True or hidden='norms'")
        return torch.linalg.vector_norm(self.hidden.float(), dim=-1)

    def summary(self, top_k: int) -> dict[str, torch.Tensor]:
        """Per prompt and site the `top_k` largest |h| entries (value, position, dim [P, S, k]), the median |h|
        [P, S] and the first token's vector [P, S, d] (`capture.hidden.hidden_summary`): as reduced in the capture
        (`capture_ids(top=…)`), or from the vectors."""
        found = self.trace.hidden_summary
        if found is not None and found["value"].shape[-1] >= top_k:
            return {k: (v[..., :top_k] if k in ("value", "position", "dim") else v) for k, v in found.items()}
        if self.hidden.numel() == 0:
            raise SinkscopeError(f"this capture kept neither the residual vectors nor their top-{top_k} summary; "
                                 f"capture with hidden=True or top={top_k}")
        per = [[hidden_summary(self.hidden[p, s, :n], top_k) for s in range(self.hidden.shape[1])]
               for p, n in enumerate(self.lengths.tolist())]
        return {k: torch.stack([torch.stack([x[k] for x in row]) for row in per]) for k in per[0][0]}

    def units(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ over prompts of h/‖h‖ at every site and position j < the shortest prompt ([S, J, d] float64) and the
        number of non-zero vectors summed ([S, J]): as reduced in the capture (`capture_ids(leading=J)`), or from
        the vectors."""
        n = int(self.lengths.min())
        if self.trace.hidden_units is not None and self.trace.hidden_unit_count is not None:
            return self.trace.hidden_units[:, :n], self.trace.hidden_unit_count[:, :n]
        if self.hidden.numel() == 0:
            raise SinkscopeError("this capture kept neither the residual vectors nor their unit sums; capture with "
                                 "hidden=True or leading=J")
        parts = [[unit_sum(self.hidden[p, s, :n], n) for s in range(self.hidden.shape[1])]
                 for p in range(self.hidden.shape[0])]
        units = sum(torch.stack([u for u, _ in row]) for row in parts)
        count = sum(torch.stack([c for _, c in row]) for row in parts)
        return units, count  # type: ignore[return-value]

    def without_vectors(self) -> MechTrace:
        """The same capture keeping only the norms of the residual stream (drops the [P, S, N, d] vectors)."""
        if self.trace.hidden is None and self.trace.hidden_norms is not None:
            return self
        trace = replace(self.trace, hidden=None, hidden_norms=self.norms())
        return replace(self, trace=trace, hidden=torch.empty(0))


def capture_ids(
    loaded: LoadedModel,
    ids: Sequence[Sequence[int]],
    config: CaptureConfig | None = None,
    *,
    interventions: Sequence[Intervention] = (),
    sink_position: int | None = None,
    hidden: bool | str = True,
    top: int = 0,
    leading: int = 0,
    batch_size: int = 8,
    prompts: Sequence[str] | None = None,
) -> MechTrace:
    """Run token-id sequences through `run_capture` with the residual-stream sites (and, with `sink_position`, the
    attention column A_{i,s} of that key) in the same forward pass.

    ids: one list of token ids per prompt (special tokens already in place). `interventions` (e.g. `AblateHeads`)
    apply to every forward pass. `hidden`: True for the residual-stream vectors, "norms" for only their norms
    (`MechTrace.norms()`), False for none. `top` and `leading` reduce the residual stream inside the capture
    (`MechTrace.summary`, `MechTrace.units`), which is how `analyze` reads it without keeping the vectors.
    Returns a `MechTrace`; `hidden` is an empty tensor unless `hidden=True`.
    """
    config = config or CaptureConfig(rows=None, entropy=False, fused=False)
    seqs = [list(map(int, s)) for s in ids]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise SinkscopeError("capture_ids needs at least one non-empty token sequence")
    if hidden:
        half_site_rule(loaded.model)  # refuse families whose half-layer site is unknown, before running anything
    config = replace(config, hidden=SUBLAYERS if hidden else None, hidden_norms=hidden == "norms",
                     hidden_top=top if hidden else 0, hidden_leading=leading if hidden else 0,
                     columns=[sink_position] if sink_position is not None else config.columns)
    context = intervene(loaded.model, *interventions) if interventions else nullcontext()
    with context:
        trace = run_capture(loaded, seqs, config, batch_size=batch_size, padding_side="right", texts=prompts)
    column = trace.columns[..., 0] if sink_position is not None and trace.columns is not None else None
    hidden_states = trace.hidden if trace.hidden is not None else torch.empty(0)
    sites = trace.sites if trace.sites is not None else sites_for(loaded.info.n_layers)
    return MechTrace(trace=trace, hidden=hidden_states, sites=sites, sink_column=column)
