"""The engine's arrival queue: the requests not yet added to the core, pulled one at a time.

The workload is an iterable of ``RequestSpec`` in arrival order, read lazily: the queue holds one
request ahead (``head``, due at ``next_at``), so a run keeps what is in flight, never the whole
workload. Requests submitted to an open workload (a router's, models/cluster.py) come after the
workload's own.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Iterable

from .request import RequestSpec


class Arrivals:
    __slots__ = ("_it", "_submitted", "_reaching", "head", "next_at")

    def __init__(self, workload: Iterable[RequestSpec], reaching: Callable[[RequestSpec], RequestSpec]):
        """`reaching` maps a request as the client sent it to the request as the core receives it."""
        self._it = iter(workload)
        self._submitted: deque[RequestSpec] = deque()
        self._reaching = reaching
        self.head: RequestSpec | None = None  # the next request to arrive
        self.next_at = math.inf  # its arrival (inf: none yet)
        self._set(self._pull())

    def _pull(self) -> RequestSpec | None:
        spec = next(self._it, None)
        if spec is not None:
            return self._reaching(spec)
        return self._submitted.popleft() if self._submitted else None

    def _set(self, spec: RequestSpec | None) -> None:
        self.head = spec
        self.next_at = spec.arrival if spec is not None else math.inf

    def pop(self) -> RequestSpec:
        """The head, which leaves the queue; the next request becomes the head."""
        spec = self.head
        self._set(self._pull())
        return spec

    def push(self, spec: RequestSpec) -> None:
        """A request submitted now (already as the core receives it) joins the end of the queue."""
        if self.head is None:
            self._set(spec)
        else:
            self._submitted.append(spec)

    def next_arrival(self) -> float | None:
        """When the head arrives; None for an empty queue."""
        return self.next_at if self.head is not None else None
