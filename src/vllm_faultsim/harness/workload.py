"""Workloads: Poisson and bursty arrivals with length distributions, and JSONL trace replay.

A workload is a tuple of :class:`RequestSpec` sorted by arrival. Both the simulator and the
real drivers consume the same specs, so both sides see the same prompts (token ids are a pure
function of the spec, see :func:`prompt_token_ids`), multimodal items and output lengths.
"""

from __future__ import annotations

import codecs
import gzip
import json
import math
import random
from array import array
from pathlib import Path
from typing import Annotated, Any, Iterable, Iterator, Literal, Sequence

from pydantic import AfterValidator, Field, TypeAdapter, ValidationError, model_validator

from ..inputs import Fraction, NonNegative, NonNegativeInt, Positive, PositiveInt, Section, bounds, checked, problem_line
from ..models.request import MMItem, RequestSpec

class WorkloadError(ValueError):
    """An invalid workload description; the message is one line."""


MAX_REQUESTS = 10_000_000   # a generated workload larger than this is refused (memory: the specs are built up front)


def _expected(n: float, what: str) -> None:
    if n > MAX_REQUESTS:
        raise WorkloadError(f"{what} would generate about {n:.3g} requests (at most {MAX_REQUESTS:,}: "
                            "split the run, or replay a JSONL workload)")


# ---- length distributions -------------------------------------------------------------------

LengthBounds = bounds(PositiveInt)
SecondsBounds = bounds(NonNegative)


class Uniform(Section):
    uniform: LengthBounds


class LognormalParams(Section):
    median: Positive
    sigma: NonNegative
    max: PositiveInt = 1 << 30


class Lognormal(Section):
    lognormal: LognormalParams


def _member(spec: Any, schema: type[Section]) -> Section:
    try:
        return schema.model_validate(spec)
    except ValidationError as exc:
        raise ValueError(problem_line(exc, "", schema)) from None


def _length(spec: Any) -> Any:
    """int -> fixed; {"uniform": [lo, hi]}; {"lognormal": {"median": m, "sigma": s, "max": x}}: the
    member of the union its form names, checked by that member's schema."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"a length must be >= 1, got {spec}")
        return spec
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("uniform", "lognormal"):
        return _member(spec, Uniform if "uniform" in spec else Lognormal)
    raise ValueError(f"unknown length distribution {spec!r} (use an int, "
                     "{uniform: [lo, hi]} or {lognormal: {median, sigma, max}})")


Length = Annotated[Any, AfterValidator(_length)]


def length_sampler(spec: Any):
    """A sampler (rng -> tokens) of a checked length (``Length``)."""
    if isinstance(spec, int):
        return lambda rng: spec
    if isinstance(spec, Uniform):
        lo, hi = spec.uniform
        return lambda rng: rng.randint(lo, hi)
    mu, sigma, mx = math.log(spec.lognormal.median), spec.lognormal.sigma, spec.lognormal.max
    return lambda rng: max(1, min(mx, int(round(rng.lognormvariate(mu, sigma)))))


# ---- generators -----------------------------------------------------------------------------

class PrefetchUniform(Section):
    uniform: SecondsBounds


def _prefetch(spec: Any) -> float | PrefetchUniform:
    """Seconds (a finite number >= 0) or ``{uniform: [lo, hi]}`` seconds."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not math.isfinite(spec) or spec < 0:
            raise ValueError(f"prefetch seconds must be finite and >= 0, got {spec!r}")
        return float(spec)
    if isinstance(spec, dict):
        return _member(spec, PrefetchUniform)
    raise ValueError(f"expected seconds or {{uniform: [lo, hi]}}, got {spec!r}")


class MMConfig(Section):
    """Multimodal mix: a fraction of requests carry one image of `tokens` placeholder tokens."""

    fraction: Fraction = 0.0
    tokens: PositiveInt = 100
    prefetch: Annotated[Any, AfterValidator(_prefetch)] = 0.05  # seconds, or {"uniform": [lo, hi]} in seconds
    offset: NonNegativeInt = 0
    reuse: Fraction = 0.0  # probability an image repeats an earlier identifier (encoder-cache hits)


def _prefetch_sampler(spec: float | PrefetchUniform):
    if isinstance(spec, PrefetchUniform):
        lo, hi = spec.uniform
        return lambda rng: rng.uniform(lo, hi)
    return lambda rng: spec


class Poisson(Section):
    """Poisson arrivals at `rate` req/s for `duration` seconds or `num_requests` requests."""

    kind: Literal["poisson"] = "poisson"
    rate: Positive
    duration: Positive | None = None
    num_requests: Annotated[int, Field(ge=1, le=MAX_REQUESTS)] | None = None
    prompt: Length = 512
    output: Length = 128
    mm: MMConfig | None = None
    start: NonNegative = 0.0

    @model_validator(mode="after")
    def _one_end(self):
        if (self.duration is None) == (self.num_requests is None):
            raise ValueError("give exactly one of duration or num_requests")
        if self.duration is not None:
            _expected(self.rate * self.duration, f"rate {self.rate:g} req/s for {self.duration:g} s")
        return self


