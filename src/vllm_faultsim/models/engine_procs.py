"""Engine-core processes and the client's liveness monitor (PR #35862), as SimPy processes.

The model follows vLLM 0.26.0's code paths, by name:

- ``EngineCoreProc.run_engine_core``: an engine core runs its busy loop (steps of the scenario's
  busy window, idle otherwise). SIGTERM/SIGINT only *request* shutdown: an idle core wakes at
  once, a core mid-step finishes the step first. A fatal error (``exit1``) or an unexpected
  ``SystemExit`` (``exit0``) leaves the loop at once. In every one of these cases the ``finally``
  restores SIG_DFL and runs ``EngineCore.shutdown()``, which drains the connectors
  (models/shutdown_drain.py); the process then exits 0 (1 after a fatal error). SIGKILL ends it
  at once; during the shutdown a SIGTERM (SIG_DFL by then) ends it with -15, and ``exit1``/``exit0``
  end it with that code at once.
- ``CoreEngineProcManager.monitor_engine_liveness`` (policy ``mp-0.26``): an event-driven wait
  on the process sentinels. At the first exit it wakes (after the measured detection latency);
  of the processes found dead then, one whose ``proc.exitcode`` is not 0 while the manager is
  not stopping becomes ``failed_proc_name`` (the last such in rank order: the real loop
  overwrites). A process that exited 0 is usually not named, but the sentinel (the child's pipe
  closing in the kernel's exit path) can wake the monitor before the child is reapable, and then
  ``exitcode`` is still ``None`` (``None != 0``): a clean exit is named as the failed process.
  The model draws that race with the rate measured on the host (profile
  ``exitcode_none_after_sentinel``); the checker compares it across the matrix, not per case. Any
  exit, code 0 included, ends monitoring and calls ``shutdown()``: ``manager_stopped`` is set,
  every live process gets SIGTERM, the manager waits up to the timeout (``shutdown(procs,
  None)`` means 5 s) and SIGKILLs what is left (``kill_process_tree``).
- ``MPClient.start_engine_core_monitor``: when the monitor returns and the client is still
  up, the client sets ``engine_dead`` and calls ``MPClient.shutdown()``; later calls
  (``add_request`` -> ``ensure_alive``) raise ``EngineDeadError``. A client stop
  (``MPClient.shutdown(timeout)``) stops the manager first, so no exit is a failure, and its
  background-resource cleanup sets ``engine_dead`` too.
- ``CoreEngineActorManager.monitor_engine_liveness`` (policy ``ray-actor``): ``ray.wait`` on the
  actors' ``run`` refs (``num_returns=1``: the first ready ref in rank order), then ``ray.get``:
  ``RayActorError`` (the actor died: SIGKILL, or a ``SystemExit`` out of
  ``EngineCoreActorMixin.run``, whose ``finally`` drains first: the one Ray's SIGTERM handler
  raises at once, even mid-step, or the one the busy loop raises after ``exit0``) is a failure
  named ``Actor <ref>``; a fatal error in ``run`` (``exit1``) is a ``RayTaskError`` that the monitor does not catch:
  the monitor thread dies, nothing is shut down and the client is never marked dead. The
  manager's ``shutdown()`` is ``ray.kill`` of every actor: no engine core drains its connectors.
- ``polling``: the monitor before the event-driven design: it looks at ``finished_procs()``
  every ``poll_interval`` seconds (5 s, the old ``wait_for_completion_or_failure`` timeout), so
  detection is up to one interval late; classification as ``mp-0.26``.
- Rules a mutant can break (harness/mutants.py ``PROCS_MUTANTS``): ``names_exit0``,
  ``shutdown_on_exit``, ``drain``.

Detection latency (sentinel or ``ray.wait`` wake-up after an exit) is drawn from a measured
profile (profiles/liveness_cpu.json, written by benchmarks/detection_latency.py), per backend
and per cause: ``signal`` (the process was killed) or ``exit`` (it returned an exit code). An MP
engine core is a fork of the client process (vLLM's default start method): its sentinel closes
only once the kernel has torn down its copy of the client's address space, so the MP latency
scales with the client's resident memory (measured on the CPU host, p50: 21.8 ms at 881 MB,
47.8 ms at 1908 MB, i.e. proportional, ~0.025 ms per MB; benchmarks/results/) and with how fast
the host tears a fork down. The profile records the client RSS it was measured at and the bare
fork teardown there (``fork_teardown_s``); a scenario's ``client_rss_mb`` scales the MP quantiles
by the RSS ratio, :meth:`LatencyModel.on_host` re-bases them on another host by the ratio of
bare teardowns (Ray actors are not forks: no scaling).

Faults are ``kill_engine`` faults of the plan (``at``, ``rank``, ``signal``, ``phase``). The time
a fault applies is resolved from the scenario alone (:func:`resolve_fault_time`), the same way
on both sides: ``any`` at ``at``; ``idle`` / ``mid_step`` at the first moment >= ``at`` that is
``margin`` inside an idle gap / a step of that rank; ``shutdown`` at ``max(at, b +
shutdown_delay)`` where ``b`` is when that rank's core began its shutdown, if it is still
shutting down then. ``stop`` is ``MPClient.shutdown(timeout=stop_timeout)`` (the rank only picks
the moment). A fault whose phase never comes, or whose rank is gone, is not applied.

Trace events (kind ``proc`` unless noted), besides those of models/shutdown_drain.py:

- ``fault`` (kind ``fault``): ``fault`` (the plan's fault), ``applied`` (bool), ``rank``
- ``exit``      ``rank, name``; MP: ``exitcode`` (negative: killed by that signal); Ray:
                ``outcome`` (``actor_died``, ``task_error`` or ``killed`` by the manager)
- ``core_shutdown`` ``rank``: the core entered ``EngineCore.shutdown()``
- ``stop``      ``cause`` (``fault`` or ``end``), ``timeout``: the client called ``shutdown``
- ``shutdown``  ``who`` (``manager``), ``cause`` (``monitor`` or ``client``): the manager's
                ``shutdown()`` began (SIGTERM / ``ray.kill`` to all)
- ``detect``    ``failed`` (rank or null), ``failed_name`` (``failed_proc_name``; null when
                none), ``first_exit`` (rank), ``cause`` (its latency class), ``latency`` (s from
                that exit): the monitor saw an exit while the manager was not stopping and
                started the shutdown
- ``monitor_error`` ``error``, ``rank``: the monitor thread died with an exception (Ray task
                error of that rank)
- ``engine_dead`` ``via`` (``monitor`` or ``client_shutdown``)
- ``request_failed`` / ``request_accepted`` ``error``: the driver's later ``add_request``
- ``end`` (kind ``end``): ``t``, ``summary`` (operations per rank/role/connector); real
                traces add ``max_slip`` (how late the run was against its schedule) and
                ``slipped`` (what was that late)

Exit times: a SIGKILL's is when it was sent; a process that returns, its last moment in Python.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Iterable

import simpy
from pydantic import ConfigDict, Field

from ..inputs import SECTION, Fraction, NonNegative, Positive, Section, checked, read_mapping_file
from . import events
from .events import Emit
from .events import t as tr
from .shutdown_drain import DRAIN_POLICIES, ConnectorOp, ConnectorOps, DrainPolicy

SHUTDOWN_DEFAULT_TIMEOUT = 5.0  # vllm.v1.utils.shutdown(procs, timeout=None)
OLD_POLL_INTERVAL = 5.0         # the polling wait of the pre-#35862 monitor
RAY_WAIT_TIMEOUT = 5.0          # ray.wait(run_refs, timeout=5)
DEFAULT_PROFILE = "liveness_cpu.json"


class ScenarioError(ValueError):
    """An invalid process scenario; the message is one line."""


@dataclass(frozen=True)
class ProcScenario:
    """What the engine cores do, on both sides: ``dp_size`` cores; core ``r`` runs back-to-back
    steps of ``step`` seconds starting in ``busy[r] = (start, end)`` and is idle otherwise; the
    connector operations ``ops``; the client makes a later call at ``probe_at`` and stops
    everything at ``duration`` (``MPClient.shutdown(timeout=stop_timeout)``); the client
    process that forks the cores holds ``client_rss_mb`` of memory."""

    dp_size: int = 2
    step: float = 0.1
    busy: tuple[tuple[float, float], ...] = ((0.2, 1.0), (0.3, 1.1))
    ops: tuple[ConnectorOp, ...] = ()
    duration: float = 3.0
    probe_at: float = 2.6
    stop_timeout: float = 5.0
    margin: float = 0.03
    shutdown_delay: float = 0.1
    client_rss_mb: float | None = None   # the forking client's memory; None: the profile's

    def __post_init__(self):
        if self.dp_size < 1:
            raise ScenarioError(f"dp_size must be >= 1, got {self.dp_size}")
        if len(self.busy) != self.dp_size:
            raise ScenarioError(f"busy has {len(self.busy)} windows for dp_size {self.dp_size}")
        for r, (s, e) in enumerate(self.busy):
            if not 0 <= s <= e:
                raise ScenarioError(f"busy[{r}] must be 0 <= start <= end, got {(s, e)}")
        for op in self.ops:
            if not 0 <= op.rank < self.dp_size:
                raise ScenarioError(f"op {op.op}: rank {op.rank} out of range")
        if not 0 < self.probe_at < self.duration:
            raise ScenarioError(f"probe_at must lie in (0, duration), got {self.probe_at}")

    def steps(self, rank: int) -> list[tuple[float, float]]:
        start, end = self.busy[rank]
        n = math.ceil(round((end - start) / self.step, 9)) if end > start else 0
        return [(start + k * self.step, start + (k + 1) * self.step) for k in range(n)]

    def ops_of(self, rank: int) -> list[ConnectorOp]:
        return [op for op in self.ops if op.rank == rank]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["busy"] = [list(w) for w in self.busy]
        d["ops"] = [op.to_dict() for op in self.ops]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ProcScenario":
        d = dict(d)
        d["busy"] = tuple(tuple(w) for w in d["busy"])
        d["ops"] = tuple(ConnectorOp(**op) for op in d["ops"])
        return cls(**d)


def proc_name(rank: int, dp_size: int) -> str:
    """CoreEngineProcManager's process name."""
    return f"EngineCore_DP{rank}" if dp_size > 1 else "EngineCore"


