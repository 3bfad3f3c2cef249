"""Real drivers for engine-process deaths: real OS processes (or Ray actors) under vLLM's own
engine managers, liveness monitors, client and shutdown code, killed by the fault plan.

What runs is vLLM 0.26.0's code, not a copy:

- ``CoreEngineProcManager.__init__`` starts the processes (``get_mp_context()``: fork) with
  ``EngineCoreProc.run_engine_core`` patched, for the constructor call only, to
  :func:`run_engine_core_stand_in`; its ``monitor_engine_liveness``, ``shutdown`` and
  ``finished_procs``, ``vllm.v1.utils.shutdown`` and ``kill_process_tree`` run unchanged.
- The client is a ``SyncMPClient`` whose real ``start_engine_core_monitor`` starts the real
  monitor thread; its real ``shutdown``, ``BackgroundResources`` and ``add_request`` ->
  ``ensure_alive`` -> ``EngineDeadError`` run unchanged. It is built with ``object.__new__``
  and given only the fields those methods read (no ZMQ sockets, no engine handshake).
- In each process the stand-in mirrors ``run_engine_core``: the real ``SignalCallback`` and
  ``EngineShutdownState``, a SIGTERM/SIGINT handler that requests shutdown, a light busy loop
  (steps are sleeps of the scenario's step time), and in ``finally`` the real
  ``EngineCore.shutdown()`` -> ``UniProcExecutor.shutdown()`` -> ``Worker.shutdown()`` (real
  ``ensure_kv_transfer_shutdown`` / ``ensure_ec_transfer_shutdown``) -> the real
  ``Scheduler.shutdown()`` of a real ``Scheduler`` built with two connectors of this module,
  :class:`PendingOpsKVConnector` and :class:`PendingOpsECConnector`, whose operations are real
  daemon threads and whose ``shutdown()`` joins them. The worker-side connectors are made by
  the real factories (``ensure_ec_transfer_initialized``; ``KVConnectorFactory`` for KV, as
  ``ensure_kv_transfer_initialized`` minus its TP broadcast). Only
  ``cleanup_dist_env_and_memory`` is replaced in the child (a no-op): the stand-in has no
  distributed state or device memory, and its full ``gc.collect()`` over the test runner's
  heap takes 1-2 s.
- Ray (:func:`run_case` with ``backend="ray"``): the real ``CoreEngineActorManager``'s
  ``monitor_engine_liveness`` and ``shutdown`` (``ray.kill``) over light actors whose ``run``
  has ``EngineCoreActorMixin.run``'s shape; the manager is built with ``object.__new__``
  (its constructor builds placement groups and real engine actors).

The fault plan's ``kill_engine`` faults are applied by the real-side injector
(``faults.real_injector.ProcsInjector``): SIGKILL and SIGTERM are real signals to the processes
(or the actors' workers), ``stop`` is the real ``MPClient.shutdown(timeout)``; ``exit1`` (a fatal
error raised in the busy loop) and ``exit0`` (an unexpected ``SystemExit``) are raised by the
process itself at the times the injector resolves. Times are the shared CLOCK_MONOTONIC minus the run's
start. The run records a history; :mod:`harness.checkers.procs` judges it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import multiprocessing
import multiprocessing.connection
import os
import queue
import select
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import psutil
import torch
import zmq

import vllm.v1.engine.core as engine_core_module
from vllm.config import (CacheConfig, DeviceConfig, ECTransferConfig, KVTransferConfig, ModelConfig,
                         ParallelConfig, SchedulerConfig, VllmConfig)
from vllm.distributed.ec_transfer import ensure_ec_transfer_initialized, get_ec_transfer
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorBase
from vllm.distributed.kv_transfer import kv_transfer_state
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorRole
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreRequest, EngineCoreRequestType
from vllm.v1.engine.core import EngineCore, EngineCoreProc, EngineShutdownState
from vllm.v1.engine.core_client import BackgroundResources, SyncMPClient
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.engine.utils import CoreEngineProcManager, SignalCallback
from vllm.v1.executor.uniproc_executor import UniProcExecutor
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.serial_utils import MsgpackEncoder
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.gpu_worker import Worker

from ...faults.plan import Fault, FaultPlan
from ...faults.real_injector import EngineRank, ProcsInjector
from ...models.engine_procs import POLICIES, RAY_WAIT_TIMEOUT, ProcScenario, proc_name, resolve_fault_time, summarize
from ...models.shutdown_drain import ConnectorOp
from . import model_dirs
from .external_kv_connector import NoOpKVConnector
from . import scratch
from ..trace import header, write_jsonl
from ...models.events import t as tr

MONITOR_THREAD = "MPClientEngineMonitor"  # the thread name start_engine_core_monitor gives


# --- connectors with real pending operations ----------------------------------------------------

class _PendingOps:
    """Operations as daemon threads (like a connector's I/O threads: a process exit ends them);
    ``shutdown()`` joins them, which is what PR #42423's hook is for."""

    connector = ""

    def _ops_init(self) -> None:
        self.threads: list[threading.Thread] = []

    def _role_name(self) -> str:
        return self.role.name.lower()  # ECConnectorRole / KVConnectorRole: WORKER | SCHEDULER

    def submit(self, op: ConnectorOp) -> None:
        def run():
            time.sleep(op.dur)
            _CHILD.report("op_complete", op=op.op, connector=op.connector, role=op.role,
                          shutting_down=_CHILD.shutting_down)
        th = threading.Thread(target=run, daemon=True, name=f"op-{op.op}")
        th.start()
        self.threads.append(th)

    def shutdown(self) -> None:
        _CHILD.report("connector_shutdown", connector=self.connector, role=self._role_name())
        for th in self.threads:
            th.join()


class PendingOpsECConnector(_PendingOps, ECConnectorBase):
    """An EC connector whose only behaviour is pending asynchronous operations."""

    connector = "ec"

    def __init__(self, vllm_config, role):
        super().__init__(vllm_config, role)
        self._ops_init()

    def start_load_caches(self, encoder_cache, **kwargs) -> None:
        return None

    def save_caches(self, encoder_cache, mm_hash, **kwargs) -> None:
        return None

    def has_cache_item(self, identifier: str) -> bool:
        return False

    def update_state_after_alloc(self, request, index: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output):
        return None


class PendingOpsKVConnector(_PendingOps, NoOpKVConnector):
    """A KV connector whose only behaviour is pending asynchronous operations."""

    connector = "kv"

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self._ops_init()


# --- the real vLLM objects ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _configs(dp_size: int) -> tuple[VllmConfig, KVCacheConfig]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mc = ModelConfig(model=str(model_dirs.tiny_llama()), max_model_len=512, dtype="float16", seed=0,
                     skip_tokenizer_init=True)
    cc = CacheConfig(block_size=16)
    cc.num_gpu_blocks = 64
    cc.enable_prefix_caching = False
    here = __name__
    vc = VllmConfig(
        model_config=mc, cache_config=cc, device_config=DeviceConfig("cpu"),
        scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=512,
                                         is_encoder_decoder=False),
        parallel_config=ParallelConfig(data_parallel_size=dp_size),
        ec_transfer_config=ECTransferConfig(ec_connector="PendingOpsECConnector", ec_role="ec_both",
                                            ec_connector_module_path=here),
        kv_transfer_config=KVTransferConfig(kv_connector="PendingOpsKVConnector", kv_role="kv_both",
                                            kv_connector_module_path=here))
    kv = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(
        ["layer"], FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=1, dtype=torch.float32))])
    return vc, kv


