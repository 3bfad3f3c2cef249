"""The simulated Scheduler with KV offloading: ``models.scheduler.Scheduler`` plus the hooks of
vLLM 0.26.0's Scheduler into its KV connector, driving ``models.kv_offload``.

This is the reference for the hooks ``models/scheduler.py`` needs (each is marked ``HOOK``); it
overrides ``schedule()`` with a copy of the parent's loop (text only: no encoder inputs, no EC
connector) until the hooks land there. Checked step by step against the real vLLM 0.26.0
Scheduler + OffloadingConnector (tests/diff/test_offload_real.py). What vLLM does and this mirrors:

- ``add_request`` -> ``connector.on_new_request``.
- WAITING loop: a request in ``WAITING_FOR_REMOTE_KVS`` is skipped (``step_skipped_waiting``)
  until the worker reported its load (``finished_recving``); then ``_update_waiting_for_remote_kv``
  caches its blocks up to ``num_computed_tokens`` (a full hit recomputes the last token) and it
  is scheduled like a resumed/new request, holding its blocks.
- For ``num_computed_tokens == 0``: after the local prefix-cache hit,
  ``get_num_new_matched_tokens(req, local)``: ``None`` skips the request; with external tokens
  and ``load_async`` no new tokens are scheduled, the allocation must leave the blocks that
  in-flight prefills still need (``_inflight_prefill_reserved_blocks``), blocks are not cached
  yet (``delay_cache_blocks``), ``update_state_after_alloc`` runs, and the request parks in
  ``WAITING_FOR_REMOTE_KVS`` with ``num_computed_tokens = local + external``.
- End of ``schedule()``, before ``_update_after_schedule``: ``build_connector_meta`` with the
  requests' new block ids (new, running, resumed), the scheduled tokens, the ids finished since
  the last step and the preempted ids; the worker then runs ``handle_preemptions`` and
  ``start_load_kv`` (submission at the step's start).
- ``update_from_output``: the worker's ``get_finished`` at the step's end; finished requests call
  ``request_finished`` before their blocks are freed; *then* ``update_connector_output`` and
  ``finished_recving`` (``_update_from_kv_xfer_finished`` runs last in vLLM).
- ``has_requests()`` = unfinished requests or finished ids not yet reported or
  ``has_pending_push_work()``: the engine must step while it holds, and run ``update_from_output``
  on empty steps too (see ``harness.offload_check.run_offload``).
"""

from __future__ import annotations

from collections import deque

from . import kv_offload as ko
from .scheduler import FINISHED, PREEMPTED, RUNNING, WAITING, Scheduler, SchedulerConfig, cdiv
from .step import StepResult

REMOTE = "waiting_for_remote_kvs"  # RequestStatus.WAITING_FOR_REMOTE_KVS


class _View:
    """A simulated request as the connector reads vLLM's Request."""

    __slots__ = ("r",)

    def __init__(self, r):
        self.r = r

    @property
    def request_id(self) -> str:
        return self.r.req_id

    @property
    def num_tokens(self) -> int:
        return self.r.num_prompt_tokens + self.r.num_output_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return self.r.num_prompt_tokens

    @property
    def num_computed_tokens(self) -> int:
        return self.r.num_computed_tokens

    @property
    def block_hashes(self) -> list:
        return self.r.block_hashes

    def is_finished(self) -> bool:
        return self.r.status == FINISHED


