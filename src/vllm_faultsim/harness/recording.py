"""The ``vllm-faultsim.recording/1`` format: one real vLLM serving run (what ran, every request's client-side times, every engine step's shape and times) as JSON lines; writer, reader and validator.

Layout (one JSON object per line; the file may be gzip-compressed, detected by its magic bytes)
----------------------------------------------------------------------------------------------
1. ``{"kind": "header", "format": "vllm-faultsim.recording/1", ...}``: what ran. ``model`` (the
   shape's name), ``gpu`` (the GPU's name, e.g. "NVIDIA H200"), ``tensor_parallel_size``,
   ``dtype``, ``vllm`` and ``torch`` (versions), ``driver`` (the NVIDIA driver version),
   ``device`` (the machine in words: GPUs, memory, CPUs), ``entry_point`` (how the engine was
   started), ``workload`` (``rate`` in requests/s, ``n``, ``prompt_tokens`` and ``output_tokens``
   as inclusive ``[lo, hi]`` ranges, ``seed``; more keys allowed) and ``engine``
   (``max_num_seqs``, ``max_num_batched_tokens``, ``max_model_len``, ``block_size``,
   ``enable_prefix_caching``, ``async_scheduling``, ``enforce_eager``,
   ``gpu_memory_utilization``, ``num_gpu_blocks``; more keys allowed). Other header keys are kept.
2. One ``{"kind": "request", "id", "arrival", "prompt_tokens", "output_tokens", "first_token",
   "finish"}`` per request, in arrival order. Times are seconds from the run's start on the
   client's clock: ``arrival`` when the client submitted the request, ``first_token`` when the
   client received the first output token, ``finish`` when it received the last one.
   Optional ``stats``: the engine-side times vLLM keeps for the request
   (``vllm/v1/metrics/stats.py`` ``RequestStateStats``, handed to the client as
   ``RequestOutput.metrics``; kept when the engine logs stats, vLLM's default), by vLLM's names,
   converted to the recording's clock (seconds from the run's start):
   - ``arrival_time``: the input processor took the request (``InputProcessor.process_inputs``,
     ``time.time()`` in the client's process: a wall clock, converted through the client's
     ``time.time() - time.perf_counter()`` at the run's start);
   - ``queued_ts``: the engine core added it to the scheduler (``EngineCoreEventType.QUEUED``);
   - ``scheduled_ts``: a ``schedule()`` first gave it tokens (``SCHEDULED``; later schedules
     after a preemption are ignored, as vLLM does);
   - ``first_token_ts`` / ``last_token_ts``: the ``EngineCoreOutputs`` that carried its first /
     last output token were built (in ``update_from_output``);
   the last four are ``time.monotonic()`` in the engine-core process (CLOCK_MONOTONIC, the
   client's ``perf_counter`` clock on Linux). ``queued_ts <= scheduled_ts <= first_token_ts <=
   last_token_ts``.
3. Optional ``{"kind": "step", ...}`` lines, one per engine step that scheduled tokens, in the
   order the engine scheduled them (``i``: the engine's own step counter, increasing; gaps are
   steps outside the run or steps that scheduled nothing).
   Shape (what aiconfigurator's forward-pass estimator takes, as Dynamo's ForwardPassMetrics
   defines it): ``num_prefill_requests`` and ``sum_prefill_tokens`` (requests whose prompt is not
   yet fully computed, and the tokens scheduled for them), ``sum_prefill_kv_tokens`` (the KV those
   prefill requests already had before this step: earlier chunks and prefix-cache hits),
   ``num_decode_requests`` and ``sum_decode_kv_tokens`` (requests generating one token, and the KV
   they had before this step), ``total_tokens`` (all scheduled tokens; = sum_prefill_tokens +
   num_decode_requests, no speculative decoding). Optional: ``num_waiting``/``num_running`` (queue
   lengths right after scheduling), ``num_preempted``; ``new_reqs`` (requests this step
   scheduled for the first time), ``first_token_reqs`` (requests whose first output token this
   step's output carries) and ``finished_reqs`` (requests this step's output finished), each a
   list of request indices (0-based positions of the request lines in the file); a request is in
   each list of at most one step.
   Times (seconds from the run's start, measured in the engine-core process with
   ``time.perf_counter``, which on Linux is CLOCK_MONOTONIC and so shares the client's clock):
   - ``schedule_start`` / ``schedule_end``: ``Scheduler.schedule()`` entered / returned; the batch
     is handed to the GPU worker right after ``schedule_end``.
   - ``output_start``: ``update_from_output()`` entered, i.e. the engine core has the step's
     sampled tokens (the GPU work of this step is done, plus the device-to-host copy and IPC).
   - ``output_end``: ``update_from_output()`` returned; the step's outputs go to the client next.
   Under async scheduling (vLLM's default: ``AsyncScheduler`` with a batch queue of 2) step N+1
   is scheduled while step N executes, so ``schedule_start[N+1]`` usually lies *before*
   ``output_start[N]``: the engine core schedules N+1, submits it, then blocks on N's result.
   ``output_start[N] - schedule_end[N]`` therefore includes waiting behind step N-1 on the GPU; the
   spacing of consecutive ``output_start`` (or ``output_end``) values is the step's wall time as
   the engine sees it in steady state, and ``output_start[N] - max(schedule_end[N],
   output_start[N-1])`` bounds step N's own GPU time from above. Without async scheduling the four
   times of a step follow each other and of the next. Within a step the four times never
   decrease; across steps ``schedule_start`` and ``output_end`` never decrease.

Each line's fields are checked by its schema (:class:`HeaderLine`, :class:`RequestLine`,
:class:`StepLine`, on inputs.py's layer: strict types, finite numbers, ranges; request and step
lines refuse unknown fields, the header and its ``workload`` and ``engine`` allow more keys), then
the rules across fields and lines. Every violation raises :class:`RecordingError` with the
project's one line, ``FILE:LINE: field: problem (got VALUE)``: missing header, wrong format string, missing or ill-typed fields, non-finite
numbers, negative times, times that go backwards, ``first_token`` before ``arrival``, ``finish``
before ``first_token``, a shape whose sums disagree, duplicate request ids, a request count
other than the header's ``workload.n``.
"""

