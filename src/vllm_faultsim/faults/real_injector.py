"""The real side's fault injector: the only place a fault plan's faults are applied to real
processes (Jepsen's nemesis for the real drivers).

| fault | real driver | applied as |
| --- | --- | --- |
| ``kill_engine`` SIGKILL / SIGTERM | engine-core processes and Ray actors (``drivers/real_procs.py``), the GPU engine core (``drivers/engine_kill.py``) | the signal, to the process |
| ``kill_engine`` stop | ``drivers/real_procs.py`` | the client's stop (``MPClient.shutdown(timeout)``), given by the driver |
| ``kill_engine`` exit1 / exit0 | GPU engine core | the driver's exit trigger (the core exits with the code at its next step) |
| ``kill_engine`` exit1 / exit0 | the stand-in processes of ``real_procs`` | by the process itself, at the times :meth:`ProcsInjector.exits` resolves |
| ``slow_link`` | a real EPLB rank (``drivers/real_eplb.py``) | a delay after each layer transfer that starts in the window |
| ``eplb_rank_death`` | a real EPLB rank | SIGKILL of the rank's own process as it starts the layer |

Drivers hand over what is acted on (process ids, liveness probes, the client's stop, an exit
trigger, the run's clock and record); the injector decides when and applies. Nothing here
imports ``harness/`` or vLLM (layers: models <- faults <- harness).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..models.engine_procs import ProcScenario, check_faults, resolve_fault_time
from .plan import Fault, FaultPlan

EXIT_CODES = {"exit1": 1, "exit0": 0}


def _unsupported(plan: FaultPlan, kinds: tuple[str, ...], driver: str) -> None:
    bad = [f.kind for f in plan.faults if f.kind not in kinds]
    if bad:
        raise ValueError(f"{plan.source}: the {driver} applies {', '.join(kinds)} faults, not {bad[0]}")


def send_signal(pid: int, fault: Fault) -> None:
    """A ``kill_engine`` fault's signal (SIGKILL, SIGTERM) to process ``pid``."""
    os.kill(pid, getattr(signal, fault.signal))


# ---- engine-core processes under vLLM's engine managers (drivers/real_procs.py) --------------

@dataclass(frozen=True)
class EngineRank:
    """What the injector may act on for one engine-core rank (handles from the driver)."""

    pid: int
    exited: Callable[[], bool]           # it has exited (a cheap look: it must not reap the process)
    alive: Callable[[], bool]            # still running: asked just before a fault is applied
    shutdown_seen: threading.Event       # its core began shutting down
    shutdown_began: Callable[[], float]  # when (the run's clock), once shutdown_seen is set


class ProcsInjector:
    """The ``kill_engine`` faults of one ``ProcScenario`` run.

    SIGKILL, SIGTERM and stop are applied here, each by a thread at its resolved time
    (``models.engine_procs.resolve_fault_time``; phase ``shutdown``: ``shutdown_delay`` after the
    rank's core began shutting down, not before ``at``), and only while the phase still holds.
    exit1 and exit0 are the process's own: :meth:`exits` says when. ``now``: the run's clock;
    ``record(ev, **fields)``: the run's history (``fault_applied``, ``signal``); ``stop()``: the
    client's stop; ``manager_stopped()``: no signal once the engine manager has stopped (Ray:
    its ``ray.kill`` may have ended the actor)."""

    def __init__(self, sc: ProcScenario, plan: FaultPlan, *, now: Callable[[], float],
                 record: Callable[..., object], stop: Callable[[], None],
                 manager_stopped: Callable[[], bool] = lambda: False):
        _unsupported(plan, ("kill_engine",), "engine-process driver")
        self.sc = sc
        self.faults: list[Fault] = check_faults(sc, plan.of_kind("kill_engine"))
        self.now, self.record, self.stop, self.manager_stopped = now, record, stop, manager_stopped
        self.threads: list[threading.Thread] = []

    def exits(self, rank: int) -> list[tuple[int, Fault, float | None]]:
        """The rank's exit1/exit0 faults, which its process applies itself: (index in
        :attr:`faults`, fault, the time it resolves to; None for phase ``shutdown``)."""
        return [(i, f, resolve_fault_time(self.sc, f) if f.phase != "shutdown" else None)
                for i, f in enumerate(self.faults) if f.rank == rank and f.signal in EXIT_CODES]

    def start(self, ranks: dict[int, EngineRank]) -> None:
        """One thread per signal or stop fault, acting on ``ranks``."""
        for i, f in enumerate(self.faults):
            if f.signal in EXIT_CODES:
                continue
            th = threading.Thread(target=self._nemesis, args=(i, f, ranks[f.rank]), daemon=True, name=f"nemesis-{i}")
            th.start()
            self.threads.append(th)

    def join(self) -> None:
        for th in self.threads:
            th.join()

    def _nemesis(self, i: int, f: Fault, rank: EngineRank) -> None:
        sc = self.sc
        if f.phase == "shutdown":
            while not rank.shutdown_seen.wait(0.05):
                if rank.exited() or self.now() > sc.duration + sc.stop_timeout:
                    return
            at = max(f.at, rank.shutdown_began() + sc.shutdown_delay)
        else:
            at = resolve_fault_time(sc, f)
            if at is None or at >= sc.duration:
                return
        time.sleep(max(0.0, at - self.now()))
        if not rank.alive() or self.manager_stopped() and f.signal != "stop":
            return
        if f.phase in ("idle", "mid_step") and rank.shutdown_seen.is_set():
            return
        if f.phase == "shutdown" and not rank.shutdown_seen.is_set():
            return
        self.record("fault_applied", index=i, rank=f.rank)
        if f.signal == "stop":
            self.stop()
        else:
            self.record("signal", rank=f.rank, signal=f.signal)
            send_signal(rank.pid, f)


