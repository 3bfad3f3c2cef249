"""The common trace: one versioned JSONL schema written by the simulator and every real driver.

A trace is a sequence of events (dicts). The first is a ``header``; then, in time order:

- ``step``    one engine step: ``step`` index, ``t`` (start), ``dur``, ``sched`` {req: tokens}
              and, when non-empty, ``deferred`` (EC prefetch not ready), ``preempted``,
              ``finished``, ``enc`` {req: [mm index]}, ``ec_loaded`` [identifier],
              ``kv`` (KV offload, models/kv_offload.py; only non-empty keys):
                ``store`` / ``load`` [[job, req, [chunk]]] jobs built by build_connector_meta /
                update_state_after_alloc; ``flush`` [job] the step's jobs_to_flush (preemption,
                fence, 0.23.0's flush-all); ``done`` [job] completions retired by
                update_connector_output; ``wait`` seconds the worker blocked on flushed jobs
                (part of ``dur``); ``present`` / ``nostore`` [[req, [chunk]]] chunks already
                on CPU / refused by a full pool; ``evict`` [[req, chunk]]; ``delayed`` [req]
                lookups deferred (None). A job is ``<req>:S<chunk>`` / ``<req>:L<chunk>``
                (``#n`` on repeats), a chunk its index in the request's tokens.
                With KV offloading, empty steps (``sched`` {}) are steps too: vLLM keeps
                stepping while jobs are pending (0.24+) and reports completions in them.
- ``req``     a request's fate once it leaves the engine: arrival, first token, finish,
              output tokens, preemptions, status (``length``, ``stop``; ``failed``:
              EngineDeadError; ``aborted``: the engine's graceful shutdown after SIGTERM)
- ``kv_lost`` the engine stopped with KV offload jobs not retired: ``cause`` (``kill_engine``,
              ``kv_transfer_failed``, ``shutdown``) and ``jobs`` (may be empty: nothing lost);
              ``unapplied``: the steps recorded without their output (async: up to two batches)
- ``eplb``    async EPLB (models/eplb.py): ``rearrange`` (step), per layer ``transfer`` (start,
              end, per-rank sent/recv expert copies), ``publish``, ``consume`` (step), ``rank_death``
- ``fault``   a fault from the plan applied (time, the fault)
- ``proc``    engine-process events, ``event`` one of:
              the engine loop (models/engine.py): ``engine_dead`` / ``engine_stopped`` (``proc``),
              ``exit`` with ``cause`` ``kv_transfer_failed`` and the ``failed`` jobs (vLLM's
              offloading worker asserts transfer success: the core dies);
              the process model and its real drivers (models/engine_procs.py, harness/drivers/real_procs.py):
              ``exit`` (rank, name, code), ``detect`` (the monitor woke: ``failed`` rank,
              ``failed_name``, ``first_exit``, ``cause``, ``latency``), ``monitor_error``
              (an exception killed the monitor thread), ``shutdown`` (who, cause), ``stop``
              (the client's), ``core_shutdown`` (rank), ``engine_dead`` (via),
              connector operations (models/shutdown_drain.py: rank, connector, role, op):
              ``op_done``, ``connector_shutdown``, ``drain`` (completed during shutdown),
              ``lost`` (still pending when the process exited)
- ``client``  a deployment's request as its client saw it (models/client.py): ``req``, ``status``
              (``finished``, ``failed``, ``lost``), ``arrival``, ``tries``, ``server`` (of the last
              try), ``first_token`` / ``finish`` / ``num_output`` of the try that finished. In a
              deployment trace (harness/runs/deploy.py) ``req`` events are tries (``<id>~<n>`` for
              retries) and events of an engine core carry ``server`` and ``rank``; ``proc`` adds
              ``server_down`` (``server``, ``rank``, ``cause``) and ``server_up``
- ``end``     the run's end time and summary

Events are built by models/events.py (one constructor per kind) on both sides;
:func:`validate_event` / :func:`validate_trace` check a trace against this schema (the tests run
every trace they write through them). The checker compares events of both sides; it never looks
at either side's internal state. Serialisation is canonical (fixed key order, compact separators, rounded floats), so the same
seed and inputs give the same bytes.
"""

from __future__ import annotations

import itertools
import json
import operator
from pathlib import Path
from typing import IO, Annotated, Iterable, Iterator, Literal, Union

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import NotRequired, TypedDict

