"""A small twin of vLLM 0.26.0's v1 ``Scheduler`` (FCFS): ``schedule()`` and ``update_from_output()``.

Mirrored from ``vllm/v1/core/sched/scheduler.py``, for text and multimodal decoder-only models,
one full-attention KV group, optional prefix caching, no speculative decoding, synchronous
scheduling:

- RUNNING requests first, in order: ``num_new_tokens = num_tokens - num_computed_tokens``,
  clipped by ``long_prefill_token_threshold``, the token budget and ``max_model_len - 1``;
  encoder inputs in the window are scheduled (``_try_schedule_encoder_inputs``); KV blocks are
  allocated and, when the pool is short, the *last* running request is preempted (recompute:
  blocks freed, ``num_computed_tokens = 0``, put at the front of ``waiting``) until the
  allocation fits or the request itself was preempted.
- Then, only if nothing was preempted, WAITING requests: ``skipped_waiting`` before ``waiting``;
  stop at ``max_num_seqs``; a new request first takes its prefix-cache hit (full blocks, at most
  ``num_tokens - 1`` tokens), then the KV connector's (``get_num_new_matched_tokens``); a
  multimodal request whose EC items are still in flight (``ensure_cache_available`` with local +
  external computed tokens is False) is popped onto ``step_skipped_waiting`` and the loop goes on;
  admission requires the full sequence to fit (``scheduler_reserve_full_isl``) plus the
  watermark; a failed allocation stops the loop. Requests skipped in this pass are re-queued,
  order kept, ahead of older skipped ones.
- Async scheduling (``async_scheduling``, vLLM 0.26.0's default: ``AsyncScheduler``,
  vllm/v1/core/sched/async_scheduler.py): a request scheduled past its prompt gets an output
  *placeholder* (``num_output_placeholders``) for the token its batch will sample, so the next step
  can be scheduled before that token is known (``num_new_tokens = num_tokens + placeholders -
  num_computed_tokens``); a request sure to reach ``max_tokens`` with what is in flight is not
  scheduled again; a batch's tokens arrive one step late, are dropped for requests that finished
  meanwhile, kept (without caching) for requests preempted meanwhile, and blocks are cached at
  ``num_computed_tokens - num_output_placeholders``. The batch queue itself is the engine loop's
  (models/engine.py ``step_with_batch_queue``).
- ``update_from_output``: every scheduled request whose prefill is complete samples one token;
  stop on EOS (unless ignored), then on ``max_tokens`` / ``max_model_len``; finished requests
  free their blocks and encoder-cache references.
- With a KV connector (``kv_connector``: ``models.offload_scheduler.OffloadingConnector``, set by
  ``OffloadScheduler``; ``None`` skips every hook and the RUNNING loop has none), vLLM's calls
  into ``self.connector``: lookup, ``update_state_after_alloc``, ``WAITING_FOR_REMOTE_KVS``,
  ``build_connector_meta``, ``request_finished``, the worker's output (models/offload_scheduler.py).
- Macro-steps (``lazy_decodes``, set by the engine; none of this changes a decision): the *decode
  cohort* takes the RUNNING loop's round when every running request is a steady decode (one token
  past its prompt, unclipped), parked (skipped by the async ``max_tokens`` rule until its last token
  comes back) or new; its members' counters advance lazily with two round counters, and a round
  costs what changes in it (new members, block boundaries, finishes, the rule's edge), not the batch
  (``_cohort_round``, ``_cohort_update``); with prefix caching its members' full blocks are cached
  where the loop caches them (``_cohort_cache``). Anything else (a prefill chunk, multimodal inputs, a
  preemption, the token budget) dissolves it: the counters are written back and the loop runs.
  ``decode_run`` / ``advance_decode``: whole rounds in which nothing can change, at once.

vLLM's rules that the differential checks' mutants break are class attributes
(``continue_past_deferred``, ``requeue_skipped_at_front``, ``admit_full_sequence``); the broken
variants are subclasses that live with the checkers (harness/checkers/mutants.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields
from functools import lru_cache
from heapq import heappop, heappush
from itertools import chain, islice
from operator import attrgetter

from typing import Annotated

from pydantic import Field

from ..inputs import NonNegativeInt, PositiveInt, checked
from .request import RequestSpec, prompt_token_ids
from .ec_connector import ECConnector
from .kv_cache import BlockPool, EncoderCacheManager
from .kv_offload import version_policy
from .step import DecodeBatch, Finished, StepResult, hash_str, sampled_token

WAITING, RUNNING, PREEMPTED, FINISHED = "waiting", "running", "preempted", "finished"
WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"  # a KV load from the connector in flight

@dataclass(frozen=True)
class SchedulerConfig:
    """vLLM's scheduler arguments by their names; the annotations are the ranges a run config's
    ``scheduler:`` section and :meth:`validate` check (``inputs.checked``)."""
    max_num_seqs: PositiveInt = 256
    max_num_batched_tokens: PositiveInt = 8192
    block_size: PositiveInt = 16
    num_gpu_blocks: Annotated[int, Field(ge=2)] = 16384  # block 0 is the null block
    max_model_len: PositiveInt = 8192
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: NonNegativeInt = 0
    watermark: Annotated[float, Field(ge=0, lt=1)] = 0.0
    encoder_compute_budget: NonNegativeInt = 8192  # max_num_encoder_input_tokens
    encoder_cache_size: NonNegativeInt = 8192
    enable_prefix_caching: bool = False
    async_scheduling: bool = True  # vLLM 0.26.0's default (vllm/config/vllm.py)

    def validate(self) -> "SchedulerConfig":
        """Its fields' types and ranges (one line naming the field and the value), and vLLM's
        cross-field rule; raises ValueError."""
        checked(SchedulerConfig, {f.name: getattr(self, f.name) for f in fields(self)}, "", ValueError)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                             f"({self.max_model_len}) with chunked prefill off (vLLM rejects this too)")
        return self


class Request:
    __slots__ = ("req_id", "num_prompt_tokens", "num_output_tokens", "num_tokens", "num_computed_tokens",
                 "stop_at", "finish_at", "status", "mm", "tokens", "block_hashes", "max_tokens",
                 "num_output_placeholders", "join", "leave", "order", "finish_round")

    def __init__(self, spec: RequestSpec, max_model_len: int, block_size: int | None = None):
        self.req_id = spec.req_id
        self.num_prompt_tokens = spec.prompt_len
        self.num_output_tokens = 0
        self.num_tokens = spec.prompt_len  # prompt + output
        self.num_computed_tokens = 0
        self.stop_at = spec.stop_at
        self.max_tokens = spec.output_len
        self.num_output_placeholders = 0  # async scheduling: tokens of batches in flight
        # in the decode cohort (Scheduler.cohort): the rounds it joined and left it in; the counters
        # above are then those of the join, advanced lazily (_Cohort)
        self.join: int | None = None
        self.leave: int | None = None
        # the output count at which it finishes: EOS (stop_at), max_tokens or max_model_len
        self.finish_at = min(spec.output_len, max_model_len - spec.prompt_len,
                             spec.stop_at if spec.stop_at is not None and spec.stop_at >= 1 else spec.output_len)
        self.status = WAITING
        self.mm = spec.mm
        self.tokens: list[int] | None = None  # prefix caching: the prompt, then the outputs to the last full block
        self.block_hashes: list[int] = []
        if block_size is not None:  # prefix caching: hash every full block of tokens
            self.tokens = prompt_token_ids(spec)
            self.update_block_hashes(block_size)

    def update_block_hashes(self, block_size: int, num_output_tokens: int | None = None) -> None:
        """Chained hashes of the full blocks (tokens + the multimodal items they overlap). The sampled
        tokens are appended here, lazily: the updates call it only when a sampled token fills a block
        (``sampled_token`` is a pure function of the request and the output index); the decode cohort
        gives its lazy output count (`num_output_tokens`)."""
        hashes, toks, mm = self.block_hashes, self.tokens, self.mm
        rid, stop_at = self.req_id, self.stop_at
        if num_output_tokens is None:
            num_output_tokens = self.num_output_tokens
        toks += [sampled_token(rid, out, stop_at)
                 for out in range(len(toks) - self.num_prompt_tokens + 1, num_output_tokens + 1)]
        for i in range(len(hashes), len(toks) // block_size):
            start, end = i * block_size, (i + 1) * block_size
            extra = tuple((hash_str(m.identifier), m.offset - start) for m in mm
                          if m.offset < end and m.offset + m.length > start) if mm else ()
            hashes.append(hash((hashes[-1] if hashes else 0, tuple(toks[start:end]), extra)))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    """The simulated scheduler core (see models/step.py for the protocol)."""

    def __init__(self, config: SchedulerConfig, ec_connector: ECConnector | None = None):
        self.config = config.validate()
        self.ec_connector = ec_connector
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.skipped_waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.pool = BlockPool(config.num_gpu_blocks, config.enable_prefix_caching, self.frees_hashless_first)
        self.caching = config.enable_prefix_caching
        self.encoder_cache = EncoderCacheManager(config.encoder_cache_size)
        self.watermark_blocks = int(config.watermark * config.num_gpu_blocks)
        self.kv_connector = None  # a KV connector's hooks: attach_kv_connector
        self.async_scheduling = config.async_scheduling
        # vLLM's defer_block_free: blocks of a request freed while a batch that wrote them is in flight
        # go back to the pool (pool.deferred_frees) once that batch's output is processed
        self.defer_block_free = False
        self.sched_step_seq = self.processed_step_seq = 0
        self.cohort: _Cohort | bool | None = None  # the lazy decode cohort (lazy_decodes; False: not allowed)
        self.last_sched_seq: dict[str, int] = {}  # vLLM's Request.last_sched_seq, of requests holding blocks

    def attach_kv_connector(self, connector) -> None:
        """vLLM builds the scheduler's KV connector from ``kv_transfer_config``; with more than one batch
        in flight (async scheduling) and a connector that loads KV (``is_kv_consumer``), it defers
        freeing blocks (``defer_block_free``): a load into a re-allocated block is not ordered against
        the in-flight batch still writing it."""
        self.kv_connector = connector
        self.defer_block_free = self.defers_freed_blocks and self.async_scheduling and connector.is_kv_consumer

    # ---- protocol ----------------------------------------------------------------------

    def add_request(self, spec: RequestSpec, now: float) -> None:
        req = Request(spec, self.config.max_model_len, self.config.block_size if self.caching else None)
        self.requests[req.req_id] = req
        self.waiting.append(req)
        if self.kv_connector is not None:
            self.kv_connector.on_new_request(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def counts(self) -> tuple[int, int]:
        return len(self.running), len(self.waiting) + len(self.skipped_waiting)

    def shutdown(self) -> None:
        pass

    def check(self, deep: bool = False) -> str | None:
        """Internal invariants; None when they hold. Every running request holds exactly the blocks
        its computed tokens need, waiting ones hold none, and held + free blocks = the pool
        (deep: every block's ref count recounted from the requests' block lists). With the decode
        cohort, the members checked are those that took a block in the last round: each member
        once every block_size rounds, right after its new block (deep: all)."""
        bs, max_len, req_blocks = self.config.block_size, self.config.max_model_len, self.pool.req_blocks
        c = self.cohort
        checked = self.running
        if c and c.active:  # counters are those of the join; members: the last round's block takers
            members, rounds = c.members, c.S
            if not deep:
                for rid in c.blocks[(rounds - 1) % bs]:  # members: computed tokens = at the join + rounds since
                    req = members[rid]
                    computed = req.num_computed_tokens + rounds - req.join
                    if len(req_blocks.get(rid, ())) != -(-(computed if computed < max_len else max_len) // bs):
                        return _held_error(req, computed, req_blocks, bs)
                checked = ([*c.parked.values(), *(req for req in c.pending if req.status == RUNNING)]
                           if c.parked or c.pending else ())
                if len(members) + len(c.parked) + len(c.pending) < len(self.running):
                    return f"{len(self.running)} running requests, not all in the decode cohort or new"
        for req in checked:
            computed = req.num_computed_tokens
            if req.join is not None:
                computed += (rounds if req.leave is None else req.leave) - req.join
            if len(req_blocks.get(req.req_id, ())) != -(-(computed if computed < max_len else max_len) // bs):
                return _held_error(req, computed, req_blocks, bs)
        if len(req_blocks) > len(self.running):
            return f"{len(req_blocks) - len(self.running)} requests outside running hold KV blocks"
        err = self.pool.conservation_error(deep)
        if err:
            return err
        queued = len(self.running) + len(self.waiting) + len(self.skipped_waiting)
        if queued != len(self.requests):
            return f"requests not conserved: {queued} queued/running != {len(self.requests)} unfinished"
        return None

    # ---- schedule() --------------------------------------------------------------------

    # vLLM 0.26.0's rules (a mutant subclass breaks one of them)
    free_encoder_past_placeholders = True  # vLLM >= 0.24 (0.23.0 frees encoder inputs a batch early): for_release
    continue_past_deferred = True    # PR #41627: a request deferred for its EC items is skipped, later ones run
    requeue_skipped_at_front = True  # skipped requests go back to the front of the queue, in order
    admit_full_sequence = True       # a new request is admitted only if its full sequence's blocks fit
    use_output_placeholders = True   # async: a batch that samples gives its requests a placeholder
    ec_sees_external_tokens = True   # ensure_cache_available gets local + KV-connector computed tokens
    defers_freed_blocks = True       # async + a KV-consumer connector: defer_block_free (attach_kv_connector)
    frees_hashless_first = True      # BlockPool.free_blocks: freed blocks without a hash to the front (0.23.0: in order)

    def schedule(self, now: float) -> StepResult:
        cfg = self.config
        # the RUNNING requests as the decode cohort's round (None: this round needs the loop below)
        res = self._cohort_round() if self.lazy_decodes else None
        lazy = res is not None
        if not lazy:
            res = StepResult()
        elif not (self.waiting or self.skipped_waiting):  # the round is the cohort's (no KV connector)
            if self.ec_connector is not None:
                self.ec_connector.now = now
            return res
        sched, before, plen = res.sched, res.computed_before, res.prompt_len
        token_budget = cfg.max_num_batched_tokens - len(sched)
        encoder_budget = cfg.encoder_compute_budget
        max_model_len, bs = cfg.max_model_len, cfg.block_size
        threshold = cfg.long_prefill_token_threshold
        pool, running = self.pool, self.running
        free_blocks = pool.free
        caching = self.caching
        num_cached_block = pool.num_cached_block  # cache_blocks only where a block newly fills
        if self.ec_connector is not None:
            self.ec_connector.now = now
        kv = self.kv_connector

        # First, the RUNNING requests. (_update_after_schedule is folded in: a request's
        # num_computed_tokens advances as it is scheduled; a victim is never one scheduled already.)
        limit = max_model_len - 1
        preempted = res.preempted
        async_ = self.async_scheduling
        if async_:
            sampling = res.sampling if lazy else set()
            res.sampling = sampling
        num_running = len(running)
        for req in () if lazy else running:  # a preemption pops the list's end: the iteration sees it
            computed = req.num_computed_tokens
            ph = req.num_output_placeholders
            if ph and computed + 2 - ph >= req.num_prompt_tokens + req.max_tokens:
                continue  # async: what is in flight already reaches max_tokens
            n = req.num_tokens + ph - computed
            mm = req.mm
            if n != 1 or mm or computed >= limit:  # else one decode token, which no clip below changes
                if 0 < threshold < n:
                    n = threshold
                if n > token_budget:
                    n = token_budget
                if computed + n > limit:
                    n = limit - computed
                if mm:
                    enc, n, new_encoder_budget, ext = self._try_schedule_encoder_inputs(req, computed, n,
                                                                                        encoder_budget)
                if n == 0:
                    continue
            rid = req.req_id
            end = computed + n  # < max_model_len and <= num_tokens
            # blocks for `end` tokens less those held: cdiv(computed), as check() holds every step
            need = (-computed // bs) - (-end // bs)
            if need > 0:
                if need > len(free_blocks) and not self._preempt_for(req, need, preempted):
                    break  # the request itself was preempted
                pool.allocate(rid, need)
            if caching:
                full = end if end < req.num_tokens else req.num_tokens
                if full // bs > num_cached_block.get(rid, 0):
                    pool.cache_blocks(rid, req.block_hashes, full, bs)
            sched[rid] = n
            before[rid] = computed
            plen[rid] = req.num_prompt_tokens
            req.num_computed_tokens = end
            if async_ and end >= req.num_tokens + ph:  # _update_after_schedule: not a prefill chunk
                if self.use_output_placeholders:
                    req.num_output_placeholders = ph + 1
                sampling.add(rid)
            token_budget -= n
            if mm and (enc or ext):
                self._allocate_encoder_inputs(req, enc, ext, res)
                encoder_budget = new_encoder_budget
            if token_budget <= 0:
                break

        # Next, the WAITING requests.
        if not preempted:
            step_skipped_waiting: deque[Request] = deque()
            while (self.waiting or self.skipped_waiting) and token_budget > 0:
                if len(running) >= cfg.max_num_seqs:
                    break
                queue = self.skipped_waiting or self.waiting
                req = queue[0]
                rid = req.req_id
                if kv is not None and req.status == WAITING_FOR_REMOTE_KVS and not kv.promote(req):
                    queue.popleft()
                    step_skipped_waiting.appendleft(req)
                    continue
                hit: list[int] = []
                num_external, load_async = 0, False
                num_tokens = req.num_tokens
                if req.num_computed_tokens == 0:
                    if caching:
                        hit = pool.get_computed_blocks(req.block_hashes, num_tokens - 1, bs)
                    computed = len(hit) * bs
                    if kv is not None:
                        num_external, load_async = kv.get_num_new_matched_tokens(req, computed)
                        if num_external is None:
                            queue.popleft()
                            step_skipped_waiting.appendleft(req)
                            continue
                        computed += num_external
                    # after the KV connector's lookup, with local + external computed tokens (as vLLM)
                    if (self.ec_connector is not None and req.mm and not self.ec_connector.ensure_cache_available(
                            req, computed if self.ec_sees_external_tokens else computed - num_external)):
                        res.deferred.append(rid)
                        if not self.continue_past_deferred:
                            break
                        queue.popleft()
                        step_skipped_waiting.appendleft(req)
                        continue
                else:
                    computed = req.num_computed_tokens
                if load_async:
                    n = 0
                else:
                    n = num_tokens - computed
                    if 0 < threshold < n:
                        n = threshold
                    if not cfg.enable_chunked_prefill and n > token_budget:
                        break
                    if n > token_budget:
                        n = token_budget
                enc = ext = None
                new_encoder_budget = encoder_budget
                if req.mm:
                    enc, n, new_encoder_budget, ext = self._try_schedule_encoder_inputs(
                        req, computed, n, encoder_budget)
                    if n == 0:
                        break
                # allocate_slots: hit blocks still in the free queue count against it
                extra = (self.watermark_blocks if running else 0) + (pool.num_evictable(hit) if hit else 0)
                free = len(free_blocks)
                full = num_tokens if self.admit_full_sequence else computed + n
                held = reserved = 0
                if kv is not None:  # a request admitted after its KV load holds its blocks
                    held = len(pool.req_blocks.get(rid, ()))
                    reserved = kv.inflight_prefill_reserved_blocks() if load_async else 0
                need = max(cdiv(min(computed + n, max_model_len), bs) - len(hit) - held, 0)
                if (max(cdiv(min(full, max_model_len), bs) - len(hit) - held, 0) + extra > free
                        or need + extra > free - reserved):
                    if req.mm:
                        self.encoder_cache.free(req)
                    break
                if hit:
                    pool.allocate_computed(rid, hit)
                pool.allocate(rid, need)
                if caching and not load_async:
                    pool.cache_blocks(rid, req.block_hashes, min(computed + n, num_tokens), bs)
                if kv is not None:
                    kv.update_state_after_alloc(req, pool.req_blocks[rid], num_external, len(hit))
                queue.popleft()
                if load_async:
                    kv.wait_for_remote_kvs(req, computed)
                    step_skipped_waiting.appendleft(req)
                    continue
                running.append(req)
                if kv is not None:
                    kv.admitted(req, computed + n)
                req.status = RUNNING
                req.num_computed_tokens = computed + n
                if async_ and computed + n >= num_tokens + req.num_output_placeholders:
                    if self.use_output_placeholders:
                        req.num_output_placeholders += 1
                    sampling.add(rid)
                sched[rid] = n
                before[rid] = computed
                plen[rid] = req.num_prompt_tokens
                token_budget -= n
                if enc or ext:
                    self._allocate_encoder_inputs(req, enc, ext, res)
                    encoder_budget = new_encoder_budget
            if step_skipped_waiting:
                if self.requeue_skipped_at_front:
                    self.skipped_waiting.extendleft(step_skipped_waiting)
                else:
                    self.waiting.extend(reversed(step_skipped_waiting))
        if lazy:  # admitted this round: they join the cohort (or not) at the next one
            self.cohort.pending.extend(running[num_running:])
        if kv is not None:
            kv.build_connector_meta(res, now)
        if self.defer_block_free and sched:  # the fence of the blocks this batch writes
            seq = self.sched_step_seq = self.sched_step_seq + 1
            for rid in sched:
                self.last_sched_seq[rid] = seq
        return res

    def _preempt_for(self, req: Request, need: int, preempted: list[str]) -> bool:
        """Preempt from the back of running until `need` blocks are free; False when `req` itself
        was preempted."""
        free_blocks, running = self.pool.free, self.running
        while need > len(free_blocks):
            victim = running.pop()
            self._preempt_request(victim)
            preempted.append(victim.req_id)
            if victim is req:
                return False
        return True

    def _preempt_request(self, req: Request) -> None:
        self._free_request_blocks(req)
        if req.mm:
            self.encoder_cache.free(req)
        req.status = PREEMPTED
        req.num_computed_tokens = 0
        self.waiting.appendleft(req)
        if self.kv_connector is not None:
            self.kv_connector.on_preempt(req)

    def _try_schedule_encoder_inputs(self, req: Request, computed: int, n: int, budget: int):
        """Which encoder inputs overlap [computed, computed + n); clip n where one cannot run."""
        to_schedule: list[int] = []
        external: list[int] = []
        if n == 0:
            return to_schedule, n, budget, external
        scheduled_ids: set[str] = set()
        num_embeds = 0
        end = computed + n
        cache, ec = self.encoder_cache, self.ec_connector
        for i, m in enumerate(req.mm):
            if m.offset + m.length <= computed:
                continue
            if m.offset >= end:
                break
            if m.identifier in scheduled_ids:
                continue
            if cache.check_and_update_cache(req, i):
                continue
            if not cache.can_allocate(req, i, budget, num_embeds):
                n = m.offset - computed if computed < m.offset else 0
                break
            scheduled_ids.add(m.identifier)
            num_embeds += m.length
            if ec is not None and ec.has_cache_item(m.identifier):
                external.append(i)
                continue
            budget -= m.length
            to_schedule.append(i)
        return to_schedule, n, budget, external

    def _allocate_encoder_inputs(self, req: Request, enc: list[int], ext: list[int], res: StepResult) -> None:
        for i in enc:
            self.encoder_cache.allocate(req, i)
        for i in ext:
            self.encoder_cache.allocate(req, i)
            res.ec_loaded.append(req.mm[i].identifier)
        if enc:
            res.enc[req.req_id] = enc

    # ---- update_from_output() ----------------------------------------------------------

    def update_from_output(self, res: StepResult, now: float) -> list[Finished]:
        if self.defer_block_free and res.sched:  # every write of this batch and earlier ones is done
            self.processed_step_seq += 1
            deferred = self.pool.deferred_frees
            while deferred and deferred[0][0] <= self.processed_step_seq:  # _drain_deferred_frees
                self.pool.free_blocks(reversed(deferred.popleft()[1]))
        finished: list[Finished] = []
        rids = res.sched
        if type(res) is _CohortStep and res.epoch == self.cohort.epoch:  # the cohort's part, lazily
            rids = self._cohort_update(res, finished)
        if res.sampling is not None:
            if rids:  # (a cohort round that admitted none has none)
                self._update_async(res, rids, finished)
            if self.kv_connector is not None:  # the batch's worker output (got when it was scheduled)
                self.kv_connector.update_connector_output(res)
            return finished
        kv = self.kv_connector
        if kv is not None:  # the worker's get_finished, at the step's end
            kv.get_finished(now)
        for req in map(self.requests.get, rids):
            if req is None:
                continue
            if req.mm:
                self._free_encoder_inputs(req)
            num_tokens = req.num_tokens
            if req.num_computed_tokens < num_tokens:
                continue  # a partial prefill chunk samples nothing
            out = req.num_output_tokens = req.num_output_tokens + 1
            req.num_tokens = num_tokens + 1
            if req.tokens is not None and not (num_tokens + 1) % self.config.block_size:  # a block newly full
                req.update_block_hashes(self.config.block_size)
            if out < req.finish_at:
                continue
            status = "stop" if out == req.stop_at else "length"  # sampled_token() is EOS exactly at stop_at
            req.status = FINISHED
            finished.append(Finished(req.req_id, status, out))
            self.running.remove(req)
            self._free_request(req)
        if kv is not None:  # _update_from_kv_xfer_finished: after the finished requests were freed
            kv.update_connector_output(res)
        return finished

    # the check of AsyncScheduler._update_request_with_output's cache_blocks (a mutant drops it)
    cache_less_placeholders = True

    def _update_async(self, res: StepResult, rids, finished: list[Finished]) -> None:
        """``update_from_output`` of a batch scheduled one step before (AsyncScheduler), for its
        requests `rids`: requests finished meanwhile are skipped; a request preempted meanwhile keeps
        its token (vLLM appends it; it is not cached); placeholders resolve; blocks are cached at
        computed - placeholders."""
        sampling, bs = res.sampling, self.config.block_size
        num_cached_block = self.pool.num_cached_block  # cache_blocks only where a block newly fills
        for rid in rids:
            req = self.requests.get(rid)
            if req is None:
                continue  # finished (or aborted) while the batch was in flight
            if req.mm:
                self._free_encoder_inputs(req)
            if rid not in sampling:
                continue  # a partial prefill chunk samples nothing
            out = req.num_output_tokens = req.num_output_tokens + 1
            req.num_tokens += 1
            if req.num_output_placeholders:
                req.num_output_placeholders -= 1
            if req.tokens is not None:
                if not req.num_tokens % bs:  # a block newly full
                    req.update_block_hashes(bs)
                if req.status == RUNNING:
                    cached = req.num_computed_tokens  # in the cohort too: computed - placeholders is the join's
                    if self.cache_less_placeholders:
                        cached -= req.num_output_placeholders
                    if cached // bs > num_cached_block.get(rid, 0):
                        self.pool.cache_blocks(rid, req.block_hashes, cached, bs)
                    if req.join is not None:  # joined the decode cohort after this batch: a full block waits there
                        if req.num_tokens // bs > num_cached_block.get(rid, 0):
                            self.cohort.uncached[rid] = req
                        else:
                            self.cohort.uncached.pop(rid, None)
            if out < req.finish_at:
                continue
            status = "stop" if out == req.stop_at else "length"
            finished.append(Finished(rid, status, out))
            if req.status == RUNNING:
                self.running.remove(req)
            elif req in self.waiting:
                self.waiting.remove(req)
            else:
                self.skipped_waiting.remove(req)
            req.status = FINISHED
            self._free_request(req)

    # ---- macro-steps: rounds in which nothing can change (models/engine.py) --------------

    # what bounds a decode run (a mutant drops one; the macro-step equality check must catch it)
    decode_run_stops_at_finish = True
    decode_run_fits_the_pool = True

    def decode_run(self, in_flight: StepResult | None = None) -> tuple[int, DecodeBatch] | None:
        """How many of the next schedule() + update_from_output() rounds are certain to schedule one
        decode token for every running request, in order, and nothing else, so that the engine
        can take them at once (:meth:`advance_decode`): no request is admitted (the queues are
        empty, or ``max_num_seqs`` or the token budget stops the WAITING loop before it looks),
        deferred, preempted (every new block of the run fits the free queue), clipped (by
        ``max_model_len``, the budget or the async ``max_tokens`` rule) or finished (its output
        count stays below ``finish_at``), and no encoder input or KV connector is involved (nor,
        outside the decode cohort, prefix-cache bookkeeping). ``in_flight``: the batch an async engine has in flight, whose
        output is the run's first update (it must be such a round's batch itself); the rounds
        are then schedule(N+1), update(N). Returns (k, the first round's batch), or None when the
        next round is not such a round."""
        cfg, running = self.config, self.running
        n = len(running)
        budget = cfg.max_num_batched_tokens
        if (not n or n > budget or self.kv_connector is not None
                or ((self.waiting or self.skipped_waiting) and n < cfg.max_num_seqs and n < budget)):
            return None
        if self.cohort and self.cohort.active:  # the requests' counters are the cohort's
            return self._cohort_decode_run(self.cohort, in_flight)
        if self.caching:  # the plain run does no prefix-cache bookkeeping
            return None
        lag = 0  # the first round's computed tokens are those before the batch in flight, + 1
        if in_flight is not None:
            sched = in_flight.sched
            if (len(sched) != n or in_flight.sampling is None or len(in_flight.sampling) != n
                    or sum(sched.values()) != n or in_flight.preempted or in_flight.deferred or in_flight.enc
                    or in_flight.ec_loaded or in_flight.kv
                    or any(rid != req.req_id for rid, req in zip(sched, running))):
                return None
            lag = 1
        oldest = running[0]  # the likeliest to finish in the next update
        if self.decode_run_stops_at_finish and oldest.finish_at - oldest.num_output_tokens <= 1:
            return None
        k = limit = cfg.max_model_len - 1
        bs = cfg.block_size
        first_block = [0] * bs  # requests by the round (mod bs) in which they take their first new block
        context = 0
        for req in reversed(running):  # the newest first: the likeliest to be in its prefill
            c, ph = req.num_computed_tokens, req.num_output_placeholders
            if req.mm or req.num_tokens + ph - c != 1 or c - lag < req.num_prompt_tokens:
                return None  # not one decode token past the prompt (or not in the batch in flight)
            if self.decode_run_stops_at_finish:
                k = min(k, req.finish_at - req.num_output_tokens - 1)
            k = min(k, limit - c)
            if ph:  # async: not scheduled once what is in flight reaches max_tokens
                k = min(k, req.num_prompt_tokens + req.max_tokens - c - 2 + ph)
            if k < 1:
                return None
            first_block[-c % bs] += 1
            context += c
        if self.decode_run_fits_the_pool:
            k = self._fitting_run(first_block, k)
            if not k:
                return None
        return k, DecodeBatch(sched if in_flight is not None else {req.req_id: 1 for req in running}, context)

    def _fitting_run(self, first_block: list[int], k: int) -> int:
        """The longest run of at most k rounds whose new blocks fit the free queue (no preemption)."""
        free = len(self.pool.free)
        if self._new_blocks(first_block, k) <= free:
            return k
        lo, hi = 0, k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self._new_blocks(first_block, mid) <= free else (lo, mid - 1)
        return lo

    @staticmethod
    def _new_blocks(first_block: list[int], k: int) -> int:
        """Blocks allocated in k rounds by requests that take one every block_size rounds from
        round f (``first_block[f]`` of them)."""
        bs = len(first_block)
        return sum(cnt * -(-(k - f) // bs) for f, cnt in enumerate(first_block) if cnt and k > f)

    def advance_decode(self, k: int, now: float, sched: dict[str, int] | None = None) -> StepResult | None:
        """Apply k rounds of a :meth:`decode_run` at once (the last one scheduled at `now`): every
        running request computes and samples k more tokens, its new blocks allocated in the order
        the rounds would allocate them. ``sched`` (the run's batch): the rounds were
        schedule(N+1), update(N) (async); returns the batch the last round scheduled, still in flight."""
        if self.cohort and self.cohort.active:
            return self._cohort_advance(self.cohort, k, now)
        running, pool, bs = self.running, self.pool, self.config.block_size
        by_round: list[list[str]] = [[] for _ in range(bs)]
        for req in running:
            c = req.num_computed_tokens
            by_round[-c % bs].append(req.req_id)
            req.num_computed_tokens = c + k
            req.num_tokens += k
            req.num_output_tokens += k
        allocate = pool.allocate
        for r in range(k):
            for rid in by_round[r % bs]:
                allocate(rid, 1)
        if self.ec_connector is not None:
            self.ec_connector.now = now
        if sched is None:
            return None
        res = StepResult()
        res.sched = sched
        res.computed_before = {req.req_id: req.num_computed_tokens - 1 for req in running}
        res.prompt_len = {req.req_id: req.num_prompt_tokens for req in running}
        res.sampling = set(res.sched)
        return res

    # ---- the decode cohort: steady decodes advanced lazily (macro-steps) -----------------

    lazy_decodes = False  # set by the engine when macro-steps are on (models/engine.py)
    cohort_finishes_at_eos = True  # a member finishes at finish_at (a mutant: at max_tokens / max_model_len)
    cohort_caches_blocks = True  # prefix caching: members' full blocks cached as the loop would (a mutant: not)

    def _cohort_allowed(self) -> bool:
        """The cohort takes rounds of the plain twin only: no KV connector or a mutant's RUNNING-loop
        or decode-run rule."""
        return (self.kv_connector is None and not self.defer_block_free and self.use_output_placeholders
                and self.cache_less_placeholders and self.decode_run_stops_at_finish and self.decode_run_fits_the_pool)

    def _cohort_round(self) -> "_CohortStep | None":
        """The RUNNING loop's round, taken by the decode cohort when it decides what the loop would:
        every running request is a member (one decode token past its prompt, unclipped: scheduled),
        parked (skipped by the async max_tokens rule until the batch in flight finishes it) or new
        since the last round and one of the two; the members fit the token budget and their new
        blocks the free queue (no preemption). Per round the work is what changes: new requests,
        members at the async rule's edge (``leave`` rounds), the members whose computed tokens reach
        a block boundary (``blocks``, by round mod block_size: one new block each, in running order).
        None when the loop must run: the cohort is dissolved first (its counters written back)."""
        c = self.cohort
        if c is None:
            c = self.cohort = _Cohort(self.config.block_size) if self._cohort_allowed() else False
        if not c:
            return None
        r = c.S
        if not c.active:
            if not self._cohort_form(c):
                return None
        elif c.pending:
            for req in c.pending:
                joins = self._steady(req, req.num_computed_tokens, req.num_output_placeholders, req.num_tokens)
                if joins is None:
                    return self._cohort_dissolve(c)
                (self._cohort_join if joins else self._cohort_park)(c, req, r)
            c.pending.clear()
        keys, leave, members = c.leave_keys, c.leave, c.members
        while keys and keys[0] <= r:
            for req in leave.pop(heappop(keys), ()):
                if members.get(req.req_id) is not req:
                    continue  # finished or parked since
                applied = c.A - req.join
                applied = applied if applied > 0 else 0
                d = r - req.join
                joins = self._steady(req, req.num_computed_tokens + d, req.num_output_placeholders + d - applied,
                                     req.num_tokens + applied)
                if joins is None or (not joins and req.finish_round != r - 1):
                    return self._cohort_dissolve(c)
                if joins:
                    _push(leave, keys, r + 1, req)
                else:
                    self._cohort_park(c, req, r)
        bucket = c.blocks[r % c.bs]
        if len(members) > self.config.max_num_batched_tokens or len(bucket) > len(self.pool.free):
            return self._cohort_dissolve(c)
        if bucket:
            self.pool.allocate_each(bucket)
        if c.uncached:
            self._cohort_cache(c, None)
        c.S = r + 1
        res = _CohortStep(c, r, self.async_scheduling)
        c.live.append(res)
        return res

    def _steady(self, req: Request, computed: int, ph: int, num_tokens: int) -> bool | None:
        """The RUNNING loop's decision for `req` at these counters: True (one decode token past its
        prompt, no clip), False (skipped by the async max_tokens rule: what is in flight finishes it),
        None (anything else: the loop must run)."""
        if ph and computed + 2 - ph >= req.num_prompt_tokens + req.max_tokens:
            return False
        if (req.mm or computed >= self.config.max_model_len - 1 or num_tokens + ph - computed != 1
                or computed < req.num_prompt_tokens):
            return None
        return True

    def _cohort_form(self, c: "_Cohort") -> bool:
        """Form the cohort from the running requests, when each is a member or parked."""
        kinds = []
        for req in self.running:
            joins = self._steady(req, req.num_computed_tokens, req.num_output_placeholders, req.num_tokens)
            if joins is None:
                return False
            kinds.append(joins)
        c.active = True
        for req, joins in zip(self.running, kinds):
            (self._cohort_join if joins else self._cohort_park)(c, req, c.S)
        return True

    def _cohort_join(self, c: "_Cohort", req: Request, r: int) -> None:
        """`req` (counters current) is a member from round r: its next block, finish and rule edge."""
        rid, cfg = req.req_id, self.config
        req.join, req.leave, req.order = r, None, c.next_order
        c.next_order += 1
        c.members[rid] = req
        c.decodes[rid] = 1
        base = req.num_computed_tokens - r  # computed tokens at round t: base + t
        c.sum_base += base
        c.blocks[-base % c.bs][rid] = None
        prompt = req.num_prompt_tokens
        fin = req.finish_at if self.cohort_finishes_at_eos else min(req.max_tokens, cfg.max_model_len - prompt)
        # the round whose update brings its output to fin (after the tokens of batches in flight)
        req.finish_round = r + fin - req.num_output_tokens - req.num_output_placeholders - 1
        if req.finish_round >= r:
            _push(c.finish, c.finish_keys, req.finish_round, req)
        edge = cfg.max_model_len - 1
        if self.async_scheduling:  # the max_tokens rule can skip it once computed + 1 >= prompt + max_tokens
            edge = min(edge, prompt + req.max_tokens - 1)
        _push(c.leave, c.leave_keys, max(r + 1, r + edge - req.num_computed_tokens), req)
        if req.tokens is not None and req.num_tokens // c.bs > self.pool.num_cached_block.get(rid, 0):
            c.uncached[rid] = req

    def _cohort_park(self, c: "_Cohort", req: Request, r: int) -> None:
        rid = req.req_id
        if c.members.pop(rid, None) is not None:
            del c.decodes[rid]
            base = req.num_computed_tokens - req.join
            c.sum_base -= base
            del c.blocks[-base % c.bs][rid]
        else:  # new (counters current)
            req.join, req.order = r, c.next_order
            c.next_order += 1
        req.leave = r
        c.parked[rid] = req

    def _cohort_discard(self, c: "_Cohort", req: Request) -> None:
        """A finished request leaves the cohort (its join stays: batches in flight still name it)."""
        rid = req.req_id
        if c.members.pop(rid, None) is not None:
            del c.decodes[rid]
            base = req.num_computed_tokens - req.join
            c.sum_base -= base
            del c.blocks[-base % c.bs][rid]
        elif c.parked.pop(rid, None) is None and req in c.pending:
            c.pending.remove(req)
        c.uncached.pop(rid, None)

    def _cohort_dissolve(self, c: "_Cohort") -> None:
        """Write the lazy counters back (the batches in flight keep their computed tokens) and end
        the cohort: the RUNNING loop runs."""
        S, A, async_ = c.S, c.A, self.async_scheduling
        for res in c.live:
            res.freeze()
        for req in chain(c.members.values(), c.parked.values()):
            lv = S if req.leave is None else req.leave
            rounds = lv - req.join
            applied = (A if A < lv else lv) - req.join
            if applied < 0:
                applied = 0
            req.num_computed_tokens += rounds
            req.num_output_tokens += applied
            req.num_tokens += applied
            if async_:
                req.num_output_placeholders += rounds - applied
            req.join = req.leave = None
            if req.tokens is not None and len(req.block_hashes) < req.num_tokens // c.bs:
                req.update_block_hashes(c.bs)  # the loop's cache_blocks reads them
        c.clear()
        return None

    def _cohort_update(self, res: "_CohortStep", finished: list[Finished]):
        """``update_from_output`` of a cohort round's members: the outputs advance lazily; those
        whose output reaches ``finish_at`` in this round finish, in running order. Returns the
        batch's other requests (the WAITING loop's), for the per-request update."""
        c, r = self.cohort, res.round
        c.live.remove(res)
        c.A = r + 1
        if self.caching:
            self._cohort_cache_update(c, r)
        done = c.finish.pop(r, None)
        if done:
            requests, running, members, parked = self.requests, self.running, c.members, c.parked
            if len(done) > 1:
                done.sort(key=_order)
            for req in done:
                rid = req.req_id
                if req.finish_round != r or requests.get(rid) is not req or (rid not in members and rid not in parked):
                    continue
                lv = req.leave
                out = req.num_output_tokens + (r + 1 if lv is None or lv > r else lv) - req.join
                req.num_output_tokens = out
                req.num_tokens = req.num_prompt_tokens + out
                req.status = FINISHED
                finished.append(Finished(rid, "stop" if out == req.stop_at else "length", out))
                running.remove(req)
                self._free_request(req)
        return res.admitted()

    def _cohort_decode_run(self, c: "_Cohort", in_flight: StepResult | None):
        """:meth:`decode_run` from the cohort's own bounds: every running request a member, the
        first finish and rule edge ahead, the new blocks of the run fitting the pool."""
        n, members = len(self.running), c.members
        if c.pending or c.parked or len(members) != n:
            return None
        r, bs = c.S, c.bs
        lag = 0
        if in_flight is not None:
            if (type(in_flight) is not _CohortStep or in_flight.epoch != c.epoch or in_flight.round != r - 1
                    or in_flight.m != n or len(in_flight.sched) != n or in_flight.preempted or in_flight.deferred
                    or in_flight.enc or in_flight.ec_loaded or in_flight.kv):
                return None
            lag = 1
        k = min(_first_key(c.finish, c.finish_keys, r - lag) - (r - lag), _first_key(c.leave, c.leave_keys, r) - r)
        if k < 1:
            return None
        if n * -(-k // bs) > len(self.pool.free):  # (at most one block per member every block_size rounds)
            k = self._fitting_run([len(c.blocks[(r + f) % bs]) for f in range(bs)], k)
            if not k:
                return None
        return k, DecodeBatch(in_flight.sched if lag else c.decodes.copy(), c.sum_base + n * r)

    def _cohort_advance(self, c: "_Cohort", k: int, now: float) -> "_CohortStep | None":
        """:meth:`advance_decode` of the cohort: the blocks of k rounds, in order; the counters move."""
        r, bs, blocks, allocate_each = c.S, c.bs, c.blocks, self.pool.allocate_each
        if self.caching:  # round by round: schedule(t), then update(t - 1) (async) or update(t)
            lag = 1 if self.async_scheduling else 0
            for t in range(r, r + k):
                if blocks[t % bs]:
                    allocate_each(blocks[t % bs])
                if c.uncached:
                    self._cohort_cache(c, None)
                c.A = t - lag + 1
                self._cohort_cache_update(c, t - lag)
        else:
            for t in range(r, r + k):
                if blocks[t % bs]:
                    allocate_each(blocks[t % bs])
        c.S = r + k
        if self.ec_connector is not None:
            self.ec_connector.now = now
        if not self.async_scheduling:
            c.A = r + k
            return None
        c.A = r + k - 1  # the batch in flight and k - 1 of the run's applied; its last in flight
        c.live.clear()
        res = _CohortStep(c, r + k - 1, True)
        c.live.append(res)
        return res

    def _cohort_cache(self, c: "_Cohort", u: int | None) -> None:
        """Prefix caching: ``cache_blocks`` of the cohort's requests whose full block is not cached yet
        (``uncached``), in running order, where the loop would cache it: at a schedule (u None) for
        the members it schedules, up to ``num_tokens``; at the update of round u (async) for that
        batch's requests, up to ``num_computed_tokens - num_output_placeholders`` (num_tokens - 1)."""
        if not self.cohort_caches_blocks:
            return
        unc, bs, A, pool = c.uncached, c.bs, c.A, self.pool
        for req in sorted(unc.values(), key=_order) if len(unc) > 1 else list(unc.values()):
            j, lv = req.join, req.leave
            if (lv is not None) if u is None else (j > u or (lv is not None and lv <= u)):
                continue  # parked (not scheduled), or not in round u's batch
            applied = (A if lv is None or A < lv else lv) - j
            out = req.num_output_tokens + (applied if applied > 0 else 0)
            req.update_block_hashes(bs, out)
            pool.cache_blocks(req.req_id, req.block_hashes, req.num_prompt_tokens + out - (u is not None), bs)
            del unc[req.req_id]

    def _cohort_cache_update(self, c: "_Cohort", u: int) -> None:
        """Prefix caching at the update of round u (``c.A`` = u + 1): async, the waiting blocks of
        the batch's requests are cached; then those whose num_tokens the update brings to a block
        boundary wait (``uncached``): num_tokens = computed at the join + 1 + u + 1 - join."""
        if self.async_scheduling and c.uncached:
            self._cohort_cache(c, u)
        unc, members, bs = c.uncached, c.members, c.bs
        for rid in c.blocks[(u + 2) % bs]:
            req = members[rid]
            if req.join <= u:
                unc[rid] = req
        for rid, req in c.parked.items():
            if req.join <= u < req.leave and not (req.num_computed_tokens - req.join + u + 2) % bs:
                unc[rid] = req

    def _free_encoder_inputs(self, req: Request) -> None:
        ids = self.encoder_cache.request_cached_ids.get(req.req_id)
        if not ids:
            return
        # vLLM: offset + length <= num_computed_tokens - num_output_placeholders (async: the positions
        # of the batches in flight are not computed yet; sync: no placeholders); 0.23.0: <= num_computed_tokens
        done = req.num_computed_tokens - (req.num_output_placeholders if self.free_encoder_past_placeholders else 0)
        for i in list(ids):
            m = req.mm[i]
            if m.offset + m.length <= done:
                self.encoder_cache.free_encoder_input(req, i)

    def _free_request(self, req: Request) -> None:
        if self.cohort:
            self._cohort_discard(self.cohort, req)
        if self.kv_connector is not None:  # before the blocks are freed
            self.kv_connector.request_finished(req)
        if req.mm:
            self.encoder_cache.free(req)
        self._free_request_blocks(req)
        del self.requests[req.req_id]

    def _free_request_blocks(self, req: Request) -> None:
        """Free a finished or preempted request's KV blocks, deferred while a batch in flight may
        still write them (``defer_block_free``)."""
        if not self.defer_block_free or self.last_sched_seq.pop(req.req_id, 0) <= self.processed_step_seq:
            self.pool.free_request(req.req_id)
            return
        blocks = self.pool.pop_blocks_for_free(req.req_id)
        if blocks:
            self.pool.deferred_frees.append((self.sched_step_seq, blocks))

    def fail_all(self) -> list[str]:
        """The engine died: every unfinished request fails (EngineDeadError); returns their ids."""
        ids = list(self.requests)
        for req in self.requests.values():
            self.pool.free_request(req.req_id)
        self.requests.clear()
        self.waiting.clear()
        self.skipped_waiting.clear()
        self.running = []
        if self.cohort:
            self.cohort.clear()
        return ids


