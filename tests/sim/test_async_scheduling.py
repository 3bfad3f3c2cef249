"""Async scheduling (vLLM 0.26.0's default): the AsyncScheduler twin (output placeholders, outputs
one step late) under the engine loop's ``step_with_batch_queue``, against the synchronous mode."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from vllm_faultsim.faults.plan import FaultPlan, validate_plan
from vllm_faultsim.harness.mutants import ASYNC, SCHEDULER_MUTANTS
from vllm_faultsim.harness.runs.simulate import RunConfig, config_from_dict, prefetch_schedule, run_engine, simulate
from vllm_faultsim.harness.strategies import fault_plans, scheduler_configs, workloads
from vllm_faultsim.models.ec_connector import ECConnector
from vllm_faultsim.models.request import RequestSpec
from vllm_faultsim.models.scheduler import SchedulerConfig


def run(specs, plan=None, mutant=None, **sched):
    cfg = RunConfig(scheduler=SchedulerConfig(**{"num_gpu_blocks": 64, "block_size": 4, **sched}))
    plan = plan or FaultPlan()
    m = SCHEDULER_MUTANTS[mutant] if mutant else None
    prefetch = prefetch_schedule(specs, plan)
    core = (m.scheduler_cls if m else SCHEDULER_MUTANTS["no-full-admission"].scheduler_cls.__mro__[1])(
        cfg.scheduler, ECConnector(prefetch, m.ec_policy if m else "future-only"))
    kw = {"engine_cls": m.engine_cls} if m else {}
    return run_engine(core, tuple(specs), cfg, plan, side="sim", prefetch=prefetch, **kw).events


def steps(events):
    return [e for e in events if e["kind"] == "step"]


def fates(events):
    return {e["req"]: (e["status"], e["num_output"]) for e in events if e["kind"] == "req"}


def test_the_default_is_async():
    assert SchedulerConfig().async_scheduling and config_from_dict({}).scheduler.async_scheduling
    assert not config_from_dict({"scheduler": {"async_scheduling": False}}).scheduler.async_scheduling


def test_decode_is_scheduled_before_the_previous_token_is_known():
    """Placeholders: step 1 decodes while step 0's token is in flight; no decode beyond max_tokens
    (the schedule() that would add one schedules nothing: an empty batch, applied last, as in vLLM)."""
    ev = run([RequestSpec("a", 0.0, 8, 4)])
    assert [s["sched"] for s in steps(ev)] == [{"a": 8}, {"a": 1}, {"a": 1}, {"a": 1}, {}]
    st = steps(ev)
    assert st[1]["t"] == pytest.approx(st[0]["t"] + st[0]["dur"])  # scheduled during step 0's forward
    assert fates(ev) == {"a": ("length", 4)}


def test_a_stop_token_in_flight_wastes_one_step():
    """EOS at output 2: the batch scheduled while its token was in flight decodes once more, and
    that token is dropped (the request finished meanwhile); synchronous scheduling does not."""
    spec = [RequestSpec("a", 0.0, 8, 10, stop_at=2)]
    assert [s["sched"] for s in steps(run(spec))] == [{"a": 8}, {"a": 1}, {"a": 1}]
    assert [s["sched"] for s in steps(run(spec, async_scheduling=False))] == [{"a": 8}, {"a": 1}]
    assert fates(run(spec)) == fates(run(spec, async_scheduling=False)) == {"a": ("stop", 2)}


def test_an_arrival_during_a_forward_waits_one_more_step():
    """With no CPU cost to hide, the batch queue delays a new request by the step already queued."""
    specs = [RequestSpec("a", 0.0, 64, 20), RequestSpec("b", 0.005, 16, 2)]
    first = {}
    for mode in (True, False):
        ev = run(specs, async_scheduling=mode)
        first[mode] = next(e for e in ev if e["kind"] == "req" and e["req"] == "b")["first_token"]
    assert first[True] > first[False]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs=workloads(mm=True), sched=scheduler_configs(async_scheduling=True), plan=fault_plans())
def test_fates_do_not_depend_on_the_mode(specs, sched, plan):
    """Every request ends with the same status and output count, async or not (tokens are kept for
    preempted requests and dropped only for finished ones); the runs' invariants hold."""
    a = run(specs, plan, **{**vars(sched), "async_scheduling": True})
    s = run(specs, plan, **{**vars(sched), "async_scheduling": False})
    assert fates(a) == fates(s)


