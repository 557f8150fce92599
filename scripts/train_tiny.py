"""Train `sinkscope-tiny`, the decoder shipped in src/sinkscope/assets/sinkscope-tiny/, and write its model card.

Self-contained given a data folder: it reads the `text` fields of DATA/*/test.jsonl (tiny_shakespeare/test.jsonl
is the whole of Tiny Shakespeare; if a subfolder has no test.jsonl its .txt files are read instead), trains a
byte-level BPE tokenizer and a Llama-style model with `sinkscope.toy.tinylm.train`, then

    OUT/                      the run folder (checkpoint/, model/, trace.parquet, manifest.json, trace.png)
    SHIP/                     the shipped model: config.json, model.safetensors, tokenizer files, README.md (card),
                              sinks.json (the card's figures + the held-out token ids they were measured on),
                              trace.parquet, trace.png

GPU (one H100/H200): the preset's three candidate recipes train in parallel processes on the one GPU for
--minutes each (the step count is calibrated on the machine and recorded in the card, so
`--candidate NAME --steps N` reproduces the shipped one), then the best is shipped:

    PYTHONPATH=src python scripts/train_tiny.py --data DATA --preset gpu --minutes 6 --out runs/sinkscope-tiny

CPU pilot (a few minutes; a smaller model and batch, one candidate):

    python scripts/train_tiny.py --preset cpu --threads 1

The card's figures are measured after training on the shipped files themselves (float32, CPU), so
`sinkscope.toy.tinylm.load_tiny()` reproduces them (tests/toy/test_tinylm.py checks it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from sinkscope.cli.options import progress_bars
from sinkscope.report.figures.tinylm import draw_trace
from sinkscope.toy import tinylm
from sinkscope.toy.tinylm import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SHIP = ROOT / "src" / "sinkscope" / "assets" / tinylm.TINY_DIR_NAME
MAX_BYTES = 15 * 2**20
# The done criterion of #17 item 5 is measured on these (tests/models/test_tiny_sink.py holds the same three).
SENTENCES = (
    "The cat sat on the mat and looked out of the window.",
    "She walked to the market in the morning to buy fresh bread.",
    "The river was cold, and the old bridge had fallen into the water.",
)


def sentence_alpha0(folder: Path) -> list[list[float]]:
    """α₀[layer][head] on SENTENCES with plain transformers (eager attention, output_attentions): the mean over the
    queries i ≥ 1 of A_i0, averaged over the sentences (each run alone, BOS first, no padding)."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    model = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    per = []
    for text in SENTENCES:
        ids = tok(text, return_tensors="pt")["input_ids"]  # [1, n]
        with torch.no_grad():
            att = model(ids, output_attentions=True).attentions  # L × [1, H, n, n]
        per.append(torch.stack([a[0, :, 1:, 0].mean(-1) for a in att]))  # [L, H]
    return torch.stack(per).mean(0).tolist()

