"""Macro-steps (models/engine.py ``_decode_steps``, models/scheduler.py ``decode_run``) change no
decision and no byte of a trace: generated workloads, scheduler configs and fault plans (slow steps,
engine kills, EC prefetch stalls and failures) run with and without them, async scheduling on and
off, prefix caching on and off (the decode cohort caches its members' blocks); the macro-step mutants
(harness/mutants.py ``MACRO_MUTANTS``) are caught by that comparison."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from vllm_faultsim.faults.plan import FaultPlan, validate_plan
from vllm_faultsim.harness.invariants import InvariantViolation
from vllm_faultsim.harness.mutants import MACRO_MUTANTS
from vllm_faultsim.harness.runs.simulate import (RunConfig, build_workload, prefetch_schedule, run_engine, simulate,
                                                 with_scheduler)
from vllm_faultsim.harness.strategies import fault_plans, scheduler_configs, workloads
from vllm_faultsim.harness.trace import dumps
from vllm_faultsim.models.ec_connector import ECConnector
from vllm_faultsim.models.kv_cache import BlockPool
from vllm_faultsim.models.request import RequestSpec
from vllm_faultsim.models.scheduler import Scheduler, SchedulerConfig

FAULTS = ("slow_steps", "kill_engine", "ec_prefetch_stall", "ec_prefetch_fail")
MAX_OUTPUT = 64  # long enough decodes that decode runs of many steps happen
CACHING_MUTANTS = {"cohort-uncached"}  # shown only with prefix caching on


def counting(cls: type[Scheduler], runs: list[int], lazy: list[int] | None = None) -> type[Scheduler]:
    """`cls`, recording the length of every decode run the engine takes (and in `lazy`, the size of
    every round the decode cohort took)."""
    class Counted(cls):
        def advance_decode(self, k, now, sched=None):
            runs.append(k)
            return super().advance_decode(k, now, sched)

        def _cohort_round(self):
            res = super()._cohort_round()
            if res is not None and lazy is not None:
                lazy.append(len(res.sched))
            return res
    return Counted


SERVING = {"schedule_base_s": 0.0004, "schedule_per_req_s": 0.00002, "update_base_s": 0.0003,
           "update_per_req_s": 0.00001}  # serving-mode CPU costs (async only)


def trace(specs, scheduler: SchedulerConfig, plan: FaultPlan, *, macro_steps: bool,
          scheduler_cls: type[Scheduler] = Scheduler, serving: dict | None = None) -> list[str]:
    """The run's trace as the bytes of its events (an invariant violation is its last line)."""
    cfg = RunConfig(scheduler=scheduler, serving=serving)
    prefetch = prefetch_schedule(specs, plan)
    core = scheduler_cls(cfg.scheduler, ECConnector(prefetch, cfg.ec_policy))
    try:
        res = run_engine(core, tuple(specs), cfg, plan, side="sim", prefetch=prefetch, macro_steps=macro_steps)
    except (InvariantViolation, RuntimeError) as exc:
        return [f"error: {exc}"]
    return [dumps(e) for e in res.events]


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-caching", "prefix-caching"])
@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_macro_steps_give_the_per_step_trace(async_scheduling, prefix_caching):
    runs: list[int] = []
    lazy: list[int] = []  # the decode cohort's rounds (members scheduled)
    killed = [0]

    @settings(max_examples=120, deadline=None, derandomize=True)
    @given(specs=workloads(max_size=10, max_output=MAX_OUTPUT),
           scheduler=scheduler_configs(max_output=MAX_OUTPUT, async_scheduling=async_scheduling),
           plan=fault_plans(kinds=FAULTS),
           serving=st.sampled_from([None, SERVING] if async_scheduling else [None]))
    def check(specs, scheduler, plan, serving):
        scheduler = SchedulerConfig(**{**scheduler.__dict__, "enable_prefix_caching": prefix_caching})
        per_step = trace(specs, scheduler, plan, macro_steps=False, serving=serving)
        assert trace(specs, scheduler, plan, macro_steps=True, scheduler_cls=counting(Scheduler, runs, lazy),
                     serving=serving) == per_step
        killed[0] += any('"kind":"fault"' in line and "kill_engine" in line for line in per_step)

    check()
    print(f"decode runs: {len(runs)}, of >= 2 steps: {sum(k >= 2 for k in runs)}, steps in them: {sum(runs)}, "
          f"runs with a kill: {killed[0]}; decode cohort rounds: {len(lazy)}, of >= 2 requests: "
          f"{sum(n >= 2 for n in lazy)}")
    # the comparison covered macro-steps of several steps, cohort rounds of several requests, and runs cut by kills
    assert sum(k >= 2 for k in runs) >= 30 and sum(runs) >= 400, runs
    assert sum(n >= 2 for n in lazy) >= 15, lazy
    assert killed[0] >= 10


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("mm, caching", [(False, False), (False, True), (True, False)],
                         ids=["text", "text-prefix-caching", "multimodal"])