from __future__ import annotations

import gzip
import itertools
import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from ..inputs import SECTION, NonNegative, NonNegativeInt, PositiveInt, Section, bounds, checked, show

FORMAT = "vllm-faultsim.recording/1"
GZIP_MAGIC = b"\x1f\x8b"

STEP_SHAPE = ("num_prefill_requests", "sum_prefill_tokens", "sum_prefill_kv_tokens",
              "num_decode_requests", "sum_decode_kv_tokens", "total_tokens")
STEP_TIMES = ("schedule_start", "schedule_end", "output_start", "output_end")
REQ_LISTS = ("new_reqs", "first_token_reqs", "finished_reqs")
# RequestStateStats' times, in the order they must come (arrival_time is on another clock: not ordered)
STATS_ORDERED = ("queued_ts", "scheduled_ts", "first_token_ts", "last_token_ts")
TIME_DIGITS = 6  # times are written rounded to microseconds


class RecordingError(ValueError):
    """An invalid recording; the message is one line: file, line, field, value."""


@dataclass
class Recording:
    header: dict
    requests: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)


# ---- checks: each line's fields by its schema (inputs.py), then the rules across fields and lines ----

TokenRange = bounds(NonNegativeInt)
Time = NonNegative  # seconds from the run's start


class _Open(Section):
    """A header section: its fields checked, more keys allowed (and kept)."""

    model_config = ConfigDict(**{**SECTION, "extra": "allow"})


class RecordedWorkload(_Open):
    rate: NonNegative
    n: NonNegativeInt
    prompt_tokens: TokenRange
    output_tokens: TokenRange
    seed: NonNegativeInt


class RecordedEngine(_Open):
    """vLLM's engine arguments by their names."""
    max_num_seqs: PositiveInt
    max_num_batched_tokens: PositiveInt
    max_model_len: PositiveInt
    block_size: PositiveInt
    enable_prefix_caching: bool
    async_scheduling: bool
    enforce_eager: bool
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)]
    num_gpu_blocks: PositiveInt


class HeaderLine(_Open):
    kind: Literal["header"]
    format: Literal[FORMAT]
    model: str
    gpu: str
    tensor_parallel_size: PositiveInt
    dtype: str
    vllm: str
    torch: str
    driver: str
    device: str
    entry_point: str
    workload: RecordedWorkload
    engine: RecordedEngine


class RequestStats(Section):
    arrival_time: Time
    queued_ts: Time
    scheduled_ts: Time
    first_token_ts: Time
    last_token_ts: Time