def resolve_fault_time(sc: ProcScenario, fault) -> float | None:
    """When a fault of phase any/idle/mid_step applies (None: never); phase ``shutdown`` is
    resolved at run time (see the module docstring)."""
    at, m = fault.at, sc.margin
    if fault.phase == "any":
        return at
    steps = sc.steps(fault.rank)
    if fault.phase == "mid_step":
        windows = steps
    elif fault.phase == "idle":
        first = steps[0][0] if steps else math.inf
        last = steps[-1][1] if steps else 0.0
        windows = [(0.0, first)] if steps else []
        windows.append((last, math.inf))
    else:
        raise ValueError(f"phase {fault.phase!r} is resolved at run time")
    for lo, hi in windows:
        if hi - lo > 2 * m and at <= hi - m:
            return max(at, lo + m)
    return None


def check_faults(sc: ProcScenario, faults: list) -> list:
    """The ``kill_engine`` faults (``at``, ``rank``, ``signal``, ``phase``), checked against the
    scenario (one line per problem)."""
    for i, f in enumerate(faults):
        if f.rank >= sc.dp_size:
            raise ScenarioError(f"kill_engine fault {i}: rank {f.rank} but dp_size is {sc.dp_size}")
        if f.at >= sc.duration:
            raise ScenarioError(f"kill_engine fault {i}: at {f.at} is not before duration {sc.duration}")
    return faults


