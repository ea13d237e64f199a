"""Shared fixtures. Real data lives in ../shared/data (see its README); tiny models are built locally."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    # Under xdist every worker is its own process: share the cores between them instead of
    # letting each start one thread per core (oversubscription makes small tensor work several
    # times slower on a 2-core machine).
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LAYERCAP_SHARED_DATA", REPO.parent / "shared" / "data"))
WIKITEXT = SHARED_DATA / "corpora" / "wikitext-2-raw" / "wiki.test.raw"
TASKS = SHARED_DATA / "tasks"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set LAYERCAP_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def wikitext(shared_data) -> Path:
    return WIKITEXT


@pytest.fixture()
def tiny_llama():
    """(model, tokenizer): 4-block random-init Llama with GQA, hidden 32, vocab 320."""
    from layercap.models.tiny import build_tiny

    return build_tiny("llama")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the bundled real SmolLM2-135M-Instruct, float32 on CPU.

    Session-scoped: tests must not modify it in place (deep-copy first).
    """
    from layercap.models import load_model

    return load_model("smollm2")