@pytest.mark.parametrize("mutant", [m for m in ASYNC if m != "cache-with-placeholders"])
def test_async_mutants_change_what_a_run_decides(mutant):
    """Each async mutant breaks something a decision-by-decision comparison sees (here, with the
    faithful twin; tests/diff holds them against the real AsyncScheduler). Caching one block too many
    changes only the free queue's order, which shows in prefix hits under KV pressure: the diff
    tier's generated cases catch that one."""
    specs = [RequestSpec(f"r{i}", 0.002 * i, 9 + 5 * i, 6, stop_at=3 if i % 2 else None) for i in range(6)]
    kw = dict(enable_prefix_caching=True, num_gpu_blocks=40, max_num_batched_tokens=32)
    good = run(specs, **kw)
    assert steps(run(specs, mutant=mutant, **kw)) != steps(good)


def test_sigterm_with_two_batches_in_flight_aborts_after_the_step_in_progress():
    cfg = config_from_dict({"workload": {"kind": "poisson", "rate": 30, "duration": 3, "prompt": 128, "output": 32},
                            "seed": 4})
    for signal, statuses in (("SIGTERM", {"aborted", "failed", "length"}), ("SIGKILL", {"failed"})):
        res = simulate(cfg, validate_plan([{"kind": "kill_engine", "at": 1.0, "signal": signal}]))
        st = steps(res.events)
        assert st and max(s["t"] for s in st) < 1.0  # no forward starts after the kill
        late = [e for e in res.events if e["kind"] == "req" and e["finish"] > 1.0]
        assert late and {e["status"] for e in late} <= statuses  # SIGTERM: the step in progress may finish some
        if signal == "SIGTERM":  # the requests in flight are aborted; later arrivals rejected or failed
            assert res.summary["aborted"] > 0
        assert res.summary["finished"] + res.summary["failed"] + res.summary["aborted"] == res.summary["requests"]


def test_sigterm_waits_for_the_batch_queue_call_in_progress():
    """vLLM's SIGTERM handler only sets ``shutdown_state``: ``run_busy_loop`` calls ``_handle_shutdown``
    between two ``step_with_batch_queue`` calls, so the call in progress (its ``schedule()``, the
    block on the oldest batch, ``update_from_output()``) ends and sends its outputs first. With the
    serving section's CPU costs: a SIGTERM during the ``schedule()`` or the ``update_from_output()``
    of the call that applies a request's last batch lets the request finish; one before that call
    aborts it (the batch's tokens are dropped)."""
    cfg = config_from_dict({"serving": {"schedule_base_s": 0.004, "update_base_s": 0.003}})
    specs = (RequestSpec("r0", 0.0, 16, 3), RequestSpec("r1", 0.0, 16, 12))
    base = simulate(cfg, specs=specs).events
    *_, prev, last = [s for s in steps(base) if "r0" in s["sched"]]
    assert last["finished"] == ["r0"]
    call_start = prev["t"] + prev["dur"] + 0.003  # the call before ends with prev's update_from_output
    finish = next(e["finish"] for e in base if e["kind"] == "req" and e["req"] == "r0")

    def r0_at_sigterm(at):
        plan = validate_plan([{"kind": "kill_engine", "at": round(at, 6), "signal": "SIGTERM"}])
        return fates(simulate(cfg, plan, specs=specs).events)["r0"][0]

    assert r0_at_sigterm(finish - 0.001) == "length"      # in update_from_output()
    assert r0_at_sigterm(call_start + 0.001) == "length"  # in schedule(), before the block on r0's batch
    assert r0_at_sigterm(call_start - 0.001) == "aborted"
