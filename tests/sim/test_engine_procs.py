"""Engine processes, the liveness monitor (PR #35862) and connector shutdown draining
(PR #42423): the simulator alone (no torch, no vllm)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_faultsim.faults.plan import validate_plan
from vllm_faultsim.harness.checkers.procs import (MATRIX_PHASES, RACE, binomial_p_value, classify, code0_naming, fate_differences,
                                                compare_code0_naming, compare_latency)
from vllm_faultsim.harness.runs.procs import (Case, like_the_run, matrix_cases, matrix_scenario, off_schedule,
                                             on_a_boundary, simulate_procs)
from vllm_faultsim.harness.trace import dumps
from vllm_faultsim.harness.mutants import PROCS_MUTANTS
from vllm_faultsim.models.engine_procs import (POLICIES, LatencyModel, ProcScenario, ScenarioError,
                                               check_faults, policy_for_vllm, resolve_fault_time)
from vllm_faultsim.models.shutdown_drain import DRAIN_POLICIES, ConnectorOp


def latency(unreaped: float = 0.0, mp: float = 0.02, ray: float = 0.01) -> LatencyModel:
    """A fixed-latency profile: every draw is the same."""
    flat = lambda v: [[0.0, v], [1.0, v]]  # noqa: E731
    return LatencyModel({"name": "test", "exitcode_none_after_sentinel": {"rate": unreaped}, "client_rss_mb": 500.0,
                         "quantiles": {"mp": {"signal": flat(mp), "exit": flat(mp)},
                                       "ray": {"signal": flat(ray), "exit": flat(ray)}}})


def kill(signal: str, rank: int = 1, phase: str = "mid_step", at: float = 0.45):
    return validate_plan([{"kind": "kill_engine", "at": at, "rank": rank, "signal": signal, "phase": phase}])


def proc(events, name):
    return [e for e in events if e.get("kind") == "proc" and e["event"] == name]


def ops(events):
    return classify(events)["ops"]


SC = matrix_scenario()


def test_same_seed_same_bytes_and_packaged_profile_loads():
    a = simulate_procs(SC, kill("exit0"), seed=7)
    b = simulate_procs(SC, kill("exit0"), seed=7)
    assert [dumps(e) for e in a] == [dumps(e) for e in b]
    prof = LatencyModel.load()
    assert prof.quantile("mp", "signal", 0.5) > 0 and 0 <= prof.exit0_unreaped <= 1


def test_sigkill_mid_step_is_named_and_everything_shuts_down_with_the_others_drained():
    ev = simulate_procs(SC, kill("SIGKILL"), latency=latency())
    c = classify(ev)
    assert c["exits"] == {0: 0, 1: -9}
    assert c["detect"] == [{"failed": 1, "failed_name": "EngineCore_DP1", "first_exit": 1}]
    assert c["exit_by"] == {0: "monitor", 1: "self"} and c["manager_shutdowns"] == ["monitor"]
    assert c["engine_dead"] == ["monitor"] and c["probe"] == ["request_failed"]
    assert all(v["lost"] == 1 for k, v in c["ops"].items() if k.startswith("1."))
    assert {k: v["drain"] for k, v in c["ops"].items() if k.startswith("0.")} == {
        "0.scheduler.ec": 1, "0.scheduler.kv": 1, "0.worker.ec": 1, "0.worker.kv": 1}
    (d,) = proc(ev, "detect")
    assert d["latency"] == pytest.approx(0.02) and d["cause"] == "signal"
    # engine_dead only once the monitor's shutdown has drained the others
    assert proc(ev, "engine_dead")[0]["t"] >= max(e["t"] for e in proc(ev, "exit"))


def test_exit_code_0_shuts_everything_down_and_is_named_only_through_the_reap_race():
    for signal in ("exit0", "SIGTERM"):
        quiet = classify(simulate_procs(SC, kill(signal), latency=latency(unreaped=0.0)))
        assert quiet["_code0_named"] == [False] and quiet["detect"][0]["failed"] == RACE
        assert quiet["manager_shutdowns"] == ["monitor"] and quiet["exits"] == {0: 0, 1: 0}
        raced = simulate_procs(SC, kill(signal), latency=latency(unreaped=1.0))
        assert proc(raced, "detect")[0]["failed_name"] == "EngineCore_DP1"
        assert not fate_differences(raced, simulate_procs(SC, kill(signal), latency=latency(unreaped=0.0)))


def test_sigterm_mid_step_finishes_the_step_then_drains_in_shutdown_order():
    ev = simulate_procs(SC, kill("SIGTERM", rank=0), latency=latency())
    assert [e["t"] for e in proc(ev, "core_shutdown") if e["rank"] == 0] == [0.5]  # the step ends at 0.5
    assert classify(ev)["shutdown_order"][0] == ["worker.kv", "worker.ec", "scheduler.kv", "scheduler.ec"]
    exit0 = [e for e in proc(ev, "exit") if e["rank"] == 0][0]
    assert exit0["t"] == pytest.approx(0.95) and exit0["exitcode"] == 0  # the last EC op ends at 0.95


def test_idle_sigterm_starts_the_shutdown_at_once():
    ev = simulate_procs(SC, kill("SIGTERM", rank=0, phase="idle"), latency=latency())
    assert [e["t"] for e in proc(ev, "core_shutdown") if e["rank"] == 0] == [pytest.approx(0.63)]


def test_signals_during_the_shutdown_cut_the_drain():
    for signal, code in (("SIGKILL", -9), ("SIGTERM", -15), ("exit1", 1), ("exit0", 0)):
        c = classify(simulate_procs(SC, kill(signal, rank=0, phase="shutdown"), latency=latency()))
        assert c["exits"][0] == code and c["faults"] == [True]
        assert c["ops"]["0.worker.ec"]["lost"] == 1 and c["ops"]["0.worker.kv"]["drain"] == 1
        assert c["ops"]["1.worker.ec"]["drain"] == 1 and c["detect"] == []  # the manager was stopping
        assert c["manager_shutdowns"] == ["client"] and c["stops"] == ["end"]


def test_client_stop_is_no_failure_and_drains_everything():
    c = classify(simulate_procs(SC, kill("stop", phase="mid_step"), latency=latency()))
    assert c["detect"] == [] and c["stops"] == ["fault"] and c["manager_shutdowns"] == ["client"]
    assert c["engine_dead"] == ["client_shutdown"] and c["probe"] == ["request_failed"]
    assert all(v["lost"] == 0 for v in c["ops"].values())


def test_drain_is_bounded_by_the_managers_timeout():
    long = ProcScenario(ops=(ConnectorOp(0, "ec", "worker", "slow", 0.25, 9.0),), duration=12.0, probe_at=11.0)
    ev = simulate_procs(long, kill("SIGKILL", rank=1), latency=latency())
    c = classify(ev)
    assert c["exits"] == {0: -9, 1: -9} and c["ops"]["0.worker.ec"]["lost"] == 1
    (d,) = proc(ev, "detect")
    rank0 = [e for e in proc(ev, "exit") if e["rank"] == 0][0]
    assert rank0["t"] == pytest.approx(d["t"] + 5.0)  # shutdown(procs, timeout=None) waits 5 s


def test_shutdown_hook_of_pr_42423_drains_ec_and_without_it_ec_is_lost():
    with_hook = classify(simulate_procs(SC, kill("exit1", rank=0), latency=latency()))
    without = classify(simulate_procs(SC, kill("exit1", rank=0), "mutant:skip-ec-shutdown", latency=latency()))
    assert with_hook["ops"]["0.worker.ec"] == {"op_done": 0, "drain": 1, "lost": 0}
    assert without["ops"]["0.worker.ec"] == {"op_done": 0, "drain": 0, "lost": 1}
    assert without["ops"]["0.worker.kv"]["drain"] == 1  # the KV connector kept its shutdown
    assert without["shutdown_order"][0] == ["worker.kv", "scheduler.kv"]
    assert DRAIN_POLICIES["pre-pr42423"].shutdown_steps() == (("worker", "kv"), ("scheduler", "kv"))


def test_polling_detects_up_to_one_interval_late():
    ev = simulate_procs(SC, kill("SIGKILL", phase="any", at=0.3), "polling", latency=latency())
    assert proc(ev, "detect") == []  # the first poll (5 s) comes after the end-of-run stop
    long = ProcScenario(duration=12.0, probe_at=11.0)
    for at in (0.3, 2.0, 4.9):
        (d,) = proc(simulate_procs(long, kill("SIGKILL", phase="any", at=at), "polling", latency=latency()), "detect")
        assert d["t"] == 5.0 and 0 < d["latency"] <= POLICIES["polling"].poll_interval


def test_ray_actor_policy():
    lat = latency()
    crash = classify(simulate_procs(SC, kill("SIGKILL"), "ray-actor", latency=lat))
    assert crash["exits"] == {0: "killed", 1: "actor_died"} and crash["detect"][0]["failed"] == 1
    assert crash["detect"][0]["failed_name"] == "Actor <ref>"
    assert all(v["drain"] == 0 for v in crash["ops"].values())  # ray.kill: nobody drains
    # SystemExit out of EngineCoreActorMixin.run is an ActorDiedError: a failure
    assert classify(simulate_procs(SC, kill("exit0"), "ray-actor", latency=lat))["detect"][0]["failed"] == 1
    # a fatal error is a RayTaskError the monitor does not catch: no shutdown, never marked dead
    fatal = classify(simulate_procs(SC, kill("exit1"), "ray-actor", latency=lat))
    assert fatal["monitor_error"] and fatal["detect"] == [] and fatal["probe"] == ["request_accepted"]
    assert fatal["manager_shutdowns"] == ["client"] and fatal["exit_by"] == {0: "client", 1: "self"}
    assert fatal["ops"]["1.worker.ec"]["drain"] == 1
    stop = classify(simulate_procs(SC, kill("stop"), "ray-actor", latency=lat))
    assert stop["detect"] == [] and stop["exits"] == {0: "killed", 1: "killed"}


# detection latencies the real matrices measured with both cores loaded by stress-ng and other jobs
# (load average 4-10; benchmarks/results/loaded_runs.txt): MP sentinels 10-70 ms, Ray's ray.wait
# 10-410 ms; Ray's range taken to 600 ms
LOADED_DETECTION = {"mp": 0.07, "ray": 0.6}


@pytest.mark.parametrize("backend", ["mp", "ray"])
def test_matrix_classification_holds_over_the_loaded_detection_range(backend):
    """Each matrix case's model classification is the same for every detection latency a loaded
    host gives (and GUARD beyond), so on_a_boundary leaves no case unjudged for its latency alone.
    With Ray's operations timed as MP's, rank 0's SIGTERM / exit0 cases change at 150 ms."""
    from vllm_faultsim.harness.runs.procs import GUARD, MeasuredLatency
    model, policy = LatencyModel.load(), POLICIES["ray-actor" if backend == "ray" else "mp-0.26"]
    sc = matrix_scenario(2, backend)
    top = LOADED_DETECTION[backend] + GUARD
    for case in matrix_cases(phases=("mid_step",) if backend == "ray" else MATRIX_PHASES):
        seen = {}
        for ms in range(5, round(top * 1e3) + 1, 5):
            c = classify(simulate_procs(sc, case.plan(), policy, latency=MeasuredLatency(model, [ms / 1e3] * 4)))
            seen.setdefault(json.dumps(c, sort_keys=True, default=str), ms)
        assert len(seen) == 1, (case.name, f"classification changes at {sorted(seen.values())[1:]} ms")


