"""`evaluate`: seed 000 Table 2 (accuracy, keyword Match/Mismatch before and after detect-mask-renormalise) plus
causal alignment, as tidy tables, resumable in a run folder.

Per example: one batched forward pass gives the label scores and the last prompt token's attention; the
attention is aggregated (default: last layer, mean over heads, seed 000 §4.1), detect-mask-renormalise runs with
each method (Algorithm 1), keyword match is scored before and after (`alignment.py`), and, for the examples the
causal budget covers, each prompt token's causal effect on the predicted label is measured (`causal.py`).

Resuming: with `out`, every finished batch of examples is a store unit `out/units/<dataset>-<n>/` (`sinkscope.store`:
written atomically, verified by size and sha256); a restarted run with the same settings skips the example ids of
the units that verify, and recomputes (and reports) the examples of a damaged one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sinkscope.analyses.evaluate.alignment import keyword_score, spearman, token_words, topk_overlap
from sinkscope.analyses.evaluate.causal import CAUSAL_MODES, causal_effects
from sinkscope.analyses.evaluate.classify import PromptPass, label_token_ids, prompt_pass, score_labels
from sinkscope.analyses.evaluate.datasets import DatasetSpec, Example, Skipped, get_spec, load_examples, sample
from sinkscope.analyses.mitigate import aggregate_rows, detect_mask_renormalise
from sinkscope.detect import get_detector
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel
from sinkscope.progress import Progress
from sinkscope.store import Run, RunFolder, make_manifest, open_run, reporter

__all__ = ["Classified", "EvalConfig", "EvalResult", "causal_subset", "classify_examples", "evaluate",
           "evaluate_examples", "example_records", "summarise",
           "summarise_records", "table2"]

COMMAND = "eval"
RECORDS = "records.jsonl"


@dataclass(frozen=True)
class EvalConfig:
    """Settings of an evaluation. Everything but the batch sizes changes per-example results (and so must match
    when a run resumes).

    methods: detectors for detect-mask-renormalise (each one returning a sink mask); method_params their
        thresholds, e.g. {"zscore": {"alpha": 2.0}}.
    layers, heads: the aggregation of the last token's attention rows (None: last layer, all heads).
    k: top-K for keyword match and causal overlap (seed 000: K = 10).
    causal: measure causal effects; causal_mode "mask" or "occlude" (see causal.py); causal_limit: at most this
        many examples per dataset (the first ones of the seeded sample order) get them; causal_max_tokens: longer
        prompts are skipped (n forward passes each).
    """

    methods: tuple[str, ...] = ("zscore",)
    method_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    k: int = 10
    causal: bool = True
    causal_mode: str = "mask"
    causal_limit: int | None = None
    causal_max_tokens: int | None = 256
    seed: int = 0
    padding_side: str = "right"
    batch_size: int = 8
    causal_batch_size: int = 16

    def check(self) -> None:
        """Raise a one-line SinkscopeError for an unusable setting (unknown detector, bad threshold, …)."""
        if not self.methods:
            raise SinkscopeError("give at least one --method")
        if len(set(self.methods)) != len(self.methods):
            raise SinkscopeError(f"--method repeats a detector: {list(self.methods)}")
        unknown = set(self.method_params) - set(self.methods)
        if unknown:
            raise SinkscopeError(f"parameters given for {', '.join(sorted(unknown))}, which is not among the methods")
        probe = torch.tensor([0.6, 0.3, 0.1])
        for method in self.methods:
            column = get_detector(method).statistic == "column"
            detect_mask_renormalise(probe, method, detect_on=probe if column else None,
                                    **dict(self.method_params.get(method, {})))
        if self.k < 1:
            raise SinkscopeError("--top-k must be at least 1")
        if self.causal_mode not in CAUSAL_MODES:
            raise SinkscopeError(f"unknown causal mode '{self.causal_mode}': use {' or '.join(CAUSAL_MODES)}")
        if self.batch_size < 1 or self.causal_batch_size < 1:
            raise SinkscopeError("batch sizes must be at least 1")
        if self.padding_side not in ("left", "right"):
            raise SinkscopeError("padding side must be 'left' or 'right'")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change results, as JSON-ready values."""
        out = dataclasses.asdict(self)
        for name in ("batch_size", "causal_batch_size", "padding_side"):
            out.pop(name)
        out["methods"] = list(self.methods)
        out["method_params"] = {m: dict(p) for m, p in self.method_params.items()}
        for name in ("layers", "heads"):
            out[name] = None if out[name] is None else list(out[name])
        return out


