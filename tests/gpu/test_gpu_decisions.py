"""The real engine decides as the simulator does: same workload, same fault plan, same trace.

The simulator's own engine loop drives the real in-process engine (``real_engine.RealEngineCore``,
``runs.gpu.run_virtual``):
requests are added at the steps where the simulator adds them, each step is one real
``EngineCore.step()`` (async: one ``step_with_batch_queue`` call) on the GPU, and both sides step
the virtual clock with the same step-time model. Tolerance: none. Every step's scheduled tokens (in scheduling order), preemptions and
finishes, and every request's first-token and finish time must be identical; a divergence
prints the first differing step. The real steps' wall times are reported beside (they do not
enter the trace). Both scheduling modes: async (vLLM 0.26.0's default: the engine's
``AsyncRecordingScheduler`` on vLLM's AsyncScheduler, a batch queue of 2, the simulator's
batch-queue loop) and sync."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vllm_faultsim.faults.plan import validate_plan
from vllm_faultsim.harness.drivers import model_dirs
from vllm_faultsim.harness.drivers import real_engine as RE
from vllm_faultsim.harness.runs.gpu import run_virtual, write_json
from vllm_faultsim.harness.checkers.divergence import first_divergence
from vllm_faultsim.harness.metrics import percentile
from vllm_faultsim.harness.runs.simulate import RunConfig, simulate
from vllm_faultsim.harness.workload import poisson
from vllm_faultsim.models.scheduler import SchedulerConfig

# KV pool small enough that the burst preempts (recompute) and admission waits for blocks
SCHED = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, block_size=16, num_gpu_blocks=160,
                        max_model_len=2048)
PLAN = {"faults": [{"kind": "slow_steps", "start": 0.5, "end": 1.0, "factor": 2.5}]}


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_text_workload_trace_identical(results_dir, device, mode):
    sched = replace(SCHED, async_scheduling=mode == "async")
    tag = "_async" if sched.async_scheduling else ""  # the sync run keeps its files' names (benchmarks/gpu_fidelity.py)
    cfg = RunConfig(scheduler=sched, seed=7)
    plan = validate_plan(PLAN, "decisions-plan")
    specs = poisson(60.0, num_requests=80, prompt={"uniform": [16, 400]}, output={"uniform": [4, 96]}, seed=7)
    llm = RE.open_llm(**RE.engine_args(sched, model=model_dirs.tiny_llama(), async_scheduling=sched.async_scheduling))
    try:
        assert RE.scheduler_of(llm).scheduler_config.async_scheduling == sched.async_scheduling
        assert llm.llm_engine.engine_core.engine_core.batch_queue_size == (2 if sched.async_scheduling else 1)
        real, core = run_virtual(llm, cfg, plan, specs, trace_path=results_dir / f"trace_text_gpu{tag}.jsonl")
    finally:
        RE.shutdown_llm(llm)
    sim = simulate(cfg, plan, specs=specs, trace_path=results_dir / f"trace_text_sim{tag}.jsonl")
    div = first_divergence(sim.events, real.events, ("sim", "gpu"))
    walls = [w.wall for w in core.walls]
    write_json(results_dir / f"decisions{tag}.json", {
        "device": device, "mode": mode, "requests": len(specs), "steps": real.summary["steps"],
        "preemptions": real.summary["preemptions"], "identical": div is None,
        "divergence": div.explain() if div else None,
        "real_step_wall_ms": {f"p{q}": round(1000 * percentile(walls, q), 3) for q in (50, 90, 99)},
        "summary": {"sim": sim.summary, "gpu": real.summary}})
    assert div is None, div.explain()
    assert real.summary["preemptions"] > 0, "the workload should exercise preemption"
    assert real.summary["finished"] == len(specs)
