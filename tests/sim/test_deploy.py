"""Deployments (issue 14, items 1-2): DP ranks or independent servers behind a router, the client's
retries, faults from rates; every run's trace checked (harness/checkers/deploy.py)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vllm_faultsim.faults.plan import FaultPlan, PlanError, validate_plan
from vllm_faultsim.faults.rates import MAX_FAULTS, FaultRates, expand, rates_from_dict
from vllm_faultsim.harness.checkers.deploy import deployment_problems
from vllm_faultsim.harness.cli import main
from vllm_faultsim.harness.mutants import DEPLOYMENT_MUTANTS
from vllm_faultsim.harness.runs.deploy import DeploymentConfig, simulate_deployment
from vllm_faultsim.harness.runs.simulate import RunConfig
from vllm_faultsim.harness.trace import read_trace
from vllm_faultsim.models.client import RetryPolicy
from vllm_faultsim.models.request import RequestSpec
from vllm_faultsim.models.router import ROUTERS

CFG = RunConfig(workload={"kind": "poisson", "rate": 30.0, "duration": 20.0, "prompt": 256, "output": 32})


def _kill(at: float, rank: int = 0, signal: str = "SIGKILL") -> FaultPlan:
    return validate_plan([{"kind": "kill_engine", "at": at, "rank": rank, "signal": signal}])


def _run(dep: DeploymentConfig, plans=None, cfg=CFG, seed=1, **kw) -> dict:
    res = simulate_deployment(dep, cfg, seed=seed, plans=plans, summary_only=False, **kw)
    assert deployment_problems(res["events"]) == []
    return res


def _of(res, kind, **match):
    return [e for e in res["events"] if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())]


def test_every_request_ends_exactly_once_under_deaths_of_both_kinds():
    dep = DeploymentConfig(servers=3, router="least_outstanding", restart_s=4.0,
                           retry=RetryPolicy(attempts=2, backoff_s=0.5, timeout_s=8.0))
    plans = (_kill(3.0), _kill(5.0, signal="SIGTERM"), _kill(9.0))
    res = _run(dep, plans)
    ends = _of(res, "client")
    n = res["requests"]
    assert len(ends) == len({e["req"] for e in ends}) == n == 599
    assert res["finished"] + res["failed"] + res["lost"] == n
    assert res["engine_deaths"] == 3 and res["retried"] > 0
    assert {e["status"] for e in _of(res, "req")} >= {"length", "failed", "aborted"}  # SIGTERM aborts


def test_same_seed_same_trace_bytes_and_a_replay_from_the_trace(tmp_path):
    spec = tmp_path / "deploy.yaml"
    spec.write_text("deployment: {servers: 2, router: round_robin, restart_s: 3}\n"
                    "fault_rates: {engine_mtbf_s: 8, slow_episodes_per_hour: 360, slow_duration_s: 2, slow_factor: 3}\n"
                    "run: {workload: {kind: poisson, rate: 20, duration: 15, prompt: 128, output: 16}, seed: 4}\n")
    a, b, c, d = (tmp_path / f"{x}.jsonl" for x in "abcd")
    for path, extra in ((a, []), (b, []), (d, ["--seed", "5"])):
        assert main(["deploy", "--spec", str(spec), "--trace", str(path), "--no-progress", *extra]) == 0
    assert main(["deploy", "--replay", str(a), "--trace", str(c), "--no-progress"]) == 0
    assert a.read_bytes() == b.read_bytes() == c.read_bytes() != d.read_bytes()
    events = read_trace(a)
    plans = events[0]["config"]["plans"]
    assert any(f["kind"] == "kill_engine" for p in plans for f in p["faults"])
    assert any(f["kind"] == "slow_steps" for p in plans for f in p["faults"])
    assert deployment_problems(events) == []


def test_a_dp_rank_death_takes_the_whole_server_down_and_it_restarts():
    dep = DeploymentConfig(data_parallel_size=2, restart_s=3.0, retry=RetryPolicy(attempts=1))
    res = _run(dep, (_kill(8.0, rank=1),))
    (down,) = _of(res, "proc", event="server_down")
    (up,) = _of(res, "proc", event="server_up")
    assert down["rank"] == 1 and 8.0 < down["t"] < 8.5 and up["t"] == pytest.approx(down["t"] + 3.0)
    tries = _of(res, "req")
    assert {e["rank"] for e in tries if e["arrival"] < 8.0} == {0, 1}  # the DP LB used both ranks
    in_flight = [e for e in tries if e["arrival"] < 8.0 and e["finish"] >= down["t"]]
    assert {e["rank"] for e in in_flight} == {0, 1}  # both ranks had work when rank 1 died ...
    assert all(e["status"] == "failed" and e["finish"] == down["t"] for e in in_flight)  # ... all failed
    assert [e["fault"].get("by") for e in _of(res, "fault")] == [None, "server_shutdown"]  # rank 0 shut down
    after = [e for e in tries if e["arrival"] >= up["t"]]
    assert {e["rank"] for e in after} == {0, 1} and all(e["status"] == "length" for e in after)
    between = [e for e in _of(res, "client") if down["t"] < e["arrival"] < up["t"]]
    assert between and all(e["status"] == "failed" for e in between)  # rejected while down, no retry left
    assert res["rejected"] == len(between)


def test_a_dense_models_dp_ranks_send_no_counts_so_the_client_balances_on_its_own_increments():
    """vLLM 0.26.0: only MoE ranks (DPEngineCoreProc) send counts; a dense model's coordinator
    publishes zeros (at 50 ms, then every 5 s), so between two publications the client's picks
    differ by at most one per rank whatever the ranks' load."""
    res = _run(DeploymentConfig(data_parallel_size=2, is_moe=False), cfg=RunConfig(workload={
        "kind": "poisson", "rate": 60.0, "duration": 20.0, "prompt": 256, "output": 64}))
    windows: dict[int, list[int]] = {}
    for e in _of(res, "req"):
        w = windows.setdefault(int((e["arrival"] - 0.05) // 5.0) if e["arrival"] >= 0.05 else -1, [0, 0])
        w[e["rank"]] += 1
    assert len(windows) >= 4 and all(abs(a - b) <= 1 for a, b in windows.values())
    moe = _run(DeploymentConfig(data_parallel_size=2, is_moe=True), cfg=RunConfig(workload={
        "kind": "poisson", "rate": 60.0, "duration": 20.0, "prompt": 256, "output": 64}))
    assert [e["rank"] for e in _of(moe, "req")] != [e["rank"] for e in _of(res, "req")]  # the counts matter


def test_the_one_rank_mutant_is_caught():
    dep = DeploymentConfig(data_parallel_size=2, restart_s=3.0, retry=RetryPolicy(attempts=1))
    res = simulate_deployment(dep, CFG, seed=1, plans=(_kill(8.0, rank=1),), summary_only=False,
                              server_cls=DEPLOYMENT_MUTANTS["dp-death-one-rank"])
    problems = deployment_problems(res["events"])
    assert problems and any("ran on past the server's death" in p for p in problems)


def test_an_independent_server_death_takes_down_that_server_only():
    dep = DeploymentConfig(servers=3, router="round_robin", restart_s=3.0, retry=RetryPolicy(attempts=1))
    res = _run(dep, (FaultPlan(), _kill(6.0), FaultPlan()))
    (down,) = _of(res, "proc", event="server_down")
    assert down["server"] == 1
    tries = _of(res, "req")
    assert all(e["status"] == "length" for e in tries if e["server"] != 1)
    assert any(e["status"] == "failed" for e in tries if e["server"] == 1)
    while_down = [e["server"] for e in tries if down["t"] < e["arrival"] < down["t"] + 3.0]
    assert while_down and set(while_down) == {0, 2}  # round robin skips the server that is down
    assert res["rejected"] == 0 and res["uptime"] == pytest.approx(1 - 3.0 / (3 * res["sim_time_s"]))


def test_retries_succeed_on_a_live_server():
    dep = DeploymentConfig(servers=2, router="least_outstanding", restart_s=30.0,
                           retry=RetryPolicy(attempts=3, backoff_s=0.25, timeout_s=30.0))
    res = _run(dep, (_kill(5.0), FaultPlan()))
    retried = [e for e in _of(res, "client") if e["tries"] > 1]
    assert retried and all(e["status"] == "finished" and e["server"] == 1 for e in retried)
    assert res["failed"] == res["lost"] == 0 and res["availability"] == 1.0
    first_tries = {e["req"] for e in _of(res, "req", server=0, status="failed")}
    assert first_tries == {e["req"] for e in retried}
    assert all(e["arrival"] == pytest.approx(f["finish"] + 0.25) for e in _of(res, "req") if "~" in e["req"]
               for f in _of(res, "req", req=e["req"].split("~")[0]))  # sent one backoff after the failure


def test_a_timeout_loses_the_request_and_it_ends_once():
    dep = DeploymentConfig(retry=RetryPolicy(attempts=3, timeout_s=0.2))  # shorter than a 32-token answer
    res = _run(dep)
    assert res["lost"] == res["requests"] and res["finished"] == 0 and res["goodput_rps"] == 0.0


class _Endpoint:
    def __init__(self, up=True, outstanding=0, hit=0):
        self.up, self.outstanding, self.hit = up, outstanding, hit

    def cached_prefix_blocks(self, spec):
        return self.hit


SPEC = RequestSpec("r", 0.0, 64, 4)


def test_round_robin_goes_in_order_and_skips_servers_that_are_down():
    rr = ROUTERS["round_robin"]()
    servers = [_Endpoint(), _Endpoint(up=False), _Endpoint()]
    assert [rr.choose(SPEC, servers) for _ in range(5)] == [0, 2, 0, 2, 0]
    assert rr.choose(SPEC, [_Endpoint(up=False)] * 2) is None


def test_least_outstanding_picks_the_least_loaded_server_that_is_up():
    lor = ROUTERS["least_outstanding"]()
    assert lor.choose(SPEC, [_Endpoint(outstanding=3), _Endpoint(outstanding=1), _Endpoint(outstanding=1)]) == 1
    assert lor.choose(SPEC, [_Endpoint(outstanding=3), _Endpoint(up=False, outstanding=0)]) == 0


def test_prefix_aware_picks_the_longest_cached_prefix_then_the_least_loaded():
    pa = ROUTERS["prefix_aware"]()
    assert pa.choose(SPEC, [_Endpoint(hit=1), _Endpoint(hit=4, outstanding=9), _Endpoint(hit=2)]) == 1
    assert pa.choose(SPEC, [_Endpoint(hit=4, outstanding=2), _Endpoint(hit=4, outstanding=1)]) == 1
    assert pa.choose(SPEC, [_Endpoint(hit=4, up=False), _Endpoint(hit=0)]) == 1


def test_prefix_aware_sends_a_prefix_group_where_its_blocks_are_cached(tmp_path):
    import json
    rows = [{"arrival": 0.05 * i, "prompt_tokens": 320, "output_tokens": 4, "prefix": [i % 2, 256]}
            for i in range(60)]
    wl = tmp_path / "w.jsonl"
    wl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig(workload={"kind": "jsonl", "path": str(wl)},
                    scheduler=CFG.scheduler.__class__(enable_prefix_caching=True))
    servers = {}
    for router in ("prefix_aware", "round_robin"):
        res = _run(DeploymentConfig(servers=3, router=router), cfg=cfg)
        by_group: dict[int, set] = {}
        for e in _of(res, "req"):
            by_group.setdefault(int(e["req"][1:]) % 2, set()).add(e["server"])
        servers[router] = by_group
    assert all(len(s) == 1 for s in servers["prefix_aware"].values())  # each group stays where it is cached
    assert all(len(s) == 3 for s in servers["round_robin"].values())


def test_fault_rate_expansion_is_deterministic_bounded_and_paired_across_topologies():
    rates = FaultRates(engine_mtbf_s=100.0, slow_episodes_per_hour=60, slow_duration_s=5, ec_prefetch_fail_rate=0.5)
    one = expand(rates, servers=2, data_parallel_size=2, horizon=3600, seed=3, items=["a", "b", "c"])
    assert one == expand(rates, servers=2, data_parallel_size=2, horizon=3600, seed=3, items=["c", "b", "a"])
    assert one != expand(rates, servers=2, data_parallel_size=2, horizon=3600, seed=4, items=["a", "b", "c"])
    kills = [f for p in one for f in p.of_kind("kill_engine")]
    assert all(0 <= f.at < 3600 for f in kills) and 4 * 36 * 0.6 < len(kills) < 4 * 36 * 1.4
    slow = [f for p in one for f in p.of_kind("slow_steps")]
    assert all(0 <= f.start < 3600 and f.end == pytest.approx(f.start + 5) for f in slow) and slow
    assert all(f.item in "abc" for p in one for f in p.of_kind("ec_prefetch_fail"))
    # engine core g = server * dp + rank: one DP server of 4 ranks dies when 4 servers of 1 rank do
    dp = expand(rates, servers=1, data_parallel_size=4, horizon=3600, seed=3)[0].of_kind("kill_engine")
    rr = [f for p in expand(rates, servers=4, data_parallel_size=1, horizon=3600, seed=3) for f in p.of_kind("kill_engine")]
    assert sorted(f.at for f in dp) == sorted(f.at for f in rr)
    with pytest.raises(PlanError, match="at most"):
        expand(FaultRates(engine_mtbf_s=1e-3), servers=1, data_parallel_size=1, horizon=3600, seed=0)


@pytest.mark.parametrize("bad, match", [({"engine_mtbf": 1}, "fault_rates: unknown field 'engine_mtbf' \\(fields: engine_mtbf_s, "),
                                        ({"engine_mtbf_s": 0}, r"fault_rates.engine_mtbf_s: must be > 0 \(got 0\)"),
                                        ({"ec_prefetch_fail_rate": 2}, r"ec_prefetch_fail_rate: must be <= 1 \(got 2\)"),
                                        ({"kill_signal": "SIGHUP"}, "kill_signal: must be one of SIGKILL, SIGTERM")])
def test_bad_fault_rates_name_the_field(bad, match):
    with pytest.raises(PlanError, match=match):
        rates_from_dict(bad)


@pytest.mark.parametrize("spec, words", [
    ("deployment: {servers: 0}", "deployment.servers: must be >= 1 (got 0)"),
    ("deployment: {restart_s: .nan}", "deployment.restart_s: must be finite (got nan)"),
    ("deployment: {router: random}", "deployment.router: must be one of round_robin, least_outstanding, prefix_aware (got 'random')"),
    ("deployment: {replicas: 2}", "deployment: unknown field 'replicas' (fields: servers, "),
    ("deployment: {retry: {attempts: 1.5}}", "deployment.retry.attempts: must be an integer (got 1.5)"),
    ("deployment: {slo: {ttft: 1}}", "deployment.slo: unknown field 'ttft' (fields: ttft_ms, tpot_ms)"),
    ("fault_rates: {kill_signal: 9}", "fault_rates.kill_signal: must be one of SIGKILL, SIGTERM, exit1, exit0, stop (got 9)"),
    ("fault_rates: {engine_mtbf_s: -1}", "fault_rates.engine_mtbf_s: must be > 0 (got -1)"),
    ("run: {scheduler: {max_num_seqs: 0}}", "run: scheduler.max_num_seqs: must be >= 1 (got 0)"),
    ("deploy: {}", "unknown field 'deploy'"),
])
def test_bad_spec_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, spec, words):
    path = tmp_path / "deploy.yaml"
    path.write_text(spec + "\n")
    trace = tmp_path / "t.jsonl"
    assert main(["deploy", "--spec", str(path), "--trace", str(trace), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and str(path) in err
    assert not list(tmp_path.glob("*.jsonl*")) and not list(tmp_path.glob(".*partial"))


def test_submit_wakes_an_idle_open_engine_and_close_ends_it():
    import simpy

    from vllm_faultsim.models.engine import EngineCore
    from vllm_faultsim.models.scheduler import Scheduler, SchedulerConfig
    env, out = simpy.Environment(), []
    engine = EngineCore(env, Scheduler(SchedulerConfig()), (), lambda *shape: 0.01, out.append, full_trace=False,
                        open_workload=True)

    def router():
        yield env.timeout(2.0)
        engine.submit(RequestSpec("a", env.now, 32, 3))
        yield env.timeout(5.0)
        engine.close()
    env.process(router())
    env.run()
    (req,) = [e for e in out if e["kind"] == "req"]
    assert req["status"] == "length" and req["arrival"] == 2.0 and 2.0 < req["finish"] < 2.1
    assert env.now == 7.0 and not engine.process.is_alive  # it slept until the submission, then until close


def test_replay_of_a_trace_that_is_not_a_deployments_and_no_input_are_one_line_exit_2(tmp_path, capsys):
    run_trace = tmp_path / "run.jsonl"
    assert main(["run", "--duration", "1", "--trace", str(run_trace), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["deploy", "--replay", str(run_trace), "--trace", str(tmp_path / "d.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a deployment trace" in err and str(run_trace) in err
    assert main(["deploy", "--trace", str(tmp_path / "d.jsonl")]) == 2
    assert "exactly one of --spec SPEC or --replay TRACE" in capsys.readouterr().err
    assert not (tmp_path / "d.jsonl").exists()



@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(servers=st.integers(1, 3), dp=st.integers(1, 3), router=st.sampled_from(sorted(ROUTERS)),
       kills=st.lists(st.tuples(st.floats(0.0, 6.0), st.integers(0, 2), st.sampled_from(["SIGKILL", "SIGTERM", "exit1"])),
                      max_size=4),
       attempts=st.integers(1, 3), timeout=st.sampled_from([0.5, 2.0, 20.0]), seed=st.integers(0, 3))
def test_property_every_request_ends_once_and_no_try_outlives_its_server(servers, dp, router, kills, attempts,
                                                                         timeout, seed):
    plans = [validate_plan([{"kind": "kill_engine", "at": at, "rank": rank % dp, "signal": sig}
                            for k, (at, rank, sig) in enumerate(kills) if k % servers == s]) for s in range(servers)]
    cfg = RunConfig(workload={"kind": "poisson", "rate": 15.0, "duration": 4.0, "prompt": 64, "output": 8})
    dep = DeploymentConfig(servers=servers, data_parallel_size=dp, router=router, restart_s=1.0,
                           retry=RetryPolicy(attempts=attempts, backoff_s=0.2, timeout_s=timeout))
    res = _run(dep, plans, cfg=cfg, seed=seed)
    assert res["finished"] + res["failed"] + res["lost"] == res["requests"] == len(_of(res, "client"))
    assert res["retries"] == sum(e["tries"] - 1 for e in _of(res, "client"))
