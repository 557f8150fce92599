"""The one engine: the registered attention function with its chunked statistics (`attention`), `run_capture` and
`Trace` (`trace`), residual-stream sites (`hidden`), and interventions, the one place that changes attention
(`intervene`).

`run_capture(loaded, prompts_or_ids, CaptureConfig(...)) -> Trace` is the only code that runs a model under capture.
"""

from sinkscope.capture.attention import (
    ATTN_NAME,
    CaptureConfig,
    LayerRecord,
    attention_implementation,
    attention_probs,
    check_supported,
    chunk_size_for,
    free_memory,
    model_for,
    pad_to,
    use_sinkscope_attention,
)
from sinkscope.capture.intervene import (
    AblateHeads,
    Calibrate,
    Intervention,
    MaskKeyPerRow,
    MaskKeys,
    Reweight,
    ReweightSinks,
    Temperature,
    intervene,
)
from sinkscope.capture.trace import Trace, run_capture, tokenize, validate_prompts

__all__ = [
    "ATTN_NAME",
    "AblateHeads",
    "Calibrate",
    "CaptureConfig",
    "Intervention",
    "LayerRecord",
    "MaskKeyPerRow",
    "MaskKeys",
    "Reweight",
    "ReweightSinks",
    "Temperature",
    "Trace",
    "attention_implementation",
    "attention_probs",
    "check_supported",
    "chunk_size_for",
    "free_memory",
    "intervene",
    "model_for",
    "pad_to",
    "run_capture",
    "tokenize",
    "use_sinkscope_attention",
    "validate_prompts",
]
