"""EC deferral on the GPU (PR #41627) and the EC connector's shutdown in both processes (PR #42423).

The tiny multimodal model (tiny-llava, dummy weights) runs with ``GpuFaultsimECConnector``
(``ec_connector_module_path``): its scheduler side answers ``ensure_cache_available`` from the
shared prefetch schedule (latencies from the workload, stalls and failures from the fault plan),
its worker side materialises loaded encoder outputs and saves locally encoded ones to a slow
store asynchronously. The executor is ``mp``: the worker (and its connector) lives in its own
process, the scheduler in this one.

Tolerances: deferrals, EC loads, encoder inputs and scheduled tokens per step, and each
request's TTFT on the virtual clock, must be identical to the simulator's (no tolerance). At
engine shutdown the connector's ``shutdown()`` must run in the scheduler process and in the
worker process, and the worker's pending saves must all be drained (none left)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

from vllm_faultsim.faults.plan import validate_plan
from vllm_faultsim.harness.drivers import model_dirs
from vllm_faultsim.harness.drivers import real_engine as RE
from vllm_faultsim.harness.drivers.dry_run import DRYRUN
from vllm_faultsim.harness.runs.gpu import run_virtual, write_json
from vllm_faultsim.harness.checkers.divergence import first_divergence
from vllm_faultsim.harness.runs.simulate import RunConfig, prefetch_schedule, run_engine
from vllm_faultsim.harness.workload import MMConfig, poisson
from vllm_faultsim.models.ec_connector import ECConnector
from vllm_faultsim.models.scheduler import Scheduler, SchedulerConfig

SCHED = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, block_size=16, num_gpu_blocks=256,
                        max_model_len=1024)


def workload():
    specs = poisson(40.0, num_requests=40, prompt={"uniform": [40, 200]}, output={"uniform": [4, 30]}, seed=5,
                    mm=MMConfig(fraction=0.6, tokens=RE.IMAGE_TOKENS, prefetch={"uniform": [0.02, 0.2]},
                                offset=4, reuse=0.2))
    items = [m.identifier for s in specs for m in s.mm]
    # stall the first image by 300 ms; the last two distinct images fail (encoded locally, then saved)
    last = list(dict.fromkeys(reversed(items)))[:2]
    plan = validate_plan({"faults": [{"kind": "ec_prefetch_stall", "item": items[0], "delay": 0.3}]
                          + [{"kind": "ec_prefetch_fail", "item": i} for i in last]}, "ec-plan")
    return specs, plan


def ttft(events):
    return {e["req"]: round(e["first_token"] - e["arrival"], 9) for e in events if e["kind"] == "req"}


def test_ec_deferral_matches_simulator_and_shutdown_drains(results_dir, device, tmp_path):
    specs, plan = workload()
    ec_log = tmp_path / "ec-events.jsonl"
    kw = RE.engine_args(SCHED, model=model_dirs.tiny_llava(), multimodal=True, ec_policy="future-only",
                        ec_log=ec_log, ec_save_delay=1.0, distributed_executor_backend="mp",
                        async_scheduling=SCHED.async_scheduling)  # the simulator's mode (vLLM's default: async)
    llm = RE.open_llm(**kw)
    try:
        sched = RE.scheduler_of(llm)
        # the encoder budgets vLLM derived (MultiModalBudget): the simulator uses the same
        scfg = replace(SCHED, encoder_compute_budget=sched.max_num_encoder_input_tokens,
                       encoder_cache_size=sched.encoder_cache_manager.cache_size)
        cfg = RunConfig(scheduler=scfg, seed=5)
        real, core = run_virtual(llm, cfg, plan, specs, prefetch=prefetch_schedule(specs, plan),
                                    trace_path=results_dir / "trace_ec_gpu.jsonl")
    finally:
        RE.shutdown_llm(llm)
    pre = prefetch_schedule(specs, plan)
    sim = run_engine(Scheduler(scfg, ECConnector(pre)), specs, cfg, plan, side="sim", prefetch=pre,
                     trace_path=results_dir / "trace_ec_sim.jsonl")
    div = first_divergence(sim.events, real.events, ("sim", "gpu"))
    steps = [e for e in real.events if e["kind"] == "step"]
    deferrals = [len(e.get("deferred", ())) for e in steps]
    events = [json.loads(line) for line in ec_log.read_text().splitlines()]
    shutdowns = {e["role"]: e for e in events if e["event"] == "shutdown"}
    t_real, t_sim = ttft(real.events), ttft(sim.events)
    mm_reqs = sorted({s.req_id for s in specs if s.mm})
    write_json(results_dir / "ec_deferral.json", {
        "device": device, "requests": len(specs), "mm_requests": len(mm_reqs),
        "plan": plan.to_dict(), "identical": div is None, "divergence": div.explain() if div else None,
        "steps": len(steps), "steps_with_deferral": sum(1 for d in deferrals if d),
        "deferrals_total": sum(deferrals), "ec_loads": sum(len(e.get("ec_loaded", ())) for e in steps),
        "local_encodes": sum(len(v) for e in steps for v in e.get("enc", {}).values()),
        "ttft_ms_mm": {r: {"sim": round(1000 * t_sim[r], 3), "gpu": round(1000 * t_real[r], 3)} for r in mm_reqs},
        "real_step_wall_ms_mean": round(1000 * sum(w.wall for w in core.walls) / max(1, len(core.walls)), 3),
        "connector_events": events, "this_pid": os.getpid()})
    assert div is None, div.explain()
    assert sum(deferrals) > 0 and t_real == t_sim
    if DRYRUN:  # no worker process in a dry run
        assert "scheduler" in shutdowns
        return
    assert set(shutdowns) == {"scheduler", "worker"}, f"connector shutdown seen in {sorted(shutdowns)}"
    assert shutdowns["scheduler"]["pid"] == os.getpid()
    assert shutdowns["worker"]["pid"] != os.getpid(), "the worker connector should live in the worker process"
    w = shutdowns["worker"]
    assert w["left"] == 0 and w["drained"] >= w["saved"] >= 1, w
    assert w["pending_at_shutdown"] >= 1, f"no save was pending at shutdown, nothing to drain: {w}"
    assert w["loaded"] >= 1, w
