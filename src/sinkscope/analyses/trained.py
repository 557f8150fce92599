"""Training-time mitigations beside the inference-time ones (seed 002's call for one benchmark, #18 item 4).

`train_variants` trains the tiny LM's attention variants (softmax, off-by-one, learned sink logit, gated attention;
`sinkscope.toy.tinylm.variants`) from scratch on one budget — the same text, steps, seed and architecture — and
`prompt_sinks` measures any model on the benchmark's prompts the same way for both groups:

    sink_share  α₀ = the mean over the queries i ≥ 1 of A_i0 (query 0 sees only itself), averaged over prompts,
                layers and heads (sinkscope's capture of column 0, so the same numbers as eager attention; for
                off-by-one and sink-logit the probabilities the variant really uses)
    null_mass   1 − Σ_j A_ij averaged the same way: the share each row gives to the extra / learned logit (0 for
                softmax and gated attention, and for every inference-time method of a softmax model)
    loss        next-token cross-entropy over the prompts' tokens (nats/token), under the method

Inference-time methods are measured under their interventions on the loaded model; trained variants on themselves.
`variant_rows` adds each trained variant's accuracy on a dataset as rows of kind "training" with the columns of
`sinkscope.analyses.calibrate.mitigation_benchmark`, plus the held-out text loss and sink share of its training run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sinkscope.analyses.evaluate.datasets import DatasetSpec, Example
from sinkscope.capture import CaptureConfig, Intervention, Trace, intervene, run_capture
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel, model_info


def budget_config(data: str | Path, out: str | Path, steps: int, seed: int = 0, **overrides: Any) -> Any:
    """The shared budget: `sinkscope-tiny`'s recipe (3 layers, d_model 64, 4 heads, context 64, batch 16, byte-level
    BPE of 1024 tokens, AdamW lr 5e-3, weight decay 0.1, cosine schedule; half of every batch the Bigram-Backcopy task
    with 24 dedicated trigger tokens) for `steps` steps on the text of `data`,
    softmax attention (each variant replaces `variant`). Returns a `tinylm.TrainConfig`."""
    from sinkscope.toy.tinylm import TrainConfig

    base = dict(d_model=64, layers=3, heads=4, intermediate=None, vocab_size=1024, seq_len=64, batch_size=16, lr=5e-3,
                weight_decay=0.1, synthetic="bigram_backcopy", synthetic_frac=0.5, synthetic_triggers=24,
                eval_every=max(1, steps // 4), eval_batch=32)
    return TrainConfig(data=str(data), out=str(out), steps=steps, seed=seed, device="cpu", **{**base, **overrides})


@dataclass
class TrainedVariant:
    """One variant trained on the budget: its model (with its attention function), run folder and held-out figures."""

    variant: str
    loaded: LoadedModel
    run: Path
    steps: int
    heldout_loss: float
    heldout_sink_share: float  # α₀ on the held-out text batch, mean over layers and heads
    train_seconds: float


def train_variants(
    variants: Sequence[str],
    data: str | Path,
    out: str | Path,
    steps: int,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    **overrides: Any,
) -> list[TrainedVariant]:
    """Train each variant from scratch on the same budget (`budget_config`) into out/<variant>/ (a `train-lm` run
    folder; a finished run there with the same settings is reused, an interrupted one resumed)."""
    from sinkscope.toy.tinylm import check_variant, load_checkpoint, train

    if steps < 1:
        raise SinkscopeError("--train-steps must be at least 1")
    trained = []
    for variant in variants:
        check_variant(variant)
        cfg = replace(budget_config(data, Path(out) / variant, steps, seed, **overrides), variant=variant)
        cfg.validate()
        start = time.perf_counter()
        result = train(cfg, resume=True, log=log)
        seconds = time.perf_counter() - start
        model, tokenizer = load_checkpoint(result.out / "model")
        model.config._name_or_path = f"tinylm-{variant}"
        loaded = LoadedModel(model=model, tokenizer=tokenizer, info=model_info(model, tokenizer, f"tinylm-{variant}"))
        final = result.final
        assert final is not None
        trained.append(TrainedVariant(variant, loaded, result.out, result.steps_done, final.loss,
                                      float(final.alpha0().mean()), seconds))
    return trained


@torch.inference_mode()
def prompt_sinks(loaded: LoadedModel, prompts: Sequence[Sequence[int]], interventions: Sequence[Intervention] = (),
                 batch_size: int = 8) -> dict[str, float]:
    """sink_share, null_mass and loss (see the module docstring) of `loaded` on token-id prompts, under
    `interventions`: one `run_capture` pass (right padding, so prompt position 0 is key 0)."""
    config = CaptureConfig(rows=None, entropy=False, columns=[0], loss=True)
    if min(len(p) for p in prompts) < 2:
        raise SinkscopeError("the sink share needs prompts of at least two tokens")
    with intervene(loaded.model, *interventions) if interventions else nullcontext():
        trace = run_capture(loaded, [list(p) for p in prompts], config, batch_size=batch_size, padding_side="right")
    assert trace.nll_sum is not None and trace.nll_count is not None
    alpha0, null = sink_terms(trace)
    return {"sink_share": float(alpha0.mean()), "null_mass": float(null.mean()),
            "loss": float(trace.nll_sum.sum()) / max(1, int(trace.nll_count.sum()))}


def sink_terms(trace: Trace) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, layer and head ([P, L, H] each): α₀, the mean over queries i ≥ 1 of A_i0, and the null mass, the
    mean over queries of the learned sink's share (zeros without one). The trace needs `columns=[0]` (right padding,
    so prompt position 0 is key 0)."""
    assert trace.columns is not None
    col = trace.columns[..., 0]  # [P, L, H, N]: A_i0 for every query i (0 past each prompt's length)
    later = (torch.arange(col.shape[-1]) >= 1).float()  # queries i ≥ 1 (query 0 sees only itself)
    alpha0 = (col * later).sum(-1) / (trace.lengths - 1).clamp(min=1)[:, None, None].float()
    null = (trace.sink_share.sum(-1) / trace.lengths[:, None, None].float()
            if trace.sink_share is not None else torch.zeros_like(alpha0))
    return alpha0, null


