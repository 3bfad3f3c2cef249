"""Readers of public LLM-serving traces into workloads: Azure LLM inference (CSV), Mooncake (JSONL
with block hash ids), BurstGPT (CSV) and ShareGPT conversations (JSON, Poisson arrivals).

Each reader streams its file (``.gz`` too), one row at a time, each row checked by its schema
(:class:`AzureRow`, :class:`BurstGPTRow`: CSV text parsed; :class:`MooncakeLine`), a bad one named
``FILE:LINE: field: problem (got VALUE)``; :func:`read` checks the whole selection in one streamed pass, then gives an iterable of the
:class:`RequestSpec` in arrival order that reads the file again as a run pulls it (the workload is
never held whole: :class:`TimedReplay`, :class:`ShareGPTReplay`). The timed formats share one
selection (:func:`_selected`): trace time is seconds since the file's first row; rows must not go
back in time (refused, not sorted: a window then stops reading at its end); the window
``[start, start + duration)`` in trace seconds, then the first ``max_requests`` of it; arrivals are
``(t - start) * time_scale``, or scaled so the selection's mean rate is ``rate`` req/s. A row with a
zero prompt or zero output (BurstGPT's failed requests) is skipped; a prompt vLLM would refuse
(``>= max_model_len``) is refused with its line, clipped to ``max_model_len - 1`` or skipped
(``over_length``); outputs past ``max_model_len`` are capped by the engine, as in vLLM.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import random
from datetime import datetime, timezone
from functools import lru_cache
from typing import Annotated, Any, Iterator, Literal

from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from ..inputs import SECTION, NonNegative, NonNegativeInt, Positive, PositiveInt, Section, problem_line
from ..models.request import RequestSpec
from .workload import MAX_REQUESTS, WorkloadError, schema_lines

OVER_LENGTH = ("refuse", "clip", "skip")


class TracePath(Section):
    """A published trace file (a ``.gz`` of it too) and what to do with prompts of ``max_model_len``
    tokens or more (vLLM refuses them)."""

    path: str
    max_requests: PositiveInt | None = None
    over_length: Literal[OVER_LENGTH] = "refuse"


class TimedTrace(TracePath):
    """A trace with timestamps: the window ``[start, start + duration)`` of trace time, arrivals scaled
    by `time_scale` or to a mean `rate` (one of the two)."""

    start: NonNegative = 0.0
    duration: Positive | None = None
    time_scale: Positive | None = None
    rate: Positive | None = None

    @model_validator(mode="after")
    def _one_scale(self):
        if self.time_scale is not None and self.rate is not None:
            raise ValueError("give at most one of time_scale and rate")
        return self


class Azure(TimedTrace):
    kind: Literal["azure"]


class Mooncake(TimedTrace):
    kind: Literal["mooncake"]
    chunk_hash_size: PositiveInt = 512  # vLLM's --timed-trace-chunk-hash-size


class BurstGPT(TimedTrace):
    kind: Literal["burstgpt"]
    model: str | None = None  # keep one model's rows (GPT-4), as vLLM's benchmark does


class ShareGPT(TracePath):
    kind: Literal["sharegpt"]
    rate: Positive  # Poisson arrivals (file order)
    chars_per_token: Positive = 4.0


WORKLOADS = {"azure": Azure, "mooncake": Mooncake, "burstgpt": BurstGPT, "sharegpt": ShareGPT}  # kind -> schema
CHUNK_CHARS = 1 << 20  # how much of a ShareGPT JSON file is read at a time


# ---- files, fields ---------------------------------------------------------------------------

def _open(path: str):
    if not isinstance(path, str) or not path:
        raise WorkloadError(f"path must be a file name, got {path!r}")
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read workload ({exc.strerror or exc})") from None


def _utc(text: str) -> datetime:
    """An Azure TIMESTAMP; a naive one (the 2023 traces) is UTC."""
    dt = datetime.fromisoformat(text)
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _date_time(text: str) -> str:
    try:
        _utc(text)
    except ValueError:
        raise ValueError(f"must be a date and time, e.g. 2023-11-16 18:15:46.6805900 (got {text!r})") from None
    return text


CSV_ROW = ConfigDict(SECTION, strict=False)  # a CSV field is text: numbers are parsed from it


class AzureRow(Section):
    """The fields read of an Azure LLM inference trace row."""

    model_config = CSV_ROW
    TIMESTAMP: Annotated[str, AfterValidator(_date_time)]
    ContextTokens: NonNegativeInt
    GeneratedTokens: NonNegativeInt


class BurstGPTRow(Section):
    """The fields read of a BurstGPT row."""

    model_config = ConfigDict(CSV_ROW, populate_by_name=False)
    Timestamp: NonNegative  # seconds
    Model: str
    request_tokens: NonNegativeInt = Field(alias="Request tokens")
    response_tokens: NonNegativeInt = Field(alias="Response tokens")


def _csv_rows(path: str, schema: type[Section]) -> Iterator[tuple[str, list[str], Section]]:
    """(file:line, the fields' text, the row checked by `schema`) for each data row; the header
    names the columns (the aliases of `schema`'s fields)."""
    adapter = _row_adapter(schema)
    columns = tuple(f.alias or name for name, f in schema.model_fields.items())
    with _open(path) as fh:
        for where, fields in _reading(path, _csv_fields(fh, path, columns)):
            try:
                yield where, fields, adapter.validate_python(dict(zip(columns, fields)))
            except ValidationError as exc:
                raise WorkloadError(problem_line(exc, where, schema)) from None


@lru_cache(maxsize=None)
def _row_adapter(schema: type[Section]) -> TypeAdapter:
    return TypeAdapter(schema)


def _csv_fields(fh, path: str, columns: tuple[str, ...]) -> Iterator[tuple[str, list[str]]]:
    reader = csv.reader(fh)
    try:
        header = next(reader, None)
        if header is None:
            raise WorkloadError(f"{path}: empty file (expected a CSV header with {', '.join(columns)})")
        header = [h.strip() for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise WorkloadError(f"{path}:1: no column {missing[0]!r} in the header {','.join(header)!r} "
                                f"(needs {', '.join(columns)})")
        idx = [header.index(c) for c in columns]
        for row in reader:
            if not "".join(row).strip():
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) < len(header):
                raise WorkloadError(f"{where}: {len(row)} fields, the header has {len(header)}")
            yield where, [row[i].strip() for i in idx]
    except csv.Error as exc:
        raise WorkloadError(f"{path}:{reader.line_num}: not a CSV row ({exc})") from None


# ---- rows of each timed format: (where, trace seconds, timestamp text, prompt, output, hash_ids) ---

def _azure_rows(path: str):
    t0 = None
    for where, _, r in _csv_rows(path, AzureRow):
        dt = _utc(r.TIMESTAMP)
        t0 = dt if t0 is None else t0
        yield where, (dt - t0).total_seconds(), r.TIMESTAMP, r.ContextTokens, r.GeneratedTokens, ()


def _burstgpt_rows(path: str, model: str | None = None):
    t0 = None
    for where, (ts, *_), r in _csv_rows(path, BurstGPTRow):
        t = r.Timestamp
        t0 = t if t0 is None else t0
        if model is None or r.Model == model:
            yield where, t - t0, ts, r.request_tokens, r.response_tokens, ()


class MooncakeLine(Section):
    """One request of a Mooncake trace (other keys are ignored: the published traces vary)."""

    model_config = ConfigDict(SECTION, extra="ignore")
    timestamp: NonNegative  # milliseconds
    input_length: NonNegativeInt
    output_length: NonNegativeInt
    hash_ids: list[int] = []


MOONCAKE_LINE = TypeAdapter(MooncakeLine)


def _mooncake_rows(path: str, chunk_hash_size: int = 512):
    t0, n = None, 0
    for n, d in schema_lines(path, MOONCAKE_LINE, MooncakeLine):
        where = f"{path}:{n}"
        t = d.timestamp / 1000.0  # milliseconds
        t0 = t if t0 is None else t0
        p = d.input_length
        blocks = -(-p // chunk_hash_size)
        if len(d.hash_ids) > blocks:
            raise WorkloadError(f"{where}: {len(d.hash_ids)} hash_ids for input_length {p}, more than "
                                f"ceil(input_length / chunk_hash_size) = {blocks} (chunk_hash_size {chunk_hash_size}: "
                                "Mooncake's traces hash 512-token blocks; set the trace's block size)")
        yield where, t - t0, int(d.timestamp) if d.timestamp.is_integer() else d.timestamp, p, d.output_length, tuple(d.hash_ids)
    if n == 0:
        raise WorkloadError(f"{path}: empty file (expected one JSON request per line)")


# ---- selection, lengths, scaling -------------------------------------------------------------

def _lengths(where: str, p: int, o: int, over_length: str, max_model_len: int | None):
    """The (prompt, output) a row becomes, or None (skipped): zero lengths, over-length prompts."""
    if p == 0 or o == 0:
        return None  # vLLM refuses an empty prompt and max_tokens 0; BurstGPT's failures have 0 output
    if max_model_len is not None and p >= max_model_len:
        if over_length == "refuse":
            raise WorkloadError(f"{where}: the prompt ({p} tokens) is not shorter than max_model_len "
                                f"{max_model_len}, which vLLM refuses (workload.over_length: clip or skip)")
        if over_length == "skip":
            return None
        p = max_model_len - 1
    return p, o


def _selected(rows, tally: dict, *, start=0.0, duration=None, max_requests=None, over_length="refuse",
              max_model_len=None, chunk_hash_size=512) -> Iterator[tuple[float, int, int, tuple]]:
    """(arrival in the window, prompt, output, hash ids) of each selected row, in file order (which
    never goes back in time); `tally` counts the rows ``read`` and ``skipped``."""
    prev, n = None, 0
    limit = min(max_requests or MAX_REQUESTS + 1, MAX_REQUESTS + 1)
    for where, t, raw, p, o, hash_ids in rows:
        tally["read"] += 1
        if prev is not None and t < prev[0]:
            raise WorkloadError(f"{where}: timestamp {raw!r} is earlier than line {prev[1]}'s {prev[2]!r}: "
                                "timestamps must not decrease (sort the file by time)")
        prev = (t, where.rsplit(":", 1)[1], raw)
        if t < start:
            continue
        if duration is not None and t >= start + duration:
            return
        lengths = _lengths(where, p, o, over_length, max_model_len)
        if lengths is None:
            tally["skipped"] += 1
            continue
        p, o = lengths
        yield t - start, p, o, hash_ids[:-(-p // chunk_hash_size)]
        n += 1
        if n >= limit:
            return


class TimedReplay:
    """A timed trace's workload (Azure, Mooncake, BurstGPT), checked in one streamed pass when made
    (every selected row; the count and span that `rate` scales by), then an iterable of its
    requests: each pass reads the file again, one row at a time (the workload is never held whole)."""

    def __init__(self, w: "Azure | Mooncake | BurstGPT", max_model_len: int | None):
        opts = w.model_dump(exclude={"kind", "path", "time_scale", "rate", "model"})
        self.path, self.kind, self.model = w.path, w.kind, getattr(w, "model", None)
        self.chunk_hash_size = opts.setdefault("chunk_hash_size", 512)
        self.opts = {**opts, "max_model_len": max_model_len}
        tally = {"read": 0, "skipped": 0}
        n, first, last = 0, 0.0, 0.0
        for a, *_ in _selected(self._rows(), tally, **self.opts):
            first, last = (a, a) if n == 0 else (first, a)
            n += 1
        path, start, duration = w.path, w.start, w.duration
        if n > MAX_REQUESTS:
            raise WorkloadError(f"{path}: more than {MAX_REQUESTS:,} requests selected (set max_requests or a window)")
        if not n:
            end = "the end" if duration is None else f"{start + duration:g} s"
            raise WorkloadError(f"{path}: no requests selected ({tally['read']} rows read, {tally['skipped']} of "
                                f"the window [{start:g} s, {end}) skipped: a zero length or over_length)")
        self.scale = 1.0 if w.time_scale is None else w.time_scale
        if w.rate is not None:
            if last - first <= 0:
                raise WorkloadError(f"{path}: cannot scale to rate {w.rate:g} req/s: the {n} selected "
                                    "requests arrive at the same time")
            self.scale = (n - 1) / (last - first) / w.rate
        self.last_arrival = round(last * self.scale, 6)  # the last request's

    def _rows(self):
        if self.kind == "mooncake":
            return _mooncake_rows(self.path, self.chunk_hash_size)
        return _azure_rows(self.path) if self.kind == "azure" else _burstgpt_rows(self.path, self.model)

    def __iter__(self) -> Iterator[RequestSpec]:
        scale, size = self.scale, self.chunk_hash_size
        for i, (a, p, o, h) in enumerate(_selected(self._rows(), {"read": 0, "skipped": 0}, **self.opts)):
            yield RequestSpec(f"r{i}", round(a * scale, 6), p, o, hash_ids=h, chunk_hash_size=size)


# ---- ShareGPT: a JSON array of conversations, streamed --------------------------------------

def _json_array_items(fh, path: str) -> Iterator[tuple[int, Any]]:
    """(line, item) for each item of the file's top-level JSON array, read CHUNK_CHARS at a time."""
    dec = json.JSONDecoder()
    buf, pos, mark, line, eof = "", 0, 0, 1, False

    def line_at(p: int) -> int:
        nonlocal mark, line
        line += buf.count("\n", mark, p)
        mark = p
        return line

    def fill() -> None:
        nonlocal buf, pos, mark, eof
        chunk = fh.read(CHUNK_CHARS)
        eof = not chunk
        line_at(pos)
        buf, pos, mark = buf[pos:] + chunk, 0, 0

    def next_char() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or eof:
                return buf[pos] if pos < len(buf) else ""
            fill()

    c = next_char()
    if not c:
        raise WorkloadError(f"{path}: empty file (expected a JSON array of conversations)")
    if c != "[":
        raise WorkloadError(f"{path}:{line_at(pos)}: expected a JSON array of conversations, found {c!r}")
    pos += 1
    first = True
    while True:
        c = next_char()
        if c == "]":
            pos += 1
            if next_char():
                raise WorkloadError(f"{path}:{line_at(pos)}: text after the JSON array")
            return
        if not first:
            if c != ",":
                raise WorkloadError(f"{path}:{line_at(pos)}: expected ',' or ']' in the JSON array, found {c!r}"
                                    if c else f"{path}:{line_at(pos)}: the JSON array is not closed (the file ends)")
            pos += 1
            c = next_char()
        if not c:
            raise WorkloadError(f"{path}:{line_at(pos)}: the JSON array is not closed (the file ends)")
        first = False
        while True:
            try:
                item, end = dec.raw_decode(buf, pos)
                if end < len(buf) or eof:
                    break
            except json.JSONDecodeError as exc:
                if eof:
                    raise WorkloadError(f"{path}:{line_at(exc.pos)}: not valid JSON ({exc.msg})") from None
            fill()
        yield line_at(pos), item
        pos = end


class ShareGPTReplay:
    """A ShareGPT file's workload (Poisson arrivals from the seed, in file order), checked in one
    streamed pass when made, then an iterable of its requests: each pass reads the file again and
    draws the same arrivals."""

    def __init__(self, w: ShareGPT, seed: int, max_model_len: int | None):
        self.w, self.seed, self.max_model_len = w, seed, max_model_len
        tally = {"read": 0}
        n, self.last_arrival = 0, 0.0  # the last request's arrival
        for spec in self._specs(tally):
            n, self.last_arrival = n + 1, spec.arrival
        if n > MAX_REQUESTS:
            raise WorkloadError(f"{w.path}: more than {MAX_REQUESTS:,} requests selected (set max_requests)")
        if not n:
            raise WorkloadError(f"{w.path}: no requests selected ({tally['read']} entries read: none with two "
                                "non-empty turns that fit)")

    def __iter__(self) -> Iterator[RequestSpec]:
        return self._specs({"read": 0})

    def _specs(self, tally: dict) -> Iterator[RequestSpec]:
        w, path = self.w, self.w.path
        limit = min(w.max_requests or MAX_REQUESTS + 1, MAX_REQUESTS + 1)
        rng = random.Random(self.seed)
        n, now = 0, 0.0
        with _open(path) as fh:
            for line, entry in _reading(path, _json_array_items(fh, path)):
                where = f"{path}:{line}"
                tally["read"] += 1
                if not isinstance(entry, dict):
                    raise WorkloadError(f"{where}: a conversation must be a JSON object, got {type(entry).__name__}")
                turns = entry.get("conversations")
                if not isinstance(turns, list) or len(turns) < 2:
                    continue  # as vLLM's ShareGPTDataset: entries with at least two turns
                texts = []
                for j in (0, 1):
                    text = turns[j].get("value") if isinstance(turns[j], dict) else None
                    if not isinstance(text, str):
                        raise WorkloadError(f"{where}: conversations[{j}] has no string 'value'")
                    texts.append(math.ceil(len(text) / w.chars_per_token))
                lengths = _lengths(where, texts[0], texts[1], w.over_length, self.max_model_len)
                if lengths is None:
                    continue
                now += rng.expovariate(w.rate)
                yield RequestSpec(f"r{n}", round(now, 6), *lengths)
                n += 1
                if n >= limit:
                    return


# ---- the entry point -------------------------------------------------------------------------

def _reading(path: str, items):
    """`items`, with a file that is not UTF-8 text named (decoding happens while streaming)."""
    try:
        yield from items
    except UnicodeDecodeError as exc:
        raise WorkloadError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x}): a trace is a UTF-8 "
                            "text file") from None
    except (OSError, EOFError) as exc:
        raise WorkloadError(f"{path}: cannot read workload ({getattr(exc, 'strerror', None) or exc})") from None


def read(w: Azure | Mooncake | BurstGPT | ShareGPT, *, seed: int = 0,
         max_model_len: int | None = None) -> TimedReplay | ShareGPTReplay:
    """The workload a checked trace-file section `w` (a schema of WORKLOADS) gives: checked now in
    one streamed pass, an iterable of its requests in arrival order, read again as a run pulls it."""
    if isinstance(w, ShareGPT):
        return ShareGPTReplay(w, seed, max_model_len)
    return TimedReplay(w, max_model_len)
