"""KV offloading (PR #42611) against the real OffloadingConnector, under the installed vLLM.

Runs under vllm 0.26.0 (policy "0.24+": has_pending_push_work) and vllm 0.23.0 (policy "0.23":
flush-all on the last step); the expectations follow the installed version. Both sides run the
real v1 Scheduler with prefix caching; the "real" side uses vLLM's OffloadingConnector (its
worker over a virtual-clock transfer engine), the "sim" side the simulator's model. Every check
runs in both scheduling modes: async (vLLM's default: AsyncScheduler, the engine loop's batch
queue of 2) and sync (Scheduler, EngineCore.step()).
"""

from __future__ import annotations

import logging
import os

import pytest

pytest.importorskip("vllm", reason="the offload differential tier needs vllm (0.26.0 or 0.23.0) installed")

from vllm_faultsim.faults.plan import validate_plan  # noqa: E402
from vllm_faultsim.harness.runs import offload as oc  # noqa: E402
from vllm_faultsim.harness.drivers.real_offload import vllm_version  # noqa: E402
from vllm_faultsim.harness.workload import RequestSpec, validate  # noqa: E402
from vllm_faultsim.models import kv_offload as ko  # noqa: E402

logging.getLogger("vllm").setLevel(logging.ERROR)
POLICY = ko.version_policy(vllm_version())
OTHER = "0.23" if POLICY == "0.24+" else "0.24+"
NUM_CASES = int(os.environ.get("VLLM_FAULTSIM_OFFLOAD_CASES", "300"))
MODES = pytest.mark.parametrize("mode", [True, False], ids=["async", "sync"])


def steps(events):
    return [e for e in events if e["kind"] == "step"]


def kv(ev, key):
    return (ev.get("kv") or {}).get(key, [])


@pytest.fixture(scope="module")
def all_scenario_runs():
    runs = {}
    for mode in (True, False):
        for name in oc.SCENARIOS:
            case = oc.scenario(name, mode)
            runs[name, mode] = (case, oc.run_case(case, "real"), oc.run_case(case, "sim"))
    return runs


@pytest.fixture(params=[True, False], ids=["async", "sync"])
def scenario_runs(request, all_scenario_runs):
    """name -> (case, real trace, sim trace) in one scheduling mode."""
    return {name: all_scenario_runs[name, request.param] for name in oc.SCENARIOS}


def test_policy_follows_installed_version():
    assert ko.policy_for().version == POLICY
    assert ko.policy_for("0.23").version == "0.23"


@pytest.mark.parametrize("side", ["real", "sim"])
def test_preempted_requests_store_jobs_are_flushed(scenario_runs, side):
    case, real, sim = scenario_runs["preemption"]
    events = real if side == "real" else sim
    pre = [e for e in steps(events) if "r1" in e.get("preempted", ())]
    assert pre, "r1 must be preempted"
    ev = pre[0]
    assert kv(ev, "flush") == ["r1:S0"], ev
    assert "r1:S0" in kv(ev, "done"), "a flushed job completes in its step"
    assert kv(ev, "wait") > 0, "the worker blocked on the flushed store"
    assert oc.invariants(events, case.specs, case.offload.tokens_per_chunk) == []


@pytest.mark.parametrize("side", ["real", "sim"])
def test_reallocated_blocks_pending_job_is_flushed(scenario_runs, side):
    case, real, sim = scenario_runs["fence"]
    events = real if side == "real" else sim
    fin = {r: e["step"] for e in steps(events) for r in e.get("finished", ())}
    assert fin["r0"] < fin["r1"]
    first_r2 = next(e for e in steps(events) if "r2" in e["sched"])
    # r0 finished with its store in flight; r2 takes r0's freed GPU blocks -> fence flush
    assert kv(first_r2, "flush") == ["r0:S0"], first_r2
    assert kv(first_r2, "done") == ["r0:S0"]
    assert oc.invariants(events, case.specs, case.offload.tokens_per_chunk) == []


@pytest.mark.parametrize("side", ["real", "sim"])
def test_last_step_flush_follows_version(scenario_runs, side):
    case, real, sim = scenario_runs["last_step"]
    events = real if side == "real" else sim
    st = steps(events)
    late = int(case.sched.async_scheduling)  # async: the batch scheduled during r0's forward is empty
    assert st[0]["finished"] == ["r0"] and kv(st[0], "store") == [["r0:S0", "r0", [0, 1]]]
    assert all(e["sched"] == {} for e in st[1:])
    if POLICY == "0.23":
        # PR #42611: every tracked request is finished -> flush all jobs on that (last) step
        assert len(st) == 2 + late
        assert kv(st[-1], "flush") == ["r0:S0"] and kv(st[-1], "done") == ["r0:S0"]
    else:
        # 0.24+: no flush; has_pending_push_work keeps the engine stepping until the store lands
        # (async: the empty batch queued behind the completion is applied last)
        assert all(not kv(e, "flush") for e in st)
        assert len(st) > 10 and kv(st[-1 - late], "done") == ["r0:S0"]
    assert oc.invariants(events, case.specs, case.offload.tokens_per_chunk) == []