class OffloadScheduler(Scheduler):
    """A scheduler core (models/step.py) with KV offloading; ``policy`` picks the vLLM release's
    rules (``kv_offload.policy_for``), ``plan`` the transfer faults."""

    def __init__(self, config: SchedulerConfig, offload: ko.OffloadConfig, policy: ko.OffloadPolicy | None = None,
                 plan=None):
        if not config.enable_prefix_caching:
            raise ValueError("KV offloading needs prefix caching (block hashes): set enable_prefix_caching")
        if offload.block_size != config.block_size:
            raise ValueError("offload.block_size must equal the scheduler's block_size")
        super().__init__(config)
        policy = policy or ko.policy_for()
        self.policy = policy
        self.kv = ko.OffloadingConnectorScheduler(offload, policy)
        self.engine = ko.TransferEngine(offload, plan)
        self.worker = ko.OffloadingConnectorWorker(self.engine, policy, self.kv.names, self.kv.events)
        self.views = {}
        self.finished_req_ids = set()
        self.finished_recving = set()
        self.inflight = {}          # rid -> Request (in-flight prefills)
        self.num_preemptions = {}
        self._meta = None

    def add_request(self, spec, now):
        if spec.mm:
            raise ValueError(f"request {spec.req_id}: the offloading scheduler is text-only")
        super().add_request(spec, now)
        req = self.requests[spec.req_id]
        v = self.views[spec.req_id] = _View(req)
        self.kv.on_new_request(v)

    def has_requests(self):
        return bool(self.requests) or bool(self.finished_req_ids) or self.kv.has_pending_push_work()

    has_unfinished_requests = has_requests

    def pending_jobs(self):
        return self.kv.pending_jobs()

    def _remaining_blocks(self, req):
        full = min(req.num_prompt_tokens + req.num_output_tokens, self.config.max_model_len)
        held = len(self.pool.req_blocks.get(req.req_id, ()))
        return max(cdiv(full, self.config.block_size) - held, 0)

    def _preempt_request(self, req):
        super()._preempt_request(req)
        self.inflight.pop(req.req_id, None)
        self.num_preemptions[req.req_id] = self.num_preemptions.get(req.req_id, 0) + 1

    def schedule(self, now):
        cfg = self.config
        res = StepResult()
        sched, before, plen = res.sched, res.computed_before, res.prompt_len
        token_budget = cfg.max_num_batched_tokens
        max_model_len, bs = cfg.max_model_len, cfg.block_size
        threshold = cfg.long_prefill_token_threshold
        pool, running = self.pool, self.running
        req_blocks, free_blocks = pool.req_blocks, pool.free
        new_data, running_data, resumed_data = [], [], []

        req_index = 0
        while req_index < len(running) and token_budget > 0:
            req = running[req_index]
            computed = req.num_computed_tokens
            n = req.num_prompt_tokens + req.num_output_tokens - computed
            if 0 < threshold < n:
                n = threshold
            if n > token_budget:
                n = token_budget
            if n > max_model_len - computed - 1:
                n = max_model_len - computed - 1
            if n == 0:
                req_index += 1
                continue
            rid = req.req_id
            new = []
            while True:
                held = req_blocks.get(rid)
                need = -(-min(computed + n, max_model_len) // bs) - (len(held) if held else 0)
                if need <= len(free_blocks):
                    if need > 0:
                        new = pool.allocate(rid, need)
                    pool.cache_blocks(rid, req.block_hashes, min(computed + n, req.num_prompt_tokens
                                                                  + req.num_output_tokens), bs)
                    break
                victim = running.pop()
                self._preempt_request(victim)
                res.preempted.append(victim.req_id)
                if victim is req:
                    break
            if req.status != RUNNING:
                break
            sched[rid] = n
            before[rid] = computed
            plen[rid] = req.num_prompt_tokens
            token_budget -= n
            req_index += 1
            running_data.append((rid, new or None, False))

        if not res.preempted:
            step_skipped_waiting = deque()
            while (self.waiting or self.skipped_waiting) and token_budget > 0:
                if len(running) >= cfg.max_num_seqs:
                    break
                queue = self.skipped_waiting or self.waiting
                req = queue[0]
                rid = req.req_id
                # HOOK: blocked WAITING_FOR_REMOTE_KVS requests (_try_promote_blocked_waiting_request)
                if req.status == REMOTE:
                    if rid not in self.finished_recving:
                        queue.popleft()
                        step_skipped_waiting.appendleft(req)
                        continue
                    pool.cache_blocks(rid, req.block_hashes, req.num_computed_tokens, bs)
                    if req.num_computed_tokens == req.num_prompt_tokens + req.num_output_tokens:
                        req.num_computed_tokens -= 1
                    self.finished_recving.discard(rid)
                    req.status = PREEMPTED if self.num_preemptions.get(rid) else WAITING
                hit = []
                ext, load_async, local = 0, False, 0
                num_tokens = req.num_prompt_tokens + req.num_output_tokens
                if req.num_computed_tokens == 0:
                    hit = pool.get_computed_blocks(req.block_hashes, num_tokens - 1, bs)
                    local = len(hit) * bs
                    # HOOK: get_num_new_matched_tokens
                    ext, load_async = self.kv.get_num_new_matched_tokens(self.views[rid], local)
                    if ext is None:
                        queue.popleft()
                        step_skipped_waiting.appendleft(req)
                        continue
                    computed = local + ext
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
                watermark = self.watermark_blocks if running else 0
                extra = watermark + (pool.num_evictable(hit) if hit else 0)
                reserved = sum(self._remaining_blocks(r) for r in self.inflight.values()) if load_async else 0
                free = len(free_blocks)
                full = num_tokens
                held = len(req_blocks.get(rid, ()))  # a request promoted after its load holds its blocks
                need = max(cdiv(min(computed + n, max_model_len), bs) - len(hit) - held, 0)
                if (max(cdiv(min(full, max_model_len), bs) - len(hit) - held, 0) + extra > free
                        or need + extra > free - reserved):
                    break
                if hit:
                    pool.allocate_computed(rid, hit)
                pool.allocate(rid, need)
                if not load_async:
                    pool.cache_blocks(rid, req.block_hashes, min(computed + n, num_tokens), bs)
                # HOOK: update_state_after_alloc
                self.kv.update_state_after_alloc(self.views[rid], list(req_blocks[rid]), ext,
                                                 num_hashed_blocks=len(hit))
                queue.popleft()
                if load_async:
                    req.status = REMOTE
                    step_skipped_waiting.appendleft(req)
                    req.num_computed_tokens = computed
                    self.inflight[rid] = req
                    continue
                running.append(req)
                (resumed_data if req.status == PREEMPTED else new_data).append(
                    (rid, list(req_blocks[rid]), req.status == PREEMPTED))
                req.status = RUNNING
                req.num_computed_tokens = computed
                sched[rid] = n
                before[rid] = computed
                plen[rid] = req.num_prompt_tokens
                token_budget -= n
                if computed + n < num_tokens:
                    self.inflight[rid] = req
            if step_skipped_waiting:
                self.skipped_waiting.extendleft(step_skipped_waiting)

        # HOOK: build_connector_meta (before _update_after_schedule), then the worker's step start
        so = ko.SchedOut(new_data + running_data + resumed_data, dict(sched), self.finished_req_ids,
                         set(res.preempted))
        self._meta = self.kv.build_connector_meta(so)
        self.worker.handle_preemptions(self._meta, now)
        self.worker.start_kv_transfers(self._meta, now)
        self.finished_req_ids = set()
        requests = self.requests
        for rid, n in sched.items():
            r = requests[rid]
            r.num_computed_tokens += n
            if r.num_computed_tokens >= r.num_prompt_tokens + r.num_output_tokens:
                self.inflight.pop(rid, None)
        res.kv = self.kv.events.take()
        return res

    def update_from_output(self, res, now):
        try:
            recving, completed = self.worker.get_finished(self._meta, now)
        except ko.TransferFailed as exc:
            raise ko.TransferFailed(exc.failed, self.kv.pending_jobs(), now) from None
        finished = super().update_from_output(res, now)
        # HOOK: _update_from_kv_xfer_finished (after the finished requests were freed)
        self.kv.update_connector_output(completed)
        for rid in recving:
            r = self.requests.get(rid)
            if r is not None and r.status == REMOTE:
                self.finished_recving.add(rid)
        kv = self.kv.events.take()
        if kv:
            res.kv = {**(res.kv or {}), **kv}
        return finished

    def _free_request(self, req):
        # HOOK: request_finished before the blocks are freed; the id is reported next step
        self.inflight.pop(req.req_id, None)
        self.kv.request_finished(self.views[req.req_id])
        self.finished_req_ids.add(req.req_id)
        super()._free_request(req)
        del self.views[req.req_id]

    def fail_all(self):
        self.views.clear()
        self.inflight.clear()
        return super().fail_all()

    def check(self, deep=False):
        """KV blocks conserved; running requests hold their computed tokens' blocks; only running
        requests and those loading (or loaded, not yet admitted) hold blocks."""
        bs, max_len, req_blocks = self.config.block_size, self.config.max_model_len, self.pool.req_blocks
        for req in self.running:
            have = len(req_blocks.get(req.req_id, ()))
            if have != cdiv(min(req.num_computed_tokens, max_len), bs):
                return f"request {req.req_id} holds {have} KV blocks for {req.num_computed_tokens} computed tokens"
        # a waiting request holds blocks only while / after its KV load (then num_computed_tokens > 0)
        holders = {r.req_id for r in self.running}
        holders |= {r.req_id for q in (self.waiting, self.skipped_waiting) for r in q
                    if r.status == REMOTE or r.num_computed_tokens > 0}
        stray = set(req_blocks) - holders
        if stray:
            return f"requests {sorted(stray)[:3]} hold KV blocks outside running / a KV load"
        return self.pool.conservation_error(deep)
