"""Serving metrics from a trace's ``req`` events: throughput, TTFT, TPOT, preemptions, failures.

:class:`Summary` takes the events one at a time as a run emits them and keeps only the numbers
the summary needs (a few floats per finished request), so a summary-only run keeps no event.
"""

from __future__ import annotations

import math
from array import array
from typing import Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (deterministic, no interpolation); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


class Summary:
    """The summary of the ``req`` events added so far (:meth:`add`, one per request as it leaves)."""

    __slots__ = ("ttft", "tpot", "e2e", "arrival", "finished", "failed", "aborted", "tokens", "preemptions",
                 "first_arrival")

    def __init__(self):
        self.ttft, self.tpot, self.e2e = array("d"), array("d"), array("d")
        self.arrival = array("d")  # of the finished requests, beside their ttft (for overloaded)
        self.finished = self.failed = self.aborted = self.tokens = self.preemptions = 0
        self.first_arrival: float | None = None

    def add(self, e: dict) -> None:
        arrival = e["arrival"]
        if self.first_arrival is None or arrival < self.first_arrival:
            self.first_arrival = arrival
        self.preemptions += e["preemptions"]
        status = e["status"]
        if status == "failed":
            self.failed += 1
            return
        if status == "aborted":
            self.aborted += 1
            return
        self.finished += 1
        n, first, finish = e["num_output"], e["first_token"], e["finish"]
        self.tokens += n
        self.ttft.append(first - arrival)
        self.arrival.append(arrival)
        self.e2e.append(finish - arrival)
        if n > 1:
            self.tpot.append((finish - first) / (n - 1))

    def overloaded(self) -> bool:
        """:func:`overloaded` of the requests added."""
        return _overloaded(sorted(zip(self.arrival, self.ttft)))

    def result(self, *, steps: int, end: float) -> dict:
        s = self
        finished, failed, aborted, tokens, preemptions = s.finished, s.failed, s.aborted, s.tokens, s.preemptions
        ttft, tpot, e2e = s.ttft, s.tpot, s.e2e
        span = end - (s.first_arrival or 0.0)
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


def summarize(req_events: Iterable[dict], *, steps: int, end: float) -> dict:
    s = Summary()
    for e in req_events:
        s.add(e)
    return s.result(steps=steps, end=end)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 3)


OVERLOAD_SLOPE = 0.05  # s of extra TTFT per s of arrivals: the backlog grows by >= 5% of what is served


def overloaded(req_events: Iterable[dict]) -> bool:
    """Whether the engine's queue grew without bound over the run: the time to first token of the
    requests that got one grows with their arrival time (least-squares slope >= OVERLOAD_SLOPE)
    and the last quarter of arrivals waits at least twice as long (median TTFT) as the first.
    A stable queue has a flat TTFT whatever its level; a run whose arrivals outpace the engine has
    one that rises until the arrivals stop. Needs 20 requests with a first token (else False)."""
    return _overloaded(sorted((e["arrival"], e["first_token"] - e["arrival"]) for e in req_events
                              if e.get("first_token") is not None and e["status"] not in ("failed", "aborted")))


def _overloaded(pts: list[tuple[float, float]]) -> bool:
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
