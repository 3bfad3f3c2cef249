"""Data-parallel load balancing: the front-end's choice of engine (``DPLBAsyncMPClient``) and the
DP coordinator's publication of the engines' [waiting, running] counts (``DPCoordinatorProc``).

The twins of vLLM 0.26.0's vllm/v1/engine:

- :class:`DPLoadBalancer` is ``DPLBAsyncMPClient.get_core_engine_for_request`` (core_client.py)
  with the ``lb_engines`` it reads. A request with ``data_parallel_rank`` set goes to that rank
  (``InputProcessor.process_inputs`` refuses one outside ``[0, num_ranks)``; the counts and the
  scan start are left alone). Otherwise the scan starts at ``eng_start_index`` (first
  ``num_ranks * client_index // client_count``) and takes the engine of least ``waiting * 4 +
  running`` (strict ``<``: ties go to the first in scan order), adds ``client_count`` to that
  engine's waiting count (the other clients route too, unseen until the next publication) and
  moves ``eng_start_index`` one on (``(eng_start_index + 1) % num_engines``, so ties rotate).
  :meth:`DPLoadBalancer.publish` is the client's stats-update task
  (``run_engine_stats_update_task``): ``self.lb_engines`` becomes the published list, dropping
  the local increments. Not modelled: late-interaction pooling requests (pinned by a crc32 of
  their query key), hybrid LB's slice of the global counts (``engine_ranks_managed``: a client
  here manages every rank), elastic-EP resizing.
- :class:`DPCoordinator` is ``DPCoordinatorProc.process_input_socket``'s load-balancing half
  (coordinator.py). Engines send ``SchedulerStats(num_running_reqs, num_waiting_reqs,
  step_counter, current_wave)`` when their counts change (:meth:`DPCoordinator.scheduler_stats`).
  The loop publishes when its poll times out, the timeout taken afresh after every message:
  ``max(min_timeout, wait_for - elapsed)`` with ``wait_for`` = ``min_stats_update_interval_ms``
  (100) while counts changed since the last publication of the current counts, 5000 otherwise,
  ``elapsed`` the time since the last publication and ``min_timeout`` 50 ms (0 while a snapshot
  is held): so a stream of stats closer than 50 ms apart holds a publication back. When stats of a
  newer (wave, step) arrive while counts have changed, the counts before them are kept
  (``last_step_counts``) and the next timeout publishes that snapshot (counts stay "changed");
  otherwise it publishes the current counts and they are no longer "changed". Times are taken to
  the millisecond, as vLLM's loop does; stats that arrive at the publication's time are applied
  first. Not modelled: wave coordination (MoE ``START_DP_WAVE``; a wave-state message carries no
  counts), the coordinator's delivery delays (the caller adds them).

Which engines send stats, read in vLLM 0.26.0 (engine/core.py): only ``DPEngineCoreProc``
(MoE models) calls ``_maybe_publish_request_counts``, before and after each engine step, with
``Scheduler.get_request_counts()`` = (``len(running)``, ``len(waiting) + len(skipped_waiting)``).
Dense models' DP engines are plain ``EngineCoreProc``s that send none, so their coordinator
publishes all-zero counts (50 ms after start, then every 5 s) and each client balances on its own
increments since the last publication.

In a simulation (harness/runs/dp_lb.py drives them so, against vLLM's code)::

    # an engine whose (running, waiting) changed, before and after each step (MoE engines only)
    coordinator.scheduler_stats(now, rank, num_waiting, num_running, step_counter)
    # the coordinator: wake at coordinator.publish_time() unless stats arrive first, then
    counts = coordinator.maybe_publish(now)
    for lb in clients: lb.publish(counts)        # each client's DPLoadBalancer
    rank = clients[i].choose(request_rank)       # a request arriving at client i
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

STATS_UPDATE_INTERVAL = 0.1   # s, DPCoordinatorProc min_stats_update_interval_ms
IDLE_STATS_UPDATE_INTERVAL = 5.0   # s, the coordinator's period while no counts changed
_MIN_TIMEOUT_MS = 50   # the coordinator waits this long for the rest of a step's stats


class DPLoadBalancer:
    """One front-end client's ``DPLBAsyncMPClient`` engine choice over ``num_ranks`` engines."""

    waiting_weight = 4   # score = waiting * 4 + running; a mutant overrides it

    def __init__(self, num_ranks: int, *, client_count: int = 1, client_index: int = 0):
        if num_ranks < 2:
            raise ValueError(f"num_ranks must be > 1 (DPLBAsyncMPClient asserts it), got {num_ranks}")
        if not 0 <= client_index < client_count:
            raise ValueError(f"client_index must be in [0, {client_count}), got {client_index}")
        self.num_ranks = num_ranks
        self.client_count = client_count
        self.client_index = client_index
        self.lb_engines: list[list[int]] = [[0, 0] for _ in range(num_ranks)]   # [waiting, running] per rank
        self.eng_start_index = num_ranks * client_index // client_count

    def publish(self, counts: Sequence[tuple[int, int]]) -> None:
        """The coordinator's published [waiting, running] per rank replaces ``lb_engines``."""
        if len(counts) != self.num_ranks:
            raise ValueError(f"published counts for {len(counts)} ranks, the client has {self.num_ranks}")
        self.lb_engines = [[int(waiting), int(running)] for waiting, running in counts]

    def choose(self, data_parallel_rank: int | None = None) -> int:
        """The rank a new request goes to (``get_core_engine_for_request``), with its local increment."""
        if data_parallel_rank is not None:
            if not 0 <= data_parallel_rank < self.num_ranks:
                raise ValueError(f"data_parallel_rank {data_parallel_rank} is out of range [0, {self.num_ranks}).")
            return data_parallel_rank
        current_counts = self.lb_engines
        num_engines = len(current_counts)
        min_score = sys.maxsize
        eng_index = 0
        for i in range(num_engines):
            idx = (self.eng_start_index + i) % num_engines
            waiting, running = current_counts[idx]
            score = waiting * self.waiting_weight + running
            if score < min_score:
                min_score = score
                eng_index = idx
        current_counts[eng_index][0] += self.client_count
        self.eng_start_index = (self.eng_start_index + 1) % num_engines
        return eng_index