class RequestLine(Section):
    kind: Literal["request"]
    id: str
    arrival: Time
    prompt_tokens: PositiveInt
    output_tokens: NonNegativeInt
    first_token: Time
    finish: Time
    stats: RequestStats | None = None


Indices = list[NonNegativeInt]  # request indices: 0-based positions of the request lines


class StepLine(Section):
    kind: Literal["step"]
    i: NonNegativeInt
    num_prefill_requests: NonNegativeInt
    sum_prefill_tokens: NonNegativeInt
    sum_prefill_kv_tokens: NonNegativeInt
    num_decode_requests: NonNegativeInt
    sum_decode_kv_tokens: NonNegativeInt
    total_tokens: NonNegativeInt
    schedule_start: Time
    schedule_end: Time
    output_start: Time
    output_end: Time
    num_waiting: NonNegativeInt | None = None
    num_running: NonNegativeInt | None = None
    num_preempted: NonNegativeInt | None = None
    new_reqs: Indices | None = None
    first_token_reqs: Indices | None = None
    finished_reqs: Indices | None = None


LINE_SCHEMAS = {"header": HeaderLine, "request": RequestLine, "step": StepLine}


def _fail(name: str, line: int, fld: str, value: Any, why: str):
    raise RecordingError(f"{name}:{line}: {fld}: {why} (got {show(value)})")


class _Checker:
    """Checks a recording line by line, in file order, keeping what cross-line rules need."""

    def __init__(self, name: str):
        self.name = name
        self.header: dict | None = None
        self.ids: set[str] = set()
        self.last_arrival = 0.0
        self.last_step: dict | None = None
        self.n_requests = 0
        self.listed: dict[str, set[int]] = {k: set() for k in REQ_LISTS}

    def line(self, no: int, obj: Any) -> str:
        name = self.name
        if not isinstance(obj, dict):
            _fail(name, no, "<line>", obj, "must be a JSON object")
        kind = obj.get("kind")
        if self.header is None:
            if kind != "header":
                _fail(name, no, "kind", kind, "the first line must be the header")
            self._header(no, obj)
            return "header"
        if kind == "request":
            if self.last_step is not None:
                _fail(name, no, "kind", kind, "requests must come before steps")
            self._request(no, obj)
        elif kind == "step":
            self._step(no, obj)
        elif kind == "header":
            _fail(name, no, "kind", kind, "a second header")
        else:
            _fail(name, no, "kind", kind, "must be header, request or step")
        return kind

    def _header(self, no: int, h: dict) -> None:
        checked(HeaderLine, h, f"{self.name}:{no}", RecordingError)
        self.header = h

    def _request(self, no: int, r: dict) -> None:
        name = self.name
        checked(RequestLine, r, f"{name}:{no}", RecordingError)
        if r.get("stats") is not None:
            st = r["stats"]
            for a, b in itertools.pairwise(STATS_ORDERED):
                if st[b] < st[a]:
                    _fail(name, no, f"stats.{b}", st[b], f"before stats.{a} {st[a]}")
        if r["id"] in self.ids:
            _fail(name, no, "id", r["id"], "duplicate request id")
        self.ids.add(r["id"])
        if r["arrival"] < self.last_arrival:
            _fail(name, no, "arrival", r["arrival"], f"before the previous request's {self.last_arrival}")
        if r["first_token"] < r["arrival"]:
            _fail(name, no, "first_token", r["first_token"], f"before arrival {r['arrival']}")
        if r["finish"] < r["first_token"]:
            _fail(name, no, "finish", r["finish"], f"before first_token {r['first_token']}")
        self.last_arrival = r["arrival"]
        self.n_requests += 1

    def _step(self, no: int, s: dict) -> None:
        name = self.name
        checked(StepLine, s, f"{name}:{no}", RecordingError)
        if s["total_tokens"] != s["sum_prefill_tokens"] + s["num_decode_requests"]:
            _fail(name, no, "total_tokens", s["total_tokens"],
                  f"!= sum_prefill_tokens + num_decode_requests = {s['sum_prefill_tokens'] + s['num_decode_requests']}")
        if s["sum_prefill_tokens"] < s["num_prefill_requests"]:
            _fail(name, no, "sum_prefill_tokens", s["sum_prefill_tokens"], "fewer tokens than prefill requests")
        for a, b in itertools.pairwise(STEP_TIMES):
            if s[b] < s[a]:
                _fail(name, no, b, s[b], f"before {a} {s[a]}")
        for k in REQ_LISTS:
            for j in s.get(k) or ():
                if j >= self.n_requests:
                    _fail(name, no, k, j, f"no such request: the file has {self.n_requests}")
                if j in self.listed[k]:
                    _fail(name, no, k, j, "request already listed by an earlier step")
                self.listed[k].add(j)
        prev = self.last_step
        if prev is not None:
            if s["i"] <= prev["i"]:
                _fail(name, no, "i", s["i"], f"not after the previous step's {prev['i']}")
            for t in ("schedule_start", "output_end"):
                if s[t] < prev[t]:
                    _fail(name, no, t, s[t], f"before the previous step's {prev[t]}")
        self.last_step = s

    def end(self, no: int) -> None:
        if self.header is None:
            _fail(self.name, max(no, 1), "kind", None, "no header (empty recording)")
        n = self.header["workload"]["n"]
        if n != self.n_requests:
            _fail(self.name, 1, "workload.n", n, f"the file has {self.n_requests} request lines")


