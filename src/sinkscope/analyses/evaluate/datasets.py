"""Classification datasets of seed 000 (Table 1): label sets, instructions, templates, task keywords and loaders.

A `DatasetSpec` says how one example becomes a prompt (instruction + template, ending just before the label) and
which words of the prompt are task keywords (instruction and label words, seed 000 §2.1: "for SST-2 ... classify,
sentiment, positive and negative"). Loaders read JSONL or CSV files (the offline copies in `../shared/data/<name>/`
whose README gives the fields and label mapping) or, for users, the HuggingFace Hub through `datasets` (imported
lazily). Bad rows (a missing column, an unknown label, an empty text, invalid JSON, a repeated id) are skipped and
reported with their row number; the rest is kept.

Labels follow the verbaliser lists of ACT (Yu et al. 2024), which seed 000 follows; a file's `label` is the
verbaliser (any case) or its index in that list (the `label_id` of the shared copies).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sinkscope.errors import SinkscopeError

__all__ = [
    "SPECS",
    "DatasetSpec",
    "Example",
    "LoadResult",
    "Skipped",
    "default_data_dir",
    "get_spec",
    "list_datasets",
    "load_examples",
    "sample",
]


@dataclass(frozen=True)
class HubSource:
    """Where a dataset lives on the HuggingFace Hub and how its integer labels map onto the verbalisers.

    labels: the verbaliser of each Hub label id, in the Hub's id order.
    fields: Hub column for each template field, e.g. {"text": "sentence"}.
    """

    path: str
    name: str | None
    split: str
    fields: Mapping[str, str]
    label_column: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class DatasetSpec:
    """One classification task: labels, prompt and keywords.

    prompt(x) = instruction + "\\n" + template.format(**x.fields); the model then scores answer_prefix + label.
    The template ends with a colon and the verbalisers start with a space (" positive"), which is how BPE
    tokenizers split the continuation (a trailing space in the prompt would be a token of its own).
    """

    name: str
    title: str
    labels: tuple[str, ...]
    instruction: str
    template: str
    keywords: frozenset[str]
    fields: tuple[str, ...] = ("text",)
    answer_prefix: str = " "
    hub: HubSource | None = None

    def prompt(self, fields: Mapping[str, str]) -> str:
        """The prompt for one example's fields (the label is what the model continues with)."""
        return self.instruction + "\n" + self.template.format(**fields)

    def label_index(self, value: Any) -> int | None:
        """A file's label as an index into `labels`: the verbaliser (any case) or its index; None if unknown."""
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value if 0 <= value < len(self.labels) else None
        if isinstance(value, str):
            text = value.strip()
            for i, label in enumerate(self.labels):
                if text.casefold() == label.casefold():
                    return i
            if text.isdigit() and int(text) < len(self.labels):
                return int(text)
        return None


def _kw(*words: str) -> frozenset[str]:
    return frozenset(w.casefold() for w in words)


def _quoted(labels: Sequence[str]) -> str:
    quoted = [f"'{label}'" for label in labels]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


_SENT2 = ("negative", "positive")
_SENT5 = ("terrible", "negative", "neutral", "positive", "great")
_DBPEDIA = ("company", "school", "artist", "sport", "politics", "transportation", "building", "nature", "village",
            "animal", "plant", "album", "film", "book")
_AGNEWS = ("World", "Sports", "Business", "Technology")
_TREC = ("Description", "Entity", "Expression", "Person", "Number", "Location")
_CB = ("Yes", "No", "Maybe")
_BOOLQ = ("False", "True")

SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "sst2", "SST-2", _SENT2,
            f"Classify the sentiment of the sentence as {_quoted(_SENT2[::-1])}.",
            "Sentence: {text}\nSentiment:",
            _kw("classify", "sentiment", *_SENT2),
            hub=HubSource("nyu-mll/glue", "sst2", "validation", {"text": "sentence"}, "label", _SENT2),
        ),
        DatasetSpec(
            "sst5", "SST-5", _SENT5,
            f"Classify the sentiment of the sentence as {_quoted(_SENT5)}.",
            "Sentence: {text}\nSentiment:",
            _kw("classify", "sentiment", *_SENT5),
            hub=HubSource("SetFit/sst5", None, "validation", {"text": "text"}, "label", _SENT5),
        ),
        DatasetSpec(
            "mr", "MR", _SENT2,
            f"Classify the sentiment of the movie review as {_quoted(_SENT2[::-1])}.",
            "Review: {text}\nSentiment:",
            _kw("classify", "sentiment", *_SENT2),
            hub=HubSource("cornell-movie-review-data/rotten_tomatoes", None, "validation", {"text": "text"}, "label",
                          _SENT2),
        ),
        DatasetSpec(
            "subj", "SUBJ", ("objective", "subjective"),
            "Classify the sentence as 'subjective' or 'objective'.",
            "Sentence: {text}\nType:",
            _kw("classify", "subjective", "objective"),
            hub=HubSource("SetFit/subj", None, "test", {"text": "text"}, "label", ("objective", "subjective")),
        ),
        DatasetSpec(
            "dbpedia", "DBPedia", _DBPEDIA,
            f"Classify the topic of the text as one of: {', '.join(_DBPEDIA)}.",
            "Text: {text}\nTopic:",
            _kw("classify", "topic", *_DBPEDIA),
            hub=HubSource("fancyzhx/dbpedia_14", None, "test", {"text": "content"}, "label", _DBPEDIA),
        ),
        DatasetSpec(
            "agnews", "AGNews", _AGNEWS,
            f"Classify the topic of the news article as {_quoted(_AGNEWS)}.",
            "Article: {text}\nTopic:",
            _kw("classify", "topic", "news", *_AGNEWS),
            hub=HubSource("fancyzhx/ag_news", None, "test", {"text": "text"}, "label", _AGNEWS),
        ),
        DatasetSpec(
            "trec", "TREC", _TREC,
            f"Classify the type of answer the question asks for as {_quoted(_TREC)}.",
            "Question: {text}\nAnswer type:",
            _kw("classify", "type", "answer", "question", *_TREC),
            # HF `coarse_label` order today: ABBR, ENTY, DESC, HUM, LOC, NUM (see ../shared/data/trec/README.md).
            hub=HubSource("CogComp/trec", None, "test", {"text": "text"}, "coarse_label",
                          ("Expression", "Entity", "Description", "Person", "Location", "Number")),
        ),
        DatasetSpec(
            "cb", "CB", _CB,
            f"Does the premise imply the hypothesis? Answer {_quoted(_CB)}.",
            "Premise: {premise}\nHypothesis: {hypothesis}\nAnswer:",
            _kw("premise", "hypothesis", "imply", *_CB),
            fields=("premise", "hypothesis"),
            hub=HubSource("aps/super_glue", "cb", "validation", {"premise": "premise", "hypothesis": "hypothesis"},
                          "label", _CB),
        ),
        DatasetSpec(
            "boolq", "BoolQ", _BOOLQ,
            "Answer the question about the passage with 'True' or 'False'.",
            "Passage: {passage}\nQuestion: {question}?\nAnswer:",
            _kw("passage", "question", "answer", *_BOOLQ),
            fields=("passage", "question"),
            hub=HubSource("aps/super_glue", "boolq", "validation", {"passage": "passage", "question": "question"},
                          "label", _BOOLQ),
        ),
    )
}


def list_datasets() -> list[str]:
    """Dataset names in seed 000's Table 1 order."""
    return list(SPECS)


def get_spec(name: str | DatasetSpec) -> DatasetSpec:
    """The spec registered as `name` (a spec passes through); a one-line error listing the names otherwise."""
    if isinstance(name, DatasetSpec):
        return name
    key = name.strip().lower().replace("-", "").replace("_", "")
    aliases = {"agnews": "agnews", "dbpedia14": "dbpedia", "rottentomatoes": "mr"}
    key = aliases.get(key, key)
    if key not in SPECS:
        raise SinkscopeError(f"unknown dataset '{name}': use one of {', '.join(SPECS)}")
    return SPECS[key]