_order = attrgetter("order")


def _held_error(req: Request, computed: int, req_blocks: dict[str, list[int]], bs: int) -> str:
    return (f"request {req.req_id} holds {len(req_blocks.get(req.req_id, ()))} KV blocks for {computed} computed "
            f"tokens (block_size {bs})")


def _push(d: dict[int, list], keys: list[int], key: int, req: Request) -> None:
    lst = d.get(key)
    if lst is None:
        d[key] = lst = []
        heappush(keys, key)
    lst.append(req)


def _first_key(d: dict[int, list], keys: list[int], lo: int) -> float:
    """The first round >= lo with an entry (rounds before lo are dropped)."""
    while keys and (keys[0] < lo or keys[0] not in d):
        d.pop(heappop(keys), None)
    return keys[0] if keys else float("inf")


class _Cohort:
    """The decode cohort (Scheduler._cohort_round): running requests in steady decode, whose
    counters advance lazily with the round counters ``S`` (rounds scheduled) and ``A`` (rounds
    applied): a member that joined in round j with counters (c, o, ph) has, after round t is
    scheduled and round a applied, c + t - j computed tokens, o + max(0, a - j) outputs and
    ph + (t - j) - max(0, a - j) placeholders (a parked one stops at its ``leave`` round)."""

    __slots__ = ("bs", "S", "A", "epoch", "active", "members", "decodes", "parked", "pending", "blocks", "sum_base",
                 "finish", "finish_keys", "leave", "leave_keys", "live", "next_order", "uncached")

    def __init__(self, block_size: int):
        self.bs = block_size
        self.S = self.A = self.epoch = self.next_order = 0
        self.clear()

    def clear(self) -> None:
        self.active = False
        self.epoch += 1  # batches of the old cohort are applied request by request
        self.members: dict[str, Request] = {}  # running order
        self.decodes: dict[str, int] = {}  # the members' batch entries (one token each, same order): each round's sched
        self.parked: dict[str, Request] = {}
        self.pending: list[Request] = []  # admitted in the last round
        self.blocks: list[dict[str, None]] = [{} for _ in range(self.bs)]  # by round mod block_size
        self.sum_base = 0  # sum of the members' computed tokens less the round
        self.finish: dict[int, list[Request]] = {}  # round -> members whose output reaches finish_at in it
        self.finish_keys: list[int] = []
        self.leave: dict[int, list[Request]] = {}  # round -> members at the async rule's edge
        self.leave_keys: list[int] = []
        self.live: list[_CohortStep] = []  # its batches not applied yet
        # prefix caching: requests whose num_tokens // block_size exceeds their cached blocks
        self.uncached: dict[str, Request] = {}


