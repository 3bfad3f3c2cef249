"""Async EPLB (PR #40730) on CPU: vLLM 0.26.0's real worker, state and transfer code on 2 gloo
processes, against the model (harness/runs/eplb.py ``run_check``; CUDA streams and events are
replaced as harness/drivers/real_eplb.py says).

Only what does not depend on the wall clock is judged here (``timing=False``): placement, the
protocol on both sides, layer order, one layer a step on every rank, send/recv counts, the
first rearrangement's step and vLLM's rearrangement rule on each side's own steps, the model
mutants those rules catch (``publish-all-at-once``, ``no-stream-sync``), and that a rank death
makes a survivor's ``EplbState.step()`` raise with nothing hung. A shared CI host stretches any
transfer, so the consume steps, per-layer transfer times, the model that ignores the slow link
and the step the engine fails in after the death are measured and judged by
``benchmarks/eplb_timing.py`` (and the GPU tier); they are printed here, not asserted. gloo on
one host is latency-bound (its bandwidth may calibrate to near-infinite), so the slow link is
set to add at least 15 ms per expert a layer moves (1-4 here)."""

from __future__ import annotations

import pytest

from vllm_faultsim.harness.checkers import eplb as ce
from vllm_faultsim.harness.runs import eplb as re_eplb
from vllm_faultsim.harness.drivers import real_eplb

TOL = ce.Tolerance(rel=1.0, abs=0.010, step_margin=0.02, outliers=1)  # the figures printed (timing=False)


def test_eplb_real_worker_vs_model_cpu(tmp_path):
    reason = real_eplb.skip_reason("cpu", 2)
    if reason:
        pytest.skip(f"diff tier (EPLB): {reason}")
    summary = re_eplb.run_check("cpu", tmp_path, hidden=(16384, 32768), forward_s=0.1, tol=TOL, slow_min_s=0.015,
                                timing=False)
    print(re_eplb.format_summary(summary))
    bad = re_eplb.verdict(summary)
    assert not bad, "\n".join(bad) + (f"\nthe ranks' records: {tmp_path}/launch*; "
                                      "replay: python -m pytest -s tests/diff/test_eplb_real_cpu.py")
    assert len(summary["mutants"]) == 8  # two model mutants on each of 4 runs, caught by deterministic rules