class Bursty(Section):
    """On/off (two-state) arrivals: `rate_high` for `on` seconds, then `rate_low` for `off` seconds."""

    kind: Literal["bursty"] = "bursty"
    rate_high: Positive
    rate_low: NonNegative
    on: Positive
    off: Positive
    duration: Positive
    prompt: Length = 512
    output: Length = 128
    mm: MMConfig | None = None

    @model_validator(mode="after")
    def _bounded(self):
        rate = max(self.rate_high, self.rate_low)
        _expected(rate * self.duration, f"rate {rate:g} req/s for {self.duration:g} s")
        return self


def _attach_mm(rng: random.Random, i: int, prompt_len: int, mm: MMConfig, seen: array, sample_prefetch):
    """The image of request `i`, if it carries one; `seen` holds the request numbers of the images so far."""
    if mm.fraction <= 0 or rng.random() >= mm.fraction or prompt_len < mm.offset + mm.tokens + 1:
        return ()
    if seen and rng.random() < mm.reuse:
        ident = f"img{seen[rng.randrange(len(seen))]}"
    else:
        ident = f"img{i}"
        seen.append(i)
    return (MMItem(ident, mm.offset, mm.tokens, round(sample_prefetch(rng), 6)),)


def generate(w: Poisson | Bursty, seed: int = 0) -> tuple[RequestSpec, ...]:
    """The requests of a checked generated workload, from `seed` (:func:`iter_requests`, all at once)."""
    return tuple(iter_requests(w, seed))


def iter_requests(w: Poisson | Bursty, seed: int = 0) -> Iterator[RequestSpec]:
    """The requests of a checked generated workload, from `seed`, one at a time in arrival order
    (what a run pulls as its clock reaches them: the workload is never held whole)."""
    rng = random.Random(seed)
    sp, so = length_sampler(w.prompt), length_sampler(w.output)
    mm = w.mm or MMConfig()
    spf = _prefetch_sampler(mm.prefetch)
    seen = array("q")
    spans = ([(w.start, w.start + w.duration if w.duration is not None else math.inf, w.rate)]
             if isinstance(w, Poisson) else _bursts(w))
    limit = w.num_requests if isinstance(w, Poisson) and w.num_requests is not None else math.inf
    expovariate = rng.expovariate
    i = 0
    for start, end, rate in spans:
        now = start
        while rate > 0 and i < limit:
            now += expovariate(rate)
            if now >= end:
                break
            p = sp(rng)
            yield RequestSpec(f"r{i}", round(now, 6), p, so(rng), _attach_mm(rng, i, p, mm, seen, spf))
            i += 1


class Generated:
    """A checked generated workload as an iterable of its requests: each pass generates them again,
    lazily, from the same seed (the same requests every pass)."""

    def __init__(self, w: Poisson | Bursty, seed: int = 0):
        self.w, self.seed = w, seed

    def __iter__(self) -> Iterator[RequestSpec]:
        return iter_requests(self.w, self.seed)


def _bursts(w: Bursty) -> list[tuple[float, float, float]]:
    """A bursty workload's spans (start, end, rate): `rate_high` for `on` s, `rate_low` for `off` s, ..."""
    spans, t0, high = [], 0.0, True
    while t0 < w.duration:
        rate, span = (w.rate_high, w.on) if high else (w.rate_low, w.off)
        end = min(t0 + span, w.duration)
        spans.append((t0, end, rate))
        t0, high = end, not high
    return spans


def poisson(rate: float, *, seed: int = 0, **fields: Any) -> tuple[RequestSpec, ...]:
    """Poisson arrivals at `rate` req/s (the fields of :class:`Poisson`), checked by its schema."""
    return generate(checked(Poisson, {"rate": rate, **fields}, "", WorkloadError), seed)


def bursty(rate_high: float, rate_low: float, *, seed: int = 0, **fields: Any) -> tuple[RequestSpec, ...]:
    """On/off arrivals (the fields of :class:`Bursty`), checked by its schema."""
    return generate(checked(Bursty, {"rate_high": rate_high, "rate_low": rate_low, **fields}, "", WorkloadError), seed)


# ---- JSONL replay ---------------------------------------------------------------------------

class MMLine(Section):
    """A multimodal item of a JSONL request: placeholder tokens [offset, offset + length) of the
    prompt; its EC prefetch takes `prefetch` seconds (null: no prefetch)."""

    id: str
    offset: NonNegativeInt
    length: PositiveInt
    prefetch: NonNegative | None = 0.0


class RequestLine(Section):
    """One request of a JSONL replay (see RequestSpec)."""

    id: str | None = None
    arrival: NonNegative
    prompt_tokens: PositiveInt
    output_tokens: PositiveInt
    mm: list[MMLine] | None = None
    prefix: Annotated[list[NonNegativeInt], Field(min_length=2, max_length=2)] | None = None  # [group, length]
    stop_at: int | None = None
    hash_ids: list[int] = []
    chunk_hash_size: PositiveInt = 512