@pytest.mark.parametrize("name", oc.SCENARIOS)
def test_scenarios_sim_matches_real(scenario_runs, name):
    case, real, sim = scenario_runs[name]
    assert oc.offload_differences(real, sim) == []


@MODES
def test_other_versions_policy_is_a_divergence(mode):
    """The checker is version-sensitive: the other release's flush rule diverges from real vLLM."""
    case = oc.scenario("last_step", mode)
    real = oc.run_case(case, "real")
    sim = oc.run_case(case, "sim", policy=OTHER)
    problems = oc.offload_differences(real, sim)
    assert problems and any("flush" in p or "step counts" in p or "pending" in p for p in problems), problems


@MODES
@pytest.mark.parametrize("mutant,name", [("no-preempt-flush", "preemption"), ("no-fence-flush", "fence"),
                                         ("no-flush-all", "last_step")])
def test_mutants_are_caught(mutant, name, mode):
    case = oc.scenario(name, mode)
    policy = "0.23" if mutant == "no-flush-all" else None
    problems = oc.check_case(case, policy=policy, mutant=mutant)
    assert problems, f"mutant {mutant} not caught in scenario {name}"
    if mutant == "no-flush-all":
        # whatever vLLM is installed: 0.23.0 without the flush-all rule strands the last store
        sim = oc.run_case(case, "sim", policy="0.23", mutant=mutant)
        assert any("never retired" in v for v in oc.invariants(sim, case.specs, case.offload.tokens_per_chunk))


def _kill_case(at: float, mode: bool) -> oc.Case:
    case = oc.scenario("fence", mode)
    plan = validate_plan({"faults": [{"kind": "kill_engine", "at": at}]}, "kill")
    return oc.Case(0, case.sched, case.offload, case.specs, plan)


@MODES
def test_engine_kill_with_stores_in_flight_reports_what_is_lost(mode):
    case = _kill_case(0.012, mode)  # after the first step: r0's and r1's stores are in flight
    real, sim = oc.run_case(case, "real"), oc.run_case(case, "sim")
    end = real[-1]
    assert end["dead"] == "kill_engine"
    assert end["lost"] == ["r0:S0", "r1:S0"]
    assert "r1" in end["failed_requests"] and "r2" in end["failed_requests"]
    assert oc.offload_differences(real, sim) == []
    tpc = case.offload.tokens_per_chunk
    assert oc.invariants(real, case.specs, tpc) == [] and oc.invariants(sim, case.specs, tpc) == []
    (lost,) = [e for e in real if e["kind"] == "kv_lost"]
    assert lost["unapplied"] == ([1, 2] if mode else [1]), "async: the batch queued behind never comes back"


@MODES
def test_failed_transfer_kills_the_engine_on_both_sides(mode):
    """vLLM's offloading worker asserts transfer success: a failed store is an engine death
    (async: execute_model runs the worker inline, so it raises from the schedule of a batch)."""
    base = oc.scenario("fence", mode)
    plan = validate_plan({"faults": [{"kind": "kv_transfer_fail", "start": 0.0, "end": 0.02}]}, "fail")
    case = oc.Case(0, base.sched, base.offload, base.specs, plan)
    real, sim = oc.run_case(case, "real"), oc.run_case(case, "sim")
    death = [e for e in real if e["kind"] == "proc"]
    assert death and death[0]["cause"] == "kv_transfer_failed" and death[0]["failed"]
    assert real[-1]["dead"] == "kv_transfer_failed" and real[-1]["lost"]
    assert oc.offload_differences(real, sim) == []
    assert oc.invariants(real, case.specs, case.offload.tokens_per_chunk) == []


