"""Async EPLB (vLLM PR #40730) as SimPy processes: ``EplbState.step()`` and the async worker.

The twin of vLLM 0.26.0's vllm/distributed/eplb:

- :meth:`EplbState.step` is the engine's side, called after every forward pass: the step counter
  (``add_model`` starts it at ``interval - interval // 4``); while ``rebalanced``, the
  ``_all_ranks_result_ready`` all_reduce (``step_sync`` seconds) and, when the worker has published
  a layer, ``_move_to_workspace`` (``move_from_buffer`` + the layer's map commit, then
  ``consumed_event.record()``): one layer per step; once the counter reaches ``step_interval`` and
  no rearrangement is in flight, ``rearrange()`` (``rebalanced = True``, ``rearrange_event.record()``).
- :meth:`EplbState.transfer_run_periodically` is the worker thread: it waits for
  ``rearrange_event``, snapshots the expert map and computes the new placement (``rebalance``
  seconds), then per layer: the coordinated-stop all_reduce (``gap``), ``transfer_layer`` on its
  stream and ``cuda_stream.synchronize()`` (:meth:`EplbLink.transfer_time`), ``pending_result``,
  and ``consumed_event.wait()`` before the next layer.

Costs: a layer's transfer takes ``latency + moved_bytes / bandwidth`` (``setup`` more for the first
transfer of a process: the link's connection set-up), where ``moved_bytes`` is the largest
per-rank count of expert copies sent plus received (:func:`layer_transfers`, the counting of
``move_to_buffer``) times ``expert_bytes``. In an engine run (``EngineCore(eplb=...)``) a step pays
what ``EplbState.step()`` costs (``step_sync`` while rebalancing, plus the consumed layer's
``move_from_buffer`` copy at ``publish_bandwidth``) and, as the transfer runs on its own stream
beside the forward pass, ``contention`` times the transfer time that overlapped its forward.

Faults (faults/plan.py): ``slow_link`` divides the link's bandwidth by ``factor`` for transfers
that start in [start, end); ``eplb_rank_death`` kills one EP rank as it starts a layer of a rearrangement: the
survivors' next ``EplbState.step()`` all_reduce raises (gloo: connection reset by peer), so the
engine core dies at the end of the next step (:class:`EplbRankDeath`).

vLLM's rules that the checker's mutants break are class attributes of :class:`EplbState`
(``sync_stream_before_publish``, ``publish_each_layer``); the broken variants live with the
checkers (harness/checkers/mutants.py).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Callable

import simpy

from ..inputs import NonNegative, NonNegativeInt, Positive, PositiveInt, checked

class EplbConfigError(ValueError):
    """An invalid ``eplb`` config section; the message is one line."""


class EplbRankDeath(Exception):
    """``EplbState.step()`` met a dead EP rank in its all_reduce: the engine core raises."""

    def __init__(self, fault):
        super().__init__(f"EP rank {fault.ep_rank} died during a rearrangement")
        self.fault = fault


@dataclass(frozen=True)
class EplbLink:
    """Per-layer costs of the async worker (seconds, bytes per second). Defaults: vLLM 0.26.0's
    async path (``torch_gloo``: device->host, gloo, host->device) measured on 2 H200s
    (benchmarks/results/gpu/eplb.txt); ``setup``: a worker's first transfer was 6-16 ms slower."""
    latency: NonNegative = 4.8e-3
    bandwidth: Positive = 3.0e9
    setup: NonNegative = 1.0e-2
    gap: NonNegative = 2.1e-3
    rebalance: NonNegative = 9.0e-4

    def transfer_time(self, moved_bytes: int, first: bool = False) -> float:
        return self.latency + moved_bytes / self.bandwidth + (self.setup if first else 0.0)


@dataclass(frozen=True)
class EplbConfig:
    """The ``eplb`` section of a run config. Defaults: a DeepSeek-V3-like MoE (58 MoE layers,
    256 routed experts + 32 redundant on 8 EP ranks, 3 x 7168 x 2048 fp8 weights per expert),
    the link and ``step_sync`` measured on 2 H200s; ``publish_bandwidth`` (the main stream's
    ``move_from_buffer`` copy) and ``contention`` (how much a transfer beside the forward slows
    it) are assumptions, not measurements."""
    layers: PositiveInt = 58
    logical_experts: PositiveInt = 256
    redundant_experts: NonNegativeInt = 32
    ep_size: PositiveInt = 8
    expert_bytes: NonNegativeInt = 3 * 7168 * 2048
    step_interval: PositiveInt = 3000
    link: EplbLink = EplbLink()
    step_sync: NonNegative = 2.6e-4
    publish_bandwidth: Positive = 1.0e12
    contention: NonNegative = 0.1

    @property
    def physical_experts(self) -> int:
        return self.logical_experts + self.redundant_experts

    def to_dict(self) -> dict:
        return asdict(self)


