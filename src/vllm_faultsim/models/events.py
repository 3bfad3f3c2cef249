"""The trace's vocabulary as code: one constructor per event kind, what every model emits through
the callable it is given and what every real driver writes (harness/trace.py documents the fields,
validates events and writes them).

Times are rounded to ``TIME_DIGITS`` decimals (:func:`t`) so float noise stays out of the bytes;
optional fields are left out when empty, so a trace stays as small as what happened.
"""

from __future__ import annotations

from typing import Any, Callable

TIME_DIGITS = 9  # nanosecond resolution

Emit = Callable[[dict], None]  # what a model is given to emit its events through


def t(x: float | None) -> float | None:
    """Round a time for the trace (None stays None)."""
    return None if x is None else round(x, TIME_DIGITS)


def step(index: int, start: float, dur: float, sched: dict[str, int], *, deferred=None, preempted=None,
         finished=None, enc=None, ec_loaded=None, kv=None) -> dict:
    """One engine step: its index, start, duration, scheduled tokens per request (in scheduling
    order) and, when non-empty, what else happened in it."""
    ev = {"kind": "step", "step": index, "t": t(start), "dur": t(dur), "sched": sched}
    if deferred:
        ev["deferred"] = deferred
    if preempted:
        ev["preempted"] = preempted
    if finished:
        ev["finished"] = finished
    if enc:
        ev["enc"] = enc
    if ec_loaded:
        ev["ec_loaded"] = ec_loaded
    if kv:
        ev["kv"] = kv
    return ev


def req(req_id: str, status: str, arrival: float, first_token: float | None, finish: float,
        num_output: int | None, preemptions: int) -> dict:
    """A request's fate once it leaves the engine."""
    return {"kind": "req", "req": req_id, "status": status, "arrival": arrival, "first_token": t(first_token),
            "finish": t(finish), "num_output": num_output, "preemptions": preemptions}


def client(at: float, req_id: str, status: str, arrival: float, tries: int, server: int | None,
           first_token: float | None, finish: float | None, num_output: int | None) -> dict:
    """A request's end as the client in front of a deployment sees it (models/client.py): status
    ``finished``, ``failed`` or ``lost`` after ``tries`` tries; the times of the try that finished."""
    return {"kind": "client", "t": t(at), "req": req_id, "status": status, "arrival": arrival, "tries": tries,
            "server": server, "first_token": first_token, "finish": finish, "num_output": num_output}


def fault(at: float | None, fault_doc: dict, **fields: Any) -> dict:
    """A fault of the plan, applied at ``at`` (None: it never applied)."""
    return {"kind": "fault", "t": t(at), "fault": fault_doc, **fields}


def proc(at: float, event: str, **fields: Any) -> dict:
    """An engine-process event (exit, detect, shutdown, engine_dead, connector operations, ...)."""
    return {"kind": "proc", "t": t(at), "event": event, **fields}


def kv_lost(at: float, cause: str, jobs: list[str], unapplied: list[int] | None = None) -> dict:
    """The engine stopped with these KV offload jobs not retired; ``unapplied`` (when any): the
    steps whose output never came back."""
    ev = {"kind": "kv_lost", "t": t(at), "cause": cause, "jobs": jobs}
    if unapplied:
        ev["unapplied"] = unapplied
    return ev


def eplb(event: str, **fields: Any) -> dict:
    """An async-EPLB event (rearrange, transfer, publish, consume, rank_death, step, step_error)."""
    return {"kind": "eplb", "event": event, **fields}


def end(at: float, **fields: Any) -> dict:
    """The run's end: its time and what the run reports (a summary, pending or lost jobs)."""
    return {"kind": "end", "t": t(at), **fields}