# The recipes. Sinks need optimisation and data (Gu et al. 2025): a high learning rate with weight decay, long
# contexts, many steps. Each preset has a base and candidates (overrides); `--preset gpu` trains its candidates in
# parallel processes on the one GPU (a 3 M-parameter model leaves it mostly idle, so they barely slow each other),
# then ships the one that best meets the sink target. The CPU pilot (Nov 2026, 2 shared cores) saw α₀ in layers ≥ 1
# rise steadily with steps on text alone (0.08 → 0.13 in 3k steps at wd 0.5), and the Bigram-Backcopy mix (Guo et al.
# 2024) give sinks on its own sequences (pure task, 2k steps) but not on text at that scale; weight decay 0.5 made
# them appear sooner than 0.1 — hence two text-only candidates with strong weight decay and one mix.
PRESETS: dict[str, dict] = {
    "gpu": {
        "base": dict(d_model=256, layers=4, heads=8, intermediate=512, vocab_size=2048, seq_len=256, batch_size=64,
                     lr=3e-3, weight_decay=0.5, eval_every=500, eval_batch=32, steps=6000),
        "candidates": {
            "text-wd0.5": {},
            "text-wd1.0": dict(weight_decay=1.0),
            "mix-wd0.5": dict(synthetic="bigram_backcopy", synthetic_frac=0.25, synthetic_triggers=8),
        },
    },
    "smoke": {  # a seconds-long check of the whole pipeline (two candidates in parallel, shipping)
        "base": dict(d_model=32, layers=2, heads=4, intermediate=None, vocab_size=400, seq_len=32, batch_size=8,
                     lr=5e-3, weight_decay=0.5, eval_every=10, eval_batch=8, steps=20, synthetic_pool=256),
        "candidates": {"a": {}, "b": dict(synthetic="bigram_backcopy", synthetic_frac=0.25, synthetic_triggers=8)},
    },
    # CPU, Nov 30 2026 (2 shared cores, 2,400 steps each; see the card's "How it was found"): at lr 5e-3 a weight
    # decay ≥ 0.5 kept every head near uniform attention; wd 0.1 let the Bigram-Backcopy copy head form in the last
    # layer and go dormant (on BOS) on text.
    "cpu": {
        "base": dict(d_model=64, layers=3, heads=4, intermediate=None, vocab_size=1024, seq_len=64, batch_size=16,
                     lr=5e-3, weight_decay=0.5, eval_every=100, eval_batch=32, steps=1200),
        "candidates": {
            "text-wd0.5": {},
            "mix-bb8-wd0.1": dict(synthetic="bigram_backcopy", synthetic_frac=0.5, synthetic_triggers=8,
                                  weight_decay=0.1),
            "mix-bb24-wd0.1": dict(synthetic="bigram_backcopy", synthetic_frac=0.5, synthetic_triggers=24,
                                   weight_decay=0.1),
            "mix-bb8x4-wd0.1": dict(synthetic="bigram_backcopy", synthetic_frac=0.5, synthetic_triggers=8,
                                    synthetic_distances=4, weight_decay=0.1),
            "mix-bb16x8-wd0.1": dict(synthetic="bigram_backcopy", synthetic_frac=0.5, synthetic_triggers=16,
                                     synthetic_distances=8, weight_decay=0.1),
            # #17 item 5: triggers whose rule needs layers 1 and 2 (induction, two-hop induction; TriggerRecall)
            "mix-tr24-wd0.1": dict(synthetic="trigger_recall", synthetic_frac=0.5, synthetic_triggers=24,
                                   weight_decay=0.1),
            "mix-tr24b-wd0.1": dict(synthetic="trigger_recall", synthetic_frac=0.5, synthetic_triggers=24,
                                    synthetic_rules="copy,induction,two_hop,bind", weight_decay=0.1),
            "mix-bind16-wd0.1": dict(synthetic="trigger_recall", synthetic_frac=0.5, synthetic_triggers=16,
                                     synthetic_rules="bind,bind_hop,bind2,bind_hop", weight_decay=0.1),
            "text-tr24-wd0.1": dict(synthetic="text_recall", synthetic_frac=0.5, synthetic_triggers=24,
                                    synthetic_rules="copy,induction,two_hop,bind", synthetic_rate=0.1,
                                    weight_decay=0.1),
        },
    },
}


