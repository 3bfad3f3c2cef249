"""Readers of public LLM-serving traces into workloads: Azure LLM inference (CSV), Mooncake (JSONL
with block hash ids), BurstGPT (CSV) and ShareGPT conversations (JSON, Poisson arrivals).

Each reader streams its file (``.gz`` too), one row at a time, names a bad row by file and line,
and returns the workload tuple of :class:`RequestSpec` sorted by arrival. The timed formats share
one selection (:func:`_select`): trace time is seconds since the file's first row; rows must not go
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
from array import array
from datetime import datetime, timezone
from typing import Any, Iterator, Literal

from pydantic import model_validator

from ..inputs import NonNegative, Positive, PositiveInt, Section
from ..models.request import RequestSpec
from .workload import MAX_REQUESTS, WorkloadError, validate

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
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
CHUNK_CHARS = 1 << 20  # how much of a ShareGPT JSON file is read at a time
BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens")


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


def _count(v: Any, what: str, where: str) -> int:
    """A token count: an integer >= 0 (CSV text or a JSON number)."""
    if isinstance(v, str):
        try:
            v = int(v)
        except ValueError:
            raise WorkloadError(f"{where}: {what} {v!r} is not an integer") from None
    elif isinstance(v, bool) or not isinstance(v, int):
        raise WorkloadError(f"{where}: {what} {v!r} is not an integer")
    if v < 0:
        raise WorkloadError(f"{where}: {what} must be >= 0, got {v}")
    return v


def _seconds(v: Any, what: str, where: str) -> float:
    """A finite time >= 0 (CSV text or a JSON number)."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise WorkloadError(f"{where}: {what} {v!r} is not a number") from None
    elif isinstance(v, bool) or not isinstance(v, (int, float)):
        raise WorkloadError(f"{where}: {what} {v!r} is not a number")
    if not math.isfinite(v) or v < 0:
        raise WorkloadError(f"{where}: {what} must be a finite number >= 0, got {v!r}")
    return float(v)


def _csv_rows(fh, path: str, columns: tuple[str, ...]) -> Iterator[tuple[str, list[str]]]:
    """(file:line, the named columns' text) for each data row; the header names the columns."""
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

def _azure_rows(fh, path: str):
    t0 = None
    for where, (ts, ctx, gen) in _csv_rows(fh, path, AZURE_COLUMNS):
        try:
            dt = datetime.fromisoformat(ts)
        except ValueError:
            raise WorkloadError(f"{where}: TIMESTAMP {ts!r} is not a date and time "
                                "(e.g. 2023-11-16 18:15:46.6805900)") from None
        dt = dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)  # naive (2023 traces): UTC
        t0 = dt if t0 is None else t0
        yield (where, (dt - t0).total_seconds(), ts, _count(ctx, "ContextTokens", where),
               _count(gen, "GeneratedTokens", where), ())


def _burstgpt_rows(fh, path: str, model: str | None = None):
    t0 = None
    for where, (ts, name, req, resp) in _csv_rows(fh, path, BURSTGPT_COLUMNS):
        t = _seconds(ts, "Timestamp", where)
        t0 = t if t0 is None else t0
        p, o = _count(req, "Request tokens", where), _count(resp, "Response tokens", where)
        if model is None or name == model:
            yield where, t - t0, ts, p, o, ()


