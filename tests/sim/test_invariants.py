"""The loop's invariants (harness/invariants.py ``added``, ``scheduled``, ``scheduled_again``) name a
request added to the core before it arrived, one scheduled that was never added or had left, also
where the batch before held the same requests, and a clock that goes back; the engine checks each
request's arrival as it adds it."""

from __future__ import annotations

import pytest

from vllm_faultsim.harness.invariants import Invariants, InvariantViolation
from vllm_faultsim.harness.runs.simulate import RunConfig, simulate
from vllm_faultsim.models import engine
from vllm_faultsim.models.engine import RequestRecord
from vllm_faultsim.models.step import StepResult

pytestmark = pytest.mark.sim


def batch(**sched: int) -> StepResult:
    return StepResult(sched=sched)


def test_a_request_added_before_it_arrived_is_named():
    inv = Invariants(8192, 256)
    inv.added(0, 1.0, "a", 1.0)
    with pytest.raises(InvariantViolation, match="invariant violated at step 3 .*request b added to the core at 2.0 "
                                                 "before it arrived"):
        inv.added(3, 2.0, "b", 5.0)


def test_an_engine_that_adds_requests_early_is_stopped(monkeypatch):
    """A mutant of the engine's input queue that adds every request a step early: the run stops at
    the first one added before its arrival."""
    def early(self, now):
        return _add_arrivals(self, now + 0.05)

    _add_arrivals = engine.EngineCore._add_arrivals
    monkeypatch.setattr(engine.EngineCore, "_add_arrivals", early)
    with pytest.raises(InvariantViolation, match="added to the core at .* before it arrived"):
        simulate(RunConfig(), keep=frozenset(), full_trace=False)


def test_a_request_never_added_is_named():
    inv = Invariants(8192, 256)
    records = {"a": RequestRecord(0.0)}
    inv.scheduled(0, 1.0, 1.0, batch(a=1), records)
    with pytest.raises(InvariantViolation, match="request b scheduled before it arrived or after it left"):
        inv.scheduled(1, 2.0, 2.0, batch(a=1, b=16), records)


def test_a_request_that_left_is_named_though_the_last_batch_held_it():
    inv = Invariants(8192, 256)
    records = {"a": RequestRecord(0.0), "b": RequestRecord(0.0)}
    inv.scheduled(0, 1.0, 1.0, batch(a=1, b=1), records)
    del records["b"]
    with pytest.raises(InvariantViolation, match="request b scheduled before it arrived or after it left"):
        inv.scheduled(1, 2.0, 2.0, batch(a=1, b=1), records)


def test_the_clock_going_back_is_named():
    inv = Invariants(8192, 256)
    records = {"a": RequestRecord(0.0)}
    inv.scheduled(0, 2.0, 2.0, batch(a=1), records)
    with pytest.raises(InvariantViolation, match="clock went back"):
        inv.scheduled(1, 1.0, 1.0, batch(a=1), records)


def test_a_decode_runs_later_steps_check_the_clock():
    """``scheduled_again`` (a decode run's steps after its first) checks the clock alone: the batch
    and the records are those the first step's check saw."""
    inv = Invariants(8192, 256)
    records = {"a": RequestRecord(0.0)}
    inv.scheduled(0, 1.0, 1.0, batch(a=1), records)
    inv.scheduled_again(1, 2.0, 2.0)
    with pytest.raises(InvariantViolation, match="invariant violated at step 2 .*clock went back"):
        inv.scheduled_again(2, 1.5, 1.5)