# --- detection latency ------------------------------------------------------------------------

Quantiles = Annotated[list[Annotated[list[NonNegative], Field(min_length=2, max_length=2)]], Field(min_length=2)]


class SentinelRace(Section):
    model_config = ConfigDict(SECTION, extra="allow")
    rate: Fraction  # how often proc.exitcode is still None when the monitor reads it after the sentinel


class LivenessFile(Section):
    """A liveness profile file: ``{backend: {cause: [[q, seconds], ...]}}`` quantiles and the host
    they were measured on (any other keys: provenance)."""

    model_config = ConfigDict(SECTION, extra="allow")
    name: str | None = None
    quantiles: dict[str, dict[str, Quantiles]]
    exitcode_none_after_sentinel: SentinelRace
    client_rss_mb: NonNegative | None
    fork_teardown_s: Positive | None = None


class LatencyModel:
    """Inverse-CDF sampling from measured quantiles: ``{backend: {cause: [[q, seconds], ...]}}``."""

    def __init__(self, profile: dict):
        self.profile = profile
        # how often proc.exitcode is still None when the monitor reads it after the sentinel
        self.exit0_unreaped = float(profile["exitcode_none_after_sentinel"]["rate"])
        rss = profile["client_rss_mb"]  # the forking client's RSS when measured; null: no scaling
        self.client_rss_mb = None if rss is None else float(rss)
        # the host's bare fork-teardown time at that RSS (harness/drivers/real_procs.py fork_teardown_s)
        self.fork_teardown_s = profile.get("fork_teardown_s")
        self._q: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
        for backend, causes in profile["quantiles"].items():
            for cause, pts in causes.items():
                qs, vs = zip(*pts)
                if qs[0] != 0.0 or qs[-1] != 1.0 or list(qs) != sorted(qs) or list(vs) != sorted(vs):
                    raise ValueError(f"profile {profile.get('name')}: quantiles {backend}/{cause} must rise from q=0 to q=1")
                self._q[(backend, cause)] = (list(qs), list(vs))

    @classmethod
    def load(cls, path: str | Path | None = None) -> "LatencyModel":
        """A profile by path, or by name among the package's profiles (``liveness_h100``)."""
        packaged = resources.files("vllm_faultsim.profiles").joinpath(f"{path or DEFAULT_PROFILE}".removesuffix(".json") + ".json")
        data = read_mapping_file(packaged if packaged.is_file() else Path(path), "liveness profile", ValueError)
        checked(LivenessFile, data, "", ValueError)
        return cls(data)

    def on_host(self, fork_teardown_s: float, client_rss_mb: float) -> "LatencyModel":
        """This profile re-based on another host: its MP quantiles scaled by that host's bare
        fork-teardown time (measured at ``client_rss_mb``) over the profile's own. Hosts differ in
        how fast the kernel tears down a fork's address space; the rest of the latency (the
        sentinel wake-up, the monitor starting the shutdown) is what the profile models."""
        if not self.fork_teardown_s:
            raise ValueError(f"liveness profile {self.profile.get('name')!r} has no fork_teardown_s: "
                             "re-run benchmarks/detection_latency.py")
        k = fork_teardown_s / self.fork_teardown_s
        quantiles = {b: {c: [[q, v * k] if b == "mp" else [q, v] for q, v in pts] for c, pts in causes.items()}
                     for b, causes in self.profile["quantiles"].items()}
        return LatencyModel({**self.profile, "quantiles": quantiles, "client_rss_mb": client_rss_mb,
                             "fork_teardown_s": fork_teardown_s})

    def has(self, backend: str, cause: str) -> bool:
        return (backend, cause) in self._q

    def quantile(self, backend: str, cause: str, q: float, client_rss_mb: float | None = None) -> float:
        """The ``q`` quantile; MP latencies scale with the forking client's memory."""
        scale = client_rss_mb / self.client_rss_mb if backend == "mp" and client_rss_mb and self.client_rss_mb else 1.0
        return scale * self._quantile(backend, cause, q)

    def _quantile(self, backend: str, cause: str, q: float) -> float:
        try:
            qs, vs = self._q[(backend, cause)]
        except KeyError:
            raise KeyError(f"liveness profile {self.profile.get('name')!r} has no {backend}/{cause} latencies "
                           f"(has {sorted(self._q)}); re-run benchmarks/detection_latency.py") from None
        i = min(bisect.bisect_right(qs, q), len(qs) - 1)
        q0, q1, v0, v1 = qs[i - 1], qs[i], vs[i - 1], vs[i]
        return v0 if q1 == q0 else v0 + (v1 - v0) * (q - q0) / (q1 - q0)

    def sample(self, rng: random.Random, backend: str, cause: str, client_rss_mb: float | None = None) -> float:
        return self.quantile(backend, cause, rng.random(), client_rss_mb)