def calibrate(cfg: TrainConfig, minutes: float) -> int:
    """Time a few training steps of this configuration on its device; return the steps that fit `minutes`
    (leaving 10% for evaluations and checkpoints), rounded down to a multiple of eval_every."""
    device = tinylm.resolve_device(cfg.device)
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    tmp = Path(cfg.out) / "calibration"
    data = tinylm.prepare_data(cfg, tmp)
    model = tinylm.build_model(cfg, data.tokenizer).to(device)
    opt = tinylm.make_optimizer(model, cfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)

    def step(i: int) -> None:
        batch = tinylm.make_batch(cfg, data, i).to(device)
        with autocast:
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(3):
        step(i)
    _sync(device)
    n = 10 if device.type == "cpu" else 30
    t0 = time.perf_counter()
    for i in range(n):
        step(i)
    _sync(device)
    per_step = (time.perf_counter() - t0) / n
    shutil.rmtree(tmp, ignore_errors=True)
    steps = int(minutes * 60 * 0.9 / per_step)
    steps = max(cfg.eval_every, steps - steps % cfg.eval_every)
    print(f"calibration: {per_step * 1000:.1f} ms/step on {device} → {steps} steps for {minutes} min", flush=True)
    return steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ship(run: Path, cfg: TrainConfig, target: Path, command: str, info: dict) -> dict:
    """Copy the final model into `target`, measure it there, and write sinks.json, trace files and the card."""
    target.mkdir(parents=True, exist_ok=True)
    for f in target.iterdir():
        if f.is_file():
            f.unlink()
    for f in [*(run / "model").iterdir(), run / "trace.parquet"]:
        shutil.copyfile(f, target / f.name)
        (target / f.name).chmod(0o644)
    trace = tinylm.read_trace(run)
    draw_trace(trace, target / "trace.png", title="sinkscope-tiny: emergence during training")
    model, _ = tinylm.load_checkpoint(target)  # exactly what load_tiny() gives: float32, CPU
    data = tinylm.prepare_data(cfg, run / "tokenizer", with_pool=False)
    ids = tinylm.eval_batch(cfg, data)
    stats = tinylm.attention_stats(model, ids)
    summary = tinylm.summarise(stats)
    n_params = sum(p.numel() for p in model.parameters())
    sent = sentence_alpha0(target)
    lengths = [len(data.tokenizer(t)["input_ids"]) for t in SENTENCES]
    figures = {
        **summary,
        "sentences": list(SENTENCES),
        "sentence_lengths": lengths,
        "sentence_alpha0": sent,
        "sentence_target_met": all(sum(a >= 0.3 for a in row) >= len(row) / 2 for row in sent[1:]),
        "measured_on": f"{ids.shape[0]} held-out sequences of {ids.shape[1]} tokens (BOS + text), float32, CPU",
        "parameters": n_params,
        "uniform_alpha0": sum(1 / k for k in range(1, ids.shape[1] + 1)) / ids.shape[1],
        "recipe": asdict(cfg),
        "command": command,
        **info,
        "eval_input_ids": ids.tolist(),
    }
    (target / "sinks.json").write_text(json.dumps(figures) + "\n")
    (target / "README.md").write_text(model_card(figures, data.sources, cfg))
    size = sum(f.stat().st_size for f in target.iterdir() if f.is_file())
    if size > MAX_BYTES:
        raise SystemExit(f"the shipped folder is {size / 2**20:.1f} MB, over the 15 MB budget: shrink the model")
    print(f"shipped {target} ({size / 2**20:.1f} MB)", flush=True)
    return figures


def _licence(source_file: str) -> str:
    readme = Path(source_file).parent / "README.md"
    if readme.exists():
        for line in readme.read_text(errors="replace").splitlines():
            if "licen" in line.lower():
                return line.strip().lstrip("-* ").removeprefix("Licence:").removeprefix("License:").strip()
    return "see the source"


def _mix_text(cfg: TrainConfig) -> str:
    """The card's sentence on the synthetic share of the batches."""
    if not cfg.synthetic:
        return ""
    triggers = (f"{cfg.synthetic_triggers} dedicated trigger tokens `<bb0>`… added to the tokenizer, which never "
                "occur in text")
    if cfg.synthetic == "text_recall":
        return (f"; {cfg.synthetic_frac:.0%} of every batch are text windows with trigger tokens inserted at "
                f"{cfg.synthetic_rate:.0%} of the positions ({triggers}), each followed by the answer of its rule "
                f"(`text_recall`: rules {cfg.synthetic_rules.replace(',', ', ')} in turn — backcopy as in Guo et "
                "al. 2024's Bigram-Backcopy, induction, two-hop induction and binding, which need the second and "
                "third layers; `sinkscope.toy.tinylm.TriggerRecall`)")
    if cfg.synthetic == "trigger_recall":
        return (f" mixed with the synthetic `trigger_recall` task ({cfg.synthetic_frac:.0%} of every batch: Guo et "
                f"al. 2024's Bigram-Backcopy chain whose triggers follow the rules {cfg.synthetic_rules} in turn; "
                f"{triggers})")
    distances = f", {cfg.synthetic_distances} copy distances" if cfg.synthetic_distances > 1 else ""
    return (f" mixed with the synthetic `{cfg.synthetic}` task of Guo et al. 2024 ({cfg.synthetic_frac:.0%} of every "
            f"batch; {triggers}{distances})")


