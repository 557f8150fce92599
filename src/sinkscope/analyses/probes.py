"""Linear probes on the tag part, the non-tag part and the full head output at the final token (seed 003 §4 and
the sentiment rebuttal).

For every layer and head, three logistic-regression probes (scikit-learn `LogisticRegression` after
`StandardScaler`) are fitted on one fixed, stratified train/test split of labelled statements, using as features the
head's tag t_last = Σ_{s∈S} A_last,s v_s, its non-tag part o_last − t_last, or its full output o_last
(`sinkscope.analyses.tags.final_token_parts`). The table of best heads follows the paper's criteria (seed 003 rebuttal):
high tag accuracy and low non-tag accuracy, ranked by tag − non-tag held-out accuracy.

Data: true/false statements (`geometry_of_truth`, `azaria_mitchell_true_false`, label True/False) and SST-2 sentiment
with the paper's two-shot prompt (`SST2_TEMPLATE`), read from ../shared/data (or `data_dir`).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sinkscope.analyses.evaluate.datasets import default_data_dir
from sinkscope.errors import SinkscopeError

__all__ = [
    "DATASETS",
    "PARTS",
    "SST2_TEMPLATE",
    "best_heads",
    "fit_probes",
    "load_statements",
    "make_probe",
    "probe_accuracy_table",
]

PARTS = ("tag", "nontag", "full")

SST2_TEMPLATE = (
    "it's a charming and often affecting journey. This statement is: POSITIVE.\n"
    "unflinchingly bleak and desperate. This statement is: NEGATIVE.\n"
    "{sentence}. This statement is:"
)
"""The two-shot sentiment prompt of seed 003's rebuttal ([SENTENCE] replaced by an SST-2 sentence)."""

DATASETS: dict[str, dict[str, str]] = {
    "geometry_of_truth": {"folder": "geometry_of_truth", "positive": "True"},
    "azaria_mitchell_true_false": {"folder": "azaria_mitchell_true_false", "positive": "True"},
    "sst2": {"folder": "sst2", "positive": "positive"},
}


