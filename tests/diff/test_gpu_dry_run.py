"""The GPU tier's decision test, dry-run on this CPU host (``VLLM_FAULTSIM_DRYRUN=1``: the real
in-process engine with ``drivers.dry_run.DryRunExecutor`` in place of the GPU worker), in both
scheduling modes: under async scheduling the engine runs vLLM's ``step_with_batch_queue`` with the
``AsyncRecordingScheduler``, and its trace through the simulator's loop must equal the simulator's.
A subprocess: the dry run is chosen when ``drivers.dry_run`` is first imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vllm==0.26.0 (pip install -e '.[vllm]')")

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_decisions_dry_run_in_both_modes(tmp_path):
    env = {**os.environ, "VLLM_FAULTSIM_DRYRUN": "1", "VLLM_FAULTSIM_RESULTS": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "gpu" / "test_gpu_decisions.py")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "2 passed" in run.stdout, run.stdout[-2000:]
    for name, mode in (("decisions_async.json", "async"), ("decisions.json", "sync")):
        result = json.loads((tmp_path / name).read_text())
        assert result["mode"] == mode and result["identical"], result
        assert result["preemptions"] > 0