def _scheduler(vc: VllmConfig, kv: KVCacheConfig) -> Scheduler:
    return Scheduler(vllm_config=vc, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(vc),
                     block_size=16, log_stats=False)


# --- the engine-core process (child side) -------------------------------------------------------

class _InjectedFatalError(RuntimeError):
    """The ``exit1`` fault: a fatal error inside the busy loop."""


@dataclass
class _ChildScript:
    rank: int
    sc: ProcScenario
    scheduler: Scheduler
    report_fd: int
    go_fd: int
    exit_faults: list[tuple[int, Fault, float | None]]  # (index in plan, fault, static time)


class _Child:
    """The state of this process's stand-in (one per process after fork)."""

    def __init__(self):
        self.scripts: dict[int, _ChildScript] = {}
        self.script: _ChildScript | None = None
        self.t0 = 0.0
        self.shutting_down = False
        self.lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def report(self, ev: str, **fields) -> None:
        line = json.dumps({"ev": ev, "rank": self.script.rank, "t": self.now(), **fields}) + "\n"
        with self.lock:
            os.write(self.script.report_fd, line.encode())


_CHILD = _Child()


def run_engine_core_stand_in(*args, dp_rank: int = 0, local_dp_rank: int = 0, **kwargs):
    """Stands in for ``EngineCoreProc.run_engine_core`` (same signature, same control flow)."""
    try:
        _run_engine_core(dp_rank, kwargs["vllm_config"])
    except _InjectedFatalError:
        sys.stderr = open(os.devnull, "w")  # the expected traceback of an injected fatal error
        raise


def _run_engine_core(dp_rank: int, vllm_config: VllmConfig) -> None:
    script = _CHILD.script = _CHILD.scripts[dp_rank]
    engine_core_module.cleanup_dist_env_and_memory = lambda shutdown_ray=False: None
    _CHILD.report("ready", pid=os.getpid())
    _CHILD.t0 = float(os.read(script.go_fd, 64).decode())

    core = object.__new__(EngineCore)
    core.scheduler = script.scheduler
    core.structured_output_manager = script.scheduler.structured_output_manager
    worker = object.__new__(Worker)
    worker.profiler = None
    core.model_executor = object.__new__(UniProcExecutor)
    core.model_executor.driver_worker = worker
    ensure_ec_transfer_initialized(vllm_config)
    _, kv = _configs(script.sc.dp_size)
    kv_transfer_state._KV_CONNECTOR_AGENT = KVConnectorFactory.create_connector(
        config=vllm_config, role=KVConnectorRole.WORKER, kv_cache_config=kv)
    connectors = {("worker", "ec"): get_ec_transfer(), ("worker", "kv"): kv_transfer_state._KV_CONNECTOR_AGENT,
                  ("scheduler", "kv"): core.scheduler.connector, ("scheduler", "ec"): core.scheduler.ec_connector}
    state = {"shutdown_state": EngineShutdownState.RUNNING}
    input_queue: queue.Queue = queue.Queue()
    threading.Thread(target=_submit_ops, args=(script, connectors), daemon=True, name="op-submitter").start()

    signal_callback: SignalCallback | None = None
    try:
        def wakeup_engine():
            input_queue.put_nowait((EngineCoreRequestType.WAKEUP, None))

        signal_callback = SignalCallback(wakeup_engine)

        def signal_handler(signum, frame):
            state["shutdown_state"] = EngineShutdownState.REQUESTED
            signal_callback.trigger()

        signal.signal(signal.SIGTERM, signal_handler)
        signal.signal(signal.SIGINT, signal_handler)
        _run_busy_loop(script, state, input_queue)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if signal_callback is not None:
            signal_callback.stop()
        _CHILD.shutting_down = True
        _CHILD.report("core_shutdown")
        _start_shutdown_phase_faults(script)
        EngineCore.shutdown(core)
        _CHILD.report("exiting")


