"""Where sinks come from (seeds 001 and 002), measurable on any supported decoder.

- `residual`: hooks that read the residual stream after every attention ("half layer") and every block in the
  same forward pass as attention capture (`capture_ids` → `MechTrace`); per-family hook sites documented there.
- `norms`: ℓ2 norms per site × position, the position-0 curve vs the median position, where the sink forms, and
  cross-input cosine similarity (seed 001 Figs. 2-4).
- `bos`: the same prompts with BOS, without it, and with BOS replaced (seed 001 Fig. 3).
- `ablation`: `AblateHeads` and a per-head sweep over early layers (seed 001 Fig. 5).
- `massive`: massive activations (Sun et al. 2024) and the dimensions that carry the position-0 spike.
- `bias`: the implicit-attention-bias decomposition t_i = A_{i,0} v_0 (survey, seed 002).
- `analysis.analyze`: all of it as tidy tables + a summary; `analysis.write` a run folder with figures.

    from sinkscope.analyses.mechanisms import analyze, write
    result = analyze(load_model("smollm2"), prompts)
    print("\\n".join(result.lines()))
    write(result, loaded, "runs/mech")
"""

from sinkscope.analyses.mechanisms.ablation import AblateHeads, ablation_sweep, ablation_table
from sinkscope.analyses.mechanisms.analysis import MechanismsResult, analyze, summary_lines, write
from sinkscope.analyses.mechanisms.bias import implicit_bias, sink_inputs
from sinkscope.analyses.mechanisms.bos import bos_layers, bos_summary, bos_variants, bos_verdict, resolve_bos
from sinkscope.analyses.mechanisms.massive import massive_activations, massive_dims, pos0_dims
from sinkscope.analyses.mechanisms.norms import (
    cosine_from_unit_sum,
    cross_input_similarity,
    formation,
    norm_profile,
    norm_table,
    sink_share_table,
)
from sinkscope.analyses.mechanisms.residual import (
    HiddenRecorder,
    MechTrace,
    Site,
    capture_ids,
    decoder_layers,
    half_site_rule,
    sites_for,
)

__all__ = [
    "AblateHeads",
    "HiddenRecorder",
    "MechTrace",
    "MechanismsResult",
    "Site",
    "ablation_sweep",
    "ablation_table",
    "analyze",
    "bos_layers",
    "bos_summary",
    "bos_variants",
    "bos_verdict",
    "capture_ids",
    "cosine_from_unit_sum",
    "cross_input_similarity",
    "decoder_layers",
    "formation",
    "half_site_rule",
    "implicit_bias",
    "massive_activations",
    "massive_dims",
    "norm_profile",
    "norm_table",
    "pos0_dims",
    "resolve_bos",
    "sink_inputs",
    "sink_share_table",
    "sites_for",
    "summary_lines",
    "write",
]
