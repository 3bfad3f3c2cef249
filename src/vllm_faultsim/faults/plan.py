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

Every problem is a :class:`PlanError` whose message is one line naming the fault and field: each
kind is a schema (inputs.Section).
Faults come from the plan and nowhere else (Jepsen's nemesis): one injector per side applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from ..inputs import NonNegative, NonNegativeInt, Positive, Section, checked, read_mapping_file

SIGNALS = ("SIGKILL", "SIGTERM", "exit1", "exit0", "stop")
PHASES = ("any", "idle", "mid_step", "shutdown")


class PlanError(ValueError):
    """An invalid fault plan; ``str(err)`` is one line naming the problem."""


class Window(Section):
    """A fault over ``[start, end)`` of simulated time."""

    start: NonNegative
    end: NonNegative

    @model_validator(mode="after")
    def _ordered(self):
        if self.end <= self.start:
            raise ValueError(f"end must be > start ({self.start!r}), got {self.end!r}")
        return self


class KillEngine(Section):
    """An engine-core process dies: a signal, an exit code, or a stop the client asked for."""

    at: NonNegative
    rank: NonNegativeInt = 0
    signal: Literal[SIGNALS] = "SIGKILL"
    phase: Literal[PHASES] = "any"


class SlowSteps(Window):
    """Every step that starts in [start, end) takes factor times as long."""

    factor: Positive


class ECPrefetchFail(Section):
    """The EC prefetch of an item ("*": every item) fails: the request falls back to encoding locally."""

    item: Annotated[str, Field(min_length=1)] = "*"


class ECPrefetchStall(ECPrefetchFail):
    """The EC prefetch of an item ("*": every item) takes `delay` seconds more."""

    delay: Positive


class KVTransferSlow(SlowSteps):
    """KV transfers submitted in [start, end) take factor times as long."""


class KVTransferFail(Window):
    """KV transfers submitted in [start, end) fail."""


class SlowLink(SlowSteps):
    """EPLB layer transfers that start in [start, end) see the link bandwidth / factor (models/eplb.py)."""


class EplbRankDeath(Section):
    """EP rank `ep_rank` of engine `rank` dies as it starts transferring `layer` of EPLB
    rearrangement number `rearrangement` (0-based); the engine core dies at its next EPLB step."""

    ep_rank: NonNegativeInt = 1
    layer: NonNegativeInt = 0
    rearrangement: NonNegativeInt = 0
    rank: NonNegativeInt = 0


KINDS: dict[str, type[Section]] = {
    "kill_engine": KillEngine, "slow_steps": SlowSteps, "ec_prefetch_stall": ECPrefetchStall,
    "ec_prefetch_fail": ECPrefetchFail, "kv_transfer_slow": KVTransferSlow, "kv_transfer_fail": KVTransferFail,
    "slow_link": SlowLink, "eplb_rank_death": EplbRankDeath,
}

# Kinds users ask for that the simulator does not model yet: rejected by name, not as unknown.
NOT_MODELLED = {
    "network_partition": "the simulator has no network between engines yet",
    "gpu_oom": "CUDA out-of-memory inside a step is not modelled yet",
}


class PlanFile(Section):
    """A plan's top level (a bare list is its ``faults``); each fault is checked by its kind's schema."""

    version: Literal[1] = 1
    faults: list[dict] = []
    name: str | None = None
    description: str | None = None


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
    top = checked(PlanFile, data, source, PlanError)
    faults = []
    for i, item in enumerate(top.faults):
        where = f"{source}: faults[{i}]"
        kind = item.get("kind")
        if kind is None:
            raise PlanError(f"{where}: missing field 'kind'")
        if isinstance(kind, str) and kind in NOT_MODELLED:
            raise PlanError(f"{where}: kind {kind!r} is not modelled yet ({NOT_MODELLED[kind]})")
        if not isinstance(kind, str) or kind not in KINDS:
            raise PlanError(f"{where}: unknown kind {kind!r} (known: {', '.join(sorted(KINDS))})")
        params = checked(KINDS[kind], {k: v for k, v in item.items() if k != "kind"}, f"{where} ({kind})", PlanError)
        faults.append(Fault(kind, params.model_dump()))
    return FaultPlan(tuple(faults), source)


def load_plan(path: str | Path | None) -> FaultPlan:
    """Read and validate a plan file (.yaml, .yml or .json); ``None`` is the empty plan."""
    if path is None:
        return FaultPlan()
    return validate_plan(read_mapping_file(path, "fault plan", PlanError), str(path))
