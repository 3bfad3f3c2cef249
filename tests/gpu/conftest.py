"""GPU tier: the real vLLM engine on a CUDA GPU, next to the simulator.

Every test here skips with the reason when there is no CUDA GPU or no vLLM. Nothing at import
time touches torch or vLLM, so collecting the other tiers stays light. Results (JSON, traces)
go to ``$VLLM_FAULTSIM_RESULTS`` (default: benchmarks/results/gpu in the checkout).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=1)
def _skip_reason() -> str | None:
    from vllm_faultsim.harness.drivers.real_engine import gpu_skip_reason
    return gpu_skip_reason()


@pytest.fixture(autouse=True)
def _needs_gpu():
    reason = _skip_reason()
    if reason:
        pytest.skip(f"GPU tier: {reason}")


@pytest.fixture(scope="session")
def results_dir() -> Path:
    d = Path(os.environ.get("VLLM_FAULTSIM_RESULTS") or ROOT / "benchmarks" / "results" / "gpu")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def device() -> dict:
    from vllm_faultsim.harness.drivers.real_engine import host_info
    return host_info()