from ..inputs import problem_line


SCHEMA = "vllm-faultsim.trace/1"


# json.dumps(event, separators=(",", ":"), allow_nan=False) without making an encoder per call (the C one)
_encode = json.encoder.c_make_encoder(None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii,
                                      None, ":", ",", False, False, False)


def dumps(event: dict) -> str:
    return "".join(_encode(event, 0))


class _Pieces(dict):
    """JSON text of dict keys (``"key":``) or int values, made on first use; bounded."""

    def __init__(self, encode):
        super().__init__()
        self.encode = encode

    def __missing__(self, x):
        if len(self) >= 1 << 16:
            self.clear()
        text = self[x] = self.encode(x)
        return text


class _StepEncoder:
    """``dumps`` of a step event, with its ``sched`` {request id: tokens}, the bulk of a trace,
    joined from cached pieces (the same bytes: ids repeat from step to step); the steps of a
    macro-step share one ``sched`` (models/engine.py), encoded once."""

    def __init__(self):
        self.keys = _Pieces(lambda k: json.encoder.encode_basestring_ascii(k) + ":")
        self.ints = _Pieces(int.__repr__)
        self.last: tuple[dict, str] | None = None  # the last sched and its text (a step's sched is never changed)

    def __call__(self, event: dict) -> str:
        sched = event["sched"]
        head, tail = dumps({**event, "sched": 0}).split('"sched":0', 1)  # the first "sched" is the top level's
        if self.last is not None and self.last[0] is sched:
            items = self.last[1]
        else:
            items = ",".join(map(operator.concat, map(self.keys.__getitem__, sched), map(self.ints.__getitem__,
                                                                                          sched.values())))
            self.last = (sched, items)
        return f'{head}"sched":{{{items}}}{tail}'


