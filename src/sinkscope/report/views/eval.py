"""The report section of a `sinkscope eval` run: seed 000's Table 2 per dataset, before/after bars, the
causal-alignment scatter and a per-example drill-down with the token view (attention before and after
detect-mask-renormalise, the causal effect of each token)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sinkscope.report.sections import SectionContent, register_section
from sinkscope.report.views import MAX_ROWS, floats, grid, help_text, script, tables_of
from sinkscope.store import Run

MAX_TOKEN_EXAMPLES = 40  # examples per dataset with a token view (those with causal effects first)
MAX_POINTS = 2000  # examples in the causal-alignment scatter
METRICS = {"mismatch": "Mismatch", "match": "Match", "precision_mismatch": "prec@K wrong",
           "precision_match": "prec@K right", "spearman": "ρ causal", "topk_overlap": "top-K ∩"}
EXAMPLE_COLUMNS = ["dataset", "example_id", "label", "pred", "correct", "n_tokens", "n_keywords", "causal"]


def chosen_examples(examples: pd.DataFrame, per_dataset: int | None = None) -> pd.DataFrame:
    """The examples given a token view: per dataset (at most `per_dataset`, default MAX_TOKEN_EXAMPLES), those with
    causal effects first, then the others, in order."""
    order = examples.assign(_c=(examples["causal"] != "done").astype(int) if "causal" in examples else 0,
                            _i=np.arange(len(examples)))
    order = order.sort_values(["_c", "_i"], kind="stable")
    limit = MAX_TOKEN_EXAMPLES if per_dataset is None else per_dataset
    return order.groupby("dataset", sort=False).head(limit)[["dataset", "example_id"]]


def token_views(tables: Any, chosen: pd.DataFrame, methods: list[str]) -> dict[str, Any]:
    """{"dataset/example_id": tokens, keyword flags, attention before, after and sinks per method, causal effects},
    read a batch of the tokens table at a time."""
    if not tables.has("tokens", ["dataset", "example_id", "position", "token", "attention_before"]):
        return {}
    columns = tables.columns("tokens")
    want = ["dataset", "example_id", "position", "token", "attention_before",
            *[c for c in ("keyword", "causal_effect") if c in columns],
            *[c for m in methods for c in (f"attention_after_{m}", f"sink_{m}") if c in columns]]
    keys = set(zip(chosen["dataset"], chosen["example_id"], strict=True))
    parts = []
    for batch in tables.batches("tokens", want):
        mine = [k in keys for k in zip(batch["dataset"], batch["example_id"], strict=True)]
        if any(mine):
            parts.append(batch[mine])
    if not parts:
        return {}
    rows = pd.concat(parts, ignore_index=True)
    out = {}
    for (dataset, example_id), group in rows.groupby(["dataset", "example_id"], sort=False):
        group = group.sort_values("position")
        view: dict[str, Any] = {"tokens": [str(t) for t in group["token"]],
                                "before": floats(group["attention_before"], 6),
                                "keyword": [bool(k) for k in group["keyword"]] if "keyword" in group else None,
                                "causal": floats(group["causal_effect"], 6) if "causal_effect" in group
                                and group["causal_effect"].notna().any() else None, "after": {}}
        for m in methods:
            if f"attention_after_{m}" in group:
                view["after"][m] = {"w": floats(group[f"attention_after_{m}"], 6),
                                    "sinks": [bool(s) for s in group[f"sink_{m}"]] if f"sink_{m}" in group else None}
        out[f"{dataset}/{example_id}"] = view
    return out


@register_section("eval", title="Evaluation", order=10)
def eval_section(run: Run) -> SectionContent | None:
    tables = tables_of(run)
    if not tables.has("summary", ["dataset", "variant", "accuracy"]) or not tables.has("examples",
                                                                                        ["dataset", "example_id"]):
        return None
    summary = tables.read("summary")
    variants = list(dict.fromkeys(summary["variant"]))
    methods = [v for v in variants if v != "before"]
    examples = tables.read("examples", [c for c in EXAMPLE_COLUMNS if c in tables.columns("examples")])
    shown = [c for c in METRICS if c in summary]
    per_dataset = {}
    for dataset, group in summary.groupby("dataset", sort=False):
        by = group.set_index("variant")
        per_dataset[str(dataset)] = {
            "table": grid(group.drop(columns=["dataset"]).reset_index(drop=True)),
            "accuracy": float(by["accuracy"].iloc[0]), "n": int(by["n"].iloc[0]) if "n" in by else None,
            "bars": {"categories": [METRICS[m] for m in shown],
                     "series": [{"name": v, "values": floats([by.loc[v, m] for m in shown])} for v in by.index]},
        }
    points: dict[str, Any] = {}
    if tables.has("alignment", ["dataset", "example_id", "variant", "spearman"]):
        align = tables.read("alignment", ["dataset", "example_id", "variant", "spearman"]).dropna(subset=["spearman"])
        rho = align.pivot_table(index=["dataset", "example_id"], columns="variant", values="spearman", sort=False)
        if "before" in rho:
            rho = rho.dropna(subset=["before"]).head(MAX_POINTS)
            keys = [f"{d}/{e}" for d, e in rho.index]
            points = {"keys": keys, "before": floats(rho["before"]),
                      "after": {m: floats(rho[m]) for m in methods if m in rho}}
    views = token_views(tables, chosen_examples(examples), methods)
    k = (tables.manifest.get("parameters", {}) or {}).get("k", "K")
    data = {"datasets": per_dataset, "methods": methods, "points": points, "views": views,
            "examples": grid(examples), "k": k}
    more = (f" The first {MAX_ROWS} examples are listed." if len(examples) > MAX_ROWS else "")
    body = (
        help_text(f"Seed 000 Table 2 per dataset: accuracy, and how well the last token's top-{k} attended tokens "
                  "match the task keywords on wrong (Mismatch) and right (Match) predictions, before and after "
                  "detect-mask-renormalise with each method; ρ causal and top-K ∩ compare the attention with each "
                  "token's causal effect.")
        + '<div class="ss-controls"><label>dataset <select class="ss-eval-dataset"></select></label>'
          '<span class="ss-eval-acc ss-note"></span></div>'
        + '<div class="ss-eval-table"></div><div class="ss-view-row"><div class="ss-chart ss-eval-bars"></div>'
          '<div class="ss-chart ss-eval-scatter"></div></div>'
        + "<h3>Examples</h3>"
        + help_text("Click an example (or a point of the scatter) for its token view: the prompt's tokens shaded by "
                    "the last token's attention before and after detect-mask-renormalise (sinks ▼), and by each "
                    f"token's causal effect where it was measured.{more} Token views are embedded for "
                    f"{MAX_TOKEN_EXAMPLES} examples per dataset (those with causal effects first).")
        + '<div class="ss-eval-examples"></div><div class="ss-panel ss-eval-detail" hidden></div>'
    )
    return SectionContent(html=body, data=data, script=script("eval"))
