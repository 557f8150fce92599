"""ACT head search (Yu et al. 2024) and a side-by-side benchmark of inference-time sink mitigations.

ACT calibrates only the heads where it helps. Their released code searches heads on a small calibration set by
held-out accuracy; sinkscope does the same in two stages so it fits a CPU budget: (1) calibrate each layer's heads
together and keep the `top_layers` layers that raise accuracy; (2) within those, calibrate one head at a time and keep
the heads that raise accuracy over the uncalibrated model. The chosen heads are saved as JSON and can be applied to
`profile`, `eval` or any forward pass with `calibration_interventions`.

The benchmark puts the methods that change the forward pass (position-0 masking, sink reweighting, ACT) beside the
interpretation-only ones (detect-mask-renormalise of the last token's attention, scored by
`sinkscope.analyses.evaluate`), on the same examples.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from sinkscope.analyses.evaluate.classify import PromptPass, label_token_ids, next_token_logprobs, score_labels
from sinkscope.analyses.evaluate.datasets import DatasetSpec, Example
from sinkscope.analyses.evaluate.run import Classified, EvalConfig, example_records, summarise_records
from sinkscope.analyses.trained import sink_terms
from sinkscope.capture import (
    Calibrate,
    CaptureConfig,
    Intervention,
    MaskKeys,
    ReweightSinks,
    Trace,
    intervene,
    run_capture,
)
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel
from sinkscope.progress import Progress

# what the interpretation-only rows run: detect-mask-renormalise with the z-score and entropy detectors (seed 000)
ALIGNMENT = EvalConfig(methods=("zscore", "entropy_delta"), causal=False)


@dataclass
class Calibration:
    """The heads ACT calibrates, per layer, with β and the sink threshold; plus how they were found."""

    heads: dict[int, list[int]]
    beta: float = 0.4
    threshold: float = 0.1
    model: str = ""
    dataset: str = ""
    base_accuracy: float | None = None
    calibrated_accuracy: float | None = None
    search: list[dict] = field(default_factory=list)

    def interventions(self) -> list[Intervention]:
        return calibration_interventions(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["heads"] = {str(k): v for k, v in self.heads.items()}
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        if not path.exists():
            raise SinkscopeError(f"calibration file {path} does not exist: create it with `sinkscope calibrate`")
        try:
            data = json.loads(path.read_text())
            data["heads"] = {int(k): [int(h) for h in v] for k, v in data["heads"].items()}
            return cls(**data)
        except (ValueError, KeyError, TypeError) as err:
            raise SinkscopeError(f"{path} is not a sinkscope calibration file ({err})") from None


def calibration_interventions(calibration: Calibration) -> list[Intervention]:
    """One ACT `Calibrate` per layer, scoped to that layer's chosen heads."""
    return [Calibrate(beta=calibration.beta, threshold=calibration.threshold, layers=[layer], heads=heads)
            for layer, heads in sorted(calibration.heads.items()) if heads]


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length (less padding); the stable sort keeps ties in input order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _prompts(loaded: LoadedModel, spec: DatasetSpec, examples: Sequence[Example]) -> list[list[int]]:
    if not examples:
        raise SinkscopeError("no examples to score")
    return [list(loaded.tokenizer(spec.prompt(ex.fields))["input_ids"]) for ex in examples]


def predict(loaded: LoadedModel, spec: DatasetSpec, examples: Sequence[Example],
            interventions: Sequence[Intervention] = (), batch_size: int = 8) -> torch.Tensor:
    """Predicted label index per example (highest summed verbaliser log-probability), under interventions.

    Plain forward passes (nothing captured), prompts batched by length; the result does not depend on the batch.
    Returns [len(examples)] long, in the order of `examples`.
    """
    prompts = _prompts(loaded, spec, examples)
    labels = label_token_ids(loaded.tokenizer, spec.labels, spec.answer_prefix)
    preds = torch.empty(len(prompts), dtype=torch.long)
    with intervene(loaded.model, *interventions) if interventions else nullcontext():
        for idx in _length_batches([len(p) for p in prompts], batch_size):
            batch = [prompts[i] for i in idx]
            first = next_token_logprobs(loaded, batch)
            preds[idx] = score_labels(loaded, batch, labels, first, batch_size=batch_size).argmax(-1)
    return preds