def model_card(f: dict, sources: list[dict], cfg: TrainConfig) -> str:
    layers = f["layers"]
    rows = "\n".join(
        f"| {r['layer']} | {r['alpha0_mean']:.3f} | {r['share_02']:.0%} | {r['share_03']:.0%} | {r['norm_ratio']:.2f} |"
        for r in layers)
    heads = "\n".join(f"| {i} | " + " | ".join(f"{a:.2f}" for a in row) + " |" for i, row in enumerate(f["alpha0"]))
    n_heads = len(f["alpha0"][0])
    src = "\n".join(
        f"| `{Path(s['file']).parent.name}/{Path(s['file']).name}` | {s['documents']} | {s['chars']:,} | "
        f"{_licence(s['file'])} |" for s in sources)
    target = ("**met**" if f["target_met"] else "**not met**")
    sent = f["sentence_alpha0"]
    sent_rows = "\n".join(
        f"| {i} | {sum(row) / len(row):.3f} | {sum(a >= 0.3 for a in row)} of {len(row)} | "
        + " | ".join(f"{a:.2f}" for a in row) + " |" for i, row in enumerate(sent))
    sentences = "\n".join(f"- {t} ({n} tokens)" for t, n in zip(f["sentences"], f["sentence_lengths"], strict=True))
    n_sent = min(f["sentence_lengths"])
    uniform_sent = sum(1 / k for k in range(2, n_sent + 1)) / (n_sent - 1)
    sent_target = "**met**" if f["sentence_target_met"] else "**not met**"
    mix = _mix_text(cfg)
    return f"""# sinkscope-tiny

A {f['parameters'] / 1e6:.2f} M-parameter Llama-architecture decoder (RoPE, RMSNorm, SwiGLU, tied embeddings) trained
from scratch by `sinkscope` to study attention sinks. Its tokenizer (byte-level BPE, {cfg.vocab_size} tokens) puts
`<s>` (BOS) first in every sequence, as in training. Load it offline with
`sinkscope.models.loading.load_model("sinkscope-tiny")` or `sinkscope.toy.tinylm.load_tiny()`; it is a plain
`transformers` `LlamaForCausalLM` folder, so `LlamaForCausalLM.from_pretrained(this_folder)` works too.

It is a research artefact for measuring sinks, not a useful language model: held-out loss
**{f['eval_loss']:.3f}** nats/token.

## Sinks

Measured on the shipped float32 weights, on {f['measured_on']} (the token ids are in `sinks.json`).
α₀ is the column mass of position 0: the mean over queries of their attention on BOS (sinkscope `column_mass`);
a head "has a sink" if α₀ > ε (uniform causal attention would give α₀ = H_n/n = {f['uniform_alpha0']:.3f} at
n = {cfg.seq_len}). Target (a real first-token sink): in every layer after the first, at least half of
the heads with α₀ ≥ 0.3 — {target}. Sink rate (all heads, ε = 0.3): {f['sink_rate_03']:.0%}; ε = 0.2:
{f['sink_rate_02']:.0%}.

| layer | α₀ (mean over heads) | heads α₀ > 0.2 | heads α₀ > 0.3 | ‖h₀‖ / median ‖hᵢ‖ |
| --- | --- | --- | --- | --- |
{rows}

On three ordinary sentences, with plain transformers only (`attn_implementation="eager"`,
`output_attentions=True`; α₀ here is the mean over queries i ≥ 1 of A_i0, averaged over the sentences;
`tests/models/test_tiny_sink.py` recomputes it). Target: in every layer after the first, at least half of the heads
with α₀ ≥ 0.3 — {sent_target} (uniform causal attention would give at most {uniform_sent:.3f} on the shortest
sentence).

{sentences}

| layer | α₀ (mean over heads) | heads α₀ ≥ 0.3 | {' | '.join(f'h{i}' for i in range(n_heads))} |
| --- | --- | --- | {' | '.join('---' for _ in range(n_heads))} |
{sent_rows}

α₀ per head:

| layer | {' | '.join(f'h{i}' for i in range(n_heads))} |
| --- | {' | '.join('---' for _ in range(n_heads))} |
{heads}

![emergence trace](trace.png)

`trace.parquet` holds the emergence trace (one row per evaluation step, layer and head; `sinkscope plot-trace`
draws it).

## Data and licence

Text: the `text` fields of the evaluation sets below{mix}; every 20th document is held out (the figures
above use held-out text only).

| file | documents | characters | licence (from the source's README) |
| --- | --- | --- | --- |
{src}

The weights are released with sinkscope under Apache-2.0, for research. Several training sets state no licence or a
research-only one, and BoolQ and DBpedia are CC BY-SA: treat the model as a research artefact and check the
sources before any other use.

## Recipe

{cfg.layers} layers, d_model {cfg.d_model}, {cfg.heads} heads (head size {cfg.d_model // cfg.heads}), SwiGLU width
{cfg.ffn}, context {cfg.seq_len} tokens (BOS + {cfg.seq_len - 1}), {cfg.variant} attention. AdamW (β = 0.9,
{cfg.beta2}), peak learning rate {cfg.lr}, weight decay {cfg.weight_decay} (matrices and embeddings), 5% warmup
then cosine decay to 10%, gradient clipping {cfg.grad_clip}, batch {cfg.batch_size} × {cfg.seq_len} tokens,
{f['steps']} steps ({f['steps'] * cfg.batch_size * cfg.seq_len / 1e6:.1f} M tokens), seed {cfg.seed},
{f['device']}{' with bf16 autocast' if f.get('bf16') else ''}, {f['train_seconds'] / 60:.1f} min of training.

{_candidates_text(f)}
Reproduce (DATA = the folder of evaluation sets, e.g. `/work/shared/data`; `--steps` fixes the step count the
original run calibrated; from a source checkout add `PYTHONPATH=src`):

```bash
{f['command']}
```
{HISTORY}"""


