"""Real DP load balancing on CPU, without engines: vLLM 0.26.0's ``DPLBAsyncMPClient`` engine
choice and stats-update task, and ``DPCoordinatorProc``'s stats loop on a virtual clock; the same
interface as models/dp_lb.py's twins.

- :class:`RealDPLBClient`: a ``DPLBAsyncMPClient`` built by its own ``__init__`` with the parent's
  (``DPAsyncMPClient.__init__``, which starts engines and sockets) replaced by the attributes it
  would set (``core_engines`` = each rank's ZMQ identity, ``engine_ranks_managed``, ``lb_engines``
  all zero, ``client_index``, ...); so ``eng_start_index`` comes from vLLM's own expression.
  :meth:`~RealDPLBClient.choose` calls the real ``get_core_engine_for_request`` on a real
  ``EngineCoreRequest`` and returns the rank of the identity it chose. :meth:`~RealDPLBClient.publish`
  goes through the real ``run_engine_stats_update_task`` (started by ``_ensure_stats_update_task``
  on an asyncio loop the driver owns): the counts are published, msgpack-encoded as the coordinator
  does, on an inproc XPUB socket the task's XSUB subscribes to, and the call returns once the task
  has replaced ``lb_engines``.
- :class:`RealDPCoordinator`: the real ``DPCoordinatorProc.process_input_socket`` (on an instance
  built with ``object.__new__``) runs in a thread against stand-in sockets and poller and a
  virtual millisecond clock (its code runs with the module's ``make_zmq_socket``, ``zmq`` and
  ``time`` names bound to those stand-ins). Its ``poll(timeout)`` hands the deadline to the caller and waits: the
  caller either delivers an engine's stats (a real ``EngineCoreOutputs(scheduler_stats=...)``,
  encoded with vLLM's ``MsgpackEncoder``, on ``output_back``; the clock moves to its arrival) or
  lets the poll time out at the deadline, and the loop's ``publish_front.send`` is what it
  published. The loop and the caller take turns, so runs are deterministic.

vLLM is imported lazily (``skip_reason`` says why it cannot run).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import types
from collections.abc import Sequence
from types import SimpleNamespace
from unittest import mock

_EPOCH_MS = 1_764_547_200_000   # the virtual clock's 0 on the real loop's time.time() (2025-12-01)
_REPLY_TIMEOUT_S = 30.0   # a hung real task or loop fails the run instead of hanging it (never judged)


def skip_reason() -> str | None:
    """Why the real DP load-balancing code cannot run here (None: it can)."""
    try:
        import vllm.v1.engine.coordinator  # noqa: F401
        import vllm.v1.engine.core_client  # noqa: F401
    except ImportError as exc:
        return f"needs vllm==0.26.0 ({exc})"
    return None


class RealDPLBClient:
    """vLLM's ``DPLBAsyncMPClient``: its engine choice and its stats-update task."""

    def __init__(self, num_ranks: int, *, client_count: int = 1, client_index: int = 0):
        import zmq
        import zmq.asyncio
        from vllm.utils.network_utils import get_open_zmq_inproc_path, make_zmq_socket
        from vllm.v1.engine import core_client

        def parent_init(client, vllm_config, executor_class, log_stats, client_addresses=None,
                        client_count=1, client_index=0):
            # what MPClient / DPAsyncMPClient.__init__ set that the choice and the stats task read
            client.vllm_config, client.client_index, client.current_wave = vllm_config, client_index, 0
            client.engine_ranks_managed = list(range(num_ranks))
            client.core_engines = [rank.to_bytes(2, "little") for rank in client.engine_ranks_managed]
            client.lb_engines = [[0, 0] for _ in client.core_engines]
            client.engines_running = False
            client.ctx = zmq.asyncio.Context()
            client.resources = SimpleNamespace(stats_update_task=None)
            client.stats_update_address = get_open_zmq_inproc_path()
            client.first_req_sock_addr = get_open_zmq_inproc_path()
            client.first_req_send_socket = make_zmq_socket(client.ctx, client.first_req_sock_addr, zmq.PAIR,
                                                           bind=True)

        with mock.patch.object(core_client.DPAsyncMPClient, "__init__", parent_init):
            self.client = core_client.DPLBAsyncMPClient(None, None, False, None, client_count, client_index)
        self.num_ranks = num_ranks
        self._loop = asyncio.new_event_loop()
        self._pub = make_zmq_socket(self.client.ctx, self.client.stats_update_address, zmq.XPUB, bind=True)
        self._run(self._start())
        self._next_id = 0

    @property
    def lb_engines(self) -> list[list[int]]:
        return self.client.lb_engines

    @property
    def eng_start_index(self) -> int:
        return self.client.eng_start_index

    async def _start(self):
        self.client._ensure_stats_update_task()
        assert await self._pub.recv() == b"\x01"   # the task's XSUB subscribed

    async def _publish(self, counts):
        import msgspec

        before = self.client.lb_engines
        await self._pub.send(msgspec.msgpack.encode(([list(c) for c in counts], 0, True)))
        while self.client.lb_engines is before:
            task = self.client.resources.stats_update_task
            if task.done():
                task.result()   # raises what the task raised
                raise RuntimeError("the stats-update task ended")
            await asyncio.sleep(0)

    def _run(self, coro):
        return self._loop.run_until_complete(asyncio.wait_for(coro, _REPLY_TIMEOUT_S))

    def publish(self, counts: Sequence[tuple[int, int]]) -> None:
        self._run(self._publish(counts))

    def choose(self, data_parallel_rank: int | None = None) -> int:
        from vllm import SamplingParams
        from vllm.v1.engine import EngineCoreRequest

        request = EngineCoreRequest(request_id=f"req-{self._next_id}", prompt_token_ids=[1, 2, 3],
                                    mm_features=None, sampling_params=SamplingParams(max_tokens=1),
                                    pooling_params=None, arrival_time=0.0, lora_request=None, cache_salt=None,
                                    data_parallel_rank=data_parallel_rank)
        self._next_id += 1
        return int.from_bytes(self.client.get_core_engine_for_request(request), "little")

    def close(self) -> None:
        task = self.client.resources.stats_update_task
        if task is not None:
            task.cancel()
            self._loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
        self._loop.close()
        self._pub.close(linger=0)
        self.client.first_req_send_socket.close(linger=0)
        self.client.ctx.term()