def accuracy(loaded: LoadedModel, spec: DatasetSpec, examples: Sequence[Example],
             interventions: Sequence[Intervention] = (), batch_size: int = 8) -> float:
    gold = torch.tensor([ex.label_id for ex in examples])
    return float((predict(loaded, spec, examples, interventions, batch_size) == gold).float().mean())


def _sink_sums(trace: Trace) -> torch.Tensor:
    """[4]: Σ over the prompts of α₀ and of the null mass (each a mean over layers, heads and the queries, as
    `sinkscope.analyses.trained.prompt_sinks` defines them), the summed next-token NLL and its count."""
    assert trace.nll_sum is not None and trace.nll_count is not None
    alpha0, null = sink_terms(trace)  # [P, L, H] each
    return torch.stack([alpha0.mean((1, 2)).sum(), null.mean((1, 2)).sum(), trace.nll_sum.sum().float(),
                        trace.nll_count.sum().float()]).double()


def search_heads(
    loaded: LoadedModel,
    spec: DatasetSpec,
    examples: Sequence[Example],
    *,
    beta: float = 0.4,
    threshold: float = 0.1,
    layers: Sequence[int] | None = None,
    top_layers: int = 3,
    batch_size: int = 8,
    on_trial: Callable[[dict], None] | None = None,
) -> Calibration:
    """ACT's head search on calibration examples (two stages, see the module docstring).

    on_trial: called with each trial's row (stage, layer, head (−1: all), accuracy, gain, seconds) as it finishes.
    """
    n_layers, n_heads = loaded.info.n_layers, loaded.info.n_heads
    candidates = list(range(n_layers)) if layers is None else [layer % n_layers for layer in layers]
    base = accuracy(loaded, spec, examples, batch_size=batch_size)
    rows: list[dict] = []

    def trial(stage: str, layer: int, heads: list[int] | None) -> float:
        start = time.perf_counter()
        acc = accuracy(loaded, spec, examples, [Calibrate(beta=beta, threshold=threshold, layers=[layer],
                                                          heads=heads)], batch_size)
        rows.append({"stage": stage, "layer": layer, "head": -1 if heads is None else heads[0], "accuracy": acc,
                     "gain": acc - base, "seconds": time.perf_counter() - start})
        if on_trial is not None:
            on_trial(rows[-1])
        return acc

    layer_acc = {layer: trial("layer", layer, None) for layer in candidates}
    helpful = sorted((acc, -layer) for layer, acc in layer_acc.items() if acc > base)
    chosen_layers = [-neg for _, neg in reversed(helpful)][:top_layers]
    chosen: dict[int, list[int]] = {}
    for layer in chosen_layers:
        good = [h for h in range(n_heads) if trial("head", layer, [h]) > base]
        if good:
            chosen[layer] = good
    calibration = Calibration(heads=chosen, beta=beta, threshold=threshold, model=loaded.info.name,
                              dataset=spec.name, base_accuracy=base, search=rows)
    if chosen:
        calibration.calibrated_accuracy = accuracy(loaded, spec, examples, calibration.interventions(), batch_size)
    return calibration


