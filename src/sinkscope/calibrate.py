"""ACT head search (Yu et al. 2024) and a side-by-side benchmark of inference-time sink mitigations.

ACT calibrates only the heads where it helps. Their released code searches heads on a small calibration set by
held-out accuracy; sinkscope does the same in two stages so it fits a CPU budget: (1) calibrate each layer's heads
together and keep the `top_layers` layers that raise accuracy; (2) within those, calibrate one head at a time and keep
the heads that raise accuracy over the uncalibrated model. The chosen heads are saved as JSON and can be applied to
`profile`, `eval` or any forward pass with `calibration_interventions`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from sinkscope.errors import SinkscopeError
from sinkscope.evaluate.classify import label_token_ids, prompt_pass, score_labels
from sinkscope.evaluate.datasets import DatasetSpec, Example
from sinkscope.intervene import Calibrate, Intervention, MaskKeys, intervene
from sinkscope.models import LoadedModel


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


def predict(loaded: LoadedModel, spec: DatasetSpec, examples: Sequence[Example],
            interventions: Sequence[Intervention] = (), batch_size: int = 8) -> torch.Tensor:
    """Predicted label index per example (highest summed verbaliser log-probability), under interventions."""
    if not examples:
        raise SinkscopeError("no examples to score")
    tok = loaded.tokenizer
    prompts = [tok(spec.prompt(ex.fields))["input_ids"] for ex in examples]
    labels = label_token_ids(tok, spec.labels, spec.answer_prefix)
    preds = []
    with intervene(loaded.model, *interventions) if interventions else nullcontext():
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            first = prompt_pass(loaded, batch).logprobs
            preds.append(score_labels(loaded, batch, labels, first, batch_size=batch_size).argmax(-1))
    return torch.cat(preds)


def accuracy(loaded: LoadedModel, spec: DatasetSpec, examples: Sequence[Example],
             interventions: Sequence[Intervention] = (), batch_size: int = 8) -> float:
    gold = torch.tensor([ex.label_id for ex in examples])
    return float((predict(loaded, spec, examples, interventions, batch_size) == gold).float().mean())


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
    progress: bool = False,
) -> Calibration:
    """ACT's head search on calibration examples (two stages, see the module docstring)."""
    n_layers, n_heads = loaded.info.n_layers, loaded.info.n_heads
    candidates = list(range(n_layers)) if layers is None else [layer % n_layers for layer in layers]
    base = accuracy(loaded, spec, examples, batch_size=batch_size)
    rows: list[dict] = []

    def trial(stage: str, layer: int, heads: list[int] | None) -> float:
        acc = accuracy(loaded, spec, examples, [Calibrate(beta=beta, threshold=threshold, layers=[layer],
                                                          heads=heads)], batch_size)
        rows.append({"stage": stage, "layer": layer, "head": -1 if heads is None else heads[0], "accuracy": acc,
                     "gain": acc - base})
        return acc

    steps = candidates
    if progress:
        from rich.progress import track

        steps = track(candidates, description="layers", transient=True)
    layer_acc = {layer: trial("layer", layer, None) for layer in steps}
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
) -> pd.DataFrame:
    """Accuracy and cost of each inference-time mitigation on the same examples, side by side.

    none; mask_pos0 (attention to position 0 removed in every head, rows renormalised: seed 000's causal test);
    act_all (ACT with β in every head); act_searched (ACT on the heads of `calibration`, if given).
    """
    methods: list[tuple[str, list[Intervention]]] = [
        ("none", []),
        ("mask_pos0", [MaskKeys(positions=[0])]),
        ("act_all", [Calibrate(beta=beta)]),
    ]
    if calibration is not None:
        methods.append(("act_searched", calibration.interventions()))
    gold = torch.tensor([ex.label_id for ex in examples])
    rows, baseline = [], None
    for name, interventions in methods:
        start = time.perf_counter()
        preds = predict(loaded, spec, examples, interventions, batch_size)
        seconds = time.perf_counter() - start
        baseline = preds if baseline is None else baseline
        rows.append({"dataset": spec.name, "method": name, "n": len(examples),
                     "accuracy": float((preds == gold).float().mean()),
                     "changed_predictions": float((preds != baseline).float().mean()),
                     "ms_per_example": 1000 * seconds / len(examples)})
    base = rows[0]["ms_per_example"]
    frame = pd.DataFrame(rows)
    frame["cost_vs_none"] = frame["ms_per_example"] / base
    return frame
