"""KV offloading (PR #42611) against the real OffloadingConnector, under the installed vLLM.

Runs under vllm 0.26.0 (policy "0.24+": has_pending_push_work) and vllm 0.23.0 (policy "0.23":
flush-all on the last step); the expectations follow the installed version. Both sides run the
real v1 Scheduler with prefix caching; the "real" side uses vLLM's OffloadingConnector (its
worker over a virtual-clock transfer engine), the "sim" side the simulator's model.
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


def steps(events):
    return [e for e in events if e["kind"] == "step"]


def kv(ev, key):
    return (ev.get("kv") or {}).get(key, [])


@pytest.fixture(scope="module")
def scenario_runs():
    runs = {}
    for name in oc.SCENARIOS:
        case = oc.scenario(name)
        runs[name] = (case, oc.run_case(case, "real"), oc.run_case(case, "sim"))
    return runs


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
    assert st[0]["finished"] == ["r0"] and kv(st[0], "store") == [["r0:S0", "r0", [0, 1]]]
    if POLICY == "0.23":
        # PR #42611: every tracked request is finished -> flush all jobs on that (last) step
        assert len(st) == 2 and st[1]["sched"] == {}
        assert kv(st[1], "flush") == ["r0:S0"] and kv(st[1], "done") == ["r0:S0"]
    else:
        # 0.24+: no flush; has_pending_push_work keeps the engine stepping until the store lands
        assert all(not kv(e, "flush") for e in st)
        assert len(st) > 10 and all(e["sched"] == {} for e in st[1:])
        assert kv(st[-1], "done") == ["r0:S0"]
    assert oc.invariants(events, case.specs, case.offload.tokens_per_chunk) == []


@pytest.mark.parametrize("name", oc.SCENARIOS)
def test_scenarios_sim_matches_real(scenario_runs, name):
    case, real, sim = scenario_runs[name]
    assert oc.offload_differences(real, sim) == []


def test_other_versions_policy_is_a_divergence():
    """The checker is version-sensitive: the other release's flush rule diverges from real vLLM."""
    case = oc.scenario("last_step")
    real = oc.run_case(case, "real")
    sim = oc.run_case(case, "sim", policy=OTHER)
    problems = oc.offload_differences(real, sim)
    assert problems and any("flush" in p or "step counts" in p for p in problems), problems


@pytest.mark.parametrize("mutant,name", [("no-preempt-flush", "preemption"), ("no-fence-flush", "fence"),
                                         ("no-flush-all", "last_step")])
def test_mutants_are_caught(mutant, name):
    case = oc.scenario(name)
    policy = "0.23" if mutant == "no-flush-all" else None
    problems = oc.check_case(case, policy=policy, mutant=mutant)
    assert problems, f"mutant {mutant} not caught in scenario {name}"
    if mutant == "no-flush-all":
        # whatever vLLM is installed: 0.23.0 without the flush-all rule strands the last store
        sim = oc.run_case(case, "sim", policy="0.23", mutant=mutant)
        assert any("never retired" in v for v in oc.invariants(sim, case.specs, case.offload.tokens_per_chunk))


def _kill_case(at: float) -> oc.Case:
    case = oc.scenario("fence")
    plan = validate_plan({"faults": [{"kind": "kill_engine", "at": at}]}, "kill")
    return oc.Case(0, case.sched, case.offload, case.specs, plan)


def test_engine_kill_with_stores_in_flight_reports_what_is_lost():
    case = _kill_case(0.012)  # after the first step: r0's and r1's stores are in flight
    real, sim = oc.run_case(case, "real"), oc.run_case(case, "sim")
    end = real[-1]
    assert end["dead"] == "kill_engine"
    assert end["lost"] == ["r0:S0", "r1:S0"]
    assert "r1" in end["failed_requests"] and "r2" in end["failed_requests"]
    assert oc.offload_differences(real, sim) == []
    tpc = case.offload.tokens_per_chunk
    assert oc.invariants(real, case.specs, tpc) == [] and oc.invariants(sim, case.specs, tpc) == []