class Trace:
    """Collects events in memory and, optionally, streams them to a JSONL file."""

    def __init__(self, path: str | Path | None = None, *, keep: bool | frozenset[str] = True):
        """keep: True keeps every event in memory, False none, a set of kinds only those."""
        self.events: list[dict] = []
        self._keep = keep
        self._fh: IO[str] | None = open(path, "w", encoding="utf-8", buffering=1 << 20) if path else None
        self._step = _StepEncoder()

    def emit(self, event: dict) -> None:
        keep = self._keep
        if keep is True or (keep and event["kind"] in keep):
            self.events.append(event)
        if self._fh is not None:
            self._fh.write((self._step(event) if event["kind"] == "step" else dumps(event)) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "Trace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def of_kind(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["kind"] == kind]


# ---- the schema as code -------------------------------------------------------------------------

class TraceError(ValueError):
    """A trace that breaks the schema; the message is one line naming the event and the field."""


# Each kind's fields (strict types; inf and nan refused); an event may carry more fields than these.
EVENT = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
STATUSES = ("length", "stop", "failed", "aborted")
CLIENT_STATUSES = ("finished", "failed", "lost")
Time = Annotated[float, Field(ge=0)]


@with_config(EVENT)
class HeaderEvent(TypedDict):
    kind: Literal["header"]
    schema: Literal[SCHEMA]
    side: str
    seed: int
    config: dict


@with_config(EVENT)
class StepEvent(TypedDict):
    kind: Literal["step"]
    step: int
    t: float
    dur: Time
    sched: dict[str, Annotated[int, Field(gt=0)]]  # request -> tokens scheduled
    deferred: NotRequired[list]
    preempted: NotRequired[list]
    finished: NotRequired[list]
    enc: NotRequired[dict]
    ec_loaded: NotRequired[list]
    kv: NotRequired[dict]


@with_config(EVENT)
class ReqEvent(TypedDict):
    kind: Literal["req"]
    req: str
    status: Literal[STATUSES]
    arrival: float
    first_token: float | None
    finish: float | None
    num_output: int | None
    preemptions: int


@with_config(EVENT)
class FaultEvent(TypedDict):
    kind: Literal["fault"]
    t: float | None
    fault: dict


@with_config(EVENT)
class ProcEvent(TypedDict):
    kind: Literal["proc"]
    t: float
    event: str


@with_config(EVENT)
class KVLostEvent(TypedDict):
    kind: Literal["kv_lost"]
    t: float
    cause: str
    jobs: list


@with_config(EVENT)
class EplbEvent(TypedDict):
    kind: Literal["eplb"]
    event: str


@with_config(EVENT)
class ClientEvent(TypedDict):
    kind: Literal["client"]
    t: float
    req: str
    status: Literal[CLIENT_STATUSES]
    arrival: float
    tries: int
    server: int | None
    first_token: float | None
    finish: float | None
    num_output: int | None


@with_config(EVENT)
class EndEvent(TypedDict):
    kind: Literal["end"]
    t: float


KINDS = (HeaderEvent, StepEvent, ReqEvent, FaultEvent, ProcEvent, KVLostEvent, EplbEvent, ClientEvent, EndEvent)
TRACE_EVENT = TypeAdapter(Annotated[Union[KINDS], Field(discriminator="kind")])


def validate_event(ev: dict, where: str = "event") -> None:
    """Raise :class:`TraceError` (one line: ``WHERE: kind.field: problem (got VALUE)``) if `ev` is
    not an event of the schema."""
    try:
        TRACE_EVENT.validate_python(ev)
    except ValidationError as exc:
        raise TraceError(problem_line(exc, where)) from None


def validate_trace(events: Iterable[dict], source: str = "trace") -> None:
    """Raise :class:`TraceError` unless `events` is a trace of the schema (:func:`checked_trace`)."""
    for _ in checked_trace(events, source):
        pass


def checked_trace(events: Iterable[dict], source: str = "trace") -> Iterator[dict]:
    """`events`, each yielded once checked: a header first and only there, every event valid, steps
    numbered in order with start times that never go back, one ``req`` event per request, nothing
    after the ``end`` (else :class:`TraceError`, raised when the event is reached)."""
    last_step, last_t, seen, ended = -1, float("-inf"), set(), False
    for n, ev in enumerate(events):
        where = f"{source}: event {n}"
        validate_event(ev, where)
        kind = ev["kind"]
        if (kind == "header") != (n == 0):
            raise TraceError(f"{where}: {'the first event is not a header' if n == 0 else 'a second header'}")
        if ended:
            raise TraceError(f"{where}: {kind} event after the end")
        if kind == "step":
            if ev["step"] <= last_step or ev["t"] < last_t:
                raise TraceError(f"{where}: step {ev['step']} at t={ev['t']} after step {last_step} at t={last_t}")
            last_step, last_t = ev["step"], ev["t"]
        elif kind == "req":
            if ev["req"] in seen:
                raise TraceError(f"{where}: a second req event for request {ev['req']!r}")
            seen.add(ev["req"])
        ended = kind == "end"
        yield ev


def header(side: str, seed: int, config: dict, clock: str | None = None) -> dict:
    """The first event; ``clock`` names the step time of a simulated engine (step_time.describe)."""
    head = {"kind": "header", "schema": SCHEMA, "side": side, "seed": seed, "config": config}
    return head if clock is None else {**head, "clock": clock}


def read_trace(path: str | Path) -> list[dict]:
    """Read a JSONL trace; refuses a file of another schema version or one that breaks the schema."""
    return list(iter_trace(path))


def iter_trace(path: str | Path) -> Iterator[dict]:
    """:func:`read_trace` one event at a time, each checked as it is read (the file is never held
    whole); a problem raises when its line is reached."""
    events = iter_jsonl(path)
    first = next(events, None)
    if first is None or first.get("kind") != "header":
        raise ValueError(f"{path}: not a vllm-faultsim trace (no header line)")
    if first.get("schema") != SCHEMA:
        raise ValueError(f"{path}: trace schema {first.get('schema')!r}, this version reads {SCHEMA!r}")
    yield from checked_trace(itertools.chain((first,), events), str(path))


class TraceFile:
    """A trace file as an iterable of its events: each pass reads it again (:func:`iter_trace`);
    ``last_kind`` is the kind of the last event a pass reached (``"end"``: a complete run)."""

    def __init__(self, path: str | Path):
        self.path = path
        self.last_kind: str | None = None

    def __iter__(self) -> Iterator[dict]:
        for ev in iter_trace(self.path):
            self.last_kind = ev["kind"]
            yield ev


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None


def write_jsonl(path: str | Path, events: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for e in events:
            fh.write(dumps(e))
            fh.write("\n")