class _Before(dict):
    """computed_before of a cohort round: the WAITING loop's entries, the members' on demand."""

    __slots__ = ("members", "round")

    def __missing__(self, rid: str) -> int:
        req = self.members[rid]
        return req.num_computed_tokens + self.round - req.join


class _PromptLen(dict):
    __slots__ = ("members",)

    def __missing__(self, rid: str) -> int:
        return self.members[rid].num_prompt_tokens


class _CohortStep(StepResult):
    """A round the decode cohort scheduled: ``sched`` holds its members first (one decode token
    each, running order), then what the WAITING loop admitted; its shape comes from the cohort's
    sums."""

    def __init__(self, c: _Cohort, r: int, async_: bool):  # StepResult's fields, set once
        # the batch keeps the cohort's dicts, the cohort goes on with copies: copying a dict is a block
        # copy unless a third of its slots are deleted entries (members that left), and then the copy
        # re-inserts every key and has none, so the cohort's dicts stay cheap to copy round after round
        members, c.members = c.members, c.members.copy()
        self.sched, c.decodes = c.decodes, c.decodes.copy()
        self.computed_before = before = _Before()
        self.prompt_len = plen = _PromptLen()
        before.members = plen.members = members
        before.round = r
        # async: the WAITING loop's requests that sample; the members all sample, and while the
        # cohort lives _cohort_update applies them without asking: they are added if it dissolves (freeze)
        self.sampling = set() if async_ else None
        self.deferred, self.preempted, self.enc, self.ec_loaded, self.kv = [], [], {}, [], None
        self.round, self.epoch, self.m, self.decode_kv = r, c.epoch, len(members), c.sum_base + len(members) * r

    def freeze(self) -> None:
        """The members' computed tokens written out (before the cohort's counters are written back),
        and, async, the members added to the requests that sample: the batch is then applied request
        by request."""
        before, r = self.computed_before, self.round
        for rid, req in before.members.items():
            before[rid] = req.num_computed_tokens + r - req.join
        if self.sampling is not None:
            self.sampling.update(before.members)

    def admitted(self) -> list[str]:
        """The WAITING loop's requests, in order (taken from the end: a dict has no cheap offset)."""
        a = len(self.sched) - self.m
        return list(islice(reversed(self.sched), a))[::-1] if a else []

    def batch_shape(self) -> tuple[int, int, int, int, int]:
        m, sched, decode_kv = self.m, self.sched, self.decode_kv
        if len(sched) == m:
            return 0, 0, 0, m, decode_kv
        decode, tokens, context = m, m, decode_kv
        before, plen = self.computed_before, self.prompt_len
        for rid, n in islice(reversed(sched.items()), len(sched) - m):  # the admitted, from the end (any order)
            b = before[rid]
            context += b
            tokens += n
            if n == 1 and b >= plen[rid]:
                decode += 1
                decode_kv += b
        return len(sched) - decode, tokens - decode, context - decode_kv, decode, decode_kv


@lru_cache(maxsize=None)
def for_release(cls: type[Scheduler], vllm_version: str | None) -> type[Scheduler]:
    """`cls` (the twin or a mutant of it) with the rules of vLLM release `vllm_version` (None: the
    primary target, 0.26.0). vLLM 0.23.0's ``_free_encoder_inputs`` frees an encoder input once
    ``offset + length <= num_computed_tokens``, not subtracting the output placeholders: under async
    scheduling its cache slot is free a batch earlier. And 0.23.0 has no ``defer_block_free``: a KV
    connector's freed blocks go back at once under async scheduling too. And 0.23.0's
    ``BlockPool.free_blocks`` appends every freed block to the free queue in order, where 0.26.0 puts
    those without a hash at its front: with prefix caching a preempted request's partial block is
    then not the next one taken, and a cached block of it can be evicted first. Everything else
    the differential compares is the same in 0.23.0 and 0.26.0. One class per (cls, release):
    memoised."""
    if vllm_version is None or version_policy(vllm_version) != "0.23":
        return cls
    return type(f"{cls.__name__}_0_23", (cls,), {"free_encoder_past_placeholders": False,
                                                 "defers_freed_blocks": False, "frees_hashless_first": False})
