"""Routers in front of independent vLLM servers: which server a request goes to.

A router sees each server as its :class:`Endpoint` view: whether it is up (the router learns of a
death when the server's client does: the liveness monitor's detection), how many requests it has
sent there that have not come back (``outstanding``), and, for the prefix-cache-aware scorer,
how many leading prompt blocks the server's KV cache holds now (``cached_prefix_blocks``: the
servers' BlockPools, as llm-d's *precise* prefix-cache scorer reads them from vLLM's KV events).
A server that is down is never chosen; with none up the request is rejected (None).

- ``round_robin``: the next server after the last one chosen, in index order, skipping those down.
- ``least_outstanding``: the server with the fewest outstanding requests (ties: lowest index).
- ``prefix_aware``: the server whose cache holds the longest prefix of the prompt, in full
  blocks (ties: fewest outstanding, then lowest index). llm-d weighs this scorer with load
  scorers; here load only breaks ties.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from .request import RequestSpec


class Endpoint(Protocol):
    up: bool
    outstanding: int

    def cached_prefix_blocks(self, spec: RequestSpec) -> int: ...


class RoundRobin:
    def __init__(self):
        self.last = -1

    def choose(self, spec: RequestSpec, servers: Sequence[Endpoint]) -> int | None:
        n = len(servers)
        for k in range(1, n + 1):
            i = (self.last + k) % n
            if servers[i].up:
                self.last = i
                return i
        return None


class LeastOutstanding:
    def choose(self, spec: RequestSpec, servers: Sequence[Endpoint]) -> int | None:
        up = [i for i, s in enumerate(servers) if s.up]
        return min(up, key=lambda i: (servers[i].outstanding, i)) if up else None


class PrefixAware:
    def choose(self, spec: RequestSpec, servers: Sequence[Endpoint]) -> int | None:
        up = [i for i, s in enumerate(servers) if s.up]
        if not up:
            return None
        hits = {i: servers[i].cached_prefix_blocks(spec) for i in up}
        return min(up, key=lambda i: (-hits[i], servers[i].outstanding, i))


ROUTERS = {"round_robin": RoundRobin, "least_outstanding": LeastOutstanding, "prefix_aware": PrefixAware}
