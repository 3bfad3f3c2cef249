"""Workloads: Poisson and bursty arrivals with length distributions, and JSONL trace replay.

A workload is a tuple of :class:`RequestSpec` sorted by arrival. Both the simulator and the
real drivers consume the same specs, so both sides see the same prompts (token ids are a pure
function of the spec, see :func:`prompt_token_ids`), multimodal items and output lengths.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..models.request import MMItem, RequestSpec

class WorkloadError(ValueError):
    """An invalid workload description; the message is one line."""


MAX_REQUESTS = 10_000_000   # a generated workload larger than this is refused (memory: the specs are built up front)


def _number(v: Any, what: str, *, lo: float = 0.0, lo_open: bool = False, hi: float = math.inf) -> float:
    """A finite real number in [lo, hi] (``lo_open``: (lo, hi]), or a one-line WorkloadError."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise WorkloadError(f"{what} must be a number, got {v!r}")
    if not math.isfinite(v):
        raise WorkloadError(f"{what} must be a finite number, got {v!r}")
    if v < lo or (lo_open and v == lo) or v > hi:
        bounds = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi < math.inf else "")
        raise WorkloadError(f"{what} must be {bounds}, got {v!r}")
    return float(v)


def _expected(n: float, what: str) -> None:
    if n > MAX_REQUESTS:
        raise WorkloadError(f"{what} would generate about {n:.3g} requests (at most {MAX_REQUESTS:,}: "
                            "split the run, or replay a JSONL workload)")


# ---- length distributions -------------------------------------------------------------------

def length_sampler(spec: Any, what: str):
    """int -> fixed; {"uniform": [lo, hi]}; {"lognormal": {"median": m, "sigma": s, "max": x}}."""
    if isinstance(spec, bool):
        raise WorkloadError(f"{what}: a length must be an integer or a distribution, got {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise WorkloadError(f"{what}: length must be >= 1, got {spec}")
        return lambda rng: spec
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, arg), = spec.items()
        if kind == "uniform" and isinstance(arg, list) and len(arg) == 2 and all(isinstance(a, int) for a in arg):
            lo, hi = arg
            if not 1 <= lo <= hi:
                raise WorkloadError(f"{what}: uniform bounds must satisfy 1 <= lo <= hi, got {arg}")
            return lambda rng: rng.randint(lo, hi)
        if kind == "lognormal" and isinstance(arg, dict):
            unknown = sorted(set(arg) - {"median", "sigma", "max"})
            if unknown:
                raise WorkloadError(f"{what}: lognormal has no field {unknown[0]!r} (median, sigma, max)")
            try:
                median, sigma, mx = float(arg["median"]), float(arg["sigma"]), int(arg.get("max", 1 << 30))
            except (KeyError, TypeError, ValueError, OverflowError):
                raise WorkloadError(f"{what}: lognormal needs numeric 'median' and 'sigma' (and optional 'max')") from None
            _number(median, f"{what}: lognormal median", lo_open=True)
            _number(sigma, f"{what}: lognormal sigma")
            if mx < 1:
                raise WorkloadError(f"{what}: lognormal max must be >= 1, got {mx}")
            mu = math.log(median)
            return lambda rng: max(1, min(mx, int(round(rng.lognormvariate(mu, sigma)))))
    raise WorkloadError(f"{what}: unknown length distribution {spec!r} (use an int, "
                        "{uniform: [lo, hi]} or {lognormal: {median, sigma, max}})")


# ---- generators -----------------------------------------------------------------------------

@dataclass(frozen=True)
class MMConfig:
    """Multimodal mix: a fraction of requests carry one image of `tokens` placeholder tokens."""

    fraction: float = 0.0
    tokens: int = 100
    prefetch: Any = 0.05  # seconds, or {"uniform": [lo, hi]} in seconds
    offset: int = 0
    reuse: float = 0.0  # probability an image repeats an earlier identifier (encoder-cache hits)


def _prefetch_sampler(spec: Any):
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        x = _number(spec, "mm.prefetch (seconds)")
        return lambda rng: x
    if isinstance(spec, dict) and set(spec) == {"uniform"}:
        arg = spec["uniform"]
        if not (isinstance(arg, list) and len(arg) == 2):
            raise WorkloadError(f"mm.prefetch: uniform needs [lo, hi] seconds, got {arg!r}")
        lo, hi = (_number(a, "mm.prefetch: uniform bound (seconds)") for a in arg)
        if lo > hi:
            raise WorkloadError(f"mm.prefetch: uniform bounds must satisfy lo <= hi, got {arg!r}")
        return lambda rng: rng.uniform(lo, hi)
    raise WorkloadError(f"mm.prefetch: expected seconds or {{uniform: [lo, hi]}}, got {spec!r}")