def _submit_ops(script: _ChildScript, connectors: dict) -> None:
    for op in sorted(script.sc.ops_of(script.rank), key=lambda o: (o.submit, o.op)):
        time.sleep(max(0.0, op.submit - _CHILD.now()))
        if _CHILD.shutting_down:
            return
        connectors[(op.role, op.connector)].submit(op)
        _CHILD.report("op_submit", op=op.op, connector=op.connector, role=op.role)


def _run_busy_loop(script: _ChildScript, state: dict, input_queue: queue.Queue) -> None:
    """``run_busy_loop``: idle until the next step, step, ... ; SIGTERM ends it after the step."""
    pending = [(t, i, f) for i, f, t in script.exit_faults if t is not None]
    pending.sort(key=lambda p: p[0])

    def wait(until: float, in_step: bool) -> None:
        while True:
            if state["shutdown_state"] != EngineShutdownState.RUNNING and not in_step:
                return
            now = _CHILD.now()
            if pending and pending[0][0] <= now:
                _, i, f = pending.pop(0)
                _CHILD.report("fault_applied", index=i)
                if f.signal == "exit1":
                    raise _InjectedFatalError(f"injected fatal error (fault {i})")
                raise SystemExit  # exit0: the busy loop ends unexpectedly
            if now >= until:
                return
            deadline = min(until, pending[0][0] if pending else until)
            if in_step:
                time.sleep(deadline - now)         # the model runs; signals do not cut it short
            else:
                with contextlib.suppress(queue.Empty):
                    input_queue.get(timeout=min(deadline - now, 3600.0))

    for start, end in script.sc.steps(script.rank):
        wait(start, in_step=False)
        if state["shutdown_state"] != EngineShutdownState.RUNNING:
            break
        wait(end, in_step=True)
        if state["shutdown_state"] != EngineShutdownState.RUNNING:
            break
    else:
        wait(float("inf"), in_step=False)
    raise SystemExit


def _start_shutdown_phase_faults(script: _ChildScript) -> None:
    """exit1/exit0 while the core shuts down end the process at once with that code."""
    begin = _CHILD.now()
    for i, f, static in script.exit_faults:
        if f.phase == "shutdown":
            at = max(f.at, begin + script.sc.shutdown_delay)
        elif f.phase == "any" and static is not None and static >= begin:
            at = static
        else:
            continue

        def fire(i=i, f=f, at=at):
            time.sleep(max(0.0, at - _CHILD.now()))
            _CHILD.report("fault_applied", index=i)
            os._exit(1 if f.signal == "exit1" else 0)
        threading.Thread(target=fire, daemon=True, name=f"fault-{i}").start()


# --- the driver (parent side) -------------------------------------------------------------------

class _RecordingSocket:
    """The client's input socket: records what an alive client would have sent."""

    def __init__(self):
        self.sent: list = []

    def send_multipart(self, msg, copy=False, track=False):
        self.sent.append(msg)


@dataclass
class _History:
    """What the run observed, in the shared clock (seconds since t0)."""

    t0: float = 0.0
    records: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def add(self, ev: str, **fields) -> dict:
        rec = {"ev": ev, "t": fields.pop("t", None), **fields}
        if rec["t"] is None:
            rec["t"] = self.now()
        with self.lock:
            self.records.append(rec)
        return rec

    def add_lines(self, buf: bytes) -> tuple[bytes, list[dict]]:
        """The processes' reports: each complete JSON line of ``buf`` becomes a record; returns
        what is left of ``buf`` and the new records."""
        *lines, rest = buf.split(b"\n")
        recs = [json.loads(line) for line in lines]
        with self.lock:
            self.records.extend(recs)
        return rest, recs


def _reader(fd: int, hist: _History, ready: threading.Event, dp_size: int, events: dict) -> None:
    buf = b""
    n_ready = 0
    while True:
        r, _, _ = select.select([fd], [], [], 0.05)
        if not r:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buf, recs = hist.add_lines(buf + chunk)
        for rec in recs:
            if rec["ev"] == "ready":
                n_ready += 1
                if n_ready == dp_size:
                    ready.set()
            elif rec["ev"] == "core_shutdown":
                events[rec["rank"]].set()


def _traced(hist: _History, manager, client: SyncMPClient) -> None:
    """Record (never change) the real calls: the manager's and the client's shutdown."""
    real_manager_shutdown = type(manager).shutdown.__get__(manager)
    real_client_shutdown = SyncMPClient.shutdown.__get__(client)

    def manager_shutdown(timeout=None):
        if manager.manager_stopped.is_set():
            real_manager_shutdown(timeout=timeout)
            return
        by_monitor = threading.current_thread().name == MONITOR_THREAD
        if by_monitor:
            hist.add("detect", failed_name=manager.failed_proc_name, failed_rank=_failed_rank(manager))
        hist.add("manager_shutdown", cause="monitor" if by_monitor else "client")
        real_manager_shutdown(timeout=timeout)
        hist.add("manager_shutdown_done")

    def client_shutdown(timeout=None):
        alive = client._finalizer.alive
        if alive and threading.current_thread().name == MONITOR_THREAD:
            hist.add("engine_dead", via="monitor")
        real_client_shutdown(timeout=timeout)
        if alive and not any(r["ev"] == "engine_dead" for r in hist.records):
            hist.add("engine_dead", via="client_shutdown")

    manager.shutdown = manager_shutdown
    client.shutdown = client_shutdown
    for r, p in enumerate(getattr(manager, "processes", ())):
        real_terminate = p.terminate

        def terminate(r=r, real_terminate=real_terminate):
            hist.add("terminate", rank=r)
            real_terminate()
        p.terminate = terminate


