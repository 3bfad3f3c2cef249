"""Serving metrics from a trace's ``req`` events: throughput, TTFT, TPOT, preemptions, failures."""

from __future__ import annotations

import math
from typing import Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (deterministic, no interpolation); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def summarize(req_events: Iterable[dict], *, steps: int, end: float) -> dict:
    ttft, tpot, e2e = [], [], []
    finished = failed = aborted = tokens = preemptions = 0
    first_arrival = None
    for e in req_events:
        first_arrival = e["arrival"] if first_arrival is None else min(first_arrival, e["arrival"])
        preemptions += e["preemptions"]
        if e["status"] == "failed":
            failed += 1
            continue
        if e["status"] == "aborted":
            aborted += 1
            continue
        finished += 1
        tokens += e["num_output"]
        ttft.append(e["first_token"] - e["arrival"])
        e2e.append(e["finish"] - e["arrival"])
        if e["num_output"] > 1:
            tpot.append((e["finish"] - e["first_token"]) / (e["num_output"] - 1))
    span = end - (first_arrival or 0.0)
    return {
        "requests": finished + failed + aborted,
        "finished": finished,
        "failed": failed,
        "aborted": aborted,
        "steps": steps,
        "sim_time_s": round(end, 6),
        "throughput_rps": round(finished / span, 4) if span > 0 else 0.0,
        "output_tok_s": round(tokens / span, 2) if span > 0 else 0.0,
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "tpot_p50_ms": _ms(percentile(tpot, 50)),
        "tpot_p99_ms": _ms(percentile(tpot, 99)),
        "e2e_p50_ms": _ms(percentile(e2e, 50)),
        "preemptions": preemptions,
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 3)


OVERLOAD_SLOPE = 0.05  # s of extra TTFT per s of arrivals: the backlog grows by >= 5% of what is served


def overloaded(req_events: Iterable[dict]) -> bool:
    """Whether the engine's queue grew without bound over the run: the time to first token of the
    requests that got one grows with their arrival time (least-squares slope >= OVERLOAD_SLOPE)
    and the last quarter of arrivals waits at least twice as long (median TTFT) as the first.
    A stable queue has a flat TTFT whatever its level; a run whose arrivals outpace the engine has
    one that rises until the arrivals stop. Needs 20 requests with a first token (else False)."""
    pts = sorted((e["arrival"], e["first_token"] - e["arrival"]) for e in req_events
                 if e.get("first_token") is not None and e["status"] not in ("failed", "aborted"))
    if len(pts) < 20:
        return False
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var <= 0:
        return False
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    q = len(pts) // 4
    first, last = sorted(ys[:q]), sorted(ys[-q:])
    return slope >= OVERLOAD_SLOPE and last[len(last) // 2] >= 2 * first[len(first) // 2]
