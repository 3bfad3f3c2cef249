"""The engine step loop, as SimPy processes: vLLM v1's ``EngineCore.step()``.

Each step: requests that have arrived are added (``add_request``), the core schedules
(``Scheduler.schedule()``), the batch executes for a time given by the step-time model (times the
``slow_steps`` factor of the fault plan), then the core takes the output
(``Scheduler.update_from_output()``). With nothing to run the loop sleeps until the next arrival;
with waiting work it cannot run yet (EC prefetch in flight, KV transfer) it sleeps until the next
wake-up (``next_event`` of the wake-up sources).

A ``kill_engine`` fault, as vLLM 0.26.0 lives through it (measured on an H100, tests/gpu/):
SIGKILL, ``exit1`` and ``exit0`` end the core at once; after the liveness monitor's detection
latency every unfinished request fails (EngineDeadError) and later arrivals fail at once.
SIGTERM (and a client ``stop``, which terminates the core with SIGTERM) only *requests* shutdown
(``EngineShutdownState.REQUESTED``, ``shutdown_timeout`` 0: mode abort): the core finishes the
step it is in, then ``_handle_shutdown`` aborts every unfinished request and rejects new ones
(aborted) while it tears down; once the process has exited and the monitor has seen it, the
engine is dead and later arrivals fail. Latencies come from ``detection(cause)``: ``signal``,
``exit`` or ``sigterm`` (signal -> engine dead), drawn from a liveness profile.

A core with a KV connector (KV offloading: ``pending_jobs()``, and ``has_unfinished_requests()``
is vLLM's ``Scheduler.has_requests()``, which with 0.24+ includes ``has_pending_push_work``) is
stepped the way vLLM steps it: an empty step takes ``IDLE_STEP`` and still runs
``update_from_output`` (that is where the worker's completions come back); a step whose worker
waits on flushed jobs takes that much longer. A failed KV transfer kills the engine (vLLM's
offloading worker asserts success); any engine death or shutdown names the KV jobs it loses in a
``kv_lost`` event and the summary (``kv_jobs_lost``).

With async scheduling (vLLM 0.26.0's default: ``max_concurrent_batches`` 2) the loop is the twin
of ``EngineCore.step_with_batch_queue``: each call first schedules a batch if the queue has room
and the core ``has_requests()``, and returns without waiting while the queue is not full and the
batch ran the model (or more can be scheduled); otherwise it blocks on the *oldest* batch and
applies its output. So step N+1 is scheduled while step N's forward runs, and outputs come back one
step late (the core keeps output placeholders, models/scheduler.py). The GPU runs one forward at a
time: a batch's forward starts at ``max(scheduled at, previous forward's end)``. Where vLLM spins
on empty schedules (1 ms sleeps) the loop, having nothing in flight, sleeps until the next wake-up:
the same decisions. A step's trace event is written when its output is applied, with ``t`` its
forward's start and ``dur`` its forward. With a KV connector (KV offloading, vLLM 0.26.0's default
mode too) the loop makes vLLM's calls one by one instead: an empty batch is queued like any other
(the worker's no-forward pass), the call returns while the queue has room and ``has_requests()``,
and a call that ran no forward sleeps ``IDLE_STEP`` after it (``_process_engine_step``); the
worker's wait on flushed jobs blocks the core before the batch's forward; a store submitted while a
forward is in flight starts after it (``TransferEngine.compute_done_at``); a failed transfer raises
from ``schedule()`` (``execute_model`` runs the worker inline) and kills the engine; a death
records the batches whose output never came back (the one blocked on, the one queued, one being
scheduled) and names them in ``kv_lost`` (``unapplied``).

The loop owns the virtual clock, the trace and the invariants; the core only decides (see
models/step.py). The same loop drives the simulated scheduler and the real vLLM adapters.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Protocol

import simpy

from . import events
from .arrivals import Arrivals
from .eplb import EplbRankDeath, EplbState
from .events import Emit
from .kv_offload import TransferFailed
from .request import RequestSpec
from .step import DecodeBatch, StepResult
from .step_time import OUTPUT_PROC_CHUNK_SIZE, step_seconds_of

# Detection latency when no liveness profile is given: the real 0.26.0 engine on an H200
# (recipes/gpu_engine_kill.py) took 124-128 ms from a SIGKILL to EngineDeadError.
DEFAULT_DETECTION_LATENCY = 0.126
GRACEFUL = ("SIGTERM", "stop")  # shutdown requested: the core aborts its requests, then exits 0
CAUSES = {"SIGKILL": "signal", "exit1": "exit", "exit0": "exit", "SIGTERM": "sigterm", "stop": "sigterm"}
# An empty step of a core with a KV connector: EngineCore.step() schedules nothing, runs the
# no-forward pass and run_busy_loop sleeps 1 ms, for as long as Scheduler.has_requests() holds.
IDLE_STEP = 0.001


class WakeupSource(Protocol):
    def next_event(self, now: float) -> float | None: ...


@dataclass(slots=True)
class RequestRecord:
    arrival: float
    first_token: float | None = None
    preemptions: int = 0


@dataclass
class EngineStats:
    steps: int = 0
    arrived: int = 0
    finished: int = 0
    failed: int = 0
    aborted: int = 0
    dead_at: float | None = None
    kv: dict[str, float] = field(default_factory=dict)  # KV offload counts: store, load, flush, wait, lost
    records: dict[str, RequestRecord] = field(default_factory=dict)


class EngineCore:
    """One engine core: the step loop process; faults arrive through its hooks
    (:meth:`slow_steps`, :meth:`kill`), which the fault injector calls (faults/sim_injector.py).

    ``emit`` receives every trace event (models/events.py); ``invariants``, when given, is called
    before and after every step (``scheduled``, ``after_step``), when the loop would sleep
    (``idle``) and as a request is added to the core (``added``), and raises to stop the run
    (harness/invariants.py)."""

    def __init__(self, env: simpy.Environment, core, workload: Iterable[RequestSpec],
                 step_time: Callable[[int, int, int], float], emit: Emit, *,
                 wakeups: tuple[WakeupSource, ...] = (),
                 detection: Callable[[str], float] = lambda cause: DEFAULT_DETECTION_LATENCY,
                 invariants=None, full_trace: bool = True,
                 progress: Callable[[float], None] | None = None, eplb: EplbState | None = None,
                 max_concurrent_batches: int = 1, cpu_costs=None, open_workload: bool = False,
                 macro_steps: bool = True):
        self.env, self.core, self.emit = env, core, emit
        self.eplb = eplb  # async EPLB (models/eplb.py): EplbState.step() after every forward
        # a request reaches the core's input queue ServingCosts.input_s after the client sent it: the
        # arrivals hold the times it does, client_arrival the client's times (kept in the records)
        self.input_s = cpu_costs.input_s if cpu_costs is not None else 0.0
        self.client_arrival: dict[str, float] = {}  # of the requests pulled and not added yet
        self.arrivals = Arrivals(workload, self._reaching_core)  # the workload, pulled as the clock reaches it
        self.open = open_workload  # more requests may come (submit) until close()
        self._submitted: simpy.Event | None = None  # what a sleep of an open workload also wakes on
        self.step_time = step_time
        self.step_seconds = step_seconds_of(step_time)  # res -> forward seconds (models/step_time.py)
        self.cpu_costs = cpu_costs  # serving-mode CPU time of schedule()/update_from_output() (step_time.ServingCosts)
        self.wakeups = wakeups
        self.detection = detection
        self.invariants = invariants
        self.full_trace = full_trace
        self.progress = progress
        self.stats = EngineStats()
        self.slow: list[tuple[float, float, float]] = []  # slow_steps windows: (start, end, factor)
        self.alive = True
        self.shutdown_requested = False  # SIGTERM: the loop aborts everything at its next iteration
        self.stepping = False  # a SIGTERM waits for the step in flight
        self.prefilling: dict[str, RequestRecord] = {}  # the records without a first token yet
        self.kv_connector = hasattr(core, "pending_jobs")  # KV offloading: see _kv_idle_step, _kv_lost
        self.in_step: tuple[float, StepResult] | None = None  # (start, decisions) of the step in flight
        # async: the batches in flight not blocked on, newest first: (forward start, forward end, decisions)
        self.batch_queue: deque[tuple[float, float, StepResult]] = deque()
        self.scheduling: tuple[float, StepResult] | None = None  # async: scheduled, not queued yet
        if max_concurrent_batches > 1 and eplb is not None:
            raise ValueError("async scheduling (a batch queue) is not modelled with EPLB")
        self.max_concurrent_batches = max_concurrent_batches
        # macro-steps: a core that can tell when nothing can change (Scheduler.decode_run) is advanced
        # through such steps at once (_decode_steps); False keeps the per-step loop (the check of it)
        self.macro_steps = (macro_steps and hasattr(core, "decode_run") and eplb is None and not self.kv_connector
                            and self.apply_outputs_late)
        if self.macro_steps:  # and every step's steady decodes advance lazily (Scheduler.lazy_decodes)
            core.lazy_decodes = True
        self.process = env.process(self._loop() if max_concurrent_batches == 1 else self.step_with_batch_queue())

    # ---- fault hooks (the fault injector calls them before the run) ----------------------

    def slow_steps(self, start: float, end: float, factor: float) -> None:
        """A step starting in [start, end) takes ``factor`` times as long."""
        self.slow.append((start, end, factor))

    def kill(self, fault) -> None:
        """End the engine core at ``fault.at`` with ``fault.signal`` (rank ``fault.rank``); the
        fault's ``to_dict()`` goes into the trace."""
        self.env.process(self._kill(fault))

    # ---- dynamic submission (a router sends requests as they arrive: models/cluster.py) ---

    def submit(self, spec: RequestSpec) -> None:
        """A request sent now (``spec.arrival`` <= now) joins the open workload; a sleeping loop wakes."""
        self.arrivals.push(self._reaching_core(spec))
        self._wake()

    def _reaching_core(self, spec: RequestSpec) -> RequestSpec:
        """`spec` as the engine core receives it: ``input_s`` after the client sent it."""
        if not self.input_s:
            return spec
        self.client_arrival[spec.req_id] = spec.arrival
        return replace(spec, arrival=spec.arrival + self.input_s)

    def close(self) -> None:
        """No more submissions: the loop ends once its requests have."""
        self.open = False
        self._wake()

    def _wake(self) -> None:
        if self._submitted is not None and not self._submitted.triggered:
            self._submitted.succeed()

    def _sleep(self, until: float | None):
        """Sleep until `until`; with an open workload a submission (or close) ends it early, and
        None means until then."""
        env = self.env
        if not self.open:
            return env.timeout(until - env.now)
        self._submitted = env.event()
        return self._submitted if until is None else env.any_of((self._submitted, env.timeout(until - env.now)))

    # ---- the step loop -----------------------------------------------------------------

    def _add_arrivals(self, now: float) -> float | None:
        """``_process_input_queue``: every request that has arrived by `now` is added; returns the
        next arrival's time (None: none)."""
        arrivals, core, stats, inv = self.arrivals, self.core, self.stats, self.invariants
        records = stats.records
        while arrivals.next_at <= now:
            spec = arrivals.pop()
            core.add_request(spec, now)
            rid = spec.req_id
            records[rid] = self.prefilling[rid] = rec = RequestRecord(self.client_arrival.pop(rid, spec.arrival))
            if inv is not None:
                inv.added(stats.steps, self.env.now, rid, rec.arrival)  # on the clock, not the `now` given
            stats.arrived += 1
        return arrivals.next_arrival()

    def _forward_time(self, now: float, res: StepResult) -> float:
        """The step time of `res`'s batch, times the slow_steps factor of a forward starting at `now`."""
        dur = self.step_seconds(res) if res.sched else 0.0
        for start, end, factor in self.slow:
            if start <= now < end:
                dur *= factor
        return dur

    def _launch_end(self, end: float, now: float, res) -> float:
        """The end of a forward computed to `end` whose launch (ServingCosts.execute) starts at
        `now`: the GPU runs the kernels as they are launched, so it ends no earlier than the launch."""
        launched = now + self.cpu_costs.execute(res)
        return launched if launched > end else end

    def _loop(self):
        env, core, stats = self.env, self.core, self.stats
        try:
            while True:
                if self.shutdown_requested:
                    return self._abort()
                now = env.now
                nxt = self._add_arrivals(now)
                if not core.has_unfinished_requests():
                    if nxt is None and not self.open:
                        return
                    yield self._sleep(nxt)
                    continue
                run = self.macro_steps and core.decode_run()
                if run:
                    yield from self._decode_steps(*run)
                    continue
                res = core.schedule(now)
                if not res.sched and not self.kv_connector:
                    wake = self._next_wakeup(now, nxt)
                    self._record_step(now, 0.0, res, ())
                    if self.invariants is not None:
                        self.invariants.idle(stats.steps, now, wake, core)
                    yield self._sleep(wake)
                    continue
                dur = self.step_seconds(res) if res.sched else self._kv_idle_step(now, res)
                if res.kv:  # the worker blocked on flushed jobs before the forward
                    dur += res.kv.get("wait", 0.0)
                for start, end, factor in self.slow:
                    if start <= now < end:
                        dur *= factor
                self.stepping = True
                self.in_step = (now, res)
                yield env.timeout(dur)
                self.stepping = False
                if self.eplb is not None:
                    extra = yield from self._eplb_step(now, dur, res)
                    if extra is None:
                        return
                    dur += extra
                try:
                    finished = core.update_from_output(res, env.now)
                except TransferFailed as exc:
                    yield from self._transfer_failed(now, dur, res, exc)
                    return
                self._account(res, finished, now, dur)
        except simpy.Interrupt as stop:
            if stop.cause == "shutdown":  # SIGTERM while idle: abort now
                self._abort()
            # killed: _kill fails the requests

    apply_outputs_late = True  # vLLM applies a batch's output when it blocks on it (a mutant: at once)

    def step_with_batch_queue(self):
        """The engine loop with a batch queue (async scheduling): ``run_busy_loop`` around vLLM's
        ``EngineCore.step_with_batch_queue`` (see the module docstring). ``batch_queue`` holds
        (forward start, forward end, decisions), newest first, as vLLM's deque."""
        env, core, stats, inv, costs = self.env, self.core, self.stats, self.invariants, self.cpu_costs
        size, kv_connector = self.max_concurrent_batches, self.kv_connector
        macro = self.macro_steps and size == 2
        batch_queue = self.batch_queue
        gpu_free = 0.0
        done: set[int] = set()  # (a mutant's) batches whose output was applied when scheduled
        try:
            while True:
                if self.shutdown_requested:  # _handle_shutdown, between two calls
                    return self._abort()
                now = env.now
                self._add_arrivals(now)
                executed = False  # whether this call scheduled a batch that runs the model
                if core.has_unfinished_requests():
                    run = macro and len(batch_queue) == 1 and core.decode_run(batch_queue[0][2])
                    if run:
                        gpu_free = yield from self._decode_steps_queued(*run, batch_queue, gpu_free)
                        continue
                    if kv_connector:  # a store submitted now waits for the forward in flight
                        core.transfers.compute_done_at = gpu_free
                    try:
                        res = core.schedule(now)
                    except TransferFailed as exc:  # KV connector: the batch's execute_model raised at once
                        yield from self._transfer_failed(now, 0.0, exc.batch, exc)
                        return
                    self.scheduling = (now, res)  # until it is queued (a death records it: _record_unapplied)
                    if inv is not None:
                        inv.scheduled(stats.steps, now, now, res, stats.records)
                    if costs is not None and res.sched:  # the core is busy in schedule()
                        self.stepping = True  # a SIGTERM waits for this call to end
                        yield env.timeout(costs.schedule(res))
                        self.stepping = False
                        now = env.now
                    if res.kv and res.kv.get("wait"):  # execute_model: the worker blocks on flushed jobs
                        self.stepping = True
                        yield env.timeout(res.kv["wait"])
                        self.stepping = False
                        now = env.now
                    start = gpu_free if gpu_free > now else now
                    gpu_free = end = start + self._forward_time(start, res)
                    if costs is not None and res.sched:  # execute_model(): the core launches the batch
                        gpu_free = end = self._launch_end(end, now, res)
                        self.stepping = True
                        yield env.timeout(costs.execute(res))
                        self.stepping = False
                        now = env.now
                    if not self.apply_outputs_late:  # (a mutant) the output is applied as it is scheduled
                        self._account(res, core.update_from_output(res, now), start, end - start)
                        done.add(id(res))
                    batch_queue.appendleft((start, end, res))
                    self.scheduling = None
                    executed = bool(res.sched)
                    if kv_connector and not executed:  # vLLM's calls, spinning as it does
                        if len(batch_queue) < size and core.has_unfinished_requests():
                            yield env.timeout(self._kv_idle_step(now, res))  # _process_engine_step's sleep
                            continue
                    elif res.sched:
                        if len(batch_queue) < size:
                            continue  # don't block while the queue has room
                    elif not any(b[2].sched for b in batch_queue):
                        # nothing in flight ran the model: apply the empty batches, then wait for
                        # something to change (vLLM spins here, with the same decisions)
                        while batch_queue:
                            start, end, res = batch_queue.pop()
                            if id(res) not in done:
                                self._account(res, core.update_from_output(res, now), start, end - start)
                        wake = self._next_wakeup(now, self.arrivals.next_arrival())
                        if inv is not None:
                            inv.idle(stats.steps, now, wake, core)
                        yield self._sleep(wake)
                        continue
                    elif len(batch_queue) < size:
                        continue
                elif not batch_queue:
                    nxt = self.arrivals.next_arrival()  # a submission may have come since
                    if nxt is None and not self.open:
                        return
                    yield self._sleep(nxt)
                    continue
                start, end, res = self.in_step = batch_queue.pop()  # block on the oldest batch
                self.stepping = True  # a SIGTERM is handled after this call, its output applied (_handle_shutdown)
                if end > now:
                    yield env.timeout(end - now)
                if costs is not None and res.sched:  # update_from_output(); outputs leave after it
                    yield env.timeout(costs.update(res))
                self.stepping = False
                if id(res) not in done:
                    self._account(res, core.update_from_output(res, env.now), start, end - start)
                self.in_step = None
                if kv_connector and not executed and core.has_unfinished_requests():
                    yield env.timeout(IDLE_STEP)  # no forward in this call: _process_engine_step's sleep
        except simpy.Interrupt as stop:
            if stop.cause == "shutdown":  # SIGTERM while idle: abort now
                self._abort()
            # killed: _kill fails the requests; the batches in the queue never come back

    # ---- macro-steps ---------------------------------------------------------------------

    def _decode_steps(self, k: int, batch: DecodeBatch):
        """Up to k rounds of the core's decode run (Scheduler.decode_run: every running request
        decodes one token and nothing else can change) in one go: each step's time from the
        step-time backend on its shape (times the slow_steps factor), its trace event (the same
        ``sched`` every step), then the core's state advanced once (advance_decode). The run
        stops early where the per-step loop would see something new at a step's start: an
        arrival (or a submission) or a requested shutdown; a kill interrupts it as it interrupts
        a step. Invariants: clock, causality and limits at the first step (the batch and the records
        do not change in the run: the clock alone at the others), conservation and the core's own
        check once, after it."""
        env, stats, inv, arrivals = self.env, self.stats, self.invariants, self.arrivals
        n, done, now = len(batch.sched), 0, env.now
        while True:
            dur = self._forward_time(now, batch)
            self.stepping = True
            yield env.timeout(dur)
            self.stepping = False
            if inv is not None:
                if done:
                    inv.scheduled_again(stats.steps, now, env.now)
                else:
                    inv.scheduled(stats.steps, now, env.now, batch, stats.records)
            self._record_decode_step(now, dur, batch.sched)
            done += 1
            if self.progress is not None:
                self.progress(env.now)
            if done == k or self.shutdown_requested or arrivals.next_at <= env.now:
                break
            now = env.now
            batch.context += n
        self.core.advance_decode(done, now)
        if inv is not None:
            inv.after_step(stats.steps - 1, now, self.core, stats)

    def _decode_steps_queued(self, k: int, batch: DecodeBatch, batch_queue: deque, gpu_free: float):
        """:meth:`_decode_steps` with a batch queue of 2: each round schedules batch N+1 (its forward
        starts when the GPU is free), blocks on batch N and applies it; the batch in flight at the
        start is the run's first, the last one scheduled stays in flight; serving CPU costs are
        paid as the per-step loop pays them. Returns when the GPU is free."""
        env, stats, inv, arrivals, costs = self.env, self.stats, self.invariants, self.arrivals, self.cpu_costs
        n, done = len(batch.sched), 0
        prev_start, prev_end, _ = batch_queue.pop()
        while True:
            now = scheduled_at = env.now
            if inv is not None:
                if done:
                    inv.scheduled_again(stats.steps, now, now)
                else:
                    inv.scheduled(stats.steps, now, now, batch, stats.records)
            if costs is not None:  # the core is busy in schedule()
                self.stepping = True
                yield env.timeout(costs.schedule(batch))
                self.stepping = False
                now = env.now
            start = gpu_free if gpu_free > now else now
            gpu_free = end = start + self._forward_time(start, batch)
            self.stepping = True
            if costs is not None:  # execute_model(): the core launches the batch
                gpu_free = end = self._launch_end(end, now, batch)
                yield env.timeout(costs.execute(batch))
                now = env.now
            if prev_end > now:
                yield env.timeout(prev_end - now)
            if costs is not None:  # update_from_output()
                yield env.timeout(costs.update(batch))
            self.stepping = False
            self._record_decode_step(prev_start, prev_end - prev_start, batch.sched)
            done += 1
            if self.progress is not None:
                self.progress(env.now)
            prev_start, prev_end = start, end
            if done == k or self.shutdown_requested or arrivals.next_at <= env.now:
                break
            batch.context += n
        batch_queue.appendleft((prev_start, prev_end, self.core.advance_decode(done, scheduled_at, batch.sched)))
        if inv is not None:
            inv.after_step(stats.steps - 1, prev_start, self.core, stats)
        return gpu_free

    def _record_decode_step(self, start: float, dur: float, sched: dict[str, int]) -> None:
        """What :meth:`_account` records of a decode run's step: the step, its event."""
        stats = self.stats
        stats.steps += 1
        if self.full_trace:
            self.emit(events.step(stats.steps - 1, start, dur, sched))

    def _next_wakeup(self, now: float, next_arrival: float | None) -> float | None:
        times = [w for w in (src.next_event(now) for src in self.wakeups) if w is not None and w > now]
        if next_arrival is not None:
            times.append(next_arrival)
        return min(times) if times else None

    def _kv_idle_step(self, now: float, res: StepResult) -> float:
        """An empty step of a core with a KV connector: vLLM keeps stepping while has_requests()
        (the worker's completions come back through update_from_output). A stall is an empty
        step that preempted nothing, with requests queued, no KV job pending and nothing to wake
        up for."""
        if (self.invariants is not None and not res.preempted and any(self.core.counts())
                and not self.core.pending_jobs()):
            wake = self._next_wakeup(now, self.arrivals.next_arrival())
            self.invariants.idle(self.stats.steps, now, wake, self.core)
        return IDLE_STEP

    def kv_summary(self) -> dict:
        c = self.stats.kv
        return {"kv_store_jobs": c.get("store", 0), "kv_load_jobs": c.get("load", 0),
                "kv_flushed_jobs": c.get("flush", 0), "kv_wait_ms": round(1000 * c.get("wait", 0.0), 3),
                "kv_jobs_lost": c.get("lost", 0)}

    def _account(self, res: StepResult, finished, start: float, dur: float) -> None:
        stats, records, end = self.stats, self.stats.records, self.env.now
        if self.invariants is not None and self.max_concurrent_batches == 1:  # a batch queue checks at schedule()
            self.invariants.scheduled(stats.steps, start, end, res, records)
        prefilling, sched, costs = self.prefilling, res.sched, self.cpu_costs
        # the client has a request's tokens after AsyncLLM's output path (ServingCosts.output): the
        # last chunk's time for all where the step's outputs fit one chunk, else by its position
        delivered = end + costs.output(res, len(sched) - 1) if costs is not None and sched else end
        chunked = costs is not None and len(sched) > OUTPUT_PROC_CHUNK_SIZE
        order = {rid: k for k, rid in enumerate(sched)} if chunked else {}

        def delivered_at(rid: str) -> float:  # a request of a later chunk waits for the chunks before it
            return end + costs.output(res, order[rid]) if rid in order else delivered

        for rid in prefilling.keys() & sched.keys():  # in C, over the smaller of the two
            if res.computed_before[rid] + sched[rid] >= res.prompt_len[rid]:
                prefilling.pop(rid).first_token = delivered_at(rid)
        for rid in res.preempted:
            if rid in records:  # (a request preempted in a later batch may have finished already)
                records[rid].preemptions += 1
        self._record_step(start, dur, res, finished)
        for f in finished:
            rec = records.pop(f.req_id)
            stats.finished += 1
            self.emit(events.req(f.req_id, f.status, rec.arrival, rec.first_token, delivered_at(f.req_id),
                                 f.num_output, rec.preemptions))
        if self.invariants is not None:
            self.invariants.after_step(stats.steps - 1, start, self.core, stats)
        if self.progress is not None:
            self.progress(end)

    def _record_step(self, start: float, dur: float, res: StepResult, finished) -> None:
        stats = self.stats
        step = stats.steps
        stats.steps += 1
        if res.kv:
            kv, counts = res.kv, stats.kv
            for key in ("store", "load", "flush"):
                counts[key] = counts.get(key, 0) + len(kv.get(key, ()))
            counts["wait"] = counts.get("wait", 0.0) + kv.get("wait", 0.0)
        if not self.full_trace:
            return
        self.emit(events.step(step, start, dur, res.sched, deferred=res.deferred, preempted=res.preempted,
                              finished=[f.req_id for f in finished], enc=res.enc, ec_loaded=res.ec_loaded,
                              kv=res.kv))

    # ---- faults ------------------------------------------------------------------------

    def _kill(self, fault):
        env = self.env
        yield env.timeout(fault.at - env.now)  # at is absolute (a restarted server's engine arms it late)
        if not self.alive:
            return
        self.alive = False
        self.emit(events.fault(env.now, fault.to_dict()))
        if self.kv_connector and fault.signal not in GRACEFUL:
            self._kv_lost("kill_engine")
        latency = self.detection(CAUSES[fault.signal])
        if fault.signal in GRACEFUL:
            self.shutdown_requested = True
            if self.process.is_alive and not self.stepping:
                self.process.interrupt("shutdown")
        elif self.process.is_alive:
            self.process.interrupt("killed")
        yield env.timeout(latency)
        self.stats.dead_at = env.now
        event = "engine_stopped" if fault.signal == "stop" else "engine_dead"
        self.emit(events.proc(env.now, event, proc=f"EngineCore_DP{fault.rank}"))
        if fault.signal not in GRACEFUL:
            self._end(self.core.fail_all(), "failed")
            env.process(self._reject_arrivals())

    def _abort(self) -> None:
        """``_handle_shutdown`` in abort mode: every unfinished request ends aborted."""
        if self.kv_connector:
            self._kv_lost("shutdown")
        self._end(self.core.fail_all(), "aborted")
        self.env.process(self._reject_arrivals())

    def _transfer_failed(self, start: float, dur: float, res: StepResult, exc: TransferFailed):
        """A KV transfer failed: vLLM's offloading worker asserts success, so the engine core dies
        of the exception (exit code 1) at the step's end; the step's output never comes back."""
        env = self.env
        self.alive = False
        unapplied = self._record_unapplied() + [self.stats.steps]
        self._record_step(start, dur, res, ())
        self.emit(events.proc(env.now, "exit", proc="EngineCore_DP0", cause="kv_transfer_failed", failed=exc.failed))
        self._kv_lost("kv_transfer_failed", unapplied)
        yield env.timeout(self.detection("exit"))
        self.stats.dead_at = env.now
        self.emit(events.proc(env.now, "engine_dead", proc="EngineCore_DP0"))
        self._end(self.core.fail_all(), "failed")
        env.process(self._reject_arrivals())

    def _eplb_step(self, start: float, dur: float, res: StepResult):
        """``EplbState.step()`` after the forward: the step pays what it costs plus the contention
        of a transfer that overlapped its forward (models/eplb.py); returns the extra seconds. A
        dead EP rank makes its all_reduce raise: the engine core dies of it (None)."""
        env, eplb = self.env, self.eplb
        try:
            extra = eplb.cfg.contention * eplb.overlap(start, env.now) + eplb.step(self.stats.steps)
        except EplbRankDeath as death:
            self.alive = False
            self._record_step(start, dur, res, ())
            proc = f"EngineCore_DP{death.fault.rank}"
            self.emit(events.proc(env.now, "exit", proc=proc, cause="eplb_rank_death"))
            if self.kv_connector:
                self._kv_lost("eplb_rank_death")
            yield env.timeout(self.detection("exit"))
            self.stats.dead_at = env.now
            self.emit(events.proc(env.now, "engine_dead", proc=proc))
            self._end(self.core.fail_all(), "failed")
            env.process(self._reject_arrivals())
            return None
        if extra:
            yield env.timeout(extra)
        return extra

    def _record_unapplied(self) -> list[int]:
        """Steps whose output never comes back are recorded up to now, with the jobs they
        created: the step in flight (sync), or the batch blocked on, those queued and the one
        being scheduled, oldest first (async). Returns their indices."""
        now = self.env.now
        batches = []
        if self.stepping and self.in_step is not None:
            batches.append((self.in_step[0], self.in_step[-1]))
        self.stepping = False
        batches += [(start, res) for start, _, res in reversed(self.batch_queue)]
        self.batch_queue.clear()
        if self.scheduling is not None:
            batches.append(self.scheduling)
            self.scheduling = None
        first = self.stats.steps
        for start, res in batches:  # (a queued batch whose forward had not started: at now, 0 s)
            self._record_step(min(start, now), max(now - start, 0.0), res, ())
        return list(range(first, self.stats.steps))

    def _kv_lost(self, cause: str, unapplied: list[int] | None = None) -> None:
        """The engine stops with KV offload jobs not retired: name them, never silently, with the
        steps whose output never came back (recorded first: :meth:`_record_unapplied`)."""
        unapplied = (unapplied or []) + self._record_unapplied()
        jobs = self.core.pending_jobs()
        self.stats.kv["lost"] = len(jobs)
        self.emit(events.kv_lost(self.env.now, cause, jobs, unapplied))

    def _end(self, req_ids, status: str) -> None:
        now, records = self.env.now, self.stats.records
        for rid in req_ids:
            rec = records.pop(rid)
            self.prefilling.pop(rid, None)
            if status == "failed":
                self.stats.failed += 1
            else:
                self.stats.aborted += 1
            self.emit(events.req(rid, status, rec.arrival, rec.first_token, now, None, rec.preemptions))

    def _reject_arrivals(self):
        """Requests sent after the core stopped taking them: rejected (aborted) while it shuts
        down, failed (EngineDeadError) once the engine is dead; those sent to a dead engine
        before detection fail at detection."""
        env, records, arrivals = self.env, self.stats.records, self.arrivals
        while arrivals.head is not None or self.open:
            if arrivals.head is None:  # an open workload: wait for the next submission
                yield self._sleep(None)
                continue
            spec = arrivals.pop()
            self.client_arrival.pop(spec.req_id, None)
            if spec.arrival > env.now:
                yield env.timeout(spec.arrival - env.now)
            records[spec.req_id] = RequestRecord(spec.arrival)
            self.stats.arrived += 1
            self._end([spec.req_id], "failed" if self.stats.dead_at is not None else "aborted")