def _failed_rank(manager) -> int | None:
    """The rank ``failed_proc_name`` names: MP by process name, Ray by the run ref's actor."""
    name = manager.failed_proc_name
    if name is None:
        return None
    if isinstance(manager, CoreEngineProcManager):
        return next(r for r, p in enumerate(manager.processes) if p.name == name)
    return next(r for r, ref in enumerate(manager.run_refs) if name == f"Actor {ref}")


def _make_client(dp_size: int, manager) -> SyncMPClient:
    client = object.__new__(SyncMPClient)
    client.resources = BackgroundResources(ctx=zmq.Context())
    client.resources.engine_manager = manager
    client._finalizer = weakref.finalize(client, client.resources)
    client.is_dp = dp_size > 1
    client.engines_running = False
    client.pending_messages = deque()
    client.encoder = MsgpackEncoder()
    client.core_engine = (0).to_bytes(2, "little")
    client.input_socket = _RecordingSocket()
    return client


def _probe_request() -> EngineCoreRequest:
    return EngineCoreRequest(request_id="probe", prompt_token_ids=[3, 4, 5], mm_features=None,
                             sampling_params=SamplingParams(max_tokens=1), pooling_params=None,
                             arrival_time=0.0, lora_request=None, cache_salt=None, data_parallel_rank=None)


def run_case(sc: ProcScenario, plan: FaultPlan, *, seed: int = 0, backend: str = "mp",
             trace_path: str | Path | None = None) -> list[dict]:
    """Run one scenario for real; returns the trace's events (also written to ``trace_path``)."""
    if backend == "ray":
        return run_ray_case(sc, plan, seed=seed, trace_path=trace_path)
    hist = _History()
    client = None
    injector = ProcsInjector(sc, plan, now=hist.now, record=hist.add,
                             stop=lambda: _fault_stop(hist, client, sc.stop_timeout))
    faults = injector.faults
    vc, kv = _configs(sc.dp_size)
    report_r, report_w = os.pipe()
    go = [os.pipe() for _ in range(sc.dp_size)]
    shutdown_seen = {r: threading.Event() for r in range(sc.dp_size)}
    ready = threading.Event()
    manager = None
    reader = threading.Thread(target=_reader, args=(report_r, hist, ready, sc.dp_size, shutdown_seen),
                              daemon=True, name="procs-report-reader")
    try:
        _CHILD.scripts = {r: _ChildScript(
            rank=r, sc=sc, scheduler=_scheduler(vc, kv), report_fd=report_w, go_fd=go[r][0],
            exit_faults=injector.exits(r))
            for r in range(sc.dp_size)}
        # The constructor overwrites assigned_physical_gpu_ids with the last rank's shard on
        # platforms without CUDA; a second manager on the same config would take that for the
        # user's --device-ids. Give each manager the config as the user wrote it.
        vc.parallel_config.assigned_physical_gpu_ids = None
        with mock.patch.object(EngineCoreProc, "run_engine_core", staticmethod(run_engine_core_stand_in)):
            manager = CoreEngineProcManager(
                local_engine_count=sc.dp_size, start_index=0, local_start_index=0, vllm_config=vc,
                local_client=True, handshake_address="ipc://unused", executor_class=UniProcExecutor,
                log_stats=False)
        os.close(report_w)
        report_w = -1
        reader.start()
        if not ready.wait(30):
            raise RuntimeError(f"engine-core stand-ins did not start: {manager.finished_procs()}")
        client = _make_client(sc.dp_size, manager)
        _traced(hist, manager, client)
        client.start_engine_core_monitor()
        hist.t0 = t0 = time.monotonic()
        for r, (gr, gw) in enumerate(go):
            os.write(gw, repr(t0).encode())
        injector.start({r: EngineRank(p.pid, exited=lambda p=p: p.exitcode is not None,
                                      alive=lambda p=p: p.exitcode is None and p.is_alive(),
                                      shutdown_seen=shutdown_seen[r], shutdown_began=functools.partial(_shutdown_began, hist, r))
                        for r, p in enumerate(manager.processes)})
        _probe_then_stop(hist, sc, client)
        injector.join()
        for p in manager.processes:
            p.join(sc.stop_timeout + 1)
        reader.join(5)
        exitcodes = {r: _exitcode(p) for r, p in enumerate(manager.processes)}
        hist.add("end")
    finally:
        _cleanup(manager, client, [report_r, report_w] + [fd for pair in go for fd in pair], reader)
    recs = sorted(hist.records, key=lambda r: r["t"])
    events = _trace_events("real", sc, plan, faults, hist, _mp_exits(sc, faults, recs, exitcodes), seed, "mp")
    if trace_path is not None:
        write_jsonl(trace_path, events)
    return events


def client_rss_mb() -> float:
    """This process's resident memory: what each forked engine core inherits and tears down."""
    return round(psutil.Process().memory_info().rss / 2**20, 1)


