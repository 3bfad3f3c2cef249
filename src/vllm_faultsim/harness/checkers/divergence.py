"""The differential checker: two traces, compared event by event; the first divergence explained.

It reads traces only (Jepsen: the run records a history, the checker judges it), so it also
runs offline on saved files: ``vllm-faultsim diff --traces sim.jsonl real.jsonl``, streamed (two
1-hour traces are never held whole).

Per step it compares, in this order: scheduled tokens per request (in scheduling order),
deferred requests, preempted, finished, encoder inputs scheduled, EC items loaded, KV events,
then the step's start time and duration. Per request: status, output tokens, first-token and
finish times.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Iterator

STEP_FIELDS = ("sched", "deferred", "preempted", "finished", "enc", "ec_loaded", "kv", "t", "dur")
REQ_FIELDS = ("status", "num_output", "arrival", "first_token", "finish", "preemptions")


@dataclass
class Divergence:
    where: str              # "step 12" / "request r3" / "end"
    field: str
    left: object
    right: object
    left_event: dict | None
    right_event: dict | None
    sides: tuple[str, str] = ("sim", "real")

    def explain(self) -> str:
        a, b = self.sides
        lines = [f"first divergence at {self.where}, field {self.field!r}:",
                 f"  {a:>5}: {json.dumps(self.left)}",
                 f"  {b:>5}: {json.dumps(self.right)}"]
        if self.left_event is not None or self.right_event is not None:
            lines += [f"  {a} event:  {json.dumps(self.left_event)}",
                      f"  {b} event: {json.dumps(self.right_event)}"]
        return "\n".join(lines)


def _normal(field: str, value):
    if field == "sched" and isinstance(value, dict):
        return [[k, v] for k, v in value.items()]  # order matters: scheduling order
    if field == "enc" and isinstance(value, dict):
        return [[k, v] for k, v in value.items()]
    return value


def first_divergence(left: Iterable[dict], right: Iterable[dict], sides: tuple[str, str] = ("sim", "real"),
                     fields: tuple[str, ...] = STEP_FIELDS) -> Divergence | None:
    """Compare step events in order, then request fates; None when the traces agree.

    Streamed: `left` and `right` (lists, or traces read as they go: trace.TraceFile) are read side
    by side in one pass, each through its end, keeping only the requests one side has ended and the
    other not yet; they are read again only when their sets of requests differ (to list them). A
    problem reading `right` is raised once `left` is read through, as reading both whole, left
    first, would."""
    fates = _Fates(REQ_FIELDS, sides)
    ls, rs = _steps(left, fates, 0), _steps(right, fates, 1)
    div, i, a, b, deferred = None, 0, None, None, None
    while True:
        a = next(ls, None)
        try:
            b = next(rs, None)
        except (OSError, ValueError) as exc:
            deferred, b = exc, None
        if a is None or b is None:
            break
        if div is None:
            for f in fields:
                va, vb = _normal(f, a.get(f)), _normal(f, b.get(f))
                if va != vb:
                    div = Divergence(f"step {a.get('step', i)}", f, va, vb, a, b, sides)
                    break
        i += 1
    nl = i + (a is not None) + sum(1 for _ in ls)
    if deferred is not None:
        raise deferred
    nr = i + (b is not None) + sum(1 for _ in rs)
    if div is not None:
        return div
    if nl != nr:
        return Divergence(f"step {i}", "steps", nl, nr, a, b, sides)
    if fates.unmatched():
        lq, rq = ([e["req"] for e in events if e["kind"] == "req"] for events in (left, right))
        return Divergence("end", "requests", sorted(lq), sorted(rq), None, None, sides)
    return fates.first


def _steps(events: Iterable[dict], fates: "_Fates", side: int) -> Iterator[dict]:
    """The step events of `events`; its req events go to `fates`."""
    for e in events:
        kind = e["kind"]
        if kind == "step":
            yield e
        elif kind == "req":
            fates.add(side, e)


class _Fates:
    """Request fates of two traces, matched by request id as they are read: ``first`` is the
    divergence of the earliest request of the left trace whose fates differ."""

    def __init__(self, fields: tuple[str, ...], sides: tuple[str, str]):
        self.fields, self.sides = fields, sides
        self.waiting: tuple[dict, dict] = ({}, {})  # per side: request id -> (left order, event), the other side's not read yet
        self.n = 0  # req events of the left trace read
        self.first: Divergence | None = None
        self.first_at = -1

    def add(self, side: int, e: dict) -> None:
        rid, other = e["req"], self.waiting[1 - side]
        at = self.n if side == 0 else None
        self.n += side == 0
        if rid not in other:
            self.waiting[side][rid] = (at, e)
            return
        their_at, theirs = other.pop(rid)
        at, (le, re) = (at, (e, theirs)) if side == 0 else (their_at, (theirs, e))
        if self.first is not None and at > self.first_at:
            return
        for f in self.fields:
            if le.get(f) != re.get(f):
                self.first, self.first_at = Divergence(f"request {rid}", f, le.get(f), re.get(f), le, re, self.sides), at
                return

    def unmatched(self) -> bool:
        return bool(self.waiting[0] or self.waiting[1])