# ---- reading and writing --------------------------------------------------------------------

def _open_text(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == GZIP_MAGIC:
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def read(path: str | Path) -> Recording:
    """Read and validate a recording (plain or gzip JSONL)."""
    path = Path(path)
    name = str(path)
    chk = _Checker(name)
    rec: Recording | None = None
    no = 0
    try:
        fh = _open_text(path)
    except OSError as exc:
        _fail(name, 0, "<file>", exc.strerror or str(exc), "cannot be read")
    with fh:
        try:
            for no, text in enumerate(fh, 1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    _fail(name, no, "<json>", text.strip(), f"not JSON: {exc.msg}")
                kind = chk.line(no, obj)
                if kind == "header":
                    rec = Recording(header=obj)
                elif kind == "request":
                    rec.requests.append(obj)
                else:
                    rec.steps.append(obj)
        except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
            _fail(name, no + 1, "<file>", str(exc), "unreadable")
    chk.end(no)
    return rec


def validate(rec: Recording, name: str = "<recording>") -> None:
    """Check a recording in memory with the reader's rules (line numbers as written)."""
    chk = _Checker(name)
    no = 0
    for no, obj in enumerate(_objects(rec), 1):
        chk.line(no, obj)
    chk.end(no)


def _objects(rec: Recording) -> Iterable[dict]:
    yield {"kind": "header", **{k: v for k, v in rec.header.items() if k != "kind"}}
    for r in rec.requests:
        yield {"kind": "request", **{k: v for k, v in r.items() if k != "kind"}}
    for s in rec.steps:
        yield {"kind": "step", **{k: v for k, v in s.items() if k != "kind"}}


def _rounded(obj: dict) -> dict:
    """Floats rounded to TIME_DIGITS, those of a request's ``stats`` too."""
    return {k: (round(v, TIME_DIGITS) if isinstance(v, float) else _rounded(v) if k == "stats" else v)
            for k, v in obj.items()}


def write(path: str | Path, rec: Recording) -> Path:
    """Validate and write ``rec`` (times rounded to microseconds; gzip when ``path`` ends in .gz)."""
    path = Path(path)
    objs = [_rounded(o) for o in _objects(rec)]
    chk = _Checker(str(path))
    for no, obj in enumerate(objs, 1):
        chk.line(no, obj)
    chk.end(len(objs))
    data = "".join(json.dumps(o, separators=(",", ":"), allow_nan=False) + "\n" for o in objs).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=9, mtime=0)
    path.write_bytes(data)
    return path


# ---- summaries ------------------------------------------------------------------------------

def _p50(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def summary(rec: Recording) -> dict:
    """Request count, TTFT/TPOT/E2E medians (seconds) and step count of a recording."""
    reqs = rec.requests
    tpot = [(r["finish"] - r["first_token"]) / (r["output_tokens"] - 1) for r in reqs if r["output_tokens"] > 1]
    return {"n": len(reqs), "ttft_p50": _p50([r["first_token"] - r["arrival"] for r in reqs]),
            "tpot_p50": _p50(tpot), "e2e_p50": _p50([r["finish"] - r["arrival"] for r in reqs]),
            "steps": len(rec.steps)}
