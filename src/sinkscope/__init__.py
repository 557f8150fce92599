"""sinkscope: measure, explain and remove attention sinks.

The public API, imported on first use (PEP 562), so that `import sinkscope` does not import torch:

    import sinkscope
    lm = sinkscope.load_model("tiny:llama")
    result = sinkscope.profile(lm, "The cat sat on the mat.")
    trace = sinkscope.run_capture(lm, ["Hi!"], sinkscope.CaptureConfig(rows="last"))
    sinks = sinkscope.detect("zscore", trace.last_rows())
    with sinkscope.intervene(lm.model, sinkscope.MaskKeys(positions=[0])): ...

`sinkscope.detect` is also the detector module (`sinkscope/detect.py`); calling it calls `sinkscope.detect.detect`.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_API: dict[str, str] = {
    "load_model": "sinkscope.models",
    "run_capture": "sinkscope.capture",
    "Trace": "sinkscope.capture",
    "CaptureConfig": "sinkscope.capture",
    "profile": "sinkscope.analyses.profile",
    "explain": "sinkscope.analyses.explain",
    "detect": "sinkscope.detect",
    "list_detectors": "sinkscope.detect",
    "intervene": "sinkscope.capture",
    "MaskKeys": "sinkscope.capture",
    "Calibrate": "sinkscope.capture",
    "Temperature": "sinkscope.capture",
    "Reweight": "sinkscope.capture",
    "ReweightSinks": "sinkscope.capture",
    "load_run": "sinkscope.store",
    "save_run": "sinkscope.store",
}

__all__ = [*_API, "__version__"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sinkscope")
    except PackageNotFoundError:
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()[name] = _version()
        return globals()[name]
    if name not in _API:
        raise AttributeError(f"module 'sinkscope' has no attribute {name!r}")
    module = importlib.import_module(_API[name])
    value = module if name == "detect" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _DetectModule(types.ModuleType):
    """`sinkscope/detect.py`, callable: `sinkscope.detect(name, x, ...)` is `sinkscope.detect.detect(name, x, ...)`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.detect(*args, **kwargs)


class _Package(types.ModuleType):
    """The package: when the submodule `sinkscope.detect` is imported (which binds it to the name `detect` here,
    shadowing the API function), make it callable."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "detect" and type(value) is types.ModuleType:
            value.__class__ = _DetectModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
