"""Shared fixtures: tiny random models are built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    """The `../shared` folder beside the checkout (the data tests skip without it). A fixture, because `from conftest
    import SHARED` finds whichever conftest.py pytest loaded last when several directories are collected."""
    return SHARED


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models gain
    nothing from threads, and on a busy shared machine torch's threads wait for each other (many times slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama():
    from sinkscope.models import tiny_model

    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_bert():
    from sinkscope.models import tiny_model

    return tiny_model("bert")
