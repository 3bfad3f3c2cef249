"""Deployments as SimPy models: vLLM servers made of engine cores, in one simpy.Environment.

A :class:`Server` is one vLLM server (one API server and its ``AsyncLLM`` client) with
``data_parallel_size`` engine cores, the DP ranks, each an :class:`~.engine.EngineCore` with its
own scheduler, built by the caller's ``build_rank`` and fed requests as they arrive
(``EngineCore.submit``). With more than one rank, each request goes to the rank the DP
load-balancing twin picks (models/dp_lb.py, ``DPLBAsyncMPClient.get_core_engine_for_request``)
from the counts the DP coordinator twin (``DPCoordinator``) last published, plus the client's
local increments since. What the coordinator publishes follows vLLM 0.26.0 (engine/core.py): with
``is_moe`` the ranks are ``DPEngineCoreProc``s that send their (waiting, running) when it changed,
after every step (``_maybe_publish_request_counts``), and the coordinator publishes changed
counts at most every ``STATS_UPDATE_INTERVAL`` (100 ms); a dense model's ranks are plain
``EngineCoreProc``s that send nothing, so the coordinator publishes zeros (50 ms after the start,
then every 5 s) and the client balances on its own increments. Not modelled: an MoE server's
lock-step waves (idle ranks running dummy batches beside busy ones).

Deaths, as vLLM 0.26.0's engine-core monitor handles them (models/engine_procs.py, PR #35862):
when the liveness monitor sees a rank's exit (the rank's detection latency after it died), the
client is dead: every request in flight on *every* rank fails (``EngineDeadError``) and the
manager shuts the other ranks down (here: killed at that moment, their requests failed with
them). The server is down (``proc`` event ``server_down``: the rank, the cause) and comes back
``restart_s`` later (model load and warm-up) with fresh engine cores: empty KV and encoder caches
(``server_up``). Kills of the fault plan that fall while the server is down do not apply
(a ``fault`` event with ``t`` null).

A :class:`Cluster` is N servers behind a router (models/router.py); a death takes down one
server. One server is the DP topology; N servers of one rank each are independent replicas.
Events of a rank carry ``server`` and ``rank`` fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import simpy

from . import events
from .dp_lb import DPCoordinator, DPLoadBalancer
from .engine import EngineCore
from .events import Emit
from .request import RequestSpec
from .scheduler import Request

# build_rank(server, rank, emit, detection, after_step) -> (the rank's engine core, its EC prefetch
# schedule or None); the core calls after_step(now) after each step (EngineCore's progress)
BuildRank = Callable[[int, int, Emit, Callable[[str], float], Callable[[float], None]], tuple[EngineCore, object]]


class Server:
    """One vLLM server of ``data_parallel_size`` ranks; its fault hooks (:meth:`kill`,
    :meth:`slow_steps`) are armed by the simulator's injector (faults/sim_injector.py)."""

    def __init__(self, env: simpy.Environment, index: int, data_parallel_size: int, build_rank: BuildRank,
                 detection: Callable[[str], float], restart_s: float, emit: Emit, *, is_moe: bool = True):
        self.env, self.index, self.dp, self.is_moe = env, index, data_parallel_size, is_moe
        self.build_rank, self.draw_detection, self.restart_s, self.emit = build_rank, detection, restart_s, emit
        self.slow: list[tuple[float, float, float]] = []
        self.pending: dict[str, simpy.Event] = {}  # request id -> its fate, while on this server
        self.deaths = 0
        self.down_s = 0.0  # seconds down (detected death to restart), over the finished downtimes
        self.down_since: float | None = None
        self._start()

    # ---- the router's view ------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        return len(self.pending)

    def cached_prefix_blocks(self, spec: RequestSpec) -> int:
        """The longest run of the prompt's full blocks cached on one of the ranks now."""
        cfg = self.ranks[0].core.config
        if not cfg.enable_prefix_caching:
            return 0
        hashes = Request(spec, cfg.max_model_len, cfg.block_size).block_hashes
        return max(len(e.core.pool.get_computed_blocks(hashes, spec.prompt_len - 1, cfg.block_size))
                   for e in self.ranks)

    def send(self, spec: RequestSpec) -> simpy.Event:
        """Submit `spec` to the rank the DP load balancer picks; the event succeeds with its ``req``
        event (its fate). The caller sends only while the server is up."""
        rank = self.lb.choose() if self.lb is not None else 0
        fate = self.pending[spec.req_id] = self.env.event()
        if self.prefetch[rank] is not None:
            self.prefetch[rank].add(spec)
        self.ranks[rank].submit(spec)
        return fate

    # ---- fault hooks --------------------------------------------------------------------

    def slow_steps(self, start: float, end: float, factor: float) -> None:
        self.slow.append((start, end, factor))
        for engine in self.ranks:
            engine.slow_steps(start, end, factor)

    def kill(self, fault) -> None:
        """Rank ``fault.rank`` is killed at ``fault.at`` if the server is up then."""
        self.env.process(self._kill_at(fault))

    def _kill_at(self, fault):
        env = self.env
        yield env.timeout(fault.at - env.now)
        engine = self.ranks[fault.rank]
        if self.up and not self.going_down and engine.alive:
            engine.kill(fault)
        else:
            self.emit(events.fault(None, fault.to_dict(), server=self.index))

    # ---- life cycle -------------------------------------------------------------------

    def _start(self) -> None:
        self.up, self.going_down = True, False
        built = [self._build(r) for r in range(self.dp)]
        self.ranks = [engine for engine, _ in built]
        self.prefetch = [prefetch for _, prefetch in built]
        self.lb = self.coordinator = None
        if self.dp > 1:
            self.lb, self.coordinator = DPLoadBalancer(self.dp), DPCoordinator(self.dp, start=self.env.now)
            self.sent_counts: list[tuple[int, int] | None] = [None] * self.dp  # each rank's last_counts
            self._stats_arrived: simpy.Event | None = None
            self.env.process(self._coordinate(self.lb, self.coordinator))

    def _build(self, rank: int) -> tuple[EngineCore, object]:
        """A fresh engine core for `rank` (empty caches), with the server's slow-step windows."""
        engine, prefetch = self.build_rank(self.index, rank, self._emit_of(rank), self._detection_of(rank),
                                           self._after_step_of(rank))
        for start, end, factor in self.slow:
            engine.slow_steps(start, end, factor)
        return engine, prefetch

    def _emit_of(self, rank: int) -> Emit:
        def emit(ev: dict) -> None:
            ev = {**ev, "server": self.index, "rank": rank}
            self.emit(ev)
            if ev["kind"] == "req":
                self.pending.pop(ev["req"]).succeed(ev)
        return emit

    def _detection_of(self, rank: int) -> Callable[[str], float]:
        def detection(cause: str) -> float:
            if self.going_down:  # the manager is shutting this rank down with the server
                return 0.0
            self.going_down = True
            latency = self.draw_detection(cause)
            self.env.process(self._shut_down(rank, cause, latency))
            return latency
        return detection

    def _after_step_of(self, rank: int) -> Callable[[float], None]:
        def after_step(now: float) -> None:
            """``DPEngineCoreProc._maybe_publish_request_counts``: an MoE rank sends its counts
            (``get_request_counts``: running, waiting) to the coordinator when they changed."""
            if not self.is_moe or self.coordinator is None:
                return
            engine = self.ranks[rank]
            counts = engine.core.counts()
            if counts != self.sent_counts[rank]:
                self.sent_counts[rank] = counts
                running, waiting = counts
                self.coordinator.scheduler_stats(now, rank, waiting, running, engine.stats.steps)
                if self._stats_arrived is not None and not self._stats_arrived.triggered:
                    self._stats_arrived.succeed()
        return after_step

    def _coordinate(self, lb: DPLoadBalancer, coordinator: DPCoordinator):
        """``DPCoordinatorProc``'s loop: publish the counts when the poll times out (its timeout taken
        afresh after every stats message); the client's stats task hands them to the load balancer."""
        env = self.env
        while self.coordinator is coordinator:
            self._stats_arrived = env.event()
            yield env.any_of((self._stats_arrived, env.timeout(max(0.0, coordinator.publish_time() - env.now))))
            if self.coordinator is not coordinator:
                return
            counts = coordinator.maybe_publish(env.now)
            if counts is not None:
                lb.publish(counts)

    def _shut_down(self, rank: int, cause: str, latency: float):
        """The monitor saw `rank` exit: the client is dead, every rank goes down with it; the
        server restarts ``restart_s`` later."""
        env = self.env
        yield env.timeout(latency)
        down_at = self._down(rank, cause)
        for j, engine in enumerate(self.ranks):
            if engine.alive:
                engine.kill(ShutdownKill(down_at, j))
            engine.close()
        self.lb = self.coordinator = None
        yield env.timeout(self.restart_s)
        self._start()
        self._up()

    def _down(self, rank: int, cause: str) -> float:
        self.up = False
        self.deaths += 1
        self.down_since = self.env.now
        self.emit(events.proc(self.env.now, "server_down", server=self.index, rank=rank, cause=cause))
        return self.env.now

    def _up(self) -> None:
        self.down_s += self.env.now - self.down_since
        self.down_since = None
        self.emit(events.proc(self.env.now, "server_up", server=self.index))

    def downtime(self, now: float) -> float:
        """Seconds down by `now`."""
        return self.down_s + (now - self.down_since if self.down_since is not None else 0.0)

    def close(self) -> None:
        """The deployment ends: no more submissions."""
        for engine in self.ranks:
            engine.close()


@dataclass(frozen=True)
class ShutdownKill:
    """The manager's kill of a rank that the server's shutdown takes down (not a fault of the plan):
    what ``EngineCore.kill`` takes, as a plan's ``kill_engine`` fault."""
    at: float
    rank: int
    signal: str = "SIGKILL"

    def to_dict(self) -> dict:
        return {"kind": "kill_engine", "at": self.at, "rank": self.rank, "signal": self.signal, "by": "server_shutdown"}


class Cluster:
    """Servers behind a router: ``send`` routes a try to an up server, or rejects it (None)."""

    def __init__(self, servers: list[Server], router):
        self.servers, self.router = servers, router

    def send(self, spec: RequestSpec) -> simpy.Event | None:
        i = self.router.choose(spec, self.servers)
        return None if i is None else self.servers[i].send(spec)

    def close(self) -> None:
        for server in self.servers:
            server.close()
