"""The loop's per-batch invariants (harness/invariants.py ``scheduled``, ``scheduled_again``)
name a request scheduled before it arrived or after it left, also where the batch before held the
same requests (the arrival check walks only the requests new since the last batch), and a clock
that goes back."""

from __future__ import annotations

import pytest

from vllm_faultsim.harness.invariants import Invariants, InvariantViolation
from vllm_faultsim.models.engine import RequestRecord
from vllm_faultsim.models.step import StepResult

pytestmark = pytest.mark.sim


def batch(**sched: int) -> StepResult:
    return StepResult(sched=sched)


def test_a_request_new_in_the_batch_is_checked_for_its_arrival():
    inv = Invariants(8192, 256)
    records = {"a": RequestRecord(0.0), "b": RequestRecord(5.0)}
    inv.scheduled(0, 1.0, 1.0, batch(a=1), records)
    inv.scheduled(1, 2.0, 2.0, batch(a=1), records)
    with pytest.raises(InvariantViolation, match="request b scheduled before it arrived or after it left"):
        inv.scheduled(2, 3.0, 3.0, batch(a=1, b=16), records)


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
