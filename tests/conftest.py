"""Shared fixtures: the real data in ../shared/data, and CPU determinism."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """../shared/data beside the repository, or $FCNSEG_SHARED_DATA."""
    return Path(os.environ.get("FCNSEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def require_shared(relative: str) -> Path:
    """Path of a file or folder in the shared data; skips when absent, fails under CI=true."""
    path = shared_data_dir() / relative
    if not path.exists():
        message = f"shared data {path} is absent (set FCNSEG_SHARED_DATA or place ../shared/data beside the repo)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI requires it")
        pytest.skip(message)
    return path


@pytest.fixture
def shared_data() -> Path:
    return require_shared("")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small forward passes, which are dominated by OpenMP hand-offs
    that stall when the CPU is shared (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
