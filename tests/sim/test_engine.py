"""The engine loop: faults applied from the plan, invariants that stop a broken run."""

import pytest

from vllm_faultsim.faults.plan import validate_plan
from vllm_faultsim.harness.invariants import InvariantViolation
from vllm_faultsim.harness.runs.simulate import (ConfigError, RunConfig, config_from_dict, liveness_model, run_engine,
                                            simulate, with_scheduler)
from vllm_faultsim.harness.workload import poisson
from vllm_faultsim.models.scheduler import Scheduler

CFG = RunConfig(workload={"kind": "poisson", "rate": 8.0, "duration": 10.0, "prompt": 128, "output": 16})


def test_slow_steps_stretch_only_their_window():
    base = simulate(CFG).events
    slow = simulate(CFG, validate_plan([{"kind": "slow_steps", "start": 2.0, "end": 4.0, "factor": 5.0}])).events
    dur = lambda evs, lo, hi: [e["dur"] for e in evs if e["kind"] == "step" and lo <= e["t"] < hi and e["sched"]]
    assert dur(base, 0, 2) == dur(slow, 0, 2)
    first = next(e for e in slow if e["kind"] == "step" and e["t"] >= 2.0 and e["sched"])
    matching = next(e for e in base if e["kind"] == "step" and e["step"] == first["step"])  # same until 2.0
    assert matching["sched"] == first["sched"] and matching["t"] == first["t"]
    assert first["dur"] == pytest.approx(5 * matching["dur"])


def _kill(signal: str):
    plan = validate_plan([{"kind": "kill_engine", "at": 4.0, "signal": signal}])
    res = simulate(CFG, plan)
    reqs = [e for e in res.events if e["kind"] == "req"]
    assert len(reqs) == res.summary["requests"] == len(poisson(8.0, duration=10.0, prompt=128, output=16))
    dead = [e for e in res.events if e["kind"] == "proc"]
    return res, reqs, dead[0]


def test_sigkill_fails_every_unfinished_and_later_request():
    res, reqs, dead = _kill("SIGKILL")
    assert dead["event"] == "engine_dead"
    assert liveness_model(CFG).quantile("mp", "signal", 0.0) <= dead["t"] - 4.0 <= liveness_model(CFG).quantile("mp", "signal", 1.0)
    failed = [e for e in reqs if e["status"] == "failed"]
    assert failed and all(e["finish"] >= dead["t"] for e in failed)
    assert all(e["finish"] <= 4.0 for e in reqs if e["status"] != "failed")
    assert res.summary["aborted"] == 0


def test_sigterm_aborts_after_the_step_in_flight_then_the_engine_dies():
    res, reqs, dead = _kill("SIGTERM")
    steps = [e for e in res.events if e["kind"] == "step"]
    in_flight = next(e for e in steps if e["t"] <= 4.0 < e["t"] + e["dur"])
    step_end = in_flight["t"] + in_flight["dur"]
    aborted = [e for e in reqs if e["status"] == "aborted"]
    failed = [e for e in reqs if e["status"] == "failed"]
    assert aborted and failed and dead["event"] == "engine_dead" and dead["t"] - 4.0 > 3.0
    in_engine = [e for e in aborted if e["arrival"] < 4.0]
    assert in_engine and all(e["finish"] == pytest.approx(step_end) for e in in_engine)  # the step finished first
    assert all(4.0 <= e["arrival"] < dead["t"] for e in aborted if e not in in_engine)  # rejected while tearing down
    assert all(e["arrival"] >= dead["t"] for e in failed)  # after the exit: EngineDeadError
    assert not any(e["t"] >= step_end for e in steps)


def test_bad_liveness_profile_is_a_config_error():
    with pytest.raises(ConfigError, match="liveness profile"):
        config_from_dict({"liveness": "no-such-profile"})
    with pytest.raises(ConfigError, match="no mp/sigterm"):
        simulate(RunConfig(liveness="liveness_cpu"), validate_plan([{"kind": "kill_engine", "at": 1.0, "signal": "SIGTERM"}]))


class LeakyScheduler(Scheduler):
    """A broken core: finished requests keep their KV blocks."""

    def _free_request(self, req):
        del self.requests[req.req_id]


def test_invariants_stop_a_broken_core_naming_the_step():
    specs = poisson(8.0, duration=5.0, prompt=64, output=4, seed=1)
    cfg = with_scheduler(CFG, num_gpu_blocks=512)
    with pytest.raises(InvariantViolation, match=r"invariant violated at step \d+ .*KV blocks"):
        run_engine(LeakyScheduler(cfg.scheduler), specs, cfg, validate_plan([]), side="sim")


def test_stall_is_reported_not_hung():
    cfg = with_scheduler(CFG, num_gpu_blocks=4, block_size=16)   # 3 usable blocks < a 128-token prompt
    with pytest.raises(InvariantViolation, match="engine stalled"):
        simulate(cfg)
