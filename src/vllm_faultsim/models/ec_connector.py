"""The EC (encoder-cache) connector's prefetch model: PR #41627's non-blocking lookup.

Each multimodal item's encoder output lives in a remote store (``MMItem.prefetch`` is not
``None``). The first time the scheduler asks for it (``ensure_cache_available``), the connector
starts staging it; it is ready ``prefetch`` seconds later (plus any ``ec_prefetch_stall`` from
the fault plan). An ``ec_prefetch_fail`` makes the prefetch fail: the request stops waiting
and the item is encoded locally (``has_cache_item`` is False).

:class:`PrefetchSchedule` is the shared ground truth of when items become ready on the virtual
clock; the simulated connector here and the real connector subclass in the real driver both
consult it, so both sides see the same readiness at the same times and only the scheduler's
use of it is compared.
"""

from __future__ import annotations

from ..faults.plan import FaultPlan
from ..harness.workload import RequestSpec


class PrefetchSchedule:
    """When each EC item is ready (or failed), on the virtual clock."""

    def __init__(self, workload: tuple[RequestSpec, ...], plan: FaultPlan | None = None):
        self.latency: dict[str, float | None] = {}
        for spec in workload:
            for m in spec.mm:
                self.latency.setdefault(m.identifier, m.prefetch)
        self.stall: dict[str, float] = {}
        self.fail: set[str] = set()
        for f in (plan.of_kind("ec_prefetch_stall", "ec_prefetch_fail") if plan else ()):
            targets = self.latency if f.item == "*" else [f.item]
            for ident in targets:
                if f.kind == "ec_prefetch_stall":
                    self.stall[ident] = self.stall.get(ident, 0.0) + f.delay
                else:
                    self.fail.add(ident)
        self.ready_at: dict[str, float] = {}  # started prefetches: identifier -> ready time

    def _start(self, ident: str, now: float) -> float | None:
        at = self.ready_at.get(ident)
        if at is None:
            lat = self.latency.get(ident)
            if lat is None:
                return None
            at = self.ready_at[ident] = now + lat + self.stall.get(ident, 0.0)
        return at

    def ensure(self, ident: str, now: float) -> bool:
        """True when nothing needs waiting for: ready, failed (encode locally) or not remote."""
        at = self._start(ident, now)
        return at is None or now >= at

    def has_item(self, ident: str, now: float) -> bool:
        """The item can be loaded from the remote store now."""
        at = self.ready_at.get(ident)
        return at is not None and now >= at and ident not in self.fail

    def next_event(self, now: float) -> float | None:
        """The earliest future time an in-flight prefetch completes (the engine's wake-up)."""
        future = [at for at in self.ready_at.values() if at > now]
        return min(future) if future else None


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
        now, ensure = self.now, self.schedule.ensure
        ready = True
        for m in req.mm:
            if self.policy == "future-only" and m.offset + m.length <= num_computed_tokens:
                continue
            ready = ensure(m.identifier, now) and ready  # start every prefetch, not only the first
        return ready

    def has_cache_item(self, identifier: str) -> bool:
        return self.schedule.has_item(identifier, self.now)