HISTORY = """
## How it was found (CPU, 2026-11-30; 2 shared cores, 3–6 runs at a time)

Each row is one run of `--preset cpu` with the overrides shown (lr 5e-3 throughout), stopped or measured at the step
given. α₀ on the three sentences is the mean over heads per layer (as in the table above); "strongest" is the
largest per-head α₀ in layers ≥ 1. Uniform causal attention gives 0.11–0.14 on these sentences.

| run | step | held-out loss | α₀ on the sentences, layers 0 / 1 / 2 | strongest head, layers ≥ 1 |
| --- | --- | --- | --- | --- |
| text only, wd 0.5 (the previous sinkscope-tiny) | 1,200 | 4.022 | 0.14 / 0.09 / 0.18 | 0.21 |
| 50 % BB (8 triggers), wd 1.0 | 1,200 | 4.70 | 0.16 / 0.11 / 0.15 | 0.30 |
| 25 % BB (8 triggers), wd 1.0 | 1,200 | 4.49 | 0.13 / 0.14 / 0.13 | 0.24 |
| 50 % BB (8 triggers), wd 1.0, context 32, batch 32 | 1,300 | 4.78 | 0.18 / 0.10 / 0.16 | 0.20 |
| 50 % BB (8 triggers), wd 3.0 | 1,700 | 4.88 | 0.14 / 0.13 / 0.15 | 0.21 |
| 50 % BB (8 triggers), wd 0.1 | 2,400 | 3.979 | 0.20 / 0.11 / 0.20 | 0.40 (layer 2) |
| 50 % BB (8 triggers), wd 0 | 900 | 4.47 | 0.15 / 0.09 / 0.16 | 0.33 (layer 2) |
| text only, wd 0.1 | 1,300 | 3.84 (step 1,600) | 0.20 / 0.14 / 0.16 | 0.27 |
| 50 % BB (8 triggers), wd 0.1, 2 heads of 32 | 2,200 | 4.03 | 0.26 / 0.13 / 0.17 | 0.20 |
| 50 % BB (8 triggers, 4 copy distances), wd 0.1 | 1,500 | 4.25 | 0.16 / 0.08 / 0.18 | 0.24 |
| 50 % BB (16 triggers, 8 copy distances), wd 0.1 | 1,500 | 4.25 | 0.15 / 0.08 / 0.15 | 0.21 |
| 50 % BB (24 triggers), wd 0.1 (shipped before) | 2,400 | 3.971 | 0.23 / 0.11 / 0.22 | 0.30 (layer 2) |

Then (issue #17 item 5, one run at a time) tasks whose rare job needs the later layers, all 50 % of every batch,
24 trigger tokens (16 where said), wd 0.1, lr 5e-3 unless said; "≥ 0.3" counts the heads of layers 1 / 2 at
α₀ ≥ 0.3 on the sentences.
`trigger_recall`: the Bigram-Backcopy chain whose triggers follow rules in turn (copy = backcopy; induction: the token
after the last earlier occurrence of the token before the trigger; two-hop: induction applied twice; bind: the token
after the trigger's own last occurrence; bind2 / bind-hop: two places on / then induction on the answer).
`text_recall`: the same rules inside real text windows (triggers inserted at 10 % of their positions).

| run | step | held-out loss | α₀ on the sentences, layers 0 / 1 / 2 | strongest head, layers ≥ 1 (≥ 0.3) |
| --- | --- | --- | --- | --- |
| `trigger_recall` copy, induction, two-hop | 1,200 | 4.275 | 0.12 / 0.11 / 0.12 | 0.17 (0 / 0) |
| `trigger_recall` copy, induction, two-hop | 4,000 | 3.817 | 0.22 / 0.19 / 0.22 | 0.31, layer 2 (0 / 1) |
| the same, 75 % synthetic | 4,000 | 4.183 | 0.23 / 0.12 / 0.21 | 0.38, layer 2 (0 / 1) |
| the same, lr 1e-2 | 4,000 | 3.832 | 0.21 / 0.10 / 0.12 | 0.28, layer 2 (0 / 0) |
| `trigger_recall` copy, induction, two-hop, bind | 4,000 | 3.848 | 0.21 / 0.21 / 0.12 | 0.25, layer 1 (0 / 0) |
| `trigger_recall` bind, bind-hop, bind2, bind-hop (16) | 4,000 | 3.818 | 0.24 / 0.11 / 0.22 | 0.29, layer 2 (0 / 0) |
| `trigger_recall` as above, d_model 128 (stopped) | 2,800 | 3.785 | 0.31 / 0.16 / 0.20 | 0.29, layer 2 (0 / 0) |
| `trigger_recall` copy, induction, two-hop | 9,000 | 3.634 | 0.46 / 0.20 / 0.24 | 0.39, layer 1 (1 / 1) |
| `text_recall` copy, induction, two-hop, bind | 4,000 | 3.623 | 0.46 / 0.30 / 0.18 | 0.59, layer 1 (1 / 1) |
| **`text_recall` as above (shipped)** | 10,000 | 3.534 | 0.52 / 0.49 / 0.25 | 0.81, layer 1 (3 / 2) |

What we learnt. (1) At lr 5e-3 a weight decay of 0.5 or more (decoupled: 0.25 %+ of every weight per step) keeps
attention close to uniform: text-only runs at wd 2–3 had α₀ 0.07–0.08 on 64-token held-out windows after 800 steps
(uniform 0.074), and pure Bigram-Backcopy at wd 1.0 left all 12 heads at 0.07–0.09 on its own sequences after 1,000
steps — the copy rule was never learnt. (2) At wd 0.1 attention forms; with 24 trigger tokens (copying after about
a quarter of the synthetic positions) two layer-0 heads grew a position-0 sink on held-out text (α₀ 0.25 and 0.34 at
step 2,400 on 64-token windows, 3–5× uniform; the trace shows them rising from step 300) and one layer-1 head
reached 0.19 (2.6× uniform) — the only run whose sinks on held-out text were clearly above uniform attention, so it
was the one shipped before. (3) Layer 1 stayed the weakest layer in every run; the
strongest later-layer heads on the short sentences (0.3–0.4) were not copy heads (on Bigram-Backcopy sequences the
0.40 head of the wd-0.1 / 8-trigger run puts 0.05–0.07 on BOS). The done criterion of issue #17 item 5 (at least half of
the heads of every later layer with α₀ ≥ 0.3) was met by none of these runs. (4) What did meet it
(issue #17 item 5): rare jobs for the later layers *inside text*. On separate synthetic sequences (`trigger_recall`)
the later-layer heads did go dormant — α₀ 0.4–0.9 on BOS at the non-trigger positions of those sequences in layer 2 —
but not on text, where the same heads kept working (at most one later-layer head ≥ 0.3 per layer even after 9,000
steps). With the triggers and their answers inserted into real text windows (`text_recall`), the heads that answer
them learn to idle on BOS in text contexts themselves: at 4,000 steps one head per later layer was ≥ 0.3, and the
10,000-step run has 3 of 4 in layer 1 and 2 of 4 in layer 2 on the sentences, with the lowest held-out loss of all
runs. On the 64-token held-out windows layer 2 has one such head (the sentence criterion is the issue's; the window
table above says what holds on longer text).

## GPU attempt (2026-11-26, one NVIDIA H200, not shipped)

`python scripts/train_tiny.py --data DATA --preset gpu --minutes 5` trained three candidates in parallel on one H200
(d_model 256, 4 layers, 8 heads, context 256, batch 64, lr 3e-3, ≈3.15 M parameters; 25 ms/step). The session's
device time ran out at ≈9,000 of the planned 10,500 steps, so nothing was shipped from it. Held-out figures at step
9,000 (log: `docs/gpu-tiny-train-2026-11-26.log` in the repository):

| candidate | eval loss (best → at 9k) | α₀, layers ≥ 1 | heads with α₀ > 0.3 |
| --- | --- | --- | --- |
| text, wd 0.5 | 3.71 (step 1k) → 6.24 | 0.035 | 0 % |
| text, wd 1.0 | 3.67 (step 1.5k) → 5.13 | 0.126 (rising from 0.03) | 0 % |
| 25 % Bigram-Backcopy mix, wd 0.5 | 3.68 (step 1k) → 5.71 | 0.042 | 0 % |

No first-token sink formed: the ≈0.8 M tokens of unique text are memorised within ~1.5 k steps (eval loss rises
after), and only the strongest weight decay made α₀ climb, slowly.
"""