def fork_teardown_s(n: int = 15) -> float:
    """This host's cost of an MP engine core's death, without vLLM: the median time from SIGKILL
    of a fork of this process to its sentinel becoming ready (the kernel tears down the fork's
    copy of this process's address space first). Used to re-base a liveness profile measured on
    another host (:meth:`LatencyModel.on_host`)."""
    ctx = multiprocessing.get_context("fork")
    xs = []
    for _ in range(n):
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_report_and_sleep, args=(w,), daemon=True)
        p.start()
        w.close()
        r.recv()
        t0 = time.monotonic()
        os.kill(p.pid, signal.SIGKILL)
        multiprocessing.connection.wait([p.sentinel])
        xs.append(time.monotonic() - t0)
        p.join()
        r.close()
    return statistics.median(xs)


def _report_and_sleep(w) -> None:
    w.send(True)
    time.sleep(60)


def _probe_then_stop(hist, sc, client) -> None:
    """A request at ``probe_at`` (accepted, or EngineDeadError), then the client's stop at the end."""
    _sleep_until(hist, sc.probe_at)
    try:
        client.add_request(_probe_request())
        hist.add("request_accepted", error=None)
    except EngineDeadError:
        hist.add("request_failed", error="EngineDeadError")
    _sleep_until(hist, sc.duration)
    if client._finalizer.alive:
        hist.add("stop", cause="end", timeout=sc.stop_timeout)
        client.shutdown(timeout=sc.stop_timeout)


def _sleep_until(hist: _History, t: float) -> None:
    time.sleep(max(0.0, t - hist.now()))


def _fault_stop(hist: _History, client, timeout: float) -> None:
    """A ``stop`` fault: the client's real shutdown (the injector calls it)."""
    if client._finalizer.alive:
        hist.add("stop", cause="fault", timeout=timeout)
    client.shutdown(timeout=timeout)


def _shutdown_began(hist: _History, rank: int) -> float:
    """When the rank's core reported the start of its shutdown (the latest report)."""
    return max(r["t"] for r in list(hist.records) if r["ev"] == "core_shutdown" and r["rank"] == rank)


def _exitcode(proc, wait: float = 1.0) -> int | None:
    """``proc.exitcode`` of an ended process. vLLM's liveness monitor polls the same Process from its
    thread, and ``Popen.poll`` is not thread-safe: while one thread is between reaping the child and
    storing its code, another's ``waitpid`` gets ECHILD and reads None (seen once in 9 loaded runs:
    a clean exit read as None). Read again while the process has ended and the code is not stored."""
    deadline = time.monotonic() + wait
    while proc.exitcode is None and multiprocessing.connection.wait([proc.sentinel], 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc.exitcode


def _cleanup(manager, client, fds: list[int], reader: threading.Thread) -> None:
    """Never leave a process, a thread or a descriptor behind, whatever happened."""
    try:
        if client is not None:
            client.shutdown(timeout=1)
            client.resources.ctx.term()
        elif manager is not None:
            CoreEngineProcManager.shutdown(manager, timeout=1)
        _join_monitor(5)  # monitor_engine_liveness notices manager_stopped within its 1 s wait
    finally:
        if manager is not None:
            for p in manager.processes:
                if p.pid is not None and p.exitcode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGKILL)
                    p.join(5)
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if reader.is_alive():
            reader.join(5)
        _CHILD.scripts = {}


def _mp_exits(sc: ProcScenario, faults: list[Fault], recs: list[dict],
              exitcodes: dict[int, int | None]) -> dict[int, tuple[float, dict, str]]:
    """Per rank: (exit time, exit fields, latency cause). The time is the injector's signal that
    ended it, else its own last report (or its injected exit during the shutdown), else the
    manager's SIGTERM, else the end of the manager's shutdown (kill_process_tree)."""
    killed_t = next(x["t"] for x in recs if x["ev"] in ("manager_shutdown_done", "end"))
    out = {}
    for r in range(sc.dp_size):
        code = exitcodes.get(r)
        by_nemesis = [x["t"] for x in recs if x["ev"] == "signal" and x["rank"] == r
                      and code is not None and code < 0 and getattr(signal, x["signal"]) == -code]
        reported = [x["t"] for x in recs if x["ev"] == "exiting" and x["rank"] == r]
        exited = _applied_exit_faults(faults, recs, r)
        terminated = [x["t"] for x in recs if x["ev"] == "terminate" and x["rank"] == r]
        if by_nemesis:
            t = by_nemesis[0]
        elif code is not None and code >= 0 and (reported or exited):
            t = (reported or exited)[-1]
        elif code == -signal.SIGTERM and terminated:
            t = terminated[0]
        else:
            t = killed_t
        out[r] = (t, {"exitcode": code}, "signal" if (code or 0) < 0 else "exit")
    return out


def _applied_exit_faults(faults: list[Fault], recs: list[dict], rank: int) -> list[float]:
    return [x["t"] for x in recs if x["ev"] == "fault_applied" and faults[x["index"]].rank == rank
            and faults[x["index"]].signal in ("exit0", "exit1")]


def _join_monitor(timeout: float) -> None:
    for th in threading.enumerate():
        if th.name == MONITOR_THREAD:
            th.join(timeout)