# --- policies ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LivenessPolicy:
    name: str
    backend: str = "mp"              # "mp": CoreEngineProcManager; "ray": CoreEngineActorManager
    detection: str = "event"         # "event": sentinels / ray.wait; "poll": finished_procs() every interval
    poll_interval: float = OLD_POLL_INTERVAL
    names_exit0: bool = False        # mutant: an exit code 0 becomes failed_proc_name
    reap_race: bool = True           # exitcode read right after the sentinel (None before the reap)
    shutdown_on_exit: bool = True    # mutant when False: nobody shuts the others down
    drain: DrainPolicy = DRAIN_POLICIES["pr42423"]

    def code0_naming_rate(self, unreaped: float) -> float:
        """How often a process that exited 0 (alone) is named as the failed one."""
        return 1.0 if self.names_exit0 else unreaped if self.reap_race and self.backend == "mp" else 0.0


_MP = LivenessPolicy("mp-0.26")
POLICIES: dict[str, LivenessPolicy] = {
    "mp-0.26": _MP,
    "ray-actor": LivenessPolicy("ray-actor", backend="ray"),
    "polling": LivenessPolicy("polling", detection="poll", reap_race=False),
}


def policy_for_vllm(version: str, backend: str = "mp") -> LivenessPolicy:
    """The policy of a vLLM release: 0.23.0 and later have PR #35862 and PR #42423."""
    major, minor = (int(x) for x in version.split(".")[:2])
    if (major, minor) < (0, 23):
        raise ValueError(f"vLLM {version}: only 0.23.0 and later are modelled")
    return POLICIES["ray-actor" if backend == "ray" else "mp-0.26"]