@dataclass
class EvalResult:
    """Tidy tables of an evaluation: examples, scores, alignment, tokens, skipped and summary."""

    tables: dict[str, pd.DataFrame]
    config: EvalConfig
    datasets: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        """A notebook view: the summary or parameters and each table's first rows (`report.notebook`)."""
        from sinkscope.report.notebook import result_html

        return result_html(self)

    @property
    def summary(self) -> pd.DataFrame:
        return self.tables["summary"]

    def run(self, loaded: LoadedModel, command: str = "eval") -> Run:
        """The tables with a manifest (model, settings, datasets, data sources), ready for `save_run`."""
        info = loaded.info
        model = {"name": info.name, "model_type": info.model_type, "revision": info.revision, "dtype": info.dtype,
                 "n_layers": info.n_layers, "n_heads": info.n_heads}
        params = {**self.config.fingerprint(), "datasets": self.datasets, **self.info}
        return Run(tables=self.tables, manifest=make_manifest(command, model, params, seed=self.config.seed))


# ---------------------------------------------------------------------------------------------------------------
# one batch of examples → one JSON-ready record per example
# ---------------------------------------------------------------------------------------------------------------


def _causal_rank(examples: Sequence[Example], seed: int) -> dict[str, int]:
    """Each example's place in the seeded permutation that `sample` draws from (same seed, same order)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return {examples[i].id: rank for rank, i in enumerate(order)}


def causal_subset(examples: Sequence[Example], limit: int | None, seed: int) -> set[str] | None:
    """The ids of the examples that get causal effects under --causal-limit: the first `limit` of the seeded order
    `sample` draws from (None: all). examples: every loaded example of the dataset, not only the sample."""
    if limit is None:
        return None
    return {i for i, r in _causal_rank(examples, seed).items() if r < limit}


def _clean(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _mitigate(a: torch.Tensor, key_mass: torch.Tensor, config: EvalConfig
              ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """Algorithm 1 with each method on a [n]. key_mass [L, H, n] feeds column detectors (aggregated like a).

    Returns {variant: (weights [n], sinks bool [n])} with "before" first, and each method's time in ms."""
    variants = {"before": (a, torch.zeros(a.shape[-1], dtype=torch.bool))}
    dmr_ms: dict[str, float] = {}
    for method in config.methods:
        column = get_detector(method).statistic == "column"
        detect_on = aggregate_rows(key_mass, config.layers, config.heads) if column else None
        t0 = time.perf_counter()
        dmr = detect_mask_renormalise(a, method, detect_on=detect_on, **dict(config.method_params.get(method, {})))
        dmr_ms[method] = (time.perf_counter() - t0) * 1e3
        variants[method] = (dmr.b, dmr.sinks)
    return variants, dmr_ms


def _causal_note(example: Example, n: int, config: EvalConfig, causal_ids: Collection[str] | None) -> str:
    """'done' when this example gets causal effects, else why not."""
    if not config.causal:
        return "off"
    if causal_ids is not None and example.id not in causal_ids:
        return "beyond --causal-limit"
    if config.causal_max_tokens is not None and n > config.causal_max_tokens:
        return f"{n} tokens > --causal-max-tokens {config.causal_max_tokens}"
    return "done"


def _alignment_rows(variants: Mapping[str, tuple[torch.Tensor, torch.Tensor]], words: Sequence[tuple[str, ...]],
                    keywords: frozenset[str], effects: torch.Tensor | None, k: int) -> list[dict[str, Any]]:
    """One row per variant: sinks, keyword match and precision@k, and (with effects [n]) ρ and top-k overlap."""
    rows = []
    for variant, (weights, sinks) in variants.items():
        kw = keyword_score(weights, words, keywords, k)
        rows.append({
            "variant": variant, "n_sinks": int(sinks.sum()), "match": _clean(kw.match),
            "precision": _clean(kw.precision), "keywords_found": " ".join(kw.found),
            "n_keywords": len(kw.present),
            "spearman": _clean(spearman(weights, effects)) if effects is not None else None,
            "topk_overlap": _clean(topk_overlap(weights, effects, k)) if effects is not None else None,
        })
    return rows