# ---- the GPU engine core of a kill trial (drivers/engine_kill.py) -----------------------------

class EngineCoreKill:
    """The one ``kill_engine`` fault of a kill trial: the engine core (rank 0) is killed ``at``
    seconds after the first request was sent, with a signal or an exit from inside."""

    def __init__(self, plan: FaultPlan):
        _unsupported(plan, ("kill_engine",), "GPU kill trial")
        kills = plan.of_kind("kill_engine")
        if len(kills) != 1:
            raise ValueError(f"{plan.source}: a kill trial takes one kill_engine fault, got {len(kills)}")
        f = self.fault = kills[0]
        if f.rank != 0 or f.phase != "any" or f.signal == "stop":
            raise ValueError(f"{plan.source}: a kill trial kills rank 0 (phase any) with SIGKILL, SIGTERM, exit1 "
                             f"or exit0, got rank {f.rank}, phase {f.phase}, {f.signal}")

    @property
    def at(self) -> float:
        return self.fault.at

    @property
    def signal(self) -> str:
        return self.fault.signal

    def apply(self, pid: int, exit_trigger: Callable[[int], None]) -> None:
        """Now: the signal to ``pid``, or ``exit_trigger(code)`` for exit1/exit0."""
        if self.fault.signal in EXIT_CODES:
            exit_trigger(EXIT_CODES[self.fault.signal])
        else:
            send_signal(pid, self.fault)


# ---- one EP rank of a real EPLB run (drivers/real_eplb.py), inside its process ---------------

EPLB_KINDS = ("slow_link", "eplb_rank_death")


def check_eplb_plan(plan: FaultPlan) -> None:
    """A real EPLB run applies ``slow_link`` and ``eplb_rank_death`` (of engine rank 0) only."""
    _unsupported(plan, EPLB_KINDS, "real EPLB run")
    for f in plan.of_kind("eplb_rank_death"):
        if f.rank != 0:
            raise ValueError(f"{plan.source}: a real EPLB run is one engine (rank 0), got eplb_rank_death rank {f.rank}")


class EplbInjector:
    """The EPLB faults inside EP rank ``ep_rank``'s process. ``slow_link``: the link runs at
    ``link_bandwidth / factor`` for layer transfers that start in [start, end) (the run's clock):
    after ``communicator.execute()`` the rank waits ``(factor - 1)`` times the bytes it moved over
    ``link_bandwidth``. ``eplb_rank_death``: the rank SIGKILLs itself as it starts ``layer`` of
    rearrangement ``rearrangement``."""

    def __init__(self, plan: FaultPlan, ep_rank: int, *, link_bandwidth: float):
        check_eplb_plan(plan)
        if plan.of_kind("slow_link") and link_bandwidth <= 0:
            raise ValueError(f"{plan.source}: slow_link needs the link's calibrated bandwidth (link_bandwidth > 0)")
        self.slow = [(f.start, f.end, f.factor) for f in plan.of_kind("slow_link")]
        self.deaths = [f for f in plan.of_kind("eplb_rank_death") if f.ep_rank == ep_rank]
        self.link_bandwidth = link_bandwidth

    def slow_link(self, start: float, moved_bytes: int) -> None:
        """After a layer transfer that started at ``start`` and moved ``moved_bytes`` here."""
        factor = next((f for a, b, f in self.slow if a <= start < b), 1.0)
        if factor != 1.0:
            time.sleep((factor - 1.0) * moved_bytes / self.link_bandwidth)

    def rank_death(self, layer: int, rearrangement: int, before: Callable[[], None]) -> None:
        """As this rank starts transferring ``layer`` of ``rearrangement`` (0-based): if the plan
        kills it there, ``before()`` (the driver's record of the death), then SIGKILL."""
        if any(f.layer == layer and f.rearrangement == rearrangement for f in self.deaths):
            before()
            os.kill(os.getpid(), signal.SIGKILL)