# --- the simulation ---------------------------------------------------------------------------

class _Exit(Exception):
    """Leaves the busy loop: ``code`` is the exit code after the shutdown, ``now`` skips it."""

    def __init__(self, code: int, now: bool = False):
        self.code, self.now = code, now


class EngineCoreProc:
    """One engine-core process (or Ray actor) and its connectors."""

    def __init__(self, sim: "ProcSim", rank: int):
        self.sim, self.env, self.rank = sim, sim.env, rank
        self.name = proc_name(rank, sim.sc.dp_size)
        self.state = "running"                 # running -> shutdown -> exited
        self.shutdown_requested = False
        self.sentinel = self.env.event()       # fires at exit (MP) / when the run ref is ready (Ray)
        self.exit_time: float | None = None
        self.exitcode: int | None = None
        self.outcome: str | None = None        # Ray: actor_died | task_error | killed
        self.cause: str | None = None          # latency class: signal | exit
        self.ops = ConnectorOps(self.env, rank, sim.sc.ops_of(rank), sim.emit, lambda: self.state == "running")
        self.process = self.env.process(self.run_engine_core())

    @property
    def alive(self) -> bool:
        return self.state != "exited"

    def deliver(self, sig: str) -> None:
        """A signal (or an injected exit) reaches the process."""
        if self.alive and self.process.is_alive:
            self.process.interrupt(sig)

    # EngineCoreProc.run_engine_core
    def run_engine_core(self):
        ray = self.sim.policy.backend == "ray"
        try:
            yield from self.run_busy_loop()
            code = 0
        except _Exit as e:
            if e.now:
                return self._exit(e.code)
            code = e.code
        self.state = "shutdown"                # finally: SIG_DFL, engine_core.shutdown()
        self.sim.emit({"kind": "proc", "t": tr(self.env.now), "event": "core_shutdown", "rank": self.rank})
        self.ops.begin_shutdown()
        self.sim.core_shutdown(self)
        try:
            for role, conn in self.sim.policy.drain.shutdown_steps():
                yield from self._uninterrupted(self.ops.shutdown(role, conn))
        except _Exit as e:
            return self._exit(e.code)
        if ray and code == 1:
            yield from self._ray_task_error()
            return
        self._exit(code)

    def run_busy_loop(self):
        for start, end in self.sim.sc.steps(self.rank):
            yield from self._wait(start, in_step=False)
            if self.shutdown_requested:
                return
            yield from self._wait(end, in_step=True)
            if self.shutdown_requested:
                return
        yield from self._wait(math.inf, in_step=False)

    def _wait(self, until: float, in_step: bool):
        while self.env.now < until:
            try:
                yield self.env.timeout(until - self.env.now) if until < math.inf else self.env.event()
            except simpy.Interrupt as i:
                self._signal_running(i.cause)
                if self.shutdown_requested and not in_step:
                    break  # the SignalCallback wakes the idle loop

    def _signal_running(self, sig: str) -> None:
        if sig == "SIGKILL":
            raise _Exit(-9, now=True)
        if sig == "SIGTERM":
            if self.sim.policy.backend == "ray":
                raise _Exit(0)  # no vLLM handler in an actor: Ray's raises SystemExit, run() drains
            self.shutdown_requested = True
        elif sig == "exit1":
            raise _Exit(1)
        elif sig == "exit0":
            raise _Exit(0)
        else:
            raise ValueError(sig)

    def _uninterrupted(self, gen):
        """Run a shutdown step; a signal now (SIG_DFL) ends the process."""
        proc = self.env.process(gen)
        while proc.is_alive:
            try:
                yield proc
            except simpy.Interrupt as i:
                code = {"SIGKILL": -9, "SIGTERM": -15, "exit1": 1, "exit0": 0}[i.cause]
                raise _Exit(code) from None

    def _exit(self, code: int) -> None:
        self.state = "exited"
        self.exit_time = self.env.now
        self.ops.process_exit()
        e = {"kind": "proc", "t": tr(self.env.now), "event": "exit", "rank": self.rank, "name": self.name}
        if self.sim.policy.backend == "ray":
            self.outcome = "killed" if self.rank in self.sim.ray_killed else "actor_died"
            e["outcome"] = self.outcome
        else:
            self.exitcode = code
            e["exitcode"] = code
        self.cause = "signal" if code < 0 else "exit"
        self.sim.emit(e)
        if not self.sentinel.triggered:
            self.sentinel.succeed()

    def _ray_task_error(self):
        """EngineCoreActorMixin.run re-raises the fatal error: the ref is ready, the actor lives."""
        self.outcome = "task_error"
        self.cause = "exit"
        self.exit_time = self.env.now
        self.sim.emit({"kind": "proc", "t": tr(self.env.now), "event": "exit", "rank": self.rank,
                       "name": self.name, "outcome": "task_error"})
        self.sentinel.succeed()
        self.state = "task_error"
        try:
            yield self.env.event()  # idle until ray.kill
        except simpy.Interrupt:
            self.state = "exited"