def test_every_mutant_is_caught_by_the_checker():
    """Against the mp-0.26 model itself: per case for two mutants, by naming rate for the third."""
    lat = latency(unreaped=0.4)
    base = {c.name: simulate_procs(SC, c.plan(), "mp-0.26", seed=3, latency=lat) for c in matrix_cases()}
    for m in PROCS_MUTANTS:
        caught = [c.name for c in matrix_cases() if fate_differences(simulate_procs(SC, c.plan(), m, seed=3, latency=lat), base[c.name])]
        rate = PROCS_MUTANTS[m].code0_naming_rate(lat.exit0_unreaped)
        by_rate = not compare_code0_naming(code0_naming(base.values()), rate)["ok"]
        assert caught or by_rate, m
        if m == "mutant:name-exit0":
            assert not caught and by_rate  # per case both outcomes are one class
    assert compare_code0_naming(code0_naming(base.values()), 0.4)["ok"]


def test_phases_resolve_from_the_scenario():
    f = kill("SIGKILL", phase="mid_step").faults[0]
    assert resolve_fault_time(SC, f) == 0.45
    assert resolve_fault_time(SC, kill("SIGKILL", phase="mid_step", at=0.5).faults[0]) == pytest.approx(0.53)
    assert resolve_fault_time(SC, kill("SIGKILL", phase="idle").faults[0]) == pytest.approx(0.63)
    assert resolve_fault_time(SC, kill("SIGKILL", phase="idle", at=0.1).faults[0]) == 0.1
    assert resolve_fault_time(SC, kill("SIGKILL", phase="mid_step", at=0.7).faults[0]) is None
    c = classify(simulate_procs(SC, kill("SIGKILL", phase="mid_step", at=0.7), latency=latency()))
    assert c["faults"] == [False] and c["detect"] == []