def _trace_events(side: str, sc: ProcScenario, plan: FaultPlan, faults: list[Fault], hist: _History,
                  exits: dict[int, tuple[float, dict, str]], seed: int, backend: str) -> list[dict]:
    """Turn the history into trace events (the schema of models/engine_procs.py)."""
    recs = sorted(hist.records, key=lambda r: r["t"])
    name = {r: proc_name(r, sc.dp_size) for r in range(sc.dp_size)}
    ev: list[dict] = []

    def proc(t: float, event: str, **fields) -> None:
        ev.append({"kind": "proc", "t": tr(t), "event": event, **fields})

    applied = {x["index"]: x["t"] for x in recs if x["ev"] == "fault_applied"}
    for i, f in enumerate(faults):
        ev.append({"kind": "fault", "t": tr(applied[i]) if i in applied else None, "fault": f.to_dict(),
                   "applied": i in applied, "rank": f.rank})
    submitted: dict[int, dict[str, dict]] = {r: {} for r in range(sc.dp_size)}
    first_exit = min(exits, key=lambda r: (exits[r][0], r))
    for x in recs:
        e = x["ev"]
        if e == "op_submit":
            submitted[x["rank"]][x["op"]] = x
        elif e == "op_complete":
            submitted[x["rank"]].pop(x["op"], None)
            proc(x["t"], "drain" if x["shutting_down"] else "op_done", rank=x["rank"], connector=x["connector"],
                 role=x["role"], op=x["op"])
        elif e == "connector_shutdown":
            proc(x["t"], "connector_shutdown", rank=x["rank"], connector=x["connector"], role=x["role"])
        elif e == "core_shutdown":
            proc(x["t"], "core_shutdown", rank=x["rank"])
        elif e == "stop":
            proc(x["t"], "stop", cause=x["cause"], timeout=x["timeout"])
        elif e == "manager_shutdown":
            proc(x["t"], "shutdown", who="manager", cause=x["cause"])
        elif e == "detect":
            proc(x["t"], "detect", failed=x["failed_rank"], failed_name=x["failed_name"], first_exit=first_exit,
                 cause=exits[first_exit][2], latency=tr(x["t"] - exits[first_exit][0]))
        elif e == "monitor_error":
            rank = next((r for r in exits if exits[r][1].get("outcome") == "task_error"), None)
            proc(x["t"], "monitor_error", error=x["error"], rank=rank)
        elif e == "engine_dead":
            proc(x["t"], "engine_dead", via=x["via"])
        elif e in ("request_failed", "request_accepted"):
            proc(x["t"], e, error=x["error"])
    for r in range(sc.dp_size):
        t, fields, _ = exits[r]
        for op, x in sorted(submitted[r].items()):
            proc(t, "lost", rank=r, connector=x["connector"], role=x["role"], op=op)
        proc(t, "exit", rank=r, name=name[r], **fields)
    ev.sort(key=lambda e: (e["t"] is None, e["t"] or 0.0))
    last = max((e["t"] for e in ev if e["t"] is not None), default=0.0)
    head = header(side, seed, {"policy": f"real-{backend}", "scenario": sc.to_dict(), "plan": plan.to_dict()})
    slip, slipped = _max_slip(sc, faults, recs)
    done = {x["op"]: x["t"] for x in recs if x["ev"] == "op_complete"}
    op_times = {x["op"]: [tr(x["t"]), tr(done[x["op"]]) if x["op"] in done else None]
                for x in recs if x["ev"] == "op_submit"}
    return [head, *ev, {"kind": "end", "t": tr(last), "summary": summarize(ev), "max_slip": tr(slip), "slipped": slipped,
                        "op_times": op_times}]


def _max_slip(sc: ProcScenario, faults: list[Fault], recs: list[dict]) -> tuple[float, str]:
    """How late the run applied its faults against its schedule, and which: a run that slipped by
    more than the scenario's margins (a stalled machine) is no valid history. The operations', the
    probe's and the stop's times are not slips: the model takes them as the run had them
    (``runs.procs.as_run``, from the trace)."""
    slips = [(0.0, "nothing")]
    for x in recs:
        if x["ev"] == "fault_applied":
            f = faults[x["index"]]
            if f.phase == "shutdown":
                begin = [y["t"] for y in recs if y["ev"] == "core_shutdown" and y["rank"] == f.rank]
                planned = max(f.at, begin[0] + sc.shutdown_delay) if begin else x["t"]
            else:
                planned = resolve_fault_time(sc, f)
            slips.append((x["t"] - planned, f"fault {x['index']} ({f.signal})"))
    return max(slips)


# --- Ray: CoreEngineActorManager ----------------------------------------------------------------

@contextlib.contextmanager
def ray_cluster(num_cpus: int = 2):
    """A local Ray cluster for the Ray cases; on exit it is shut down and its temp dir removed
    (a short one: Ray's sockets sit ~64 characters below it)."""
    import ray
    with scratch.socket_dir("vfs-ray-", room=66) as tmp:
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
            yield ray
        finally:
            ray.shutdown()