def mm_config(d: Any) -> MMConfig:
    """An :class:`MMConfig` from a workload's ``mm`` mapping (unknown keys and bad values named)."""
    if not isinstance(d, dict):
        raise WorkloadError(f"mm must be a mapping (fraction, tokens, prefetch, offset, reuse), got {d!r}")
    known = ("fraction", "tokens", "prefetch", "offset", "reuse")
    unknown = sorted(set(d) - set(known), key=str)
    if unknown:
        raise WorkloadError(f"mm has no field {unknown[0]!r} (fields: {', '.join(known)})")
    for key in ("fraction", "reuse"):
        if key in d:
            _number(d[key], f"mm.{key}", hi=1.0)
    for key in ("tokens", "offset"):
        if key in d and (isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < (key == "tokens")):
            raise WorkloadError(f"mm.{key} must be an integer >= {int(key == 'tokens')}, got {d[key]!r}")
    cfg = MMConfig(**d)
    _prefetch_sampler(cfg.prefetch)
    return cfg


def _attach_mm(rng: random.Random, i: int, prompt_len: int, mm: MMConfig, seen: list[str], sample_prefetch):
    if mm.fraction <= 0 or rng.random() >= mm.fraction or prompt_len < mm.offset + mm.tokens + 1:
        return ()
    if seen and rng.random() < mm.reuse:
        ident = seen[rng.randrange(len(seen))]
    else:
        ident = f"img{i}"
        seen.append(ident)
    return (MMItem(ident, mm.offset, mm.tokens, round(sample_prefetch(rng), 6)),)


def poisson(rate: float, *, duration: float | None = None, num_requests: int | None = None,
            prompt: Any = 512, output: Any = 128, seed: int = 0, mm: MMConfig | None = None,
            start: float = 0.0) -> tuple[RequestSpec, ...]:
    """Poisson arrivals at `rate` req/s for `duration` seconds or `num_requests` requests."""
    rate = _number(rate, "rate (req/s)", lo_open=True)
    if (duration is None) == (num_requests is None):
        raise WorkloadError("give exactly one of duration or num_requests")
    if duration is not None:
        duration = _number(duration, "duration (s)", lo_open=True)
        _expected(rate * duration, f"rate {rate:g} req/s for {duration:g} s")
    elif isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1:
        raise WorkloadError(f"num_requests must be an integer >= 1, got {num_requests!r}")
    else:
        _expected(num_requests, f"num_requests {num_requests}")
    start = _number(start, "start (s)")
    rng = random.Random(seed)
    sp, so = length_sampler(prompt, "prompt"), length_sampler(output, "output")
    mm = mm or MMConfig()
    spf = _prefetch_sampler(mm.prefetch)
    out, seen, now = [], [], start
    while True:
        now += rng.expovariate(rate)
        if duration is not None and now >= start + duration:
            break
        i = len(out)
        if num_requests is not None and i >= num_requests:
            break
        p = sp(rng)
        out.append(RequestSpec(f"r{i}", round(now, 6), p, so(rng), _attach_mm(rng, i, p, mm, seen, spf)))
    return tuple(out)


def bursty(rate_high: float, rate_low: float, *, on: float, off: float, duration: float,
           prompt: Any = 512, output: Any = 128, seed: int = 0, mm: MMConfig | None = None) -> tuple[RequestSpec, ...]:
    """On/off (two-state) arrivals: `rate_high` for `on` seconds, then `rate_low` for `off` seconds."""
    rate_high = _number(rate_high, "rate_high (req/s)", lo_open=True)
    rate_low = _number(rate_low, "rate_low (req/s)")
    on, off = _number(on, "on (s)", lo_open=True), _number(off, "off (s)", lo_open=True)
    duration = _number(duration, "duration (s)", lo_open=True)
    _expected(max(rate_high, rate_low) * duration, f"rate {max(rate_high, rate_low):g} req/s for {duration:g} s")
    rng = random.Random(seed)
    sp, so = length_sampler(prompt, "prompt"), length_sampler(output, "output")
    mm = mm or MMConfig()
    spf = _prefetch_sampler(mm.prefetch)
    out, seen = [], []
    t0, high = 0.0, True
    while t0 < duration:
        rate, span = (rate_high, on) if high else (rate_low, off)
        end = min(t0 + span, duration)
        now = t0
        while rate > 0:
            now += rng.expovariate(rate)
            if now >= end:
                break
            i = len(out)
            p = sp(rng)
            out.append(RequestSpec(f"r{i}", round(now, 6), p, so(rng), _attach_mm(rng, i, p, mm, seen, spf)))
        t0, high = end, not high
    return tuple(out)


# ---- JSONL replay ---------------------------------------------------------------------------

