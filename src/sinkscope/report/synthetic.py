"""A synthetic profile-shaped run of any size, to check the report's size and speed without a model.

The tables have the columns `profile` writes (keys, heads, layers, prompts, skipped) and optionally a `norms`
table. Each head's attention is a random heavy-tailed distribution plus a sink at position 0 whose share grows
with depth and a secondary sink at every 16th token (a "delimiter"); sinks are α > ε as in `column_mass`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sinkscope.store import Run, make_manifest

WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ",", " and", " then",
         " it", " sleeps", " near", "."]


def synthetic_run(n_layers: int = 32, n_heads: int = 32, n_tokens: int = 2000, n_prompts: int = 1, eps: float = 0.2,
                  norms: bool = True, seed: int = 0) -> Run:
    """A Run with keys (n_prompts × n_layers × n_heads × n_tokens rows), heads, layers, prompts, skipped, norms."""
    from sinkscope.analyses.profile import layer_summary

    rng = np.random.default_rng(seed)
    key_frames, head_frames, prompt_rows = [], [], []
    for pid in range(n_prompts):
        n = max(2, n_tokens - 7 * pid)
        tokens = [WORDS[i % len(WORDS)] for i in range(n)]
        alpha = _rows(rng, n_layers, n_heads, n)
        last = _rows(rng, n_layers, n_heads, n)
        sink = alpha > eps
        layer, head, pos = np.meshgrid(np.arange(n_layers), np.arange(n_heads), np.arange(n), indexing="ij")
        n_queries = (n - pos).ravel().astype(np.int64)
        key_frames.append(pd.DataFrame({
            "prompt_id": np.full(layer.size, pid, dtype=np.int64), "layer": layer.ravel(), "head": head.ravel(),
            "position": pos.ravel(), "token": np.asarray(tokens, dtype=object)[pos.ravel()],
            "alpha": alpha.ravel(), "mass_sum": alpha.ravel() * n_queries, "n_queries": n_queries,
            "sink": sink.ravel(), "last_row": last.ravel(),
        }))
        top = alpha.argmax(-1)
        lh_layer, lh_head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
        head_frames.append(pd.DataFrame({
            "prompt_id": pid, "layer": lh_layer.ravel(), "head": lh_head.ravel(),
            "n_sinks": sink.sum(-1).ravel().astype(np.int64), "sink_alpha": (alpha * sink).sum(-1).ravel(),
            "top_position": top.ravel(), "top_alpha": alpha.max(-1).ravel(),
            "top_token": [tokens[i] for i in top.ravel()],
            "sink_tokens": [" ".join(f"{p}:{tokens[p]!r}" for p in np.flatnonzero(row)) for row in
                            sink.reshape(-1, n)],
            "last_row_sink_mass": (last * sink).sum(-1).ravel(),
        }))
        prompt_rows.append({"prompt_id": pid, "text": "".join(tokens), "n_tokens": n})
    keys = pd.concat(key_frames, ignore_index=True)
    heads = pd.concat(head_frames, ignore_index=True)
    tables = {"keys": keys, "heads": heads, "prompts": pd.DataFrame(prompt_rows),
              "layers": layer_summary(heads, keys),
              "skipped": pd.DataFrame({"prompt_id": pd.Series(dtype="int64"), "reason": pd.Series(dtype="object")})}
    if norms:
        layer, pos = np.meshgrid(np.arange(n_layers), np.arange(min(n_tokens, 64)), indexing="ij")
        norm = 1.0 + rng.gamma(2.0, 0.5, layer.shape) + np.where(pos == 0, 3.0 * layer, 0.0)
        tables["norms"] = pd.DataFrame({"layer": layer.ravel(), "position": pos.ravel(), "norm": norm.ravel()})
    model = {"name": f"synthetic-{n_layers}x{n_heads}", "model_type": "synthetic", "n_layers": n_layers,
             "n_heads": n_heads, "n_kv_heads": n_heads}
    return Run(tables=tables, manifest=make_manifest("synthetic", model, {"method": "column_mass", "eps": eps}, seed))


def _rows(rng: np.random.Generator, n_layers: int, n_heads: int, n: int) -> np.ndarray:
    """[L, H, n] float32 distributions: heavy-tailed noise, a depth-growing sink at 0 and weaker ones every 16."""
    x = rng.pareto(1.5, size=(n_layers, n_heads, n)) + 0.05
    x /= x.sum(-1, keepdims=True)
    depth = (np.arange(n_layers)[:, None] + 1) / n_layers
    share = np.clip(0.15 + 0.7 * depth * rng.uniform(0.3, 1.0, size=(n_layers, n_heads)), 0, 0.95)
    x *= (1 - share)[..., None]
    x[..., 0] += share
    delim = np.arange(15, n, 16)
    if len(delim):
        bump = 0.08 * rng.uniform(0, 1, size=(n_layers, n_heads, 1)) / len(delim) * 4
        x[..., delim] += bump
        x /= x.sum(-1, keepdims=True)
    return x.astype(np.float32)