def _ray_actor_class():
    """The engine-core actor stand-in, defined here so that Ray ships it by value (its worker
    imports neither vLLM nor this package). ``run`` has ``EngineCoreActorMixin.run``'s shape;
    there is no vLLM signal handler in an actor: Ray's SIGTERM handler raises SystemExit in
    ``run`` (its ``finally`` drains), then the worker exits."""

    class EngineCoreActorStandIn:
        def __init__(self, rank: int, script: dict, log_path: str):
            self.rank, self.s = rank, script
            self.fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
            self.t0 = 0.0
            self.shutting_down = False
            self.threads: dict[tuple[str, str], list] = {}
            self.lock = threading.Lock()

        def report(self, ev: str, **fields) -> None:
            line = json.dumps({"ev": ev, "rank": self.rank, "t": time.monotonic() - self.t0, **fields}) + "\n"
            with self.lock:
                os.write(self.fd, line.encode())

        def now(self) -> float:
            return time.monotonic() - self.t0

        def wait_for_init(self) -> int:
            return os.getpid()

        def run(self, go_path: str) -> None:
            fd = os.open(go_path, os.O_RDONLY)   # blocks until the driver opens it: both actors run
            self.t0 = float(os.read(fd, 64).decode())
            os.close(fd)
            for op in self.s["ops"]:   # each its own thread from the start: a starved actor
                threading.Thread(target=self.run_op, args=(op,), daemon=True).start()  # submits on time
            try:
                self.run_busy_loop()
            finally:
                self.shutdown()

        def run_op(self, op: dict) -> None:
            time.sleep(max(0.0, op["submit"] - self.now()))
            with self.lock:
                if self.shutting_down:
                    return
                self.threads.setdefault((op["role"], op["connector"]), []).append(threading.current_thread())
            self.report("op_submit", op=op["op"], connector=op["connector"], role=op["role"])
            time.sleep(op["dur"])
            self.report("op_complete", op=op["op"], connector=op["connector"], role=op["role"],
                        shutting_down=self.shutting_down)

        def run_busy_loop(self) -> None:
            """Steps until an injected exit; an actor has no shutdown request, so it runs until killed."""
            pending = sorted((f["t"], f["index"], f["signal"]) for f in self.s["exit_faults"] if f["t"] is not None)
            if not pending:
                threading.Event().wait()
            t, i, sig = pending[0]
            time.sleep(max(0.0, t - self.now()))
            self.report("fault_applied", index=i)
            if sig == "exit1":
                raise RuntimeError(f"injected fatal error (fault {i})")
            raise SystemExit

        def shutdown(self) -> None:
            with self.lock:
                self.shutting_down = True
            begin = self.now()
            self.report("core_shutdown")
            for f in self.s["exit_faults"]:
                at = max(f["at"], begin + self.s["shutdown_delay"]) if f["phase"] == "shutdown" else (
                    f["t"] if f["phase"] == "any" and f["t"] is not None and f["t"] >= begin else None)
                if at is None:
                    continue

                def fire(f=f, at=at):
                    time.sleep(max(0.0, at - self.now()))
                    self.report("fault_applied", index=f["index"])
                    os._exit(1 if f["signal"] == "exit1" else 0)
                threading.Thread(target=fire, daemon=True).start()
            for role, conn in self.s["shutdown_steps"]:
                self.report("connector_shutdown", connector=conn, role=role)
                for th in self.threads.get((role, conn), []):
                    th.join()
            self.report("exiting")

    return EngineCoreActorStandIn


def _start_actors(go: list[str], timeout: float = 120.0) -> float:
    """Start every actor's schedule at one t0, once all their ``run`` tasks are running (a loaded
    host dispatches a task hundreds of ms late: a t0 taken before started them off schedule).
    Each ``run`` opens its FIFO for reading; opening one for writing succeeds once it has."""
    deadline = time.monotonic() + timeout
    fds = []
    try:
        for path in go:
            while True:
                try:
                    fds.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                    break
                except OSError as exc:
                    if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                        raise RuntimeError(f"the actors' run tasks did not start within {timeout:.0f} s") from exc
                    time.sleep(0.001)
        t0 = time.monotonic()
        for fd in fds:
            os.write(fd, repr(t0).encode())
        return t0
    finally:
        for fd in fds:
            os.close(fd)


def _tail(path: str, hist: _History, stop: threading.Event, shutdown_seen: dict[int, threading.Event]) -> None:
    with open(path, "rb") as fh:
        buf = b""
        while True:
            chunk = fh.read()
            if chunk:
                buf, recs = hist.add_lines(buf + chunk)
                for rec in recs:
                    if rec["ev"] == "core_shutdown":
                        shutdown_seen[rec["rank"]].set()
            elif stop.is_set():
                return
            else:
                time.sleep(0.005)


def _watch_refs(ray, refs: list, manager, hist: _History, stop: threading.Event) -> None:
    """When each actor's run ref becomes ready, and how (observation only)."""
    left = dict(enumerate(refs))
    while left and not stop.is_set():
        ready, _ = ray.wait(list(left.values()), num_returns=len(left), timeout=0.002)
        for ref in ready:
            r = next(k for k, v in left.items() if v == ref)
            del left[r]
            try:
                ray.get(ref)
                outcome = "returned"
            except ray.exceptions.RayActorError:
                outcome = "killed" if r in manager._vfs_killed else "actor_died"
            except ray.exceptions.RayTaskError:
                outcome = "task_error"
            hist.add("ref_ready", rank=r, outcome=outcome)