@dataclass(frozen=True)
class Example:
    """One usable row: id, the template fields, the gold label index, and its 1-based row in the source."""

    id: str
    fields: Mapping[str, str]
    label_id: int
    row: int


@dataclass(frozen=True)
class Skipped:
    """A row that was not used, with the reason (names the row and, where known, its id)."""

    row: int
    example_id: str | None
    reason: str


@dataclass
class LoadResult:
    """The usable examples (source order) and the skipped rows of one dataset."""

    spec: DatasetSpec
    examples: list[Example]
    skipped: list[Skipped] = field(default_factory=list)
    source: str = ""


def default_data_dir() -> Path | None:
    """$SINKSCOPE_DATA, else the `shared/data` folder beside this repository's checkout, else None (the Hub)."""
    env = os.environ.get("SINKSCOPE_DATA")
    if env:
        return Path(env)
    beside = _beside_checkout()
    return beside if beside is not None and beside.is_dir() else None


def _beside_checkout() -> Path | None:
    """`shared/data` beside the source checkout this module runs from (None when installed without one)."""
    src = next((p for p in Path(__file__).resolve().parents if p.name == "src"), None)
    return src.parent.parent / "shared" / "data" if src is not None else None


def _find_file(spec: DatasetSpec, data: Path) -> Path:
    """The file for `spec` under a data folder: <name>/test.jsonl, <name>.jsonl, <name>/test.csv or <name>.csv."""
    candidates = [data / spec.name / "test.jsonl", data / f"{spec.name}.jsonl", data / spec.name / "test.csv",
                  data / f"{spec.name}.csv"]
    for path in candidates:
        if path.is_file():
            return path
    raise SinkscopeError(f"no file for {spec.name} in {data}: expected {spec.name}/test.jsonl or {spec.name}.csv "
                         "(or pass --data hub to download it)")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                yield i, None, "empty line"
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield i, None, f"invalid JSON ({err.msg})"
                continue
            if not isinstance(record, dict):
                yield i, None, "not a JSON object"
                continue
            yield i, record, None


