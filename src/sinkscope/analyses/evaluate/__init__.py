"""Classification evaluation of attention-sink mitigation (seed 000 Table 2) and causal alignment.

`evaluate(loaded, "sst2", limit=900)` classifies a dataset, scores how well the last token's attention points at
the task keywords before and after detect-mask-renormalise, and how well it agrees with each token's causal effect.
Modules: datasets (specs, loaders), classify (label scoring), alignment (keyword match, Spearman, overlap),
causal (per-token causal effects), run (the pipeline, tables, resume), cli (`sinkscope eval`).
"""

from sinkscope.analyses.evaluate.alignment import keyword_score, spearman, token_words, top_k, topk_overlap
from sinkscope.analyses.evaluate.causal import CausalEffects, MaskKeyPerRow, causal_effects
from sinkscope.analyses.evaluate.classify import label_token_ids, prompt_pass, score_labels
from sinkscope.analyses.evaluate.datasets import (
    SPECS,
    DatasetSpec,
    Example,
    get_spec,
    list_datasets,
    load_examples,
    sample,
)
from sinkscope.analyses.evaluate.run import EvalConfig, EvalResult, evaluate, evaluate_examples, summarise, table2

__all__ = [
    "SPECS",
    "CausalEffects",
    "DatasetSpec",
    "EvalConfig",
    "EvalResult",
    "Example",
    "MaskKeyPerRow",
    "causal_effects",
    "evaluate",
    "evaluate_examples",
    "get_spec",
    "keyword_score",
    "label_token_ids",
    "list_datasets",
    "load_examples",
    "prompt_pass",
    "sample",
    "score_labels",
    "spearman",
    "summarise",
    "table2",
    "token_words",
    "top_k",
    "topk_overlap",
]