def config_from_dict(d: dict) -> EplbConfig:
    """Validate a parsed ``eplb`` section (its schema: the fields' annotations; one-line errors)."""
    cfg = checked(EplbConfig, d, "", EplbConfigError, at="eplb")
    if cfg.physical_experts % cfg.ep_size:
        raise EplbConfigError(f"eplb: logical_experts + redundant_experts ({cfg.physical_experts}) "
                              f"must be a multiple of ep_size ({cfg.ep_size})")
    return cfg


def initial_map(cfg: EplbConfig) -> list[int]:
    """``EplbState.build_initial_global_physical_to_logical_map``."""
    return list(range(cfg.logical_experts)) + [i % cfg.logical_experts for i in range(cfg.redundant_experts)]


def _holders(row: list[int], expert: int, n_local: int) -> list[int]:
    """Ranks holding ``expert`` in ``row``, in order of first appearance (get_ep_ranks_with_experts_batch)."""
    out: list[int] = []
    for pos, e in enumerate(row):
        if e == expert and pos // n_local not in out:
            out.append(pos // n_local)
    return out


def layer_transfers(old: list[int], new: list[int], ep_size: int) -> list[tuple[int, int]]:
    """Per rank, (expert copies sent, expert copies received) for one layer: ``move_to_buffer``'s
    ``add_send`` / ``add_recv`` calls (each carries one expert's rows of every weight tensor)."""
    n = len(old) // ep_size
    out = []
    for r in range(ep_size):
        old_local, new_local = old[r * n:(r + 1) * n], new[r * n:(r + 1) * n]
        sent = 0
        for e in sorted({x for x in old_local if x != -1}):
            send = _holders(old, e, n)
            recv = [q for q in _holders(new, e, n) if q not in send]
            if not recv:
                continue
            k, pos = len(recv) // len(send), send.index(r)
            sent += len(recv[pos * k:(pos + 1) * k]) + (1 if len(send) * k + pos < len(recv) else 0)
        need = {e for o, e in zip(old_local, new_local) if e != -1 and o != e and e not in old_local}
        out.append((sent, sum(1 for e in need if _holders(old, e, n))))
    return out


def shuffle_policy(cfg: EplbConfig, rng: random.Random) -> Callable[[int, list[list[int]]], list[list[int]]]:
    """A stand-in for ``DefaultEplbPolicy`` in studies: each layer's new placement is a seeded
    shuffle of the old one (the replica counts are kept)."""
    def policy(_cycle: int, old: list[list[int]]) -> list[list[int]]:
        return [rng.sample(row, len(row)) for row in old]
    return policy


class EplbState:
    """The engine's EPLB state and its async worker, on a SimPy environment."""

    # vLLM 0.26.0's rules (a mutant subclass breaks one of them)
    sync_stream_before_publish = True  # cuda_stream.synchronize() before a layer's result is published
    publish_each_layer = True          # one layer published (and consumed) at a time

    def __init__(self, env: simpy.Environment, cfg: EplbConfig,
                 policy: Callable[[int, list[list[int]]], list[list[int]]],
                 emit: Callable[[dict], None] = lambda ev: None):
        self.env, self.cfg, self.policy, self.emit = env, cfg, policy, emit
        self.physical_to_logical_map = [initial_map(cfg) for _ in range(cfg.layers)]
        self.expert_rearrangement_step = cfg.step_interval - cfg.step_interval // 4
        self.rebalanced = False
        self.pending_results: list[tuple[int, list[int]]] = []  # at most one, but for the mutant
        self.rearrange_event = env.event()
        self.consumed_event: simpy.Event = env.event()
        self.rearrangements = 0
        self.transferred = 0              # layer transfers so far (the first pays the link's setup)
        self.busy: list[tuple[float, float]] = []  # the worker's transfer intervals (for contention)
        self.slow: list[tuple[float, float, float]] = []  # slow_link windows
        self.deaths: list = []            # eplb_rank_death faults (ep_rank, rearrangement, layer)
        self.dead = None                  # the eplb_rank_death fault that took effect
        self.step_index = 0
        env.process(self.transfer_run_periodically())

    # ---- fault hooks (faults/sim_injector.py) ------------------------------------------------

    def slow_link(self, start: float, end: float, factor: float) -> None:
        """A layer transfer starting in [start, end) moves its bytes ``factor`` times slower."""
        self.slow.append((start, end, factor))

    def rank_death(self, fault) -> None:
        """EP rank ``fault.ep_rank`` dies as it starts layer ``fault.layer`` of rearrangement
        ``fault.rearrangement``."""
        self.deaths.append(fault)

    # ---- the engine's side: EplbState.step() ---------------------------------------------

    def step(self, step_index: int) -> float:
        """``EplbState.step()`` after a forward pass; returns the seconds it costs the step."""
        self.step_index = step_index
        self.expert_rearrangement_step += 1
        cost = 0.0
        if self.rebalanced:
            if self.dead is not None:
                raise EplbRankDeath(self.dead)
            cost += self.cfg.step_sync          # _all_ranks_result_ready's all_reduce
            for layer, new_row in self.pending_results:
                cost += self._move_to_workspace(layer, new_row)
            if self.pending_results:
                self.pending_results = []
                consumed = self.consumed_event     # record() once the copies ran
                self.env.timeout(cost).callbacks.append(lambda _ev: consumed.succeed())
        if self.expert_rearrangement_step >= self.cfg.step_interval and not self.rebalanced:
            self.expert_rearrangement_step = 0
            self.rearrange()
        return cost

    def _move_to_workspace(self, layer: int, new_row: list[int]) -> float:
        old_row = self.physical_to_logical_map[layer]
        self.physical_to_logical_map[layer] = new_row
        if layer == self.cfg.layers - 1:
            self.rebalanced = False
        self.emit({"kind": "eplb", "event": "consume", "layer": layer, "step": self.step_index,
                   "t": round(self.env.now, 9)})
        n = self.cfg.physical_experts // self.cfg.ep_size
        changed = max(sum(1 for o, e in zip(old_row[r * n:(r + 1) * n], new_row[r * n:(r + 1) * n]) if o != e)
                      for r in range(self.cfg.ep_size))
        return changed * self.cfg.expert_bytes / self.cfg.publish_bandwidth

    def rearrange(self) -> None:
        self.rebalanced = True
        self.emit({"kind": "eplb", "event": "rearrange", "step": self.step_index, "t": round(self.env.now, 9)})
        self.rearrange_event.succeed()

    def overlap(self, start: float, end: float) -> float:
        """Seconds of [start, end) during which the worker was transferring."""
        self.busy = [b for b in self.busy if b[1] > start]
        return sum(max(0.0, min(end, b) - max(start, a)) for a, b in self.busy)

    # ---- the worker thread: transfer_run_periodically ------------------------------------

    def transfer_run_periodically(self):
        env, cfg = self.env, self.cfg
        while True:
            yield self.rearrange_event
            self.rearrange_event = env.event()
            cycle = self.rearrangements
            self.rearrangements += 1
            old = [list(row) for row in self.physical_to_logical_map]  # the snapshot at wake-up
            new = self.policy(cycle, old)
            yield env.timeout(cfg.link.rebalance)
            done = []
            for layer in range(cfg.layers):
                yield env.timeout(cfg.link.gap)        # the coordinated-stop all_reduce
                if self.dead is not None:
                    return
                death = next((f for f in self.deaths if f.rearrangement == cycle and f.layer == layer), None)
                if death is not None:
                    self.dead = death
                    self.emit({"kind": "eplb", "event": "rank_death", "ep_rank": death.ep_rank, "layer": layer,
                               "t": round(env.now, 9)})
                    return
                per_rank = layer_transfers(old[layer], new[layer], cfg.ep_size)
                moved = max(s + r for s, r in per_rank) * cfg.expert_bytes
                start = env.now
                slow = next((f for a, b, f in self.slow if a <= start < b), 1.0)
                dur = cfg.link.transfer_time(moved * slow, first=self.transferred == 0)
                self.transferred += 1
                self.busy.append((start, start + dur))
                ev = {"kind": "eplb", "event": "transfer", "layer": layer, "t": round(start, 9),
                      "end": round(start + dur, 9), "dur": round(dur, 9),
                      "sent": [s for s, _ in per_rank], "recv": [r for _, r in per_rank]}
                if not self.sync_stream_before_publish:  # published when transfer_layer returns
                    self.emit(ev)
                    self._publish(layer, new[layer])
                    yield self.consumed_event
                    continue
                yield env.timeout(dur)                 # transfer_layer + cuda_stream.synchronize()
                self.emit(ev)
                if not self.publish_each_layer:
                    done.append((layer, new[layer]))
                    continue
                self._publish(layer, new[layer])
                yield self.consumed_event         # consumed_event.wait()
            for layer, row in done:
                self._publish(layer, row)

    def _publish(self, layer: int, new_row: list[int]) -> None:
        """``pending_result = AsyncEplbLayerResult(...)`` with a fresh ``consumed_event``."""
        self.pending_results.append((layer, new_row))
        self.consumed_event = self.env.event()
        self.emit({"kind": "eplb", "event": "publish", "layer": layer, "t": round(self.env.now, 9)})