def _mooncake_rows(fh, path: str, chunk_hash_size: int = 512):
    t0, n = None, 0
    for n, line in enumerate(fh, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(d, dict):
            raise WorkloadError(f"{where}: a request must be a JSON object, got {type(d).__name__}")
        for key in ("timestamp", "input_length", "output_length"):
            if key not in d:
                raise WorkloadError(f"{where}: missing field {key!r}")
        t = _seconds(d["timestamp"], "timestamp", where) / 1000.0  # milliseconds
        t0 = t if t0 is None else t0
        p, o = _count(d["input_length"], "input_length", where), _count(d["output_length"], "output_length", where)
        hash_ids = d.get("hash_ids", [])
        if not isinstance(hash_ids, list) or any(isinstance(h, bool) or not isinstance(h, int) for h in hash_ids):
            raise WorkloadError(f"{where}: hash_ids must be a list of integers, got {hash_ids!r}")
        blocks = -(-p // chunk_hash_size)
        if len(hash_ids) > blocks:
            raise WorkloadError(f"{where}: {len(hash_ids)} hash_ids for input_length {p}, more than "
                                f"ceil(input_length / chunk_hash_size) = {blocks} (chunk_hash_size {chunk_hash_size}: "
                                "Mooncake's traces hash 512-token blocks; set the trace's block size)")
        yield where, t - t0, d["timestamp"], p, o, tuple(hash_ids)
    if n == 0:
        raise WorkloadError(f"{path}: empty file (expected one JSON request per line)")


ROWS = {"azure": _azure_rows, "mooncake": _mooncake_rows, "burstgpt": _burstgpt_rows}


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


def _select(rows, path: str, *, start=0.0, duration=None, time_scale=None, rate=None, max_requests=None,
            over_length="refuse", max_model_len=None, chunk_hash_size=512) -> tuple[RequestSpec, ...]:
    arrivals, prompts, outputs, blocks = array("d"), array("q"), array("q"), []  # compact until the specs
    prev, read, skipped = None, 0, 0
    limit = min(max_requests or MAX_REQUESTS + 1, MAX_REQUESTS + 1)
    for where, t, raw, p, o, hash_ids in rows:
        read += 1
        if prev is not None and t < prev[0]:
            raise WorkloadError(f"{where}: timestamp {raw!r} is earlier than line {prev[1]}'s {prev[2]!r}: "
                                "timestamps must not decrease (sort the file by time)")
        prev = (t, where.rsplit(":", 1)[1], raw)
        if t < start:
            continue
        if duration is not None and t >= start + duration:
            break
        lengths = _lengths(where, p, o, over_length, max_model_len)
        if lengths is None:
            skipped += 1
            continue
        p, o = lengths
        arrivals.append(t - start)
        prompts.append(p)
        outputs.append(o)
        blocks.append(hash_ids[:-(-p // chunk_hash_size)])
        if len(arrivals) >= limit:
            break
    if len(arrivals) > MAX_REQUESTS:
        raise WorkloadError(f"{path}: more than {MAX_REQUESTS:,} requests selected (set max_requests or a window)")
    if not arrivals:
        end = "the end" if duration is None else f"{start + duration:g} s"
        raise WorkloadError(f"{path}: no requests selected ({read} rows read, {skipped} of the window "
                            f"[{start:g} s, {end}) skipped: a zero length or over_length)")
    scale = 1.0 if time_scale is None else time_scale
    if rate is not None:
        span = arrivals[-1] - arrivals[0]
        if span <= 0:
            raise WorkloadError(f"{path}: cannot scale to rate {rate:g} req/s: the {len(arrivals)} selected "
                                "requests arrive at the same time")
        scale = (len(arrivals) - 1) / span / rate
    return validate([RequestSpec(f"r{i}", round(a * scale, 6), p, o, hash_ids=h, chunk_hash_size=chunk_hash_size)
                     for i, (a, p, o, h) in enumerate(zip(arrivals, prompts, outputs, blocks))])


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


def _sharegpt(path: str, *, rate, max_requests=None, chars_per_token=4.0, over_length="refuse",
              max_model_len=None, seed=0) -> tuple[RequestSpec, ...]:
    limit = min(max_requests or MAX_REQUESTS + 1, MAX_REQUESTS + 1)
    rng = random.Random(seed)
    out, now, read = [], 0.0, 0
    with _open(path) as fh:
        for line, entry in _reading(path, _json_array_items(fh, path)):
            where = f"{path}:{line}"
            read += 1
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
                texts.append(math.ceil(len(text) / chars_per_token))
            lengths = _lengths(where, texts[0], texts[1], over_length, max_model_len)
            if lengths is None:
                continue
            now += rng.expovariate(rate)
            out.append(RequestSpec(f"r{len(out)}", round(now, 6), *lengths))
            if len(out) >= limit:
                break
    if len(out) > MAX_REQUESTS:
        raise WorkloadError(f"{path}: more than {MAX_REQUESTS:,} requests selected (set max_requests)")
    if not out:
        raise WorkloadError(f"{path}: no requests selected ({read} entries read: none with two non-empty turns "
                            "that fit)")
    return validate(out)


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
         max_model_len: int | None = None) -> tuple[RequestSpec, ...]:
    """The workload a checked trace-file section `w` (a schema of WORKLOADS) gives."""
    opts = w.model_dump(exclude={"kind", "path"})
    if isinstance(w, ShareGPT):
        return _sharegpt(w.path, **opts, max_model_len=max_model_len, seed=seed)
    fmt = {k: opts.pop(k) for k in ("chunk_hash_size", "model") if k in opts}
    if fmt.get("model") is None:
        fmt.pop("model", None)
    with _open(w.path) as fh:
        return _select(_reading(w.path, ROWS[w.kind](fh, w.path, **fmt)), w.path, **opts, max_model_len=max_model_len,
                       chunk_hash_size=fmt.get("chunk_hash_size", 512))