def evaluate_examples(
    loaded: LoadedModel,
    spec: DatasetSpec,
    examples: Sequence[Example],
    config: EvalConfig,
    causal_ids: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Classify one batch of examples and score their attention. Returns one record per example (JSON-ready):
    {"example": {...}, "scores": [...], "alignment": [...], "tokens": {column: [...]}}.

    causal_ids: the example ids that get causal effects when config.causal (None: all), prompts longer than
    config.causal_max_tokens excepted.
    """
    return example_records(loaded, spec, examples, config, classify_examples(loaded, spec, examples, config),
                           causal_ids)


@dataclass
class Classified:
    """One batch classified with the last token's attention captured (what the records are built from)."""

    prompt_ids: list[list[int]]
    passed: PromptPass
    scores: torch.Tensor  # [P, labels] log-probabilities of each label

    def predictions(self) -> torch.Tensor:
        return self.scores.argmax(-1)  # [P]


def classify_examples(loaded: LoadedModel, spec: DatasetSpec, examples: Sequence[Example], config: EvalConfig
                      ) -> Classified:
    """The prediction pass of `evaluate_examples`: one capture pass over the prompts and the label scores."""
    tok = loaded.tokenizer
    label_ids = label_token_ids(tok, spec.labels, spec.answer_prefix)
    prompt_ids = [list(tok(spec.prompt(x.fields))["input_ids"]) for x in examples]
    passed = prompt_pass(loaded, prompt_ids, config.padding_side)
    scores = score_labels(loaded, prompt_ids, label_ids, passed.logprobs, config.padding_side, config.batch_size)
    return Classified(prompt_ids=prompt_ids, passed=passed, scores=scores)


def example_records(
    loaded: LoadedModel,
    spec: DatasetSpec,
    examples: Sequence[Example],
    config: EvalConfig,
    classified: Classified,
    causal_ids: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """The records of `evaluate_examples` from a batch already classified (DMR, alignment, causal effects)."""
    tok = loaded.tokenizer
    label_ids = label_token_ids(tok, spec.labels, spec.answer_prefix)
    specials = set(getattr(tok, "all_special_ids", None) or [])
    prompt_ids, passed, scores = classified.prompt_ids, classified.passed, classified.scores
    records = []
    for i, example in enumerate(examples):
        ids = prompt_ids[i]
        n = len(ids)
        tokens = [tok.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False) for t in ids]
        words = token_words(tokens, [t in specials for t in ids])
        a = aggregate_rows(passed.rows[i], config.layers, config.heads)  # [n]
        variants, dmr_ms = _mitigate(a, passed.key_mass[i], config)
        pred = int(torch.argmax(scores[i]))
        note = _causal_note(example, n, config, causal_ids)
        effects = None
        if note == "done":
            effects = causal_effects(loaded, ids, label_ids[pred], mode=config.causal_mode,
                                     batch_size=config.causal_batch_size).effects  # [n]
        alignment = _alignment_rows(variants, words, spec.keywords, effects, config.k)
        token_cols: dict[str, list[Any]] = {
            "position": list(range(n)), "token": tokens, "word": [" ".join(w) for w in words],
            "keyword": [bool(set(w) & spec.keywords) for w in words], "attention_before": a.tolist(),
        }
        for method in config.methods:
            token_cols[f"attention_after_{method}"] = variants[method][0].tolist()
            token_cols[f"sink_{method}"] = variants[method][1].tolist()
        token_cols["causal_effect"] = [None] * n if effects is None else [_clean(e) for e in effects.tolist()]
        records.append({
            "example": {
                "dataset": spec.name, "example_id": example.id, "row": example.row,
                "label": spec.labels[example.label_id], "label_id": example.label_id,
                "pred": spec.labels[pred], "pred_id": pred, "correct": pred == example.label_id,
                "logprob_pred": float(scores[i, pred]), "n_tokens": n, "n_keywords": alignment[0]["n_keywords"],
                "causal": note, **{f"dmr_ms_{m}": t for m, t in dmr_ms.items()},
            },
            "scores": [{"label_id": c, "label": label, "logprob": float(scores[i, c])}
                       for c, label in enumerate(spec.labels)],
            "alignment": alignment,
            "tokens": token_cols,
        })
    return records


# units (resume)
# ---------------------------------------------------------------------------------------------------------------


def prompt_format(spec: DatasetSpec) -> dict[str, Any]:
    """What a dataset's stored results depend on besides the settings: its instruction, template and labels."""
    return {"instruction": spec.instruction, "template": spec.template, "labels": list(spec.labels)}


def _unit_index(name: str, dataset: str) -> int | None:
    head, _, index = name.rpartition("-")
    return int(index) if head == dataset and index.isdigit() else None


def read_units(folder: RunFolder, spec: DatasetSpec, say: Callable[[str], None]) -> tuple[dict[str, Any], int]:
    """The records of the dataset's units that verify ({example_id: record}) and the next free unit index.

    A damaged unit (a file missing or changed, a corrupt record) is reported through `say` and removed, so its
    examples are recomputed. Units made with another prompt format are refused."""
    previous: dict[str, Any] = {}
    indices = [-1]
    for name in folder.unit_names():
        index = _unit_index(name, spec.name)
        if index is None:
            continue
        reason = folder.check_unit(name)
        if reason is not None:
            say(f"{spec.name} unit {name}: {reason} — recomputing its examples")
            folder.discard_unit(name)
            continue
        unit = folder.read_unit(name)
        if unit.info.get("prompt") != prompt_format(spec):
            raise SinkscopeError(f"{folder.path} holds {spec.name} results made with another prompt or label set; "
                                 "pass another --out, or --overwrite to start over")
        indices.append(index)
        for line in unit.files[RECORDS].decode("utf-8").splitlines():
            record = json.loads(line)
            previous[record["example"]["example_id"]] = record
    return previous, max(indices) + 1


def write_records(folder: RunFolder, spec: DatasetSpec, index: int, records: Sequence[dict[str, Any]]) -> None:
    """One batch of records as the unit `<dataset>-<index>` (JSON lines)."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    info = {"dataset": spec.name, "prompt": prompt_format(spec),
            "example_ids": [r["example"]["example_id"] for r in records]}
    folder.write_unit(f"{spec.name}-{index:06d}", {RECORDS: text}, info)


# ---------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------------


def _tables(records: Sequence[dict[str, Any]], skipped: Sequence[dict[str, Any]], config: EvalConfig
            ) -> dict[str, pd.DataFrame]:
    keys = ["dataset", "example_id"]
    examples = pd.DataFrame([r["example"] for r in records])
    scores = pd.DataFrame([{**{k: r["example"][k] for k in keys}, **s} for r in records for s in r["scores"]])
    alignment = pd.DataFrame([{**{k: r["example"][k] for k in keys}, "correct": r["example"]["correct"], **a}
                              for r in records for a in r["alignment"]])
    token_frames = []
    for r in records:
        frame = pd.DataFrame(r["tokens"])
        frame.insert(0, "example_id", r["example"]["example_id"])
        frame.insert(0, "dataset", r["example"]["dataset"])
        token_frames.append(frame)
    tokens = pd.concat(token_frames, ignore_index=True) if token_frames else pd.DataFrame()
    skipped_df = pd.DataFrame(list(skipped), columns=["dataset", "row", "example_id", "reason"])
    for frame in (alignment, tokens):
        for col in ("match", "precision", "spearman", "topk_overlap", "causal_effect"):
            if col in frame:
                frame[col] = frame[col].astype("float64")
    return {"examples": examples, "scores": scores, "alignment": alignment, "tokens": tokens,
            "skipped": skipped_df, "summary": summarise(examples, alignment, config)}


def summarise_records(records: Sequence[dict[str, Any]], config: EvalConfig) -> pd.DataFrame:
    """The summary (see `summarise`) of records from `evaluate_examples`."""
    return _tables(records, [], config)["summary"]


def summarise(examples: pd.DataFrame, alignment: pd.DataFrame, config: EvalConfig | None = None) -> pd.DataFrame:
    """One row per (dataset, variant): n, accuracy; keyword match on correct (Match) and wrong (Mismatch)
    predictions and precision@K likewise (seed 000 Table 2); mean Spearman ρ and top-K overlap between attention
    and causal effect over the n_causal examples that have effects; mean DMR time per example (ms)."""
    cols = ["dataset", "variant", "n", "accuracy", "mismatch", "match", "precision_mismatch", "precision_match",
            "spearman", "topk_overlap", "n_causal", "dmr_ms"]
    if examples.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (dataset, variant), group in alignment.groupby(["dataset", "variant"], sort=False):
        ex = examples[examples["dataset"] == dataset]
        right, wrong = group[group["correct"]], group[~group["correct"]]
        causal = group["spearman"].notna() | group["topk_overlap"].notna()
        dmr_col = f"dmr_ms_{variant}"
        rows.append({
            "dataset": dataset, "variant": variant, "n": len(ex), "accuracy": float(ex["correct"].mean()),
            "mismatch": wrong["match"].mean(), "match": right["match"].mean(),
            "precision_mismatch": wrong["precision"].mean(), "precision_match": right["precision"].mean(),
            "spearman": group["spearman"].mean(), "topk_overlap": group["topk_overlap"].mean(),
            "n_causal": int(causal.sum()),
            "dmr_ms": float(ex[dmr_col].mean()) if dmr_col in ex else math.nan,
        })
    out = pd.DataFrame(rows, columns=cols)
    float_cols = [c for c in cols if c not in ("dataset", "variant", "n", "n_causal")]
    out[float_cols] = out[float_cols].astype("float64")
    return out


def table2(summary: pd.DataFrame) -> pd.DataFrame:
    """Seed 000 Table 2 layout: one row per dataset with n, accuracy, then Mismatch, Match, ρ and top-K overlap
    for each variant (before, then each method) as columns named like "match[zscore]", and n_causal."""
    if summary.empty:
        return pd.DataFrame()
    datasets = list(dict.fromkeys(summary["dataset"]))
    variants = list(dict.fromkeys(summary["variant"]))
    by = summary.set_index(["dataset", "variant"])
    out = summary.drop_duplicates("dataset").set_index("dataset").loc[datasets, ["n", "accuracy"]]
    for metric in ("mismatch", "match", "spearman", "topk_overlap"):
        for variant in variants:
            out[f"{metric}[{variant}]"] = [by[metric].get((d, variant), math.nan) for d in datasets]
    out["n_causal"] = summary.drop_duplicates("dataset").set_index("dataset").loc[datasets, "n_causal"]
    return out.reset_index()


# ---------------------------------------------------------------------------------------------------------------
# the public entry point
# ---------------------------------------------------------------------------------------------------------------


def evaluate(
    loaded: LoadedModel,
    dataset: str | DatasetSpec | Sequence[str | DatasetSpec],
    *,
    data: str | Path | None = None,
    limit: int | None = None,
    methods: Sequence[str] = ("zscore",),
    method_params: Mapping[str, Mapping[str, Any]] | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    k: int = 10,
    causal: bool = True,
    causal_mode: str = "mask",
    causal_limit: int | None = None,
    causal_max_tokens: int | None = 256,
    seed: int = 0,
    batch_size: int = 8,
    causal_batch_size: int = 16,
    padding_side: str = "right",
    out: str | Path | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Classify `limit` seeded examples of each dataset with `loaded` and score attention alignment.

    dataset: a name (`list_datasets()`), a spec, or several. data: see `load_examples` (None: ../shared/data when
    present, else the Hub). out: a run folder whose units make the run resumable (finished examples are not
    recomputed; damaged units are reported through `log`, default the `sinkscope` logger, and recomputed); a folder
    of another command or other settings is refused unless `overwrite`. progress(dataset, done, total) is called
    after each batch.
    Returns an EvalResult whose tables are examples, scores, alignment, tokens, skipped and summary.
    """
    config = EvalConfig(
        methods=tuple(methods), method_params={m: dict(p) for m, p in (method_params or {}).items()},
        layers=None if layers is None else tuple(layers), heads=None if heads is None else tuple(heads), k=k,
        causal=causal, causal_mode=causal_mode, causal_limit=causal_limit, causal_max_tokens=causal_max_tokens,
        seed=seed, padding_side=padding_side, batch_size=batch_size, causal_batch_size=causal_batch_size,
    )
    config.check()
    names = [dataset] if isinstance(dataset, str | DatasetSpec) else list(dataset)
    specs = [get_spec(name) for name in names]
    if not specs:
        raise SinkscopeError("no dataset given: pass --dataset NAME (repeatable) or --all")
    if data is not None and Path(data).is_file() and len(specs) > 1:
        raise SinkscopeError(f"--data {data} is one file but {len(specs)} datasets were asked for; pass a folder "
                             "holding <name>/test.jsonl for each, or one --dataset")
    settings = {"model": loaded.info.name, **config.fingerprint()}
    folder = open_run(out, COMMAND, settings, overwrite=overwrite) if out is not None else None
    try:
        records, skipped, sources = _run(loaded, specs, config, data, limit, folder, progress, reporter(log))
    finally:
        if folder is not None:
            folder.close()
    if not records:
        reasons = sorted({str(s["reason"]) for s in skipped})
        why = f": every row was skipped ({'; '.join(reasons[:3])})" if reasons else ": the data has no rows"
        raise SinkscopeError(f"no usable example in {', '.join(s.name for s in specs)}{why}; check --data and the "
                             "dataset's label and text fields")
    info = {"limit": limit, "data": sources}
    return EvalResult(tables=_tables(records, skipped, config), config=config, datasets=[s.name for s in specs],
                      info=info)


def _run(loaded: LoadedModel, specs: Sequence[DatasetSpec], config: EvalConfig, data: str | Path | None,
         limit: int | None, folder: RunFolder | None, progress: Progress | None, say: Callable[[str], None]
         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    """Every dataset's records (stored ones reused, the rest computed and stored batch by batch), skipped rows and
    data sources."""
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    sources: dict[str, str] = {}
    for spec in specs:
        loaded_rows = load_examples(spec, data)
        sources[spec.name] = loaded_rows.source
        # the sample depends on the data and the seed only, not on the model
        chosen, lengths, too_long = _fits_context(loaded, spec, sample(loaded_rows.examples, limit, config.seed))
        causal_ids = causal_subset(loaded_rows.examples, config.causal_limit, config.seed)
        skipped.extend({"dataset": spec.name, "row": s.row, "example_id": s.example_id, "reason": s.reason}
                       for s in (*loaded_rows.skipped, *too_long))
        previous, index = read_units(folder, spec, say) if folder is not None else ({}, 0)
        # batches of similar length waste less on padding (results do not depend on the batch)
        todo = sorted((x for x in chosen if x.id not in previous), key=lambda x: lengths[x.id])
        done = [previous[x.id] for x in chosen if x.id in previous]
        records.extend(done)
        if progress is not None:
            progress(spec.name, len(done), len(chosen))

        for b0 in range(0, len(todo), config.batch_size):
            batch = todo[b0 : b0 + config.batch_size]
            new = evaluate_examples(loaded, spec, batch, config, causal_ids)
            records.extend(new)
            if folder is not None:
                write_records(folder, spec, index, new)
                index += 1
            if progress is not None:
                progress(spec.name, len(done) + b0 + len(batch), len(chosen))
    return records, skipped, sources


def _fits_context(loaded: LoadedModel, spec: DatasetSpec, examples: Sequence[Example]
                  ) -> tuple[list[Example], dict[str, int], list[Skipped]]:
    """Split off the examples whose prompt plus longest label exceeds the model's context.

    Returns the kept examples, every example's prompt length in tokens, and the skipped ones."""
    limit = loaded.info.max_positions
    longest = max(len(ids) for ids in label_token_ids(loaded.tokenizer, spec.labels, spec.answer_prefix))
    keep, lengths, bad = [], {}, []
    for x in examples:
        n = lengths[x.id] = len(loaded.tokenizer(spec.prompt(x.fields))["input_ids"])
        if limit is not None and n + longest - 1 > limit:
            bad.append(Skipped(x.row, x.id, f"row {x.row} (id {x.id}): the prompt has {n} tokens, more than the "
                                            f"model's context of {limit}; shorten the text"))
        else:
            keep.append(x)
    return keep, lengths, bad
