"""The differential checker: two traces, compared event by event; the first divergence explained.

It reads traces only (Jepsen: the run records a history, the checker judges it), so it also
runs offline on saved files: ``vllm-faultsim diff --traces sim.jsonl real.jsonl``.

Per step it compares, in this order: scheduled tokens per request (in scheduling order),
deferred requests, preempted, finished, encoder inputs scheduled, EC items loaded, KV events,
then the step's start time and duration. Per request: status, output tokens, first-token and
finish times.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

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


def first_divergence(left: list[dict], right: list[dict], sides: tuple[str, str] = ("sim", "real"),
                     fields: tuple[str, ...] = STEP_FIELDS) -> Divergence | None:
    """Compare step events in order, then request fates; None when the traces agree."""
    ls = [e for e in left if e["kind"] == "step"]
    rs = [e for e in right if e["kind"] == "step"]
    for i, (a, b) in enumerate(zip(ls, rs)):
        for f in fields:
            va, vb = _normal(f, a.get(f)), _normal(f, b.get(f))
            if va != vb:
                return Divergence(f"step {a.get('step', i)}", f, va, vb, a, b, sides)
    if len(ls) != len(rs):
        i = min(len(ls), len(rs))
        return Divergence(f"step {i}", "steps", len(ls), len(rs), ls[i] if i < len(ls) else None,
                          rs[i] if i < len(rs) else None, sides)
    lq = {e["req"]: e for e in left if e["kind"] == "req"}
    rq = {e["req"]: e for e in right if e["kind"] == "req"}
    if sorted(lq) != sorted(rq):
        return Divergence("end", "requests", sorted(lq), sorted(rq), None, None, sides)
    for rid in lq:
        for f in REQ_FIELDS:
            if lq[rid].get(f) != rq[rid].get(f):
                return Divergence(f"request {rid}", f, lq[rid].get(f), rq[rid].get(f), lq[rid], rq[rid], sides)
    return None