def variant_rows(trained: Sequence[TrainedVariant], spec: DatasetSpec, examples: Sequence[Example],
                 batch_size: int = 8) -> pd.DataFrame:
    """Rows of kind "training" for one dataset: each trained variant's accuracy on `examples` (as
    `calibrate.predict` scores them), prompt sink share / null mass / loss, and its held-out figures.
    changed_predictions and cost_vs_none compare with the trained softmax variant when it is among `trained`
    (NaN otherwise): a comparison across models of different size or tokenizer would mean nothing."""
    from sinkscope.analyses.calibrate import _prompts, predict

    gold = torch.tensor([ex.label_id for ex in examples])
    rows, preds = [], {}
    for tv in trained:
        predict(tv.loaded, spec, examples[:1], batch_size=batch_size)  # the first call (attention switch) untimed
        start = time.perf_counter()
        preds[tv.variant] = predict(tv.loaded, spec, examples, batch_size=batch_size)
        ms = 1000 * (time.perf_counter() - start) / len(examples)
        sinks = prompt_sinks(tv.loaded, _prompts(tv.loaded, spec, examples), batch_size=batch_size)
        rows.append({"dataset": spec.name, "method": f"trained_{tv.variant}", "kind": "training", "n": len(examples),
                     "accuracy": float((preds[tv.variant] == gold).float().mean()), "ms_per_example": ms,
                     "dmr_ms": float("nan"), "n_causal": 0, **sinks, "heldout_loss": tv.heldout_loss,
                     "heldout_sink_share": tv.heldout_sink_share, "train_steps": tv.steps})
    frame = pd.DataFrame(rows)
    ref = next((r for r in rows if r["method"] == "trained_softmax"), None)
    frame["changed_predictions"] = [float((preds[tv.variant] != preds["softmax"]).float().mean())
                                    if ref else float("nan") for tv in trained]
    frame["cost_vs_none"] = frame["ms_per_example"] / ref["ms_per_example"] if ref else float("nan")
    for col in ("mismatch", "match", "spearman", "topk_overlap"):
        frame[col] = float("nan")
    return frame
