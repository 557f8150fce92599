"""Training a tiny LM: the learning-rate schedule, the optimizer, checkpoints and the resumable training loop that
writes a run folder (see the package docstring) through `sinkscope.store`: the folder is locked while training,
each checkpoint is a store unit `units/checkpoint-<step>/` (verified by size and sha256 before a resume uses it),
and the trace, manifest, config and final model are written atomically."""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from sinkscope.errors import SinkscopeError
from sinkscope.progress import Progress
from sinkscope.store import (
    Run,
    RunFolder,
    atomic_dir,
    load_run,
    make_manifest,
    open_run,
    read_json,
    reporter,
    write_json,
)
from sinkscope.toy.tinylm.data import eval_batch, make_batch, prepare_data
from sinkscope.toy.tinylm.model import TrainConfig, build_model, load_checkpoint, quiet
from sinkscope.toy.tinylm.statistics import TRACE_COLUMNS, AttentionStats, attention_stats, trace_rows


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to lr·min_lr_frac."""
    warmup = cfg.warmup if cfg.warmup is not None else max(1, cfg.steps // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW(β = (0.9, β₂)); weight decay on matrices and embeddings only (not norms, biases, sink logits)."""
    decay = [p for _, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for _, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from sinkscope.models.loading import check_device

    try:
        torch.device(device)
    except RuntimeError:
        raise SinkscopeError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    return check_device(device) or torch.device("cpu")  # a GPU or CPU index this machine does not have: one line


@dataclass
class TrainResult:
    out: Path
    trace: pd.DataFrame
    steps_done: int
    completed: bool
    elapsed_s: float
    final: AttentionStats | None


COMMAND = "train-lm"
TRAIN_CONFIG = "train_config.json"
CHECKPOINT = "checkpoint"
OWNED = ("tokenizer", "model", TRAIN_CONFIG, "trace.png")  # what --overwrite clears besides the store's files
RESUMABLE = ("steps", "device", "bf16", "out")  # TrainConfig fields a resume may change


def train_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a run folder is bound to: the TrainConfig without the fields a resume may change."""
    return {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE}


def _checkpoints(folder: RunFolder) -> list[str]:
    """Checkpoint unit names, newest first."""
    names = [n for n in folder.unit_names() if n.startswith(f"{CHECKPOINT}-") and n.split("-")[-1].isdigit()]
    return sorted(names, key=lambda n: int(n.split("-")[-1]), reverse=True)


def latest_checkpoint(folder: RunFolder, say: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are reported and removed."""
    for name in _checkpoints(folder):
        reason = folder.check_unit(name)
        if reason is None:
            return folder.unit_path(name)
        reporter(say)(f"{name}: {reason} — not resuming from it")
        folder.discard_unit(name)
    return None


def _save_checkpoint(folder: RunFolder, model: nn.Module, tokenizer: Any, optimizer: torch.optim.Optimizer,
                     step: int, cfg: TrainConfig) -> None:
    """Write the checkpoint of `step` as a store unit (atomic, verified on resume), then drop older ones."""
    name = f"{CHECKPOINT}-{step:08d}"
    with folder.scratch() as tmp:
        with quiet():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = io.BytesIO()
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": asdict(cfg)}, state)
        files: dict[str, Any] = {p.name: p for p in sorted(tmp.iterdir()) if p.is_file()}
        folder.write_unit(name, {**files, "train_state.pt": state.getvalue()}, {"step": step})
    for older in _checkpoints(folder):
        if older != name:
            folder.discard_unit(older)


def saved_config(out: str | Path) -> TrainConfig | None:
    """The TrainConfig stored in OUT/train_config.json, or None."""
    path = Path(out) / TRAIN_CONFIG
    if not path.exists():
        return None
    raw = read_json(path)
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in raw.items() if k in names})


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    stop_after: int | None = None,
    time_limit_s: float | None = None,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train a model as `cfg` says, writing the run folder cfg.out (see the module docstring).

    resume: continue the run in cfg.out from its last checkpoint, with the configuration saved there (only `steps`,
        `device` and `bf16` are taken from `cfg`); without a checkpoint it starts from scratch.
    stop_after: stop (as if killed) right after the checkpoint of this step — for tests of resumption.
    time_limit_s: a safety net for fixed budgets: once this process has trained this long, evaluate, save and
        finish early (`TrainResult.steps_done` < cfg.steps; the learning rate has not fully decayed then).
    overwrite: start over in a folder that holds a run (of this or another command) instead of refusing.
    progress: called as progress("train", step, cfg.steps, status="loss … α₀ …") after each step (the train loss
        since the previous evaluation, α₀ mean over layers ≥ 1 at the last evaluation).
    The folder is locked while training: a second process on the same cfg.out gets one error line.
    """
    folder = open_run(cfg.out, COMMAND, overwrite=overwrite, owned=OWNED)
    try:
        return _train(folder, cfg, resume, progress, stop_after, time_limit_s, log)
    finally:
        folder.close()


def _train(folder: RunFolder, cfg: TrainConfig, resume: bool, progress: Progress | None, stop_after: int | None,
           time_limit_s: float | None, log: Callable[[str], None] | None) -> TrainResult:
    out = folder.path
    say = log or (lambda _msg: None)
    ckpt = latest_checkpoint(folder, log)
    if ckpt is not None and not resume:
        raise SinkscopeError(f"{out} already holds a run: pass --resume to continue it, another --out, or "
                             "--overwrite to start over")
    if resume and ckpt is not None:
        stored = saved_config(out) or TrainConfig(**{
            k: v for k, v in torch.load(ckpt / "train_state.pt", weights_only=True)["config"].items()
            if k in {f.name for f in fields(TrainConfig)}})
        cfg = TrainConfig(**{**asdict(stored), "steps": cfg.steps, "device": cfg.device, "bf16": cfg.bf16,
                             "out": str(out)})
    cfg.validate()
    device = resolve_device(cfg.device)
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    folder.check_settings(train_settings(cfg))
    write_json(out / TRAIN_CONFIG, asdict(cfg))
    data = prepare_data(cfg, out / "tokenizer")
    held = eval_batch(cfg, data)

    trace = pd.DataFrame(columns=list(TRACE_COLUMNS))
    start = 0
    elapsed0 = 0.0
    if resume and ckpt is not None:
        model, _ = load_checkpoint(ckpt, device=device)
        state = torch.load(ckpt / "train_state.pt", weights_only=True, map_location=device)
        start = int(state["step"])
        optimizer = make_optimizer(model, cfg)
        optimizer.load_state_dict(state["optimizer"])
        stored_trace = load_run(out).tables.get("trace") if (out / "manifest.json").exists() else None
        if stored_trace is not None:
            trace = stored_trace[stored_trace["step"] <= start].reset_index(drop=True)
            elapsed0 = float(trace["time_s"].max()) if len(trace) else 0.0
        say(f"resuming {out} at step {start}")
    else:
        model = build_model(cfg, data.tokenizer).to(device)
        optimizer = make_optimizer(model, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    manifest = make_manifest(
        "train-lm", {"name": "tinylm", "model_type": "llama", "variant": cfg.variant, "parameters": n_params,
                     "d_model": cfg.d_model, "layers": cfg.layers, "heads": cfg.heads, "vocab": len(data.tokenizer)},
        {**asdict(cfg), "device": str(device), "bf16": bf16, "sources": data.sources}, cfg.seed)
    save_every = cfg.save_every or cfg.eval_every
    tokens_per_step = cfg.batch_size * cfg.seq_len
    run_t0 = time.perf_counter()
    t0 = run_t0 - elapsed0

    def evaluate(step: int, train_loss: float) -> AttentionStats:
        nonlocal trace
        stats = attention_stats(model, held)
        rows = trace_rows(step, step * tokens_per_step, stats, train_loss, lr_at(cfg, max(0, step - 1)),
                          time.perf_counter() - t0)
        trace = rows if trace.empty else pd.concat([trace, rows], ignore_index=True)
        folder.save(Run(tables={"trace": trace}, manifest=manifest))
        return stats

    if start == 0:  # step 0: the untrained model; its "train loss" is the loss on the first batch
        with torch.no_grad():
            first = make_batch(cfg, data, 1).to(device)
            evaluate(0, float(model(input_ids=first, labels=first, use_cache=False).loss))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    final: AttentionStats | None = None
    step = start
    loss_sum, loss_n, shown, a0 = torch.zeros((), device=device), 0, float("nan"), float("nan")
    if progress is not None:
        progress("train", start, cfg.steps, status=_status(shown, a0))
    model.train()
    for step in range(start + 1, cfg.steps + 1):
        lr = lr_at(cfg, step - 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = make_batch(cfg, data, step).to(device, non_blocking=True)
        with autocast:
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        loss_sum += loss.detach().float()
        loss_n += 1
        last = step == cfg.steps or (time_limit_s is not None and time.perf_counter() - run_t0 > time_limit_s)
        if step % cfg.eval_every == 0 or last:
            train_loss = float(loss_sum) / loss_n  # mean over the steps since the previous evaluation
            loss_sum.zero_()
            loss_n = 0
            shown = train_loss
            final = evaluate(step, train_loss)
            later = final.alpha0()[1:] if final.alpha0().shape[0] > 1 else final.alpha0()
            say(f"step {step}: train loss {train_loss:.3f}, eval loss {final.loss:.3f}, α₀ (layers ≥ 1) "
                f"{float(later.mean()):.3f}, heads α₀>0.3 {float((later > 0.3).float().mean()):.0%}")
            a0 = float(later.mean())
        if step % save_every == 0 or last:
            _save_checkpoint(folder, model, data.tokenizer, optimizer, step, cfg)
        if progress is not None:
            progress("train", step, cfg.steps, status=_status(shown, a0))
        if stop_after is not None and step >= stop_after and step % save_every == 0:
            return TrainResult(out, trace, step, False, time.perf_counter() - t0, final)
        if last:
            if step < cfg.steps:
                say(f"time limit of {time_limit_s:.0f} s reached: stopped at step {step} of {cfg.steps}")
            break
    with atomic_dir(out / "model") as final_dir, quiet():
        model.save_pretrained(final_dir)
        data.tokenizer.save_pretrained(final_dir)
    if final is None:
        final = attention_stats(model, held)
    return TrainResult(out, trace, step, True, time.perf_counter() - t0, final)


def _status(loss: float, a0: float) -> str:
    """The trainer's status beside its bar: the last train loss and α₀ (layers ≥ 1)."""
    return f"loss {loss:.3f}  α₀ {a0:.3f}"

