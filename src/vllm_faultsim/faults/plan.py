"""Fault plans as data: the schema, and its validation before anything runs.

A plan is YAML or JSON::

    version: 1
    faults:
      - {kind: kill_engine, at: 12.5, rank: 1, signal: SIGKILL}
      - {kind: slow_steps, start: 10, end: 20, factor: 3}
      - {kind: ec_prefetch_stall, item: "img-3", delay: 0.4}
      - {kind: ec_prefetch_fail, item: "*"}
      - {kind: kv_transfer_slow, start: 0, end: 5, factor: 10}
      - {kind: kv_transfer_fail, start: 2, end: 3}

Every problem is a :class:`PlanError` whose message is one line naming the fault and field.
Faults come from the plan and nowhere else (Jepsen's nemesis): one injector per side applies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..inputs import read_mapping_file

SIGNALS = ("SIGKILL", "SIGTERM", "exit1", "exit0", "stop")
PHASES = ("any", "idle", "mid_step", "shutdown")


class PlanError(ValueError):
    """An invalid fault plan; ``str(err)`` is one line naming the problem."""


def _num(lo: float | None = 0.0, *, lo_open: bool = False, integer: bool = False):
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            return f"must be {'an integer' if integer else 'a number'}, got {type(v).__name__} {v!r}"
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be finite, got {v!r}"
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo:g}, got {v!r}"
        return None
    return check


def _choice(options: tuple[str, ...]):
    def check(v: Any) -> str | None:
        if v not in options:
            return f"must be one of {', '.join(options)}, got {v!r}"
        return None
    return check


def _str(v: Any) -> str | None:
    if not isinstance(v, str) or not v:
        return f"must be a non-empty string, got {type(v).__name__} {v!r}"
    return None


TIME = _num(0.0)
FACTOR = _num(0.0, lo_open=True)

# kind -> {field: (check, default or REQUIRED)}
REQUIRED = object()
KINDS: dict[str, dict[str, tuple]] = {
    # an engine-core process dies: a signal, an exit code, or a stop the client asked for
    "kill_engine": {"at": (TIME, REQUIRED), "rank": (_num(0, integer=True), 0),
                    "signal": (_choice(SIGNALS), "SIGKILL"), "phase": (_choice(PHASES), "any")},
    # every step that starts in [start, end) takes factor times as long
    "slow_steps": {"start": (TIME, REQUIRED), "end": (TIME, REQUIRED), "factor": (FACTOR, REQUIRED)},
    # the EC prefetch of an item ("*": every item) takes `delay` seconds more
    "ec_prefetch_stall": {"item": (_str, "*"), "delay": (_num(0.0, lo_open=True), REQUIRED)},
    # the EC prefetch of an item fails: the request falls back to encoding locally
    "ec_prefetch_fail": {"item": (_str, "*")},
    # KV transfers submitted in [start, end) take factor times as long
    "kv_transfer_slow": {"start": (TIME, REQUIRED), "end": (TIME, REQUIRED), "factor": (FACTOR, REQUIRED)},
    # KV transfers submitted in [start, end) fail
    "kv_transfer_fail": {"start": (TIME, REQUIRED), "end": (TIME, REQUIRED)},
    # EPLB layer transfers that start in [start, end) see the link bandwidth / factor (models/eplb.py)
    "slow_link": {"start": (TIME, REQUIRED), "end": (TIME, REQUIRED), "factor": (FACTOR, REQUIRED)},
    # EP rank `ep_rank` of engine `rank` dies as it starts transferring `layer` of EPLB
    # rearrangement number `rearrangement` (0-based); the engine core dies at its next EPLB step
    "eplb_rank_death": {"ep_rank": (_num(0, integer=True), 1), "layer": (_num(0, integer=True), 0),
                        "rearrangement": (_num(0, integer=True), 0), "rank": (_num(0, integer=True), 0)},
}

# Kinds users ask for that the simulator does not model yet: rejected by name, not as unknown.
NOT_MODELLED = {
    "network_partition": "the simulator has no network between engines yet",
    "gpu_oom": "CUDA out-of-memory inside a step is not modelled yet",
}


@dataclass(frozen=True)
class Fault:
    kind: str
    params: dict

    def __getattr__(self, name: str) -> Any:
        try:
            return self.params[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict:
        return {"kind": self.kind, **self.params}


@dataclass(frozen=True)
class FaultPlan:
    faults: tuple[Fault, ...] = field(default_factory=tuple)
    source: str = "<empty>"

    def of_kind(self, *kinds: str) -> list[Fault]:
        return [f for f in self.faults if f.kind in kinds]

    def to_dict(self) -> dict:
        return {"version": 1, "faults": [f.to_dict() for f in self.faults]}

    def __bool__(self) -> bool:
        return bool(self.faults)


def validate_plan(data: Any, source: str = "<plan>") -> FaultPlan:
    """Validate a parsed plan; raise PlanError (one line) on the first problem."""
    if data is None:
        return FaultPlan(source=source)
    if isinstance(data, list):
        data = {"version": 1, "faults": data}
    if not isinstance(data, dict):
        raise PlanError(f"{source}: a plan must be a mapping with 'faults', got {type(data).__name__}")
    unknown_top = set(data) - {"version", "faults", "name", "description"}
    if unknown_top:
        raise PlanError(f"{source}: unknown top-level field {sorted(unknown_top)[0]!r}")
    if data.get("version", 1) != 1:
        raise PlanError(f"{source}: plan version {data.get('version')!r} is not supported (expected 1)")
    items = data.get("faults", [])
    if not isinstance(items, list):
        raise PlanError(f"{source}: 'faults' must be a list, got {type(items).__name__}")
    faults = []
    for i, item in enumerate(items):
        where = f"{source}: faults[{i}]"
        if not isinstance(item, dict):
            raise PlanError(f"{where}: must be a mapping, got {type(item).__name__}")
        kind = item.get("kind")
        if kind is None:
            raise PlanError(f"{where}: missing field 'kind'")
        if kind in NOT_MODELLED:
            raise PlanError(f"{where}: kind {kind!r} is not modelled yet ({NOT_MODELLED[kind]})")
        if kind not in KINDS:
            raise PlanError(f"{where}: unknown kind {kind!r} (known: {', '.join(sorted(KINDS))})")
        spec = KINDS[kind]
        where = f"{where} ({kind})"
        extra = set(item) - set(spec) - {"kind"}
        if extra:
            raise PlanError(f"{where}: unknown field {sorted(extra)[0]!r} (fields: {', '.join(spec)})")
        params = {}
        for name, (check, default) in spec.items():
            if name not in item:
                if default is REQUIRED:
                    raise PlanError(f"{where}: missing field {name!r}")
                params[name] = default
                continue
            problem = check(item[name])
            if problem:
                raise PlanError(f"{where}: field {name!r} {problem}")
            params[name] = item[name]
        if "start" in params and params["end"] <= params["start"]:
            raise PlanError(f"{where}: field 'end' must be > start ({params['start']!r}), got {params['end']!r}")
        faults.append(Fault(kind, params))
    return FaultPlan(tuple(faults), source)


def load_plan(path: str | Path | None) -> FaultPlan:
    """Read and validate a plan file (.yaml, .yml or .json); ``None`` is the empty plan."""
    if path is None:
        return FaultPlan()
    return validate_plan(read_mapping_file(path, "fault plan", PlanError), str(path))