def test_bad_scenarios_and_faults_fail_with_one_line():
    with pytest.raises(ScenarioError, match="busy has 1 windows"):
        ProcScenario(dp_size=2, busy=((0, 1),))
    with pytest.raises(ScenarioError, match="rank 2 but dp_size is 2"):
        check_faults(SC, kill("SIGKILL", rank=2).of_kind("kill_engine"))
    with pytest.raises(ValueError, match="connector must be one of"):
        ConnectorOp(0, "nvme", "worker", "x", 0, 1)
    with pytest.raises(KeyError, match="no ray/exit latencies"):
        LatencyModel({"name": "p", "exitcode_none_after_sentinel": {"rate": 0}, "client_rss_mb": 1,
                      "quantiles": {"mp": {"exit": [[0, 1], [1, 2]]}}}).quantile("ray", "exit", 0.5)
    with pytest.raises(ValueError, match="only 0.23.0 and later"):
        policy_for_vllm("0.22.1")
    assert policy_for_vllm("0.26.0").name == "mp-0.26" and policy_for_vllm("0.23.0", "ray").name == "ray-actor"


def test_operations_are_conserved():
    for c in matrix_cases():
        for policy in ("mp-0.26", "ray-actor", *PROCS_MUTANTS):
            ev = simulate_procs(SC, c.plan(), policy, latency=latency())
            submitted = {e["op"] for e in ev if e.get("event") in ("op_done", "drain", "lost")}
            counted = [e["op"] for e in ev if e.get("event") in ("op_done", "drain", "lost")]
            assert len(counted) == len(submitted), (c.name, policy)
            assert {e["rank"] for e in proc(ev, "exit")} == {0, 1}, (c.name, policy)