REQUEST_LINE = TypeAdapter(RequestLine)


def load_jsonl(path: str | Path) -> tuple[RequestSpec, ...]:
    """Replay a JSONL trace: one request per line (:class:`RequestLine`), each checked by its schema
    as it is parsed; a problem names ``FILE:LINE``. All of it, sorted by arrival (:func:`validate`)."""
    specs = list(_jsonl_specs(path))
    try:
        return validate(specs)
    except WorkloadError as exc:
        raise WorkloadError(f"{path}: {exc}") from None


def jsonl_workload(path: str | Path) -> Iterable[RequestSpec]:
    """A JSONL replay checked in one streamed pass (:func:`load_jsonl`'s checks and messages): a file
    already in arrival order is a :class:`JsonlReplay`, read again as a run pulls it; another is
    read whole and sorted (:func:`load_jsonl`)."""
    ids: set[str] = set()
    last = -math.inf
    for s in _jsonl_specs(path):
        if s.arrival < last:
            return load_jsonl(path)
        last = s.arrival
        try:
            _check_spec(s, ids)
        except WorkloadError as exc:
            raise WorkloadError(f"{path}: {exc}") from None
    return JsonlReplay(path, max(last, 0.0))


class JsonlReplay:
    """A checked JSONL replay in arrival order as an iterable of its requests: each pass reads the
    file again, one line at a time; ``last_arrival`` is its last request's (0 for none)."""

    def __init__(self, path: str | Path, last_arrival: float):
        self.path, self.last_arrival = path, last_arrival

    def __iter__(self) -> Iterator[RequestSpec]:
        return _jsonl_specs(self.path)


def _jsonl_specs(path: str | Path) -> Iterator[RequestSpec]:
    """The requests of a JSONL file in file order, each checked by its schema as it is read."""
    for k, (_, d) in enumerate(schema_lines(path, REQUEST_LINE, RequestLine)):
        yield _spec(d, f"r{k}")


def schema_lines(path: str | Path, adapter: TypeAdapter, schema: Any) -> Iterator[tuple[int, Any]]:
    """(line number, the line checked by `adapter`, of `schema`) for each non-blank line of a JSONL
    file (:func:`json_lines`); a bad line raises ``FILE:LINE: field: problem (got VALUE)``."""
    for n, line in json_lines(path):
        try:
            yield n, adapter.validate_json(line)
        except ValidationError as exc:
            e = exc.errors(include_url=False)[0]
            if e["type"] == "json_invalid":
                raise WorkloadError(f"{path}:{n}: not valid JSON ({e['ctx']['error']})") from None
            raise WorkloadError(problem_line(exc, f"{path}:{n}", schema)) from None


def json_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a UTF-8 JSONL file (a ``.gz`` of one too; a byte-order mark is
    skipped), numbered as ``str.splitlines`` numbers them, read one at a time."""
    try:
        with (gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as fh:
            n = offset = 0
            for raw in fh:
                start = 3 if offset == 0 and raw.startswith(codecs.BOM_UTF8) else 0
                try:
                    text = raw[start:].decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise WorkloadError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                                        f"{offset + start + exc.start}): a workload is a UTF-8 JSONL file, one "
                                        "request per line") from None
                offset += len(raw)
                for piece in text.splitlines():
                    n += 1
                    if piece.strip():
                        yield n, piece
    except (OSError, EOFError) as exc:
        raise WorkloadError(f"{path}: cannot read workload ({getattr(exc, 'strerror', None) or exc})") from None


def spec_from_dict(d: Any, default_id: str) -> RequestSpec:
    """The request of a JSONL line's mapping `d` (:class:`RequestLine`); id `default_id` if it has none."""
    return _spec(checked(RequestLine, d, "", WorkloadError), default_id)


def _spec(d: RequestLine, default_id: str) -> RequestSpec:
    mm = tuple(MMItem(m.id, m.offset, m.length, m.prefetch) for m in d.mm or ())
    return RequestSpec(d.id if d.id is not None else default_id, d.arrival, d.prompt_tokens, d.output_tokens, mm,
                       tuple(d.prefix) if d.prefix is not None else None, d.stop_at, tuple(d.hash_ids),
                       d.chunk_hash_size)


def validate(specs: Sequence[RequestSpec]) -> tuple[RequestSpec, ...]:
    """Check ids are unique and multimodal items fit their prompt; sort by arrival (stable)."""
    ids: set[str] = set()
    for s in specs:
        _check_spec(s, ids)
    return tuple(sorted(specs, key=lambda s: s.arrival))


def _check_spec(s: RequestSpec, ids: set[str]) -> None:
    """:func:`validate`'s checks of one request; `ids` holds the ids before it (and gets its own)."""
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
