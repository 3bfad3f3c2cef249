"""``vllm-faultsim calibrate``'s held-out run is simulated in the calibration engine's scheduling mode.

The calibration engine runs synchronously (``engine_settings``: eager, ``async_scheduling`` False);
the simulator's default became async (vLLM 0.26.0's), and a held-out run simulated async against a
sync engine gets every first token one step late: on the H200 (2026-12-01) the tiny model's TTFT
came out +68% (13.7 vs 8.2 ms), +4% in the engine's own mode."""

from __future__ import annotations

import argparse

import pytest

from vllm_faultsim.faults.plan import FaultPlan
from vllm_faultsim.harness.runs import calibrate as C
from vllm_faultsim.harness.runs.simulate import RunConfig, simulate


@pytest.mark.parametrize("model", ["tiny-llama", "llama3-8b-shape"])
def test_heldout_simulation_runs_in_the_engines_mode(model):
    p = argparse.ArgumentParser()
    C.add_arguments(p)
    settings = C.engine_settings(p.parse_args(["--model", model]))
    sched = C.scheduler_config(settings)
    assert sched.async_scheduling is settings["async_scheduling"] is False
    specs = C.heldout_workload(model, 1234, num_requests=20)
    cfg = RunConfig(scheduler=sched, seed=1234)
    first = {e["req"]: e["first_token"] - e["arrival"] for e in simulate(cfg, FaultPlan(), specs=specs).events
             if e["kind"] == "req"}
    other = RunConfig(scheduler=C.scheduler_config({**settings, "async_scheduling": True}), seed=1234)
    late = {e["req"]: e["first_token"] - e["arrival"] for e in simulate(other, FaultPlan(), specs=specs).events
            if e["kind"] == "req"}
    assert sum(late.values()) > sum(first.values())  # the mode shows in TTFT


def test_cuda_graphs_is_asked_for():
    p = argparse.ArgumentParser()
    C.add_arguments(p)
    assert C.engine_settings(p.parse_args([]))["enforce_eager"] is True
    assert C.engine_settings(p.parse_args(["--cuda-graphs"]))["enforce_eager"] is False