def load_statements(
    name: str,
    n: int | None = 200,
    *,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> tuple[list[str], np.ndarray]:
    """Texts and 0/1 labels of a labelled set: a built-in name (`DATASETS`) or a JSONL file with `text` and
    `label` (bool, 0/1 or a string; "true"/"positive"/"1" count as 1). A class-balanced random sample of n
    (seeded); SST-2 sentences are put into `SST2_TEMPLATE`."""
    if name in DATASETS:
        folder = Path(data_dir) if data_dir is not None else default_data_dir()
        if folder is None:
            raise SinkscopeError("no data folder: pass --data DIR (the shared data folder) or set $SINKSCOPE_DATA")
        path = folder / DATASETS[name]["folder"] / "test.jsonl"
        if not path.exists():
            raise SinkscopeError(f"{path} not found: pass --data pointing at the shared data folder")
    else:
        path = Path(name)
        if not path.exists():
            raise SinkscopeError(f"unknown data set '{name}': use one of {', '.join(DATASETS)} or a JSONL file")
    if n is not None and n < 1:
        raise SinkscopeError(f"cannot sample {n} statements: ask for at least 1")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SinkscopeError(f"{path} is not UTF-8 text: pass a JSONL file with 'text' and 'label'") from None
    texts: list[str] = []
    labels: list[int] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text, label = record["text"], record["label"]
        except (ValueError, KeyError, TypeError):
            raise SinkscopeError(f"{path}:{i + 1}: not a JSON object with 'text' and 'label'") from None
        texts.append(str(text))
        labels.append(int(str(label).strip().lower() in ("true", "positive", "1")))
    if name == "sst2":
        texts = [SST2_TEMPLATE.format(sentence=t.strip().rstrip(" .")) for t in texts]
    y = np.asarray(labels)
    if len(set(labels)) < 2:
        raise SinkscopeError(f"{path} has a single class; probes need two")
    if n is not None and n < len(texts):
        rng = random.Random(seed)
        pos = [i for i in range(len(y)) if y[i] == 1]
        neg = [i for i in range(len(y)) if y[i] == 0]
        k_pos = min(len(pos), n - n // 2)
        k_neg = min(len(neg), n - k_pos)
        picked = sorted(rng.sample(pos, k_pos) + rng.sample(neg, k_neg))
        texts, y = [texts[i] for i in picked], y[picked]
    return texts, y


def make_probe(C: float = 1.0, random_state: int = 0, max_iter: int = 2000, scale: bool = True):
    """A scikit-learn estimator (fit / predict / score): StandardScaler (optional) + LogisticRegression."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise SinkscopeError("probes need scikit-learn: pip install scikit-learn") from None
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=random_state)
    return make_pipeline(StandardScaler(), clf) if scale else clf


def fit_probes(
    features: Mapping[str, np.ndarray],  # part → [S, L, H, d]
    labels: Sequence[int] | np.ndarray,  # [S]
    *,
    test_size: float = 0.2,
    random_state: int = 0,
    C: float = 1.0,
    scale: bool = True,
) -> pd.DataFrame:
    """One probe per part, layer and head on a single stratified split (the same for every probe).

    Returns a tidy table: layer, head, part, train_accuracy, test_accuracy, n_train, n_test, chance (the share of
    the majority class in the test set)."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(labels)
    if not features:
        raise SinkscopeError("no features to probe")
    shapes = {part: x.shape for part, x in features.items()}
    first = next(iter(features.values()))
    if any(s[:3] != first.shape[:3] for s in shapes.values()) or first.shape[0] != len(y):
        raise SinkscopeError(f"feature shapes {shapes} do not match {len(y)} labels")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise SinkscopeError("probes need two classes in the labels")
    n_test = math.ceil(test_size * len(y))
    if counts.min() < 2 or min(n_test, len(y) - n_test) < len(classes):
        raise SinkscopeError(f"{len(y)} statements ({', '.join(map(str, counts))} per class) are too few for a "
                             f"stratified split with test share {test_size}: use more statements (--limit)")
    idx = np.arange(len(y))
    train, test = train_test_split(idx, test_size=test_size, random_state=random_state, stratify=y)
    chance = float(max(np.mean(y[test]), 1 - np.mean(y[test])))
    rows = []
    _, n_layers, n_heads = first.shape[:3]
    for part, x in features.items():
        for layer in range(n_layers):
            for head in range(n_heads):
                xs = x[:, layer, head].reshape(len(y), -1).astype(np.float64)
                probe = make_probe(C=C, random_state=random_state, scale=scale)
                if np.ptp(xs[train], axis=0).max(initial=0.0) == 0.0:  # constant features (e.g. no sink): chance
                    train_acc = float(max(np.mean(y[train]), 1 - np.mean(y[train])))
                    test_acc = chance
                else:
                    probe.fit(xs[train], y[train])
                    train_acc, test_acc = float(probe.score(xs[train], y[train])), float(probe.score(xs[test], y[test]))
                rows.append({"layer": layer, "head": head, "part": part, "train_accuracy": train_acc,
                             "test_accuracy": test_acc, "n_train": len(train), "n_test": len(test), "chance": chance})
    return pd.DataFrame(rows)


def probe_accuracy_table(results: pd.DataFrame) -> pd.DataFrame:
    """Wide per-head table: layer, head, tag, nontag, full (held-out accuracies), gap = tag − nontag."""
    wide = results.pivot_table(index=["layer", "head"], columns="part", values="test_accuracy").reset_index()
    wide.columns.name = None
    for part in PARTS:
        if part not in wide:
            wide[part] = np.nan
    wide["gap"] = wide["tag"] - wide["nontag"]
    return wide[["layer", "head", *PARTS, "gap"]]


def best_heads(results: pd.DataFrame, top: int = 10) -> pd.DataFrame:
    """The heads that best fit seed 003's criteria (high tag-probe accuracy, low non-tag accuracy): ranked by
    tag − nontag held-out accuracy, ties by tag accuracy."""
    wide = probe_accuracy_table(results)
    return wide.sort_values(["gap", "tag"], ascending=[False, False], ignore_index=True).head(top)