class ProcSim:
    """The engine manager, its liveness monitor, the client and the nemesis, in one SimPy env."""

    def __init__(self, sc: ProcScenario, kills: list, policy: LivenessPolicy | str = "mp-0.26",
                 *, seed: int = 0, latency: LatencyModel | None = None, emit: Emit = lambda ev: None):
        """``kills``: the ``kill_engine`` faults to deliver (faults/sim_injector.py ``kills()``);
        every event goes to ``emit`` and is kept in ``events``."""
        self.sc = sc
        self.policy = POLICIES[policy] if isinstance(policy, str) else policy
        self.faults = check_faults(sc, kills)
        self.seed = seed
        self.rng = random.Random(seed)
        self.latency = latency or LatencyModel.load()
        self.events: list[dict] = []
        self._emit = emit
        self.env = simpy.Environment()
        self.last_t = 0.0
        self.manager_stopped = False
        self.manager_finalizer_alive = True   # CoreEngineProcManager._finalizer
        self.client_finalizer_alive = True    # MPClient._finalizer
        self.engine_dead = False
        self.stopped_event = self.env.event()
        self.ray_killed: set[int] = set()
        self.procs = [EngineCoreProc(self, r) for r in range(sc.dp_size)]
        self._shutdown_waiters: dict[int, list[tuple[object, float]]] = {r: [] for r in range(sc.dp_size)}
        self.env.process(self.monitor_engine_cores())
        for f in self.faults:
            self.env.process(self._nemesis(f))
        self.env.process(self._at(sc.probe_at, self._probe))
        self.env.process(self._end())

    def emit(self, e: dict) -> None:
        if e.get("t") is not None:
            self.last_t = max(self.last_t, e["t"])
        self.events.append(e)
        self._emit(e)

    # --- the nemesis --------------------------------------------------------------------------
    def _nemesis(self, f):
        if f.phase == "shutdown":
            self._shutdown_waiters[f.rank].append((f, f.at))
            return
        at = resolve_fault_time(self.sc, f)
        if at is None or at >= self.sc.duration:
            self._fault(f, None, applied=False)
            return
        yield self.env.timeout(at)
        p = self.procs[f.rank]
        ok = p.alive and (f.phase == "any" or p.state == "running")
        self._fault(f, self.env.now, ok)
        if ok:
            self._apply(f, p)

    def core_shutdown(self, p: EngineCoreProc) -> None:
        for f, at in self._shutdown_waiters[p.rank]:
            self.env.process(self._shutdown_phase_fault(f, p, max(at, self.env.now + self.sc.shutdown_delay)))
        self._shutdown_waiters[p.rank] = []

    def _shutdown_phase_fault(self, f, p: EngineCoreProc, at: float):
        yield self.env.timeout(at - self.env.now)
        ok = p.state == "shutdown"
        self._fault(f, self.env.now, ok)
        if ok:
            self._apply(f, p)

    def _fault(self, f, at: float | None, applied: bool) -> None:
        self.emit({"kind": "fault", "t": tr(at) if at is not None else None, "fault": f.to_dict(),
                   "applied": applied, "rank": f.rank})

    def _apply(self, f, p: EngineCoreProc) -> None:
        if f.signal == "stop":
            self.env.process(self.client_shutdown(self.sc.stop_timeout, "fault"))
        else:
            p.deliver(f.signal)

    def _at(self, at: float, fn):
        yield self.env.timeout(at)
        fn()

    def _probe(self) -> None:
        """A later add_request(): ensure_alive() raises EngineDeadError once engine_dead is set."""
        event = "request_failed" if self.engine_dead else "request_accepted"
        self.emit({"kind": "proc", "t": tr(self.env.now), "event": event,
                   "error": "EngineDeadError" if self.engine_dead else None})

    def _end(self):
        yield self.env.timeout(self.sc.duration)
        if self.client_finalizer_alive:
            yield from self.client_shutdown(self.sc.stop_timeout, "end")

    # --- the client (MPClient) ----------------------------------------------------------------
    def monitor_engine_cores(self):
        """MPClient.start_engine_core_monitor's thread."""
        ok = yield from self.monitor_engine_liveness()
        if not ok or not self.client_finalizer_alive or self.engine_dead:
            return
        self._mark_dead("monitor")
        if self.policy.shutdown_on_exit:
            yield from self.client_shutdown(None, None)

    def client_shutdown(self, timeout: float | None, cause: str | None):
        """MPClient.shutdown(timeout): the manager first, then the background resources."""
        if not self.client_finalizer_alive:
            return
        self.client_finalizer_alive = False
        if cause is not None:
            self.emit({"kind": "proc", "t": tr(self.env.now), "event": "stop", "cause": cause, "timeout": timeout})
        yield from self.manager_shutdown(timeout, "client")
        if not self.engine_dead:
            self._mark_dead("client_shutdown")

    def _mark_dead(self, via: str) -> None:
        self.engine_dead = True
        self.emit({"kind": "proc", "t": tr(self.env.now), "event": "engine_dead", "via": via})

    # --- the engine manager -------------------------------------------------------------------
    def manager_shutdown(self, timeout: float | None, cause: str):
        if not self.manager_finalizer_alive:
            self.manager_stopped = True
            return
        self.manager_finalizer_alive = False
        self.manager_stopped = True
        if not self.stopped_event.triggered:
            self.stopped_event.succeed()
        self.emit({"kind": "proc", "t": tr(self.env.now), "event": "shutdown", "who": "manager", "cause": cause})
        if self.policy.backend == "ray":
            for p in self.procs:                       # ray.kill(actor) for each
                if p.state in ("running", "shutdown", "task_error"):
                    self.ray_killed.add(p.rank)
                    p.deliver("SIGKILL")
            return
        timeout = SHUTDOWN_DEFAULT_TIMEOUT if timeout is None else timeout
        live = [p for p in self.procs if p.alive]
        for p in live:
            p.deliver("SIGTERM")                       # proc.terminate()
        if live:
            yield simpy.AnyOf(self.env, [simpy.AllOf(self.env, [p.sentinel for p in live]),
                                         self.env.timeout(timeout)])
        for p in self.procs:
            if p.alive:
                p.deliver("SIGKILL")                   # kill_process_tree(pid)

    # --- the liveness monitor -----------------------------------------------------------------
    def monitor_engine_liveness(self):
        """Returns False when the monitor thread died (Ray task error), else True."""
        if self.policy.backend == "ray":
            return (yield from self._monitor_ray())
        pending = list(self.procs)
        if self.policy.detection == "event":
            first = yield from self._first_exit(pending)
            if first is None:
                return True
            detect_at = first.exit_time + self.latency.sample(self.rng, "mp", first.cause, self.sc.client_rss_mb)
            yield self.env.timeout(max(0.0, detect_at - self.env.now))
        else:
            first = None
            while first is None:
                yield self.env.timeout(self.policy.poll_interval)
                if self.manager_stopped:
                    return True
                done = [p for p in pending if not p.alive]
                first = min(done, key=lambda p: (p.exit_time, p.rank)) if done else None
        died = [p for p in pending if not p.alive]
        failed = None
        if not self.manager_stopped:
            for p in died:
                seen = p.exitcode
                if seen == 0 and self.policy.reap_race and self.rng.random() < self.latency.exit0_unreaped:
                    seen = None  # proc.exitcode before the child is reaped
                if seen != 0 or self.policy.names_exit0:
                    failed = p
            self._detect(first, failed)
            if self.policy.shutdown_on_exit:
                yield from self.manager_shutdown(None, "monitor")
        return True

    def _first_exit(self, pending: list[EngineCoreProc]):
        """Wait for the first exit (None when the manager stops first)."""
        ev = yield simpy.AnyOf(self.env, [p.sentinel for p in pending] + [self.stopped_event])
        if self.stopped_event in ev:
            return None
        return min((p for p in pending if not p.alive), key=lambda p: (p.exit_time, p.rank))

    def _detect(self, first: EngineCoreProc, failed: EngineCoreProc | None) -> None:
        name = None
        if failed is not None:
            name = failed.name if self.policy.backend == "mp" else f"Actor <run ref of rank {failed.rank}>"
        self.emit({"kind": "proc", "t": tr(self.env.now), "event": "detect",
                   "failed": failed.rank if failed is not None else None, "failed_name": name,
                   "first_exit": first.rank, "cause": first.cause, "latency": tr(self.env.now - first.exit_time)})

    def _monitor_ray(self):
        """CoreEngineActorManager.monitor_engine_liveness."""
        while not self.manager_stopped:
            ready = [p for p in self.procs if p.sentinel.triggered]
            if not ready:
                ev = yield simpy.AnyOf(self.env, [p.sentinel for p in self.procs] + [self.stopped_event])
                if self.stopped_event in ev:
                    break
                first = min((p for p in self.procs if p.sentinel.triggered), key=lambda p: (p.exit_time, p.rank))
                yield self.env.timeout(self.latency.sample(self.rng, "ray", first.cause))
                if self.manager_stopped:
                    break
                ready = [p for p in self.procs if p.sentinel.triggered]
            ref = ready[0]                         # ray.wait(num_returns=1): first in list order
            if ref.outcome == "task_error":
                self.emit({"kind": "proc", "t": tr(self.env.now), "event": "monitor_error",
                           "error": "RayTaskError", "rank": ref.rank})
                return False
            first = min(ready, key=lambda p: (p.exit_time, p.rank))
            self._detect(first, ref)
            break
        if self.policy.shutdown_on_exit:
            yield from self.manager_shutdown(None, "monitor")
        return True

    # --- running ------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        self.env.run()
        for waiters in self._shutdown_waiters.values():   # their rank never began a shutdown
            for f, _ in waiters:
                self._fault(f, None, applied=False)
        self.emit(events.end(self.last_t, summary=summarize(self.events)))
        return self.events


def summarize(events: Iterable[dict]) -> dict:
    """Counts per (rank, connector, role) of operations done, drained and lost."""
    counts: dict[str, dict[str, int]] = {}
    for e in events:
        if e.get("kind") == "proc" and e["event"] in ("op_done", "drain", "lost"):
            key = f"{e['rank']}.{e['role']}.{e['connector']}"
            counts.setdefault(key, {"op_done": 0, "drain": 0, "lost": 0})[e["event"]] += 1
    return {"ops": dict(sorted(counts.items()))}
