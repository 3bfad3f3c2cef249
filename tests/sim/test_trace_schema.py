"""The trace schema as code (models/events.py builds events, harness/trace.py validates them):
a run's trace passes; each way of breaking it is named in one line."""

from __future__ import annotations

import copy

import pytest

from vllm_faultsim.faults.plan import validate_plan
from vllm_faultsim.harness.runs.simulate import config_from_dict, simulate
from vllm_faultsim.harness.trace import TraceError, read_trace, validate_trace, write_jsonl

CFG = {"workload": {"kind": "poisson", "rate": 20, "duration": 2, "prompt": 64, "output": 8}, "seed": 2}


@pytest.fixture(scope="module")
def events():
    plan = validate_plan([{"kind": "kill_engine", "at": 1.5}])
    return simulate(config_from_dict(CFG), plan).events


def test_a_run_is_a_valid_trace(events, tmp_path):
    validate_trace(events)
    assert {e["kind"] for e in events} >= {"header", "step", "req", "fault", "proc", "end"}
    write_jsonl(tmp_path / "t.jsonl", events)
    assert read_trace(tmp_path / "t.jsonl") == events


def _first(events, kind):
    return next(i for i, e in enumerate(events) if e["kind"] == kind)


BREAKS = {
    "unknown kind": (lambda ev: ev.insert(1, {"kind": "stepp"}), "unknown kind 'stepp' (known: header, step, req, "),
    "missing field": (lambda ev: ev[_first(ev, "step")].pop("dur"), "step: missing field 'dur'"),
    "wrong type": (lambda ev: ev[_first(ev, "req")].__setitem__("arrival", "0.5"), "req.arrival: must be a number (got '0.5')"),
    "bad status": (lambda ev: ev[_first(ev, "req")].__setitem__("status", "done"), "req.status: must be one of length, stop, failed, aborted (got 'done')"),
    "zero tokens": (lambda ev: ev[_first(ev, "step")]["sched"].update(x=0), "step.sched.x: must be > 0 (got 0)"),
    "steps out of order": (lambda ev: ev.insert(_first(ev, "step") + 2, dict(ev[_first(ev, "step")])),
                           "after step 1"),
    "no header": (lambda ev: ev.pop(0), "the first event is not a header"),
    "second header": (lambda ev: ev.insert(2, dict(ev[0])), "a second header"),
    "after the end": (lambda ev: ev.append(dict(ev[-2])), "after the end"),
    "two fates": (lambda ev: ev.insert(-1, dict(ev[_first(ev, "req")])), "a second req event"),
}


@pytest.mark.parametrize("name", BREAKS)
def test_each_break_is_named_in_one_line(events, name):
    broken = copy.deepcopy(events)
    mutate, needle = BREAKS[name]
    mutate(broken)
    with pytest.raises(TraceError) as exc:
        validate_trace(broken, "t.jsonl")
    assert needle in str(exc.value) and "\n" not in str(exc.value) and str(exc.value).startswith("t.jsonl: event ")