def _read_csv(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        for i, record in enumerate(csv.DictReader(fh), start=1):
            yield i, {k: v for k, v in record.items() if k is not None and v is not None}, None


def _where_looked() -> str:
    """Where a local copy was looked for, for messages that fall back to the Hub."""
    beside = _beside_checkout()
    places = ["--data (not given)", "$SINKSCOPE_DATA (not set)"]
    if beside is not None:
        places.append(f"{beside} (not found)")
    return "; looked for local copies in " + ", ".join(places)


def _read_hub(spec: DatasetSpec, fallback: bool = False) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Rows from the Hub, renamed to the template fields, with the label as its verbaliser."""
    hub = spec.hub
    if hub is None:
        raise SinkscopeError(f"{spec.name} has no Hub source; pass --data with a JSONL or CSV file")
    try:
        import datasets
    except ImportError:
        raise SinkscopeError(f"loading {spec.name} from the Hub needs the `datasets` package: pip install datasets "
                             "(or pass --data DIR with JSONL/CSV copies, or set $SINKSCOPE_DATA)"
                             + (_where_looked() if fallback else "")) from None
    try:
        table = datasets.load_dataset(hub.path, hub.name, split=hub.split)
    except Exception as err:  # offline, renamed, gated: every failure of the download is the user's to fix
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SinkscopeError(f"could not load {hub.path} ({hub.name or 'default'}, {hub.split}) from the Hub: {first}; "
                             "pass --data DIR with local JSONL/CSV copies when offline"
                             + (_where_looked() if fallback else "")) from None
    for i, record in enumerate(table, start=1):
        row: dict[str, Any] = {"id": f"{spec.name}-{hub.split}-{i - 1:05d}"}
        for target, column in hub.fields.items():
            if column in record:
                row[target] = record[column]
        raw = record.get(hub.label_column)
        if isinstance(raw, int) and 0 <= raw < len(hub.labels):
            row["label"] = hub.labels[raw]
        elif raw is not None:
            row["label"] = str(raw)
        yield i, row, None


def _validate(spec: DatasetSpec, rows: Iterable[tuple[int, dict[str, Any] | None, str | None]]) -> LoadResult:
    examples: list[Example] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for row, record, problem in rows:
        if record is None:
            skipped.append(Skipped(row, None, f"row {row}: {problem}"))
            continue
        raw_id = record.get("id")
        example_id = str(raw_id) if raw_id not in (None, "") else f"{spec.name}-{row:05d}"
        where = f"row {row} (id {example_id})"
        missing = [c for c in (*spec.fields, "label") if c not in record or record[c] is None]
        if missing:
            skipped.append(Skipped(row, example_id, f"{where}: missing column {', '.join(map(repr, missing))}"))
            continue
        fields = {c: str(record[c]) for c in spec.fields}
        empty = [c for c, v in fields.items() if not v.strip()]
        if empty:
            skipped.append(Skipped(row, example_id, f"{where}: empty {', '.join(map(repr, empty))}"))
            continue
        label_id = spec.label_index(record["label"])
        if label_id is None:
            skipped.append(Skipped(row, example_id, f"{where}: unknown label {record['label']!r}; expected one of "
                                                    f"{', '.join(spec.labels)} or an index 0-{len(spec.labels) - 1}"))
            continue
        if example_id in seen:
            skipped.append(Skipped(row, example_id, f"{where}: repeats an earlier id"))
            continue
        seen.add(example_id)
        examples.append(Example(example_id, {c: v.strip() for c, v in fields.items()}, label_id, row))
    return LoadResult(spec, examples, skipped)


def load_examples(dataset: str | DatasetSpec, data: str | Path | None = None) -> LoadResult:
    """Read and check every row of a dataset.

    data: a JSONL/CSV file, a folder holding `<name>/test.jsonl` (the layout of ../shared/data) or `<name>.jsonl`
    / `.csv`, "hub" for the HuggingFace Hub, or None for `default_data_dir()` (the Hub when there is none).
    JSONL rows are JSON objects; CSV files have a header row. Each row needs the spec's fields (`text`, or
    `premise`/`hypothesis` for CB, `passage`/`question` for BoolQ) and `label`; `id` is optional.
    """
    spec = get_spec(dataset)
    fallback = data is None and default_data_dir() is None  # nothing local was found: the Hub is the last resort
    if data is None:
        data = default_data_dir() or "hub"
    if str(data) == "hub":
        result = _validate(spec, _read_hub(spec, fallback))
        result.source = f"hub:{spec.hub.path if spec.hub else '?'}"
        return result
    path = Path(data)
    if not path.exists():
        raise SinkscopeError(f"data path {path} does not exist: pass a JSONL/CSV file, a folder of them, or 'hub'")
    if path.is_dir():
        path = _find_file(spec, path)
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif path.suffix == ".csv":
        rows = _read_csv(path)
    else:
        raise SinkscopeError(f"cannot read {path}: use a .jsonl or .csv file")
    result = _validate(spec, rows)
    result.source = str(path)
    return result


def sample(examples: Sequence[Example], limit: int | None, seed: int = 0) -> list[Example]:
    """`limit` examples drawn without replacement with a fixed seed, returned in source order.

    The draw is a prefix of one seeded permutation, so the sample of a smaller limit is contained in that of a
    larger one (a run can be extended by raising --limit). limit None or ≥ len: all examples.
    """
    if limit is not None and limit < 1:
        raise SinkscopeError("--limit must be a positive number of examples")
    if limit is None or limit >= len(examples):
        return list(examples)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:limit])]