@MODES
def test_slow_and_stalled_transfers_delay_loads(mode):
    """A repeat of a prompt whose chunks are on CPU waits for the load; a 1000x slow window
    (a stall) stretches the wait; both sides agree."""
    specs = validate([RequestSpec("a", 0.0, 32, 2, prefix=(0, 32)), RequestSpec("b", 0.3, 32, 2, prefix=(0, 32))])
    from vllm_faultsim.harness.drivers.real_offload import OffloadSchedConfig
    sched = OffloadSchedConfig(block_size=4, num_gpu_blocks=12, async_scheduling=mode)  # 'a' leaves the GPU cache
    waits = {}
    for factor in (1, 1000):
        faults = [] if factor == 1 else [{"kind": "kv_transfer_slow", "start": 0.25, "end": 1.0, "factor": factor}]
        filler = [RequestSpec(f"f{i}", 0.1 + 0.01 * i, 40, 1) for i in range(2)]
        case = oc.Case(0, sched, ko.OffloadConfig(block_size=4, num_cpu_chunks=64), validate(list(specs) + filler),
                       validate_plan({"faults": faults}, "slow"))
        real, sim = oc.run_case(case, "real"), oc.run_case(case, "sim")
        assert oc.offload_differences(real, sim) == []
        loads = [e for e in steps(real) if any(job[1] == "b" for job in kv(e, "load"))]
        assert loads, "b must load its prefix from CPU"
        done = next(e for e in steps(real) if any(j.startswith("b:L") for j in kv(e, "done")))
        waits[factor] = done["t"] - loads[0]["t"]
    assert waits[1000] > 50 * waits[1]


@MODES
def test_generated_cases_have_no_divergence(mode):
    """Zero divergences (and all invariants) over NUM_CASES generated cases in each scheduling
    mode: few GPU blocks (preemption storms), tiny CPU pools (evictions, failed stores), shared
    prefixes (loads, delayed lookups), slow/stalled/failing transfers, engine kills."""
    bad = []
    for seed in range(NUM_CASES):
        case = oc.gen_case(seed, async_scheduling=mode)
        problems = oc.check_case(case)
        if problems:
            bad.append(f"{case.describe()}: {problems[0]}  [replay: {oc.replay_command(seed, async_scheduling=mode)}]")
    assert not bad, f"{len(bad)}/{NUM_CASES} cases diverge (vllm {vllm_version()}):\n" + "\n".join(bad[:10])


ASYNC_MUTANT_CASES = range(min(NUM_CASES, 100))
ASYNC_ONLY_SEED = 33  # a generated case the async-only mutant changes (offload_prompt_only off)


def test_async_only_mutant_is_caught_in_async_and_silent_in_sync():
    """``offload-placeholders`` counts the tokens of the batches in flight as offloadable: under
    async scheduling the checker catches it on generated cases (offload_prompt_only off: decode
    chunks are stored); under sync it is the correct model (no placeholders), 0 divergences."""
    caught = {True: [], False: []}
    for mode in (True, False):
        for seed in ASYNC_MUTANT_CASES:
            if oc.check_case(oc.gen_case(seed, async_scheduling=mode), mutant="offload-placeholders"):
                caught[mode].append(seed)
    assert caught[True], f"offload-placeholders not caught in {len(ASYNC_MUTANT_CASES)} async cases"
    assert caught[False] == [], f"offload-placeholders diverges in sync cases {caught[False][:5]}"


@pytest.mark.parametrize("name", oc.SCENARIOS)
def test_pure_simulator_reproduces_scenarios(scenario_runs, name):
    case, real, _ = scenario_runs[name]
    assert oc.offload_differences(real, oc.run_case(case, "puresim")) == []


@pytest.mark.parametrize("mutant,name", [("no-preempt-flush", "preemption"), ("no-fence-flush", "fence"),
                                         ("no-flush-all", "last_step"), ("offload-placeholders", None)])
def test_pure_simulator_mutants_are_caught(scenario_runs, mutant, name):
    if name is None:  # async only: a generated case that stores decode chunks
        case = oc.gen_case(ASYNC_ONLY_SEED)
        assert oc.check_case(case, mutant=mutant, side="puresim")
        assert not oc.check_case(case.in_mode(False), mutant=mutant, side="puresim")
        return
    case, real, _ = scenario_runs[name]
    policy = "0.23" if mutant == "no-flush-all" else None
    assert oc.check_case(case, policy=policy, mutant=mutant, side="puresim", real=real)


@MODES
def test_pure_simulator_generated_cases_have_no_divergence(mode):
    """The whole simulator (simulated Scheduler + prefix cache + offloading hooks + model) against
    the real Scheduler + OffloadingConnector, over NUM_CASES generated cases in each mode (async:
    the Scheduler's deferred block frees with a KV connector and two batches in flight too)."""
    bad = []
    for seed in range(NUM_CASES):
        case = oc.gen_case(seed, async_scheduling=mode)
        problems = oc.check_case(case, side="puresim")
        if problems:
            bad.append(f"{case.describe()}: {problems[0]}  "
                       f"[replay: {oc.replay_command(seed, side='puresim', async_scheduling=mode)}]")
    assert not bad, f"{len(bad)}/{NUM_CASES} cases diverge:\n" + "\n".join(bad[:10])
