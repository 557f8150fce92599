"""Models: loading (Hub id, folder, built-in name; safety checks), the built-in offline models, tiny test models.

`from sinkscope.models import load_model` is the usual entry; `tiny_model` builds random-config test models.
"""

from sinkscope.models.loading import (
    BUILTINS,
    ENCODER_TYPES,
    VISION_TYPES,
    LoadedModel,
    ModelInfo,
    check_device,
    dispatch,
    list_builtins,
    load_model,
    model_info,
    parse_dtype,
    register_builtin,
)
from sinkscope.models.tiny import (
    TINY_FAMILIES,
    TINY_VISION_FAMILIES,
    byte_tokenizer,
    tiny_config,
    tiny_image_processor,
    tiny_model,
)

__all__ = [
    "BUILTINS",
    "ENCODER_TYPES",
    "TINY_FAMILIES",
    "TINY_VISION_FAMILIES",
    "VISION_TYPES",
    "LoadedModel",
    "ModelInfo",
    "byte_tokenizer",
    "check_device",
    "dispatch",
    "list_builtins",
    "load_model",
    "model_info",
    "parse_dtype",
    "register_builtin",
    "tiny_config",
    "tiny_image_processor",
    "tiny_model",
]