def test_failed_transfer_kills_the_engine_on_both_sides():
    """vLLM's offloading worker asserts transfer success: a failed store is an engine death."""
    base = oc.scenario("fence")
    plan = validate_plan({"faults": [{"kind": "kv_transfer_fail", "start": 0.0, "end": 0.02}]}, "fail")
    case = oc.Case(0, base.sched, base.offload, base.specs, plan)
    real, sim = oc.run_case(case, "real"), oc.run_case(case, "sim")
    death = [e for e in real if e["kind"] == "proc"]
    assert death and death[0]["cause"] == "kv_transfer_failed" and death[0]["failed"]
    assert real[-1]["dead"] == "kv_transfer_failed" and real[-1]["lost"]
    assert oc.offload_differences(real, sim) == []
    assert oc.invariants(real, case.specs, case.offload.tokens_per_chunk) == []


def test_slow_and_stalled_transfers_delay_loads():
    """A repeat of a prompt whose chunks are on CPU waits for the load; a 1000x slow window
    (a stall) stretches the wait; both sides agree."""
    specs = validate([RequestSpec("a", 0.0, 32, 2, prefix=(0, 32)), RequestSpec("b", 0.3, 32, 2, prefix=(0, 32))])
    from vllm_faultsim.harness.drivers.real_offload import OffloadSchedConfig
    sched = OffloadSchedConfig(block_size=4, num_gpu_blocks=12)  # 'a' is evicted from the GPU cache by then
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


def test_generated_cases_have_no_divergence():
    """Zero divergences (and all invariants) over NUM_CASES generated cases: few GPU blocks
    (preemption storms), tiny CPU pools (evictions, failed stores), shared prefixes (loads,
    delayed lookups), slow/stalled/failing transfers, engine kills."""
    bad = []
    for seed in range(NUM_CASES):
        case = oc.gen_case(seed)
        problems = oc.check_case(case)
        if problems:
            bad.append(f"{case.describe()}: {problems[0]}  [replay: {oc.replay_command(seed)}]")
    assert not bad, f"{len(bad)}/{NUM_CASES} cases diverge (vllm {vllm_version()}):\n" + "\n".join(bad[:10])


needs_026_scheduler = pytest.mark.skipif(
    POLICY != "0.24+", reason="the simulated Scheduler mirrors vLLM 0.26.0's; under 0.23.0 the Scheduler "
                              "itself differs (admission, prefix hits), so only the connector model is compared")


@needs_026_scheduler
@pytest.mark.parametrize("name", oc.SCENARIOS)
def test_pure_simulator_reproduces_scenarios(scenario_runs, name):
    case, real, _ = scenario_runs[name]
    assert oc.offload_differences(real, oc.run_case(case, "puresim")) == []


@needs_026_scheduler
@pytest.mark.parametrize("mutant,name", [("no-preempt-flush", "preemption"), ("no-fence-flush", "fence"),
                                         ("no-flush-all", "last_step")])
def test_pure_simulator_mutants_are_caught(scenario_runs, mutant, name):
    case, real, _ = scenario_runs[name]
    policy = "0.23" if mutant == "no-flush-all" else None
    assert oc.check_case(case, policy=policy, mutant=mutant, side="puresim", real=real)


@needs_026_scheduler
def test_pure_simulator_generated_cases_have_no_divergence():
    """The whole simulator (simulated Scheduler + prefix cache + offloading hooks + model) against
    the real Scheduler + OffloadingConnector, over NUM_CASES generated cases."""
    bad = []
    for seed in range(NUM_CASES):
        case = oc.gen_case(seed)
        problems = oc.check_case(case, side="puresim")
        if problems:
            bad.append(f"{case.describe()}: {problems[0]}  [replay: {oc.replay_command(seed, side='puresim')}]")
    assert not bad, f"{len(bad)}/{NUM_CASES} cases diverge:\n" + "\n".join(bad[:10])
