"""Training data of a tiny LM: corpus files, the tokenizer, token streams, the synthetic Bigram-Backcopy task, and
the batches of each step (a pure function of (seed, step), so a resumed run sees the same batches)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerFast

from sinkscope.errors import SinkscopeError
from sinkscope.store import atomic_dir

if TYPE_CHECKING:
    from sinkscope.toy.tinylm.model import TrainConfig

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
TEXT_SUFFIXES = (".txt", ".jsonl")


def corpus_files(path: str | Path) -> list[Path]:
    """The text files of `--data`: a .txt/.jsonl file, or a folder: its own .txt/.jsonl files plus, from each
    subfolder, `test.jsonl` if present, else its .txt files (so `/work/shared/data` gives every `*/test.jsonl`,
    tiny_shakespeare included, and never the `orig/` copies)."""
    p = Path(path)
    if not p.exists():
        raise SinkscopeError(f"--data {p} does not exist: pass a .txt or .jsonl file or a folder of them")
    if p.is_file():
        if p.suffix not in TEXT_SUFFIXES:
            raise SinkscopeError(f"--data {p} is not a .txt or .jsonl file")
        return [p]
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in TEXT_SUFFIXES)
    for sub in sorted(d for d in p.iterdir() if d.is_dir()):
        files += [sub / "test.jsonl"] if (sub / "test.jsonl").is_file() else sorted(sub.glob("*.txt"))
    if not files:
        raise SinkscopeError(f"--data {p} holds no .txt or .jsonl files (nor */test.jsonl)")
    return files


def read_documents(path: Path) -> list[str]:
    """A .txt file is one document; a .jsonl file gives the string `text` field of each row (others skipped)."""
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        return [text] if text.strip() else []
    docs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"].strip():
            docs.append(row["text"])
    return docs


def split_documents(docs: list[str], every: int = 20) -> tuple[list[str], list[str]]:
    """(train, held-out): every `every`-th document (index ≡ every/2) is held out; with fewer documents, the last
    1/every of each document's characters is."""
    if len(docs) >= every:
        return ([d for i, d in enumerate(docs) if i % every != every // 2],
                [d for i, d in enumerate(docs) if i % every == every // 2])
    cut = [len(d) - len(d) // every for d in docs]
    return [d[:c] for d, c in zip(docs, cut, strict=True)], [d[c:] for d, c in zip(docs, cut, strict=True) if d[c:]]


def load_corpus(path: str | Path) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """Read every corpus file and split it. Returns (train docs, held-out docs, per-file source records)."""
    train_docs: list[str] = []
    held: list[str] = []
    sources = []
    for f in corpus_files(path):
        docs = read_documents(f)
        if not docs:
            continue
        tr, he = split_documents(docs)
        train_docs += tr
        held += he
        sources.append({"file": str(f), "documents": len(docs), "chars": sum(map(len, docs))})
    if not train_docs or not held:
        raise SinkscopeError(f"--data {path} has no usable text (jsonl rows need a non-empty 'text' field)")
    return train_docs, held, sources


def _wrap_tokenizer(core: Any) -> PreTrainedTokenizerFast:
    from tokenizers import processors

    bos = core.token_to_id(BOS)
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B:1",
                                                        special_tokens=[(BOS, bos)])
    unk = UNK if core.token_to_id(UNK) is not None else None
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=unk, padding_side="right")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, `tokenizers` BpeTrainer) whose encodings start with `<s>`.

    Specials: `<s>` (BOS, id 0), `</s>` (EOS, 1), `<pad>` (2); then the 256 byte symbols, then merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise SinkscopeError(f"vocab size {vocab_size} is too small for byte-level BPE: use at least 300")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    core.train_from_iterator(texts, trainer=trainer)
    return _wrap_tokenizer(core)


def word_tokenizer(n_symbols: int) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer for synthetic data: `<s> </s> <pad> <unk>` then symbols t0 … t{n−1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate((BOS, EOS, PAD, UNK))}
    vocab.update({f"t{i}": 4 + i for i in range(n_symbols)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _wrap_tokenizer(core)


def encode_stream(tokenizer: PreTrainedTokenizerFast, docs: Sequence[str]) -> torch.Tensor:
    """All documents as one token stream, each followed by `</s>`, no BOS. Returns [T] int64."""
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(list(docs), add_special_tokens=False):
        out.extend(enc.ids)
        out.append(eos)
    return torch.tensor(out, dtype=torch.long)


@dataclass
class BigramBackcopy:
    """The Bigram-Backcopy task (Guo et al. 2024, "Active-Dormant Attention Heads", §2): tokens follow a sparse
    random bigram chain, except that after a trigger token the next token copies the token before the trigger.
    Heads that implement the copy are only needed after triggers and learn to park their attention on BOS
    (a dormant head = an attention sink) everywhere else. With `distances` D > 1, trigger k (in alphabet order)
    copies the token d_k = 1 + (k mod D) places before it instead — D copy rules, each needed only after its own
    triggers, so more heads have a dormant role (D = 1 is the task of the paper).

    ids: [V] token ids of the alphabet; succ: [V, k] successor indices; cdf: [V, k]; trigger: [V] bool;
    distance: [V] long, the copy distance of each trigger (0 for the other symbols).
    """

    ids: torch.Tensor
    succ: torch.Tensor
    cdf: torch.Tensor
    trigger: torch.Tensor
    distance: torch.Tensor

    @classmethod
    def make(cls, ids: Sequence[int], n_triggers: int = 3, branching: int = 8, seed: int = 0,
             trigger_ids: Sequence[int] = (), distances: int = 1) -> BigramBackcopy:
        """A fixed random instance over the token ids `ids` (the same `seed` gives the same chain).

        Triggers: `trigger_ids` if given (added to the alphabet), else `n_triggers` random members of `ids`.
        """
        gen = torch.Generator().manual_seed(seed)
        alphabet = list(ids) + list(trigger_ids)
        v = len(alphabet)
        succ = torch.stack([torch.randperm(v, generator=gen)[:branching] for _ in range(v)])
        w = -torch.log(torch.rand(v, branching, generator=gen).clamp(min=1e-9))  # Dirichlet(1) rows
        cdf = (w / w.sum(-1, keepdim=True)).cumsum(-1)
        trigger = torch.zeros(v, dtype=torch.bool)
        if trigger_ids:
            trigger[len(ids):] = True
        else:
            trigger[torch.randperm(v, generator=gen)[:n_triggers]] = True
        distance = torch.zeros(v, dtype=torch.long)
        distance[trigger] = 1 + torch.arange(int(trigger.sum())) % distances
        return cls(torch.tensor(alphabet, dtype=torch.long), succ, cdf, trigger, distance)

    def _started(self, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
        """[n, length] token ids with a random non-trigger first token (the rest to be filled)."""
        x = torch.empty(n, length, dtype=torch.long)
        starts = (~self.trigger).nonzero().squeeze(1)
        x[:, 0] = starts[torch.randint(len(starts), (n,), generator=gen)]
        return x

    def _bigram_next(self, prev: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """[n] a successor of each token in `prev` [n], drawn from the bigram chain."""
        u = torch.rand(len(prev), generator=gen)
        j = (self.cdf[prev] < u[:, None]).sum(-1).clamp(max=self.succ.shape[1] - 1)
        return self.succ[prev, j]

    def sample(self, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
        """n sequences of `length` tokens (no BOS). Returns [n, length] token ids."""
        x = self._started(n, length, gen)
        for t in range(1, length):
            prev = x[:, t - 1]
            nxt = self._bigram_next(prev, gen)
            if t >= 2:
                src = t - 1 - self.distance[prev]  # [n]: the position the copy reads
                copy = x.gather(1, src.clamp(min=0)[:, None]).squeeze(1)
                nxt = torch.where(self.trigger[prev] & (src >= 0), copy, nxt)
            x[:, t] = nxt
        return self.ids[x]


RECALL_RULES = ("copy", "induction", "two_hop", "bind", "bind2", "bind_hop")


def _last(mask: torch.Tensor) -> torch.Tensor:
    """The last True position of each row of `mask` [n, m] (m may be 0), −1 where none. Returns [n] long."""
    pos = torch.where(mask, torch.arange(mask.shape[1]), -1)
    return torch.cat([torch.full((mask.shape[0], 1), -1), pos], 1).max(-1).values


@dataclass
class TriggerRecall(BigramBackcopy):
    """Bigram-Backcopy (above) whose triggers follow several rules; trigger k follows rules[k mod len(rules)]:
    copy: the token before the trigger (Guo et al. 2024's backcopy, one attention hop: a layer-0 head);
    induction (Olsson et al. 2022, "In-context learning and induction heads"): with a the token before the trigger,
    the token that followed the most recent earlier occurrence of a — a previous-token head then an induction head,
    so the head doing it sits in the second layer or later;
    two_hop: with b the induction answer, the token that followed the most recent earlier occurrence of b (other than
    the one just found) — its query is the first hop's result, so it needs a third layer;
    bind (associative recall, Ba et al. 2016; MQAR, Arora et al. 2023): the token that followed the most recent
    earlier occurrence of this trigger — the key it looks for ("my previous token is this trigger") never occurs in
    text; bind2: the token two places after that occurrence (a key "the token two before me is this trigger", so
    another head than bind's); bind_hop: with b the bind answer, the token that followed the most recent earlier
    occurrence of b (other than the one just found, before the token preceding the trigger) — two hops, the second
    keyed on the first's result, so a third layer.
    Where the token to look up never occurred earlier the chain's ordinary successor comes instead. Each rule is
    needed only after its own triggers, which never occur in text, so its heads have a rare job in a later layer and
    go dormant (on BOS) elsewhere — the active-dormant mechanism of Guo et al. moved past layer 0.

    rule: [V] long, the index in RECALL_RULES of each trigger's rule (−1 for the other symbols).
    """

    rule: torch.Tensor

    @classmethod
    def make_recall(cls, ids: Sequence[int], trigger_ids: Sequence[int],
                    rules: Sequence[str] = ("copy", "induction", "two_hop"), branching: int = 8,
                    seed: int = 0) -> TriggerRecall:
        """A fixed random instance: the chain of `BigramBackcopy.make(ids, trigger_ids=...)`, trigger k (in the
        order given) following rules[k mod len(rules)]."""
        unknown = [r for r in rules if r not in RECALL_RULES]
        if unknown or not rules:
            raise SinkscopeError(f"unknown trigger rules {unknown}: use some of {', '.join(RECALL_RULES)}")
        base = BigramBackcopy.make(ids, branching=branching, seed=seed, trigger_ids=trigger_ids)
        codes = torch.tensor([RECALL_RULES.index(r) for r in rules])
        rule = torch.full((len(base.ids),), -1, dtype=torch.long)
        rule[base.trigger] = codes[torch.arange(int(base.trigger.sum())) % len(rules)]
        return cls(base.ids, base.succ, base.cdf, base.trigger, base.distance, rule)

    def sample(self, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
        """n sequences of `length` tokens (no BOS). Returns [n, length] token ids."""
        x = self._started(n, length, gen)
        for t in range(1, length):
            prev = x[:, t - 1]
            nxt = self._bigram_next(prev, gen)
            rule = torch.where(self.trigger[prev], self.rule[prev], -1)  # [n]
            answer, ok = _recall_answers(x, t, rule)
            x[:, t] = torch.where(ok, answer, nxt)
        return self.ids[x]

    def insert(self, text: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
        """Text windows with triggers inserted: at each position (from the third, not the last) a trigger drawn
        uniformly comes with probability `rate`, the token after it is its rule's answer (where there is none, the
        text goes on), and the text resumes after it. text: [n, length] token ids. Returns [n, length] token ids."""
        n, length = text.shape
        trig_ids = self.ids[self.trigger]
        rule_of = torch.full((int(max(int(self.ids.max()), int(text.max()))) + 1,), -1, dtype=torch.long)
        rule_of[self.ids] = self.rule
        x = torch.empty(n, length, dtype=torch.long)
        ptr = torch.zeros(n, dtype=torch.long)  # the next text token of each row
        rows = torch.arange(n)
        for t in range(length):
            nxt = text[rows, ptr.clamp(max=length - 1)]
            from_text = torch.ones(n, dtype=torch.bool)
            if t >= 1:
                rule = rule_of[x[:, t - 1]]
                answer, ok = _recall_answers(x, t, rule)
                nxt = torch.where(ok, answer, nxt)
                from_text &= ~ok
            if 2 <= t <= length - 2:
                insert = (torch.rand(n, generator=gen) < rate) & (rule_of[x[:, t - 1]] < 0)
                pick = trig_ids[torch.randint(len(trig_ids), (n,), generator=gen)]
                nxt = torch.where(insert, pick, nxt)
                from_text &= ~insert
            x[:, t] = nxt
            ptr += from_text.long()
        return x


def _recall_answers(x: torch.Tensor, t: int, rule: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer at position t of each row under its rule (an index into RECALL_RULES, −1: none), read from x[:, :t]
    (the trigger at t − 1). x: [n, ≥ t]; rule: [n]. Returns (answer [n], whether there is one [n] bool)."""
    n = x.shape[0]
    rows = torch.arange(n)
    answer = torch.zeros(n, dtype=torch.long)
    ok = torch.zeros(n, dtype=torch.bool)
    if t < 2:
        return answer, ok
    copy_, induction, two_hop, bind, bind2, bind_hop = range(len(RECALL_RULES))
    prev = x[:, t - 1]

    def put(mask: torch.Tensor, value: torch.Tensor) -> None:
        nonlocal answer, ok
        answer = torch.where(mask, value, answer)
        ok = ok | mask

    # bind: the latest earlier occurrence of the trigger itself (positions 0 … t−2)
    sb = _last(x[:, : t - 1] == prev[:, None])  # [n], −1: none
    v = x[rows, (sb + 1).clamp(max=t - 1)]
    put((rule == bind) & (sb >= 0), v)
    # bind_hop: then the latest occurrence of that answer at positions 0 … t−3 (not the one found)
    sh = _last((x[:, : t - 2] == v[:, None]) & (torch.arange(t - 2) != (sb + 1)[:, None]))
    put((rule == bind_hop) & (sb >= 0) & (sh >= 0), x[rows, (sh + 1).clamp(max=t - 1)])
    # bind2: the latest occurrence at positions 0 … t−3, read two places on
    sb2 = _last(x[:, : t - 2] == prev[:, None])
    put((rule == bind2) & (sb2 >= 0), x[rows, (sb2 + 2).clamp(max=t - 1)])
    a = x[:, t - 2]
    put(rule == copy_, a)
    # induction: the latest occurrence of a strictly before it (positions 0 … t−3)
    seen, pos = x[:, : t - 2], torch.arange(t - 2)
    s1 = _last(seen == a[:, None])
    b = x[rows, (s1 + 1).clamp(max=t - 2)]
    put((rule == induction) & (s1 >= 0), b)
    s2 = _last((seen == b[:, None]) & (pos != (s1 + 1)[:, None]))
    put((rule == two_hop) & (s1 >= 0) & (s2 >= 0), x[rows, (s2 + 1).clamp(max=t - 2)])
    return answer, ok


SYNTHETIC: dict[str, str] = {
    "bigram_backcopy": "Bigram-Backcopy (Guo et al. 2024): sparse bigram chain; after a trigger, copy the token "
                       "before it. Alone: 64 symbols t0..t63, `synthetic_triggers` of them triggers. Mixed with "
                       "--data: the 64 most frequent text tokens plus `synthetic_triggers` dedicated trigger "
                       "tokens <bb0>, <bb1>, … added to the tokenizer (they never occur in text, so on text the "
                       "copying heads stay dormant).",
    "trigger_recall": "Bigram-Backcopy whose triggers follow `synthetic_rules` in turn (TriggerRecall): copy, "
                      "induction (the token after the last earlier occurrence of the token before the trigger), "
                      "two-hop induction, bind (the token after the trigger's own last occurrence), so that heads "
                      "of layers 1 and 2 have a rare job. Mixed with --data: `synthetic_triggers` dedicated trigger "
                      "tokens <bb0>, … are added to the tokenizer; alone: the last of t0..t63 are the triggers.",
    "text_recall": "The rules of trigger_recall inside real text: text windows with the trigger tokens <bb0>, … "
                   "inserted at `synthetic_rate` of the positions, each followed by its rule's answer, so that the "
                   "heads that answer learn to stay dormant in text contexts themselves. Needs --data.",
}


def check_synthetic(name: str | None) -> str | None:
    if name is not None and name not in SYNTHETIC:
        raise SinkscopeError(f"unknown synthetic task '{name}': use one of {', '.join(SYNTHETIC)}")
    return name



@dataclass
class Data:
    """Token sources of a run: train/held-out streams and/or the synthetic task."""

    tokenizer: PreTrainedTokenizerFast
    train: torch.Tensor | None  # [T] int64
    heldout: torch.Tensor | None  # [T'] int64
    synthetic: BigramBackcopy | None  # or its TriggerRecall subclass
    sources: list[dict[str, Any]]
    pool: torch.Tensor | None = None  # [S, seq_len − 1] pre-sampled synthetic sequences (int32)


def prepare_data(cfg: TrainConfig, tokenizer_dir: Path, with_pool: bool = True) -> Data:
    """Read/split the corpus, train (or reload) the tokenizer, encode the streams, build the synthetic task (and,
    with_pool, draw its pool of training sequences)."""
    train_docs = held = None
    sources: list[dict[str, Any]] = []
    if cfg.data is not None:
        train_docs, held, sources = load_corpus(cfg.data)
    triggers = [f"<bb{i}>" for i in range(cfg.synthetic_triggers)] if cfg.synthetic and train_docs else []
    if (tokenizer_dir / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(train_docs, cfg.vocab_size) if train_docs else word_tokenizer(64)
        if triggers:
            tokenizer.add_special_tokens({"additional_special_tokens": triggers})
        with atomic_dir(tokenizer_dir) as tmp:  # a kill never leaves a half-written tokenizer to reuse
            tokenizer.save_pretrained(tmp)
    train_ids = encode_stream(tokenizer, train_docs) if train_docs else None
    held_ids = encode_stream(tokenizer, held) if held else None
    for stream, name in ((train_ids, "training"), (held_ids, "held-out")):
        if stream is not None and len(stream) < cfg.seq_len:
            raise SinkscopeError(f"the {name} text has {len(stream)} tokens, fewer than --seq-len {cfg.seq_len}; "
                                 "give more text or a shorter --seq-len")
    task = None
    if cfg.synthetic == "text_recall" and train_ids is None:
        raise SinkscopeError("the text_recall task inserts triggers into text: give --data")
    if cfg.synthetic in ("trigger_recall", "text_recall"):
        if train_ids is None:  # synthetic alone: the last `synthetic_triggers` of t0 … t63 are the triggers
            symbols = [tokenizer.convert_tokens_to_ids(f"t{i}") for i in range(64)]
            alphabet, trigger_ids = symbols[: 64 - cfg.synthetic_triggers], symbols[64 - cfg.synthetic_triggers:]
        else:
            alphabet, trigger_ids = _frequent_tokens(tokenizer, train_ids), tokenizer.convert_tokens_to_ids(triggers)
        task = TriggerRecall.make_recall(alphabet, trigger_ids, rules=cfg.synthetic_rules.split(","), seed=0)
    elif cfg.synthetic is not None:
        if train_ids is None:
            alphabet = [tokenizer.convert_tokens_to_ids(f"t{i}") for i in range(64)]
            task = BigramBackcopy.make(alphabet, n_triggers=cfg.synthetic_triggers, seed=0,
                                       distances=cfg.synthetic_distances)
        else:
            task = BigramBackcopy.make(_frequent_tokens(tokenizer, train_ids), seed=0,
                                       trigger_ids=tokenizer.convert_tokens_to_ids(triggers),
                                       distances=cfg.synthetic_distances)
    pool = None
    # sampling is sequential in the position: draw many sequences up front (text_recall builds its rows per batch)
    if task is not None and with_pool and cfg.synthetic != "text_recall":
        pool = task.sample(cfg.synthetic_pool, cfg.seq_len - 1, torch.Generator().manual_seed(cfg.seed + 1))
        pool = pool.to(torch.int32)
    return Data(tokenizer=tokenizer, train=train_ids, heldout=held_ids, synthetic=task, sources=sources, pool=pool)


def _frequent_tokens(tokenizer: PreTrainedTokenizerFast, ids: torch.Tensor, n: int = 64) -> list[int]:
    """The n most frequent non-special token ids of the text `ids` [T] (ties by id): a mixed synthetic task's
    alphabet."""
    specials = set(tokenizer.all_special_ids)
    counts = torch.bincount(ids, minlength=len(tokenizer))
    return [int(i) for i in counts.argsort(descending=True, stable=True) if int(i) not in specials][:n]


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def make_batch(cfg: TrainConfig, data: Data, step: int) -> torch.Tensor:
    """The training batch of `step`, a pure function of (seed, step): [B, seq_len], column 0 = BOS."""
    gen = _step_generator(cfg.seed, step)
    bos = data.tokenizer.bos_token_id
    n = cfg.seq_len - 1
    n_syn = 0 if data.synthetic is None else (
        cfg.batch_size if data.train is None else round(cfg.synthetic_frac * cfg.batch_size))
    rows = []
    if cfg.batch_size - n_syn > 0:
        starts = torch.randint(0, len(data.train) - n + 1, (cfg.batch_size - n_syn,), generator=gen)
        rows.append(data.train[starts[:, None] + torch.arange(n)])
    if n_syn and cfg.synthetic == "text_recall":
        starts = torch.randint(0, len(data.train) - n + 1, (n_syn,), generator=gen)
        rows.append(data.synthetic.insert(data.train[starts[:, None] + torch.arange(n)], cfg.synthetic_rate, gen))
    elif n_syn:
        rows.append(data.pool[torch.randint(0, len(data.pool), (n_syn,), generator=gen)].long())
    body = torch.cat(rows)
    return torch.cat([torch.full((cfg.batch_size, 1), bos, dtype=torch.long), body], dim=1)


def eval_batch(cfg: TrainConfig, data: Data) -> torch.Tensor:
    """The fixed held-out batch (same for every seed): evenly spaced windows of the held-out text, or synthetic
    sequences from a fixed generator when there is no text. Returns [eval_batch, seq_len], column 0 = BOS."""
    n = cfg.seq_len - 1
    bos = data.tokenizer.bos_token_id
    if data.heldout is not None:
        starts = torch.linspace(0, len(data.heldout) - n, cfg.eval_batch).long().tolist()
        body = torch.stack([data.heldout[s : s + n] for s in starts])
    else:
        body = data.synthetic.sample(cfg.eval_batch, n, torch.Generator().manual_seed(12345))
    return torch.cat([torch.full((body.shape[0], 1), bos, dtype=torch.long), body], dim=1)