def test_mp_latency_scales_with_the_forking_clients_memory():
    lat = latency(mp=0.02, ray=0.01)
    assert lat.quantile("mp", "signal", 0.5, client_rss_mb=1000.0) == pytest.approx(0.04)
    assert lat.quantile("ray", "signal", 0.5, client_rss_mb=1000.0) == pytest.approx(0.01)  # actors are no forks
    big = ProcScenario(client_rss_mb=2000.0)
    (d,) = proc(simulate_procs(big, kill("SIGKILL"), latency=lat), "detect")
    assert d["latency"] == pytest.approx(0.08)
    assert compare_latency(lat, "mp", [("signal", 0.08)], client_rss_mb=2000.0)["signal"]["ok"]


def test_a_profile_re_based_on_another_host_scales_mp_by_its_fork_teardown():
    lat = LatencyModel({**latency(mp=0.02, ray=0.01).profile, "fork_teardown_s": 0.010})
    here = lat.on_host(fork_teardown_s=0.006, client_rss_mb=800.0)  # tears forks down faster, bigger client
    assert here.quantile("mp", "exit", 0.5, client_rss_mb=800.0) == pytest.approx(0.012)
    assert here.quantile("mp", "exit", 0.5, client_rss_mb=1600.0) == pytest.approx(0.024)
    assert here.quantile("ray", "signal", 0.5) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="no fork_teardown_s"):
        latency().on_host(0.006, 800.0)


def test_latency_and_naming_statistics():
    lat = latency(mp=0.02)
    out = compare_latency(lat, "mp", [("signal", x) for x in (0.018, 0.02, 0.021, 0.05)])
    assert out["signal"]["ok"] and out["signal"]["n"] == 4
    assert not compare_latency(lat, "mp", [("signal", 0.04)])["signal"]["ok"]
    assert binomial_p_value(3, 8, 0.4) > 0.5 and binomial_p_value(7, 8, 1.0) == 0.0
    assert binomial_p_value(8, 8, 1.0) == 1.0