def mitigation_benchmark(
    loaded: LoadedModel,
    spec: DatasetSpec,
    examples: Sequence[Example],
    calibration: Calibration | None = None,
    beta: float = 0.4,
    batch_size: int = 8,
    *,
    gammas: Sequence[float] = (0.4,),
    alignment: EvalConfig | None = ALIGNMENT,
    causal_ids: Collection[str] | None = None,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Accuracy, alignment and cost of each inference-time mitigation on the same examples, side by side.

    Methods that change the forward pass (kind "forward"; "baseline" for none): none; mask_pos0 (attention to
    position 0 removed in every head, rows renormalised: seed 000's causal test); reweight_zscore_γ for each γ in
    `gammas` (`ReweightSinks`: in every row of every head, the keys with z > 2 weighted by γ and the row
    renormalised, seed 000 eq. 1 in the forward pass; γ = 0 is detect-mask-renormalise inside the model);
    act_all (ACT with β in every head); act_searched (ACT on the heads of `calibration`, if given).
    Interpretation-only methods (kind "interpretation", with `alignment`): dmr_<method> for each of
    alignment.methods, detect-mask-renormalise of the last token's attention as `sinkscope.analyses.evaluate` runs it.
    They read the attention after the forward pass and change no prediction (changed_predictions 0: their
    predictions are the baseline's, made with the attention captured).

    Each method runs each batch once (`run_capture` under its interventions): the prediction, α₀, null mass and
    loss come from that one pass (the baseline's also keeps the last token's attention rows for the alignment).

    Columns: dataset, method, kind, n, accuracy, changed_predictions (share that differ from none),
    ms_per_example (forward rows: the method's pass; DMR rows: the baseline's pass plus DMR), cost_vs_none,
    dmr_ms (DMR alone), and for none and the DMR rows the evaluation's mismatch, match
    (keyword match of the top-K attention on wrong / right predictions), spearman, topk_overlap (attention against
    causal effects, over n_causal examples: those in `causal_ids` when alignment.causal, else none); for the rows
    that change the forward pass, sink_share, null_mass and loss on the examples' prompts under the method
    (`sinkscope.analyses.trained.prompt_sinks`; NaN for the interpretation-only rows).
    Methods run interleaved batch by batch, so a load from other processes slows them alike. `progress(spec.name,
    done, total)` is called after each batch of each stage.
    """
    methods: list[tuple[str, list[Intervention]]] = [
        ("none", []),
        ("mask_pos0", [MaskKeys(positions=[0])]),
        *((f"reweight_zscore_{g:g}", [ReweightSinks(gamma=g)]) for g in gammas),
        ("act_all", [Calibrate(beta=beta)]),
    ]
    if calibration is not None:
        methods.append(("act_searched", calibration.interventions()))
    if alignment is not None:
        alignment = dataclasses.replace(alignment, batch_size=batch_size)
        alignment.check()
    prompts = _prompts(loaded, spec, examples)
    if min(len(p) for p in prompts) < 2:
        raise SinkscopeError("the sink share needs prompts of at least two tokens")
    labels = label_token_ids(loaded.tokenizer, spec.labels, spec.answer_prefix)
    classified: list[Classified] = []  # the baseline's batches with the last token's attention, for the alignment
    sinks: dict[str, list[torch.Tensor]] = {}  # per method, per batch: [4] sums of α₀, null mass, NLL, NLL count

    def one_pass(name: str, interventions: list[Intervention]) -> Callable[[list[int]], torch.Tensor]:
        """Each method's one pass per batch: predictions, α₀ / null mass / loss, and (baseline with an alignment)
        the last token's attention rows."""
        rows = name == "none" and alignment is not None
        # the baseline's rows come with the model's own output (`fused=False`), as `sinkscope eval` reads them
        config = CaptureConfig(rows="last" if rows else None, entropy=False, columns=[0], loss=True, logprobs=True,
                               fused=not rows)

        def run(idx: list[int], batch: list[list[int]] | None = None) -> torch.Tensor:
            batch = [prompts[i] for i in idx] if batch is None else batch
            with intervene(loaded.model, *interventions) if interventions else nullcontext():
                trace = run_capture(loaded, batch, config, batch_size=len(batch), padding_side="right",
                                    texts=[""] * len(batch))
                assert trace.logprobs is not None
                scores = score_labels(loaded, batch, labels, trace.logprobs, "right", batch_size)
            sinks.setdefault(name, []).append(_sink_sums(trace))
            if rows:
                lengths = trace.lengths.tolist()
                last, mass = trace.last_rows(), trace.key_mass  # [P, L, H, N]
                classified.append(Classified(prompt_ids=batch, scores=scores, passed=PromptPass(
                    logprobs=trace.logprobs, rows=[last[i, :, :, :n].clone() for i, n in enumerate(lengths)],
                    key_mass=[mass[i, :, :, :n].clone() for i, n in enumerate(lengths)])))
            return scores.argmax(-1)

        return run

    runs = {name: one_pass(name, interventions) for name, interventions in methods}
    batches = _length_batches([len(p) for p in prompts], batch_size)
    # first calls (kernels, the attention switch, each intervention's code) are not timed: one pass per method on
    # the first 8 tokens of one prompt, which takes every path a batch takes at a small fraction of its cost
    warm = [prompts[batches[0][0]][:8]]
    for run in runs.values():
        run([], warm)
    classified.clear()
    sinks.clear()
    preds = {name: torch.empty(len(examples), dtype=torch.long) for name in runs}
    seconds = dict.fromkeys(runs, 0.0)
    total = len(batches) * (2 if alignment is not None else 1)  # the timed runs, then the alignment records
    for done, idx in enumerate(batches, 1):
        for name, run in runs.items():
            start = time.perf_counter()
            preds[name][idx] = run(idx)
            seconds[name] += time.perf_counter() - start
        if progress is not None:
            progress(spec.name, done, total)
    gold = torch.tensor([ex.label_id for ex in examples])

    def row(name: str, method: str, kind: str) -> dict:
        return {"dataset": spec.name, "method": method, "kind": kind, "n": len(examples),
                "accuracy": float((preds[name] == gold).float().mean()),
                "changed_predictions": float((preds[name] != preds["none"]).float().mean()),
                "ms_per_example": 1000 * seconds[name] / len(examples), "dmr_ms": math.nan}

    rows = [row(name, name, "baseline" if name == "none" else "forward") for name, _ in methods]
    for r, (name, _) in zip(rows, methods, strict=True):
        alpha0, null, nll, count = torch.stack(sinks[name]).sum(0).tolist()
        r.update({"sink_share": alpha0 / len(prompts), "null_mass": null / len(prompts), "loss": nll / max(1, count)})
    if alignment is not None:
        records = []
        for i, (idx, done) in enumerate(zip(batches, classified, strict=True), 1):
            records += example_records(loaded, spec, [examples[j] for j in idx], alignment, done, causal_ids)
            if progress is not None:
                progress(spec.name, len(batches) + i, total)
        summary = summarise_records(records, alignment).set_index("variant")
        scores = ["mismatch", "match", "spearman", "topk_overlap", "n_causal"]
        rows[0].update(summary.loc["before", scores].to_dict())
        for method in alignment.methods:
            dmr = {"dmr_ms": float(summary.loc[method, "dmr_ms"]), **summary.loc[method, scores].to_dict()}
            rows.append({**row("none", f"dmr_{method}", "interpretation"), **dmr})
            rows[-1]["ms_per_example"] += dmr["dmr_ms"]
    frame = pd.DataFrame(rows)
    for col in ("mismatch", "match", "spearman", "topk_overlap"):
        frame[col] = frame[col].astype("float64") if col in frame else math.nan
    frame["n_causal"] = frame["n_causal"].fillna(0).astype("int64") if "n_causal" in frame else 0
    frame["cost_vs_none"] = frame["ms_per_example"] / rows[0]["ms_per_example"]
    return frame[["dataset", "method", "kind", "n", "accuracy", "changed_predictions", "ms_per_example",
                  "cost_vs_none", "dmr_ms", "mismatch", "match", "spearman", "topk_overlap", "n_causal",
                  "sink_share", "null_mass", "loss"]]