class DPCoordinator:
    """``DPCoordinatorProc``'s stats loop: when it publishes the engines' counts, and which."""

    keep_previous_step = True   # a newer step's stats keep the counts before them (a mutant drops this)

    def __init__(self, num_ranks: int, *, min_stats_update_interval: float = STATS_UPDATE_INTERVAL,
                 start: float = 0.0):
        self.engines: list[list[int]] = [[0, 0] for _ in range(num_ranks)]   # EngineState.request_counts
        self.stats_update_interval_ms = _ms(min_stats_update_interval)
        self.stats_changed = False
        self.last_stats_step = -1
        self.last_stats_wave = -1
        self.last_step_counts: list[list[int]] | None = None
        self.last_publish_ms: int | None = None   # vLLM starts at 0 ms since the epoch: long ago
        self.poll_start_ms = _ms(start)

    def scheduler_stats(self, now: float, eng_index: int, num_waiting_reqs: int, num_running_reqs: int,
                        step_counter: int, current_wave: int = 0) -> None:
        """An engine's ``SchedulerStats`` arrives (the ``output_back`` socket) at ``now``, which must
        not be past :meth:`publish_time` (call :meth:`maybe_publish` first)."""
        now_ms = _ms(now)
        if not self.poll_start_ms <= now_ms <= self._publish_ms():
            raise ValueError(f"stats at {now_ms} ms: the coordinator is at {self.poll_start_ms} ms and "
                             f"publishes at {self._publish_ms()} ms")
        if (current_wave > self.last_stats_wave
                or current_wave == self.last_stats_wave and step_counter > self.last_stats_step):
            if self.stats_changed and self.keep_previous_step:
                self.last_step_counts = [list(c) for c in self.engines]
            self.last_stats_step = step_counter
            self.last_stats_wave = current_wave
        # (stats of an older step are applied too: vLLM only logs a warning)
        self.engines[eng_index] = [num_waiting_reqs, num_running_reqs]
        self.stats_changed = True
        self.poll_start_ms = now_ms

    def publish_time(self) -> float:
        """When the poll times out and the counts are published, if no stats arrive first."""
        return self._publish_ms() / 1000

    def maybe_publish(self, now: float) -> list[list[int]] | None:
        """The counts published at :meth:`publish_time` if that is not after ``now`` (a fresh list
        for the clients), else None."""
        due_ms = self._publish_ms()
        if _ms(now) < due_ms:
            return None
        if self.last_step_counts is not None:
            counts, self.last_step_counts = self.last_step_counts, None
        else:
            counts = [list(c) for c in self.engines]
            self.stats_changed = False
        self.last_publish_ms = self.poll_start_ms = due_ms
        return counts

    def _publish_ms(self) -> int:
        min_timeout = _MIN_TIMEOUT_MS if self.last_step_counts is None else 0
        if self.last_publish_ms is None:
            return self.poll_start_ms + min_timeout
        wait_for = self.stats_update_interval_ms if self.stats_changed else _ms(IDLE_STATS_UPDATE_INTERVAL)
        return max(self.poll_start_ms + min_timeout, self.last_publish_ms + wait_for)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
