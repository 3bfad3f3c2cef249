"""The EC (encoder-cache) connector's prefetch model: PR #41627's non-blocking lookup.

Each multimodal item's encoder output lives in a remote store (``MMItem.prefetch`` is not
``None``). The first time the scheduler asks for a request's item (``ensure_cache_available``),
the connector starts staging it for that request; it is ready ``prefetch`` seconds later (plus any ``ec_prefetch_stall`` from
the fault plan). An ``ec_prefetch_fail`` makes the prefetch fail: the request stops waiting
and the item is encoded locally (``has_cache_item`` is False).

:class:`PrefetchSchedule` is the shared ground truth of when items become ready on the virtual
clock; the simulated connector here and the real connector subclass in the real driver both
consult it, so both sides see the same readiness at the same times and only the scheduler's
use of it is compared.
"""

from __future__ import annotations

import heapq
from typing import Iterable

from .request import RequestSpec


class PrefetchSchedule:
    """When each request's EC items are staged (or fail), on the virtual clock.

    Staging is per (request, item): a request's encoder outputs are fetched for that request,
    starting the first time the scheduler asks (``ensure``). ``has_item`` is per identifier: the
    item can be loaded once any staging of it has landed (and it did not fail). A run adds each
    request as it pulls it from the workload (:meth:`add`), before it arrives, and drops it once it
    is done (:meth:`finished`): the schedule holds the requests in flight, not the workload.
    """

    def __init__(self, workload: Iterable[RequestSpec] = ()):
        self.latency: dict[tuple[str, str], float | None] = {}
        self.items: dict[str, tuple[str, ...]] = {}  # request -> its item identifiers (requests with items)
        for spec in workload:
            self.add(spec)
        self.stalled: dict[str, float] = {}  # identifier ("*": every one) -> extra staging seconds
        self.failed: set[str] = set()        # identifiers ("*": every one) whose staging fails (encode locally)
        self.ready_at: dict[tuple[str, str], float] = {}   # started stagings -> ready time
        self.landed: dict[str, float] = {}                 # identifier -> earliest ready time
        self._ready: list[float] = []  # heap of the started stagings' ready times, done requests' too

    def add(self, spec: RequestSpec) -> None:
        """A request's items (an open workload adds each request as a router sends it)."""
        if spec.mm:
            self.items[spec.req_id] = tuple(m.identifier for m in spec.mm)
        for m in spec.mm:
            self.latency[(spec.req_id, m.identifier)] = m.prefetch

    def finished(self, req_id: str) -> None:
        """Request `req_id` is done: its items and stagings are dropped; a staging still in flight
        keeps its wake-up (:meth:`next_event`), and what landed stays loadable (``has_item``)."""
        for ident in self.items.pop(req_id, ()):
            key = (req_id, ident)
            self.latency.pop(key, None)
            self.ready_at.pop(key, None)

    # ---- fault hooks (faults/sim_injector.py) ----------------------------------------------

    def stall(self, item: str, delay: float) -> None:
        """Staging of ``item`` (``"*"``: every item) takes ``delay`` seconds longer."""
        self.stalled[item] = self.stalled.get(item, 0.0) + delay

    def fail(self, item: str) -> None:
        """Staging of ``item`` (``"*"``: every item) fails: the request encodes it locally."""
        self.failed.add(item)

    # ---- the connector's view -----------------------------------------------------------

    def ensure(self, req_id: str, ident: str, now: float) -> bool:
        """True when nothing needs waiting for: staged, failed (encode locally) or not remote."""
        key = (req_id, ident)
        at = self.ready_at.get(key)
        if at is None:
            lat = self.latency.get(key)
            if lat is None:
                return True
            stalled = self.stalled
            at = self.ready_at[key] = now + lat + (stalled.get(ident, 0.0) + stalled.get("*", 0.0) if stalled else 0.0)
            heapq.heappush(self._ready, at)
            if ident not in self.failed and "*" not in self.failed and at < self.landed.get(ident, float("inf")):
                self.landed[ident] = at
        return now >= at

    def has_item(self, ident: str, now: float) -> bool:
        """The item can be loaded from the remote store now."""
        at = self.landed.get(ident)
        return at is not None and now >= at

    def next_event(self, now: float) -> float | None:
        """The earliest future time a started staging completes (the engine's wake-up)."""
        ready = self._ready
        while ready and ready[0] <= now:
            heapq.heappop(ready)
        return ready[0] if ready else None


# Policies of ensure_cache_available: which features a request waits for.
EC_POLICIES = ("future-only", "all-features")


class ECConnector:
    """The scheduler side of an EC connector with asynchronous prefetch (sim)."""

    def __init__(self, schedule: PrefetchSchedule, policy: str = "future-only"):
        if policy not in EC_POLICIES:
            raise ValueError(f"unknown EC policy {policy!r} (known: {', '.join(EC_POLICIES)})")
        self.schedule = schedule
        self.policy = policy
        self.now = 0.0

    def ensure_cache_available(self, req, num_computed_tokens: int) -> bool:
        """PR #41627: only features ending after num_computed_tokens need their cache."""
        now, ensure, rid = self.now, self.schedule.ensure, req.req_id
        ready = True
        for m in req.mm:
            if self.policy == "future-only" and m.offset + m.length <= num_computed_tokens:
                continue
            ready = ensure(rid, m.identifier, now) and ready  # start every prefetch, not only the first
        return ready

    def has_cache_item(self, identifier: str) -> bool:
        return self.schedule.has_item(identifier, self.now)