def load_jsonl(path: str | Path) -> tuple[RequestSpec, ...]:
    """Replay a JSONL trace: one request per line, fields ``arrival`` (s), ``prompt_tokens``,
    ``output_tokens``, optional ``id``, ``mm`` ([{id, offset, length, prefetch}]), ``prefix``
    ([group, length]), ``stop_at``, ``hash_ids`` and ``chunk_hash_size`` (see RequestSpec)."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read workload ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise WorkloadError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}): "
                         "a workload is a UTF-8 JSONL file, one request per line") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{where}: not valid JSON ({exc.msg})") from None
        try:
            out.append(spec_from_dict(d, default_id=f"r{len(out)}"))
        except WorkloadError as exc:
            raise WorkloadError(f"{where}: {exc}") from None
    return validate(out)


JSONL_FIELDS = ("id", "arrival", "prompt_tokens", "output_tokens", "mm", "prefix", "stop_at", "hash_ids",
                "chunk_hash_size")


def spec_from_dict(d: dict, default_id: str) -> RequestSpec:
    if not isinstance(d, dict):
        raise WorkloadError(f"a request must be an object, got {type(d).__name__}")
    for key in ("arrival", "prompt_tokens", "output_tokens"):
        if key not in d:
            raise WorkloadError(f"missing field {key!r}")
    unknown = sorted(set(d) - set(JSONL_FIELDS))
    if unknown:
        raise WorkloadError(f"unknown field {unknown[0]!r} (fields: {', '.join(JSONL_FIELDS)})")
    arrival = d["arrival"]
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not math.isfinite(arrival) or arrival < 0:
        raise WorkloadError(f"field 'arrival' must be a finite number >= 0, got {arrival!r}")
    for key in ("prompt_tokens", "output_tokens"):
        if isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < 1:
            raise WorkloadError(f"field {key!r} must be an integer >= 1, got {d[key]!r}")
    mm = []
    for j, m in enumerate(d.get("mm", []) or []):
        try:
            mm.append(MMItem(str(m["id"]), int(m["offset"]), int(m["length"]),
                             None if m.get("prefetch", 0.0) is None else float(m.get("prefetch", 0.0))))
        except (KeyError, TypeError, ValueError):
            raise WorkloadError(f"mm[{j}] needs id, offset, length (and optional prefetch seconds)") from None
        if mm[-1].prefetch is not None:
            _number(mm[-1].prefetch, f"mm[{j}].prefetch (seconds)")
    prefix = tuple(d["prefix"]) if d.get("prefix") is not None else None
    hash_ids = d.get("hash_ids", [])
    if not isinstance(hash_ids, list) or any(isinstance(h, bool) or not isinstance(h, int) for h in hash_ids):
        raise WorkloadError(f"field 'hash_ids' must be a list of integers, got {hash_ids!r}")
    size = d.get("chunk_hash_size", 512)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise WorkloadError(f"field 'chunk_hash_size' must be an integer >= 1, got {size!r}")
    return RequestSpec(str(d.get("id", default_id)), float(arrival), d["prompt_tokens"], d["output_tokens"],
                       tuple(mm), prefix, d.get("stop_at"), tuple(hash_ids), size)


def validate(specs: Sequence[RequestSpec]) -> tuple[RequestSpec, ...]:
    """Check ids are unique and multimodal items fit their prompt; sort by arrival (stable)."""
    ids = set()
    for s in specs:
        if s.req_id in ids:
            raise WorkloadError(f"duplicate request id {s.req_id!r}")
        ids.add(s.req_id)
        end = -1
        for m in s.mm:
            if m.offset < end or m.length < 1 or m.offset + m.length > s.prompt_len:
                raise WorkloadError(f"request {s.req_id}: mm item {m.identifier} must lie inside the prompt, "
                                    "sorted and non-overlapping")
            end = m.offset + m.length
        if s.stop_at is not None and not 1 <= s.stop_at <= s.output_len:
            raise WorkloadError(f"request {s.req_id}: stop_at must be in [1, output_tokens]")
    return tuple(sorted(specs, key=lambda s: s.arrival))


def spec_to_dict(s: RequestSpec) -> dict:
    """The JSONL replay form of a request (inverse of spec_from_dict)."""
    d: dict = {"id": s.req_id, "arrival": s.arrival, "prompt_tokens": s.prompt_len, "output_tokens": s.output_len}
    if s.mm:
        d["mm"] = [{"id": m.identifier, "offset": m.offset, "length": m.length, "prefetch": m.prefetch} for m in s.mm]
    if s.prefix is not None:
        d["prefix"] = list(s.prefix)
    if s.stop_at is not None:
        d["stop_at"] = s.stop_at
    if s.hash_ids:
        d["hash_ids"], d["chunk_hash_size"] = list(s.hash_ids), s.chunk_hash_size
    return d


def dump_jsonl(path: str | Path, specs: Sequence[RequestSpec]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for s in specs:
            fh.write(json.dumps(spec_to_dict(s), separators=(",", ":")) + "\n")