def test_macro_steps_give_the_per_step_trace_of_a_long_run(async_scheduling, mm, caching):
    """A minute of Poisson traffic (EC prefetch deferral in the multimodal one; prefix caching on in
    another, with a pool small enough to evict and preempt), with a slow stretch and a SIGTERM: the
    same bytes with and without macro-steps."""
    workload = {"kind": "poisson", "rate": 4.0, "duration": 60.0, "prompt": 256, "output": 256}
    if mm:
        workload["mm"] = {"fraction": 0.5, "tokens": 64, "prefetch": 0.3}
    cfg = with_scheduler(RunConfig(workload=workload, seed=3), async_scheduling=async_scheduling,
                         max_num_seqs=64, num_gpu_blocks=400 if caching else 2048, enable_prefix_caching=caching)
    plan = validate_plan({"version": 1, "faults": [{"kind": "slow_steps", "start": 10, "end": 20, "factor": 3},
                                                   {"kind": "kill_engine", "at": 50.0, "signal": "SIGTERM"}]}, "test")
    per_step = simulate(cfg, plan, macro_steps=False)
    macro = simulate(cfg, plan)
    assert [dumps(e) for e in macro.events] == [dumps(e) for e in per_step.events]
    assert macro.summary["aborted"] > 0
    assert not caching or macro.summary["preemptions"] > 0, macro.summary


def long_decodes(n: int, output: int, stop_at: int | None = None) -> tuple[RequestSpec, ...]:
    return tuple(RequestSpec(f"r{i}", 0.0, 30 + i, output, stop_at=stop_at if i == 0 else None) for i in range(n))


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("mutant, specs, blocks", [
    ("macro-past-finish", long_decodes(3, 200, stop_at=90), 1000),   # r0 stops (EOS) mid-run
    ("macro-past-pool", long_decodes(3, 200), 30),                   # the pool runs dry: a preemption
    ("cohort-past-eos", long_decodes(3, 200, stop_at=90), 1000),     # r0 stops (EOS) in the cohort
    ("cohort-uncached", long_decodes(3, 200), 30),                   # the preempted request's own blocks
])
def test_the_comparison_catches_each_macro_mutant(async_scheduling, mutant, specs, blocks):
    scheduler = SchedulerConfig(num_gpu_blocks=blocks, block_size=16, max_model_len=512,
                                async_scheduling=async_scheduling, enable_prefix_caching=mutant in CACHING_MUTANTS)
    per_step = trace(specs, scheduler, FaultPlan(), macro_steps=False)
    assert trace(specs, scheduler, FaultPlan(), macro_steps=True) == per_step
    assert trace(specs, scheduler, FaultPlan(), macro_steps=True, scheduler_cls=MACRO_MUTANTS[mutant]) != per_step


@pytest.mark.parametrize("mutant", sorted(MACRO_MUTANTS))
def test_generated_cases_catch_each_macro_mutant(mutant):
    caught = []

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(specs=workloads(max_size=10, mm=False, max_output=MAX_OUTPUT),
           scheduler=scheduler_configs(max_output=MAX_OUTPUT, kv_pressure=True), async_scheduling=st.booleans())
    def check(specs, scheduler, async_scheduling):
        scheduler = SchedulerConfig(**{**scheduler.__dict__, "enable_prefix_caching": mutant in CACHING_MUTANTS,
                                       "async_scheduling": async_scheduling})
        caught.append(trace(specs, scheduler, FaultPlan(), macro_steps=True, scheduler_cls=MACRO_MUTANTS[mutant])
                      != trace(specs, scheduler, FaultPlan(), macro_steps=False))

    check()
    print(f"{mutant}: caught in {sum(caught)} of {len(caught)} generated cases")
    assert sum(caught) >= 3, f"{mutant}: caught in {sum(caught)} of {len(caught)} generated cases"


def pool_calls(cfg: RunConfig, *, macro_steps: bool, scheduler_cls: type[Scheduler] = Scheduler) -> dict[str, list]:
    """Every allocate (request, blocks) and effective cache_blocks (request, first, last, hashes) of
    a run, in order (the two kinds apart: within a round the loop interleaves them, which commutes)."""
    calls: dict[str, list] = {"allocate": [], "cache_blocks": []}

    class LoggedPool(BlockPool):
        __slots__ = ()

        def allocate(self, rid, n):
            new = super().allocate(rid, n)
            calls["allocate"].append((rid, tuple(new)))
            return new

        def cache_blocks(self, rid, hashes, num_tokens, block_size):
            start, end = self.num_cached_block.get(rid, 0), num_tokens // block_size
            if start < end:
                calls["cache_blocks"].append((rid, start, end, tuple(hashes[start:end])))
            super().cache_blocks(rid, hashes, num_tokens, block_size)

    class Logged(scheduler_cls):
        def __init__(self, config, *args):
            super().__init__(config, *args)
            self.pool = LoggedPool(config.num_gpu_blocks, config.enable_prefix_caching)

    specs = build_workload(cfg)
    core = Logged(cfg.scheduler, ECConnector(prefetch_schedule(specs, FaultPlan()), cfg.ec_policy))
    run_engine(core, specs, cfg, FaultPlan(), side="sim", keep=frozenset(), full_trace=False, macro_steps=macro_steps)
    return calls


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_the_cohort_caches_blocks_as_the_loop_does(async_scheduling):
    """With prefix caching the decode cohort allocates (with eviction) and caches every block the
    per-step loop does, with the same hashes, in the same order (two workloads: one roomy, one
    whose pool evicts and preempts); the cohort-uncached mutant does not."""
    for rate, blocks in ((20.0, 16384), (60.0, 1200)):
        cfg = with_scheduler(RunConfig(workload={"kind": "poisson", "rate": rate, "duration": 15.0, "prompt": 200,
                                                 "output": 100}, seed=2),
                             async_scheduling=async_scheduling, enable_prefix_caching=True, num_gpu_blocks=blocks)
        per_step = pool_calls(cfg, macro_steps=False)
        assert len(per_step["cache_blocks"]) > 1000
        assert pool_calls(cfg, macro_steps=True) == per_step
        assert pool_calls(cfg, macro_steps=True, scheduler_cls=MACRO_MUTANTS["cohort-uncached"]) != per_step