def recipe_config(args: argparse.Namespace, candidate: str, out: Path) -> TrainConfig:
    preset = PRESETS[args.preset]
    if candidate not in preset["candidates"]:
        raise SystemExit(f"unknown candidate {candidate!r} of preset {args.preset}: {', '.join(preset['candidates'])}")
    recipe = {**preset["base"], **preset["candidates"][candidate]}
    for item in args.set:
        key, value = item.split("=", 1)
        recipe[key] = json.loads(value) if value not in ("", "None") else None
    return TrainConfig(data=args.data, out=str(out), device=args.device, seed=args.seed, **recipe)


def train_candidate(args: argparse.Namespace, candidate: str, out: Path) -> tuple[TrainConfig, dict]:
    """Train one candidate in this process (calibrating its steps to --minutes unless --steps is given)."""
    cfg = recipe_config(args, candidate, out)
    if not args.resume and out.exists():
        shutil.rmtree(out)
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    elif args.minutes is not None and not args.resume:
        cfg = replace(cfg, steps=calibrate(cfg.validate(), args.minutes))
    cfg.validate()
    limit = None if args.minutes is None else args.minutes * 60 * 1.05
    t0 = time.perf_counter()
    with nullcontext(None) if args.quiet else progress_bars() as update:  # bars only on a terminal
        result = tinylm.train(cfg, resume=args.resume, progress=update, time_limit_s=limit,
                              log=lambda msg: print(f"[{candidate}] {msg}", flush=True))
    seconds = max(time.perf_counter() - t0, float(result.trace["time_s"].max()))  # a resumed run: the trace's clock
    draw_trace(result.trace, out / "trace.png", title=f"{args.preset} / {candidate}")
    device = tinylm.resolve_device(cfg.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    info = {"candidate": candidate, "steps": result.steps_done, "planned_steps": cfg.steps, "device": name,
            "bf16": cfg.bf16 if cfg.bf16 is not None else device.type == "cuda", "train_seconds": round(seconds, 1)}
    (out / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return cfg, info


def score(summary: dict) -> tuple:
    """Order candidates: the sink target met first, then the worst layer's share of heads with α₀ > 0.3 (layers ≥ 1),
    then the mean α₀ of layers ≥ 1, then the lower held-out loss."""
    later = summary["layers"][1:] or summary["layers"]
    return (summary["target_met"], min(r["share_03"] for r in later),
            sum(r["alpha0_mean"] for r in later) / len(later), -summary["eval_loss"])


def candidate_summary(run: Path, cfg: TrainConfig) -> dict:
    model, _ = tinylm.load_checkpoint(run / "model")
    data = tinylm.prepare_data(cfg, run / "tokenizer", with_pool=False)
    return tinylm.summarise(tinylm.attention_stats(model, tinylm.eval_batch(cfg, data)))


def _candidates_text(f: dict) -> str:
    cands = f.get("candidates") or []
    if len(cands) < 2:
        return ""
    rows = "\n".join(
        f"| {c['candidate']}{' (shipped)' if c['candidate'] == f['candidate'] else ''} | {c['steps']} | "
        f"{c['eval_loss']:.3f} | {' / '.join(f'{a:.2f}' for a in c['alpha0_layers'])} | "
        f"{' / '.join(f'{x:.0%}' for x in c['share_03_layers'])} | {'yes' if c['target_met'] else 'no'} |"
        for c in cands)
    return f"""The recipe's candidates were trained in parallel on the same {f['device']} with the same time budget; the
shipped one is the best by (target met, worst layer's share of sink heads, mean α₀, loss) on the held-out batch:

| candidate | steps | held-out loss | α₀ per layer | heads α₀ > 0.3 per layer | target |
| --- | --- | --- | --- | --- | --- |
{rows}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data", help="folder with */test.jsonl (or a text file)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    ap.add_argument("--candidate", default=None, help="train only this candidate of the preset (in this process)")
    ap.add_argument("--out", default="runs/sinkscope-tiny", help="run folder (one subfolder per candidate)")
    ap.add_argument("--ship", default=str(SHIP), help="where to put the shipped model ('' to skip)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: calibrate to --minutes)")
    ap.add_argument("--minutes", type=float, default=None, help="training budget per candidate (calibration and "
                    "a time limit of 1.05× it)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe fields (JSON values)")
    args = ap.parse_args()
    out = Path(args.out)
    candidates = [args.candidate] if args.candidate else list(PRESETS[args.preset]["candidates"])
    if args.threads:
        torch.set_num_threads(args.threads)
    if len(candidates) == 1:
        cfg, info = train_candidate(args, candidates[0], out / candidates[0])
        infos = {candidates[0]: (cfg, info)}
    else:
        infos = run_parallel(args, candidates, out)
    if not args.ship:
        return
    summaries = {name: candidate_summary(out / name, cfg) for name, (cfg, _) in infos.items()}
    best = max(summaries, key=lambda name: score(summaries[name]))
    cfg, info = infos[best]
    command = shlex.join(["python", "scripts/train_tiny.py", "--data", "DATA", "--preset", args.preset,
                          "--candidate", best, "--steps", str(info["steps"]), "--seed", str(args.seed)]
                         + (["--set", *args.set] if args.set else []))
    others = [{"candidate": name, **{k: summaries[name][k] for k in ("eval_loss", "sink_rate_03", "target_met")},
               "alpha0_layers": [round(r["alpha0_mean"], 3) for r in summaries[name]["layers"]],
               "share_03_layers": [r["share_03"] for r in summaries[name]["layers"]],
               "steps": infos[name][1]["steps"]} for name in summaries]
    figures = ship(out / best, cfg, Path(args.ship), command, {**info, "candidates": others})
    print(json.dumps({k: v for k, v in figures.items() if k not in ("eval_input_ids", "recipe")}, indent=1))


def run_parallel(args: argparse.Namespace, candidates: list[str], out: Path) -> dict[str, tuple[TrainConfig, dict]]:
    """Train every candidate in its own process at once; stream their log lines; return their configs and infos."""
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // len(candidates))
    procs = {}
    for name in candidates:
        cmd = [sys.executable, __file__, "--data", args.data, "--preset", args.preset, "--candidate", name,
               "--out", str(out), "--ship", "", "--device", args.device, "--seed", str(args.seed),
               "--threads", str(threads), "--quiet"]
        cmd += ["--steps", str(args.steps)] if args.steps is not None else []
        cmd += ["--minutes", str(args.minutes)] if args.minutes is not None else []
        cmd += ["--resume"] if args.resume else []
        cmd += ["--set", *args.set] if args.set else []
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    threads_ = [threading.Thread(target=_pump, args=(p.stdout, out / f"{n}.log"), daemon=True)
                for n, p in procs.items()]
    for t in threads_:
        t.start()
    failed = [name for name, p in procs.items() if p.wait() != 0]
    for t in threads_:
        t.join()
    if failed:
        print(f"candidates failed: {failed} (see {out}/<name>.log)", flush=True)
    done = [n for n in candidates if n not in failed and (out / n / "model" / "config.json").exists()]
    if not done:
        raise SystemExit("no candidate finished")
    return {n: (tinylm.saved_config(out / n), json.loads((out / n / "train_info.json").read_text())) for n in done}


def _pump(stream: Any, log: Path) -> None:
    with log.open("w") as f:
        for line in stream:
            f.write(line)
            f.flush()
            print(line, end="", flush=True)


if __name__ == "__main__":
    main()
