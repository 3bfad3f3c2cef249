"""The README's example tests, as written there (tests/sim/test_plugin.py checks the README shows this file)."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vllm_faultsim import scheduler_configs, workloads

RUN = {"workload": {"kind": "poisson", "rate": 40, "duration": 10, "prompt": 256, "output": 64}}
KILL_AT = 5.0


@pytest.mark.sim
@pytest.mark.parametrize("signal", ["SIGKILL", "exit1"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_engine_death_fails_every_in_flight_request_and_loses_none(faultsim_run, faultsim_plan, signal, seed):
    base = faultsim_run(RUN, seed=seed)  # the same workload without the fault
    kill = faultsim_run(RUN, faultsim_plan({"kind": "kill_engine", "at": KILL_AT, "signal": signal}), seed=seed)
    [dead] = kill.find("proc", event="engine_dead")  # the client's liveness monitor saw the core exit
    assert kill.requests.keys() == base.requests.keys()  # nothing lost: every request has a fate
    for rid, before in base.requests.items():
        after = kill.requests[rid]
        if before["finish"] <= KILL_AT:  # done before the kill: untouched
            assert after == before
        else:  # in flight, or arriving after the kill: fails once the death is seen, none hangs
            assert after["status"] == "failed"
            assert after["finish"] == max(dead["t"], after["arrival"])
    assert all(step["t"] < KILL_AT for step in kill.steps)  # the core stops at once: no step after it


@pytest.mark.sim
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=workloads(max_size=8), scheduler=scheduler_configs(kv_pressure=False),
       delay=st.sampled_from([0.05, 0.5, 2.0]))
def test_ec_prefetch_stalls_defer_but_never_starve(faultsim_run, faultsim_plan, specs, scheduler, delay):
    plan = faultsim_plan({"kind": "ec_prefetch_stall", "item": "*", "delay": delay})
    run = faultsim_run({"scheduler": scheduler}, plan, specs=specs)
    assert {r["status"] for r in run.requests.values()} <= {"length", "stop"}  # every request finishes
    for step in run.steps:
        for rid in step.get("deferred", ()):  # deferred only while its encoder inputs are not ready
            assert step["t"] < run.requests[rid]["first_token"]