class _Stop(Exception):
    """Ends the real coordinator loop (raised from its poll)."""


class RealDPCoordinator:
    """vLLM's ``DPCoordinatorProc`` stats loop, stepped by the caller on a virtual clock."""

    def __init__(self, num_ranks: int, *, min_stats_update_interval: float = 0.1, start: float = 0.0):
        from vllm.v1.engine import coordinator

        self._coordinator_module = coordinator
        proc = object.__new__(coordinator.DPCoordinatorProc)
        proc.engines = [coordinator.EngineState() for _ in range(num_ranks)]
        proc.stats_update_interval_ms = round(min_stats_update_interval * 1000)
        proc.enable_wave_coordination = True   # MoE: the deployments whose engines send stats
        proc.ctx = None   # only handed to make_zmq_socket
        self.engines = proc.engines
        self.now_ms = round(start * 1000)
        self._to_loop: queue.Queue = queue.Queue()
        self._from_loop: queue.Queue = queue.Queue()
        self._published: list = []
        self._sockets: dict = {}
        self._deadline_ms: int | None = None
        self._thread = threading.Thread(target=self._serve, args=(proc,), name="real-dp-coordinator", daemon=True)
        self._thread.start()
        self._await_poll()

    # --- the loop's side (its thread) ---

    def _serve(self, proc) -> None:
        try:
            self._process_input_socket()(proc, "front", "back_output", "back_publish")
        except _Stop:
            self._from_loop.put(("stopped", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self._from_loop.put(("error", exc))

    def _process_input_socket(self):
        """vLLM's ``process_input_socket`` code with the stand-ins for its module's
        ``make_zmq_socket``, ``zmq`` and ``time`` (a copy of its globals: nothing is patched)."""
        import zmq

        driver = self

        class Socket:
            def __init__(self, path):
                self.path, self.inbox = path, []

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def recv(self):
                if self.path == "back_publish" and not self.inbox:
                    return b"\x01"   # each engine's subscription, then nothing
                return self.inbox.pop(0)

            def send(self, buf):
                if self.path == "front":
                    driver._published.append(buf)

            def send_multipart(self, bufs):   # START_DP_WAVE to the engines: no engines here
                pass

        class Poller:
            def register(self, socket, flags):
                pass

            def poll(self, timeout):
                driver._from_loop.put(("poll", driver.now_ms + timeout))
                what, socket = driver._to_loop.get()
                if what == "stop":
                    raise _Stop
                return [] if socket is None else [(socket, zmq.POLLIN)]

        def make_zmq_socket(path, ctx, socket_type, bind):
            return self._sockets.setdefault(path, Socket(path))

        m = self._coordinator_module
        real = m.DPCoordinatorProc.process_input_socket
        names = {**vars(m), "make_zmq_socket": make_zmq_socket,
                 "zmq": SimpleNamespace(Poller=Poller, POLLIN=zmq.POLLIN, XPUB=zmq.XPUB, PULL=zmq.PULL),
                 # int(time.time() * 1000) == _EPOCH_MS + now_ms: the loop's "last published at 0" is long ago
                 "time": SimpleNamespace(time=lambda: (_EPOCH_MS + self.now_ms + 0.5) / 1000)}
        return types.FunctionType(real.__code__, names, real.__name__, real.__defaults__, real.__closure__)

    # --- the caller's side ---

    def _await_poll(self) -> None:
        try:
            what, value = self._from_loop.get(timeout=_REPLY_TIMEOUT_S)
        except queue.Empty:
            raise RuntimeError("the real coordinator loop did not poll again") from None
        if what == "error":
            raise value
        if what != "poll":
            raise RuntimeError(f"the real coordinator loop ended ({what})")
        self._deadline_ms = value

    def scheduler_stats(self, now: float, eng_index: int, num_waiting_reqs: int, num_running_reqs: int,
                        step_counter: int, current_wave: int = 0) -> None:
        from vllm.v1.engine import EngineCoreOutputs
        from vllm.v1.metrics.stats import SchedulerStats
        from vllm.v1.serial_utils import MsgpackEncoder

        now_ms = round(now * 1000)
        if not self.now_ms <= now_ms <= self._deadline_ms:
            raise ValueError(f"stats at {now_ms} ms: the loop is at {self.now_ms} ms, polling until "
                             f"{self._deadline_ms} ms")
        stats = SchedulerStats(num_running_reqs, num_waiting_reqs, step_counter=step_counter,
                               current_wave=current_wave)
        [buf] = MsgpackEncoder().encode(EngineCoreOutputs(engine_index=eng_index, scheduler_stats=stats))
        output_back = self._sockets["back_output"]
        output_back.inbox.append(bytes(buf))
        self.now_ms = now_ms
        self._to_loop.put(("event", output_back))
        self._await_poll()

    def publish_time(self) -> float:
        return self._deadline_ms / 1000

    def maybe_publish(self, now: float) -> list[list[int]] | None:
        import msgspec

        now_ms = round(now * 1000)
        if now_ms < self._deadline_ms:
            return None
        self.now_ms = self._deadline_ms   # the poll times out at its deadline
        self._to_loop.put(("timeout", None))
        self._await_poll()
        [buf] = self._published
        self._published.clear()
        counts, _wave, _running = msgspec.msgpack.decode(buf)
        return counts

    def close(self) -> None:
        if self._thread.is_alive():
            self._to_loop.put(("stop", None))
            self._thread.join(_REPLY_TIMEOUT_S)