def test_the_model_imports_neither_torch_nor_vllm():
    code = ("import sys, vllm_faultsim.models.engine_procs, vllm_faultsim.harness.checkers.procs; "
            "print(json.dumps([m for m in ('torch', 'vllm') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_case_names_and_plans():
    case = Case("exit1", "idle", 1)
    assert case.name == "exit1-idle-rank1" and case.plan().faults[0].signal == "exit1"
    assert len(matrix_cases()) == 30


def test_pooled_latency_compares_the_models_mixture_median():
    lat = LatencyModel({**latency().profile, "quantiles": {"mp": {"signal": [[0.0, 0.01], [1.0, 0.01]],
                                                            "exit": [[0.0, 0.03], [1.0, 0.03]]}}})
    measured = [("signal", 0.01)] * 3 + [("exit", 0.03)]
    out = compare_latency(lat, "mp", measured, pooled=True)
    assert list(out) == ["pooled"] and out["pooled"]["n"] == 4
    assert out["pooled"]["model_p50"] == pytest.approx(0.01) and out["pooled"]["ok"]
    mostly_exits = compare_latency(lat, "mp", [("signal", 0.01)] + [("exit", 0.03)] * 3, pooled=True)["pooled"]
    assert mostly_exits["model_p50"] == pytest.approx(0.03) and mostly_exits["ok"]
    slower = compare_latency(lat, "mp", [("signal", 0.02)] * 3 + [("exit", 0.06)], pooled=True)["pooled"]
    assert slower["measured_p50"] == pytest.approx(0.02) and not slower["ok"]  # the model says 10 ms


def test_a_run_is_judged_unless_its_detection_latency_lies_on_a_boundary():
    """runs.procs.on_a_boundary: SIGTERM mid-step on rank 0: rank 0 drains and exits at 0.95 s;
    rank 1's KV operations end at 1.10 s, so a detection of ~150 ms decides whether they are done
    or drained when the monitor's SIGTERM reaches rank 1. Idle-host latencies (20-45 ms: moved
    down they stop at 1 ms, short of the tie with the exit at 0) and a loaded host's (220 ms) are
    judged; 150 ms and 130 ms are not. The model is conditioned on the run's operation times."""
    plan, model = Case("SIGTERM", "mid_step", 0).plan(), latency()
    on_time = {op.op: [op.submit, op.submit + op.dur] for op in SC.ops}

    def why(x, op_times=on_time):
        real = [{"kind": "proc", "event": "detect", "cause": "exit", "latency": x},
                {"kind": "proc", "event": "request_failed", "t": SC.probe_at},
                {"kind": "end", "op_times": op_times}]
        return on_a_boundary(SC, plan, "mp-0.26", 0, model, real, like_the_run(SC, plan, "mp-0.26", 0, model, real))
    assert [why(x) for x in (0.02, 0.045, 0.22)] == [None, None, None]
    assert why(0.15) and why(0.13) and "lies on a boundary" in why(0.15)
    # rank 1's KV operations submitted 150 ms late end at 1.25 s: 150 ms is then no boundary, 300 ms is
    late = {op: [s + 0.15, e + 0.15] if op.startswith("a1.") and op.endswith(".kv") else [s, e]
            for op, (s, e) in on_time.items()}
    assert why(0.15, late) is None and why(0.3, late)


def test_a_late_submission_that_crossed_the_fault_is_no_valid_history():
    """runs.procs.off_schedule: the model takes the run's operation times, but an operation the
    loaded host submitted only after the fault reached its rank (which the model's rank no longer
    takes) is a race of the driver's thread, not vLLM's: the run is left to be re-run."""
    on_time = {op.op: [op.submit, op.submit + op.dur] for op in SC.ops}

    def run_with(submit):
        times = {**on_time, "a1.worker.kv": [submit, submit + 0.55]}
        return [{"kind": "fault", "t": 0.45, "applied": True, "rank": 1, "fault": {"signal": "SIGTERM"}},
                {"kind": "end", "max_slip": 0.0, "op_times": times, "summary": {"ops": {}}}]
    assert off_schedule(SC, run_with(0.3)) is None
    assert "a1.worker.kv was submitted at 0.460 s, after the fault" in off_schedule(SC, run_with(0.46))