def run_ray_case(sc: ProcScenario, plan: FaultPlan, *, seed: int = 0,
                 trace_path: str | Path | None = None) -> list[dict]:
    """One scenario under the real CoreEngineActorManager monitor (inside :func:`ray_cluster`)."""
    import ray
    from vllm.v1.engine.utils import CoreEngineActorManager
    if not ray.is_initialized():
        raise RuntimeError("Ray cases run inside real_procs.ray_cluster()")
    hist = _History()
    client = manager = None
    injector = ProcsInjector(sc, plan, now=hist.now, record=hist.add,
                             stop=lambda: _fault_stop(hist, client, sc.stop_timeout),
                             manager_stopped=lambda: manager.manager_stopped.is_set())
    faults = injector.faults
    tmp = tempfile.mkdtemp(prefix="vfs-raycase-")
    log_path = os.path.join(tmp, "actors.jsonl")
    open(log_path, "w").close()
    stop = threading.Event()
    shutdown_seen = {r: threading.Event() for r in range(sc.dp_size)}
    actors: list = []
    threads: list[threading.Thread] = []
    old_hook = threading.excepthook
    drain_steps = [list(s) for s in POLICIES["ray-actor"].drain.shutdown_steps()]

    def excepthook(args):
        if args.thread is not None and args.thread.name == MONITOR_THREAD:
            hist.add("monitor_error", error=type(args.exc_value).__name__.split("(")[0])
        else:
            old_hook(args)

    try:
        Actor = ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(_ray_actor_class())
        for r in range(sc.dp_size):
            script = {"ops": [op.to_dict() for op in sc.ops_of(r)], "steps": sc.steps(r),
                      "shutdown_delay": sc.shutdown_delay, "shutdown_steps": drain_steps,
                      "exit_faults": [{"index": i, "signal": f.signal, "phase": f.phase, "at": f.at, "t": t}
                                      for i, f, t in injector.exits(r)]}
            actors.append(Actor.remote(r, script, log_path))
        pids = ray.get([a.wait_for_init.remote() for a in actors], timeout=120)
        manager = object.__new__(CoreEngineActorManager)
        manager.local_engine_actors, manager.remote_engine_actors = list(actors), []
        manager.created_placement_groups, manager.placement_group_is_local = [], [True] * sc.dp_size
        manager.manager_stopped = threading.Event()
        manager.failed_proc_name = None
        manager._vfs_killed = set()
        client = _make_client(sc.dp_size, manager)
        _traced(hist, manager, client)
        traced_shutdown = manager.shutdown

        def shutdown(timeout=None):
            if not manager.manager_stopped.is_set():
                manager._vfs_killed.update(r for r, ref in enumerate(manager.run_refs)
                                           if not ray.wait([ref], timeout=0)[0])
            traced_shutdown(timeout=timeout)
        manager.shutdown = shutdown
        threading.excepthook = excepthook
        go = [os.path.join(tmp, f"go{r}") for r in range(sc.dp_size)]
        for path in go:
            os.mkfifo(path)
        manager.run_refs = [a.run.remote(path) for a, path in zip(actors, go)]
        manager.actor_run_ref_dict = dict(zip(actors, manager.run_refs))
        hist.t0 = _start_actors(go)
        for target, args in ((_tail, (log_path, hist, stop, shutdown_seen)),
                             (_watch_refs, (ray, manager.run_refs, manager, hist, stop))):
            threads.append(threading.Thread(target=target, args=args, daemon=True, name=f"ray-{target.__name__}"))
            threads[-1].start()
        client.start_engine_core_monitor()
        def ended(r: int) -> bool:
            return any(x["ev"] == "ref_ready" and x["rank"] == r for x in list(hist.records))
        injector.start({r: EngineRank(pids[r], exited=functools.partial(ended, r), alive=lambda r=r: not ended(r),
                                      shutdown_seen=shutdown_seen[r], shutdown_began=functools.partial(_shutdown_began, hist, r))
                        for r in range(sc.dp_size)})
        _probe_then_stop(hist, sc, client)
        injector.join()
        ray.wait(manager.run_refs, num_returns=len(manager.run_refs), timeout=30)
        time.sleep(0.05)
        hist.add("end")
    finally:
        stop.set()
        for th in threads:
            th.join(5)
        threading.excepthook = old_hook
        if client is not None:
            client.shutdown(timeout=1)
            client.resources.ctx.term()
            _join_monitor(RAY_WAIT_TIMEOUT + 1)  # its ray.wait(timeout=5) ends, then manager_stopped
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        shutil.rmtree(tmp, ignore_errors=True)
    recs = sorted(hist.records, key=lambda r: r["t"])
    events = _trace_events("real", sc, plan, faults, hist, _ray_exits(sc, faults, recs), seed, "ray")
    if trace_path is not None:
        write_jsonl(trace_path, events)
    return events


def _ray_exits(sc: ProcScenario, faults: list[Fault], recs: list[dict]) -> dict[int, tuple[float, dict, str]]:
    """Per rank: when its run ref ended (the signal, its last report, its injected exit, or the
    manager's ray.kill), the outcome, and the latency cause."""
    out = {}
    for r in range(sc.dp_size):
        ready = next((x for x in recs if x["ev"] == "ref_ready" and x["rank"] == r), None)
        outcome = ready["outcome"] if ready else "killed"
        signalled = [x["t"] for x in recs if x["ev"] == "signal" and x["rank"] == r]
        reported = [x["t"] for x in recs if x["ev"] == "exiting" and x["rank"] == r]
        exited = _applied_exit_faults(faults, recs, r)
        killed = [x["t"] for x in recs if x["ev"] == "manager_shutdown"]
        if outcome == "killed" and reported and reported[-1] < killed[0]:
            # its run() had ended before the kill; Ray had not told the driver yet (a loaded host)
            fatal = any(faults[x["index"]].signal == "exit1" for x in recs
                        if x["ev"] == "fault_applied" and faults[x["index"]].rank == r)
            outcome = "task_error" if fatal else "actor_died"
        if outcome == "killed":
            t, cause = killed[0], "signal"
        elif reported or exited:   # it returned from run() (after its drain), whatever ended the loop
            t, cause = (reported or exited)[-1], "exit"
        elif signalled:
            t, cause = signalled[0], "signal"
        else:
            t, cause = ready["t"], "exit"
        out[r] = (t, {"outcome": outcome}, cause)
    return out
