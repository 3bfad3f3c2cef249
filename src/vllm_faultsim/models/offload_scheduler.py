"""The simulated Scheduler with KV offloading: the KV-connector hooks of ``models/scheduler.py``
(its ``kv_connector``) implemented by :class:`OffloadingConnector` over ``models.kv_offload``,
and :class:`OffloadScheduler`, the scheduler core that carries one.

Checked step by step against the real vLLM 0.26.0 Scheduler + OffloadingConnector
(tests/diff/test_offload_real.py). What vLLM's Scheduler does and the hooks mirror:

- ``add_request`` -> ``connector.on_new_request`` (:meth:`OffloadingConnector.on_new_request`).
- WAITING loop: a request in ``WAITING_FOR_REMOTE_KVS`` is skipped (``step_skipped_waiting``)
  until the worker reported its load (``finished_recving``); then ``_update_waiting_for_remote_kv``
  caches its blocks up to ``num_computed_tokens`` (a full hit recomputes the last token) and it
  is scheduled like a resumed/new request, holding its blocks (:meth:`~OffloadingConnector.promote`).
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
  on empty steps too (models/engine.py does; so does ``harness.runs.offload.run_offload``).
- Async scheduling (``AsyncScheduler``, vLLM 0.26.0's default, KV connectors included): the engine
  loop's batch queue (models/engine.py ``step_with_batch_queue``) schedules batch N+1 before batch
  N's output is applied, so ``build_connector_meta`` of N+1 runs before N's worker output reaches
  ``update_connector_output``; the worker runs a batch's whole ``execute_model`` when it is
  scheduled (``UniProcExecutor`` calls it inline: ``handle_preemptions``, ``start_load_kv`` and
  ``get_finished`` at once), and its output travels with the batch (``_outputs``, one per batch in
  flight, oldest first) to that batch's ``update_from_output``. A failed transfer therefore
  raises from ``schedule()`` (``execute_model`` re-raises at once: the engine core dies).
  And vLLM's Scheduler defers block freeing (``defer_block_free``: more than one batch in flight
  and a KV-consumer connector, which ``kv_both`` is): each non-empty ``schedule()`` advances
  ``sched_step_seq`` and stamps its requests' ``last_sched_seq``; each non-empty batch's
  ``update_from_output`` first advances ``processed_step_seq`` and returns the deferred blocks
  whose fence it reached; a request freed or preempted while a batch that scheduled it is in
  flight keeps its blocks out of the pool until then (``_free_request_blocks``) -- so a
  preemption may have to take a second victim.
"""

from __future__ import annotations

from collections import deque

from . import kv_offload as ko
from .scheduler import FINISHED, PREEMPTED, WAITING, WAITING_FOR_REMOTE_KVS, Scheduler, SchedulerConfig, cdiv
from .step import StepResult


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



class OffloadingConnector:
    """The Scheduler's KV connector: vLLM's ``OffloadingConnector`` scheduler side, plus the
    worker's calls the model runner makes at the step's start and end (one process here)."""

    is_kv_consumer = True  # kv_role "kv_both": it loads KV (Scheduler.attach_kv_connector)

    def __init__(self, sched: Scheduler, offload: ko.OffloadConfig, policy: ko.OffloadPolicy):
        self.sched = sched
        self.kv = ko.OffloadingConnectorScheduler(offload, policy)
        self.engine = ko.TransferEngine(offload)
        self.worker = ko.OffloadingConnectorWorker(self.engine, policy, self.kv.names, self.kv.events)
        self.views: dict[str, _View] = {}
        self.finished_req_ids: set[str] = set()    # finished since the last schedule()
        self.finished_recving: set[str] = set()    # loads reported, requests not yet promoted
        self.inflight: dict = {}                   # rid -> Request: prefills in flight
        self.num_preemptions: dict[str, int] = {}
        self.new_reqs: list = []                   # this step's admissions: (req, block ids, resumed)
        self.resumed_reqs: list = []
        self._meta: ko.OffloadingConnectorMetadata | None = None
        # the worker's get_finished of each batch not applied yet, oldest first: (recving, completed)
        self._outputs: deque[tuple[set[str], dict[int, int]]] = deque()

    # -- schedule() ---------------------------------------------------------------------------

    def on_new_request(self, req) -> None:
        v = self.views[req.req_id] = _View(req)
        self.kv.on_new_request(v)

    def promote(self, req) -> bool:
        """_try_promote_blocked_waiting_request: False while the load is in flight."""
        rid = req.req_id
        if rid not in self.finished_recving:
            return False
        self.sched.pool.cache_blocks(rid, req.block_hashes, req.num_computed_tokens, self.sched.config.block_size)
        if req.num_computed_tokens == req.num_prompt_tokens + req.num_output_tokens:
            req.num_computed_tokens -= 1
        self.finished_recving.discard(rid)
        req.status = PREEMPTED if self.num_preemptions.get(rid) else WAITING
        return True

    def get_num_new_matched_tokens(self, req, num_local: int) -> tuple[int | None, bool]:
        return self.kv.get_num_new_matched_tokens(self.views[req.req_id], num_local)

    def inflight_prefill_reserved_blocks(self) -> int:
        s = self.sched
        bs, max_len, req_blocks = s.config.block_size, s.config.max_model_len, s.pool.req_blocks
        return sum(max(cdiv(min(r.num_prompt_tokens + r.num_output_tokens, max_len), bs)
                       - len(req_blocks.get(r.req_id, ())), 0) for r in self.inflight.values())

    def update_state_after_alloc(self, req, block_ids: list[int], num_external: int, num_hashed: int) -> None:
        self.kv.update_state_after_alloc(self.views[req.req_id], block_ids, num_external,
                                         num_hashed_blocks=num_hashed)

    def wait_for_remote_kvs(self, req, num_computed: int) -> None:
        req.status = WAITING_FOR_REMOTE_KVS
        req.num_computed_tokens = num_computed
        self.inflight[req.req_id] = req

    def admitted(self, req, num_computed_after: int) -> None:
        """A new or resumed request was scheduled (before its status becomes RUNNING)."""
        rid = req.req_id
        resumed = req.status == PREEMPTED
        (self.resumed_reqs if resumed else self.new_reqs).append((rid, list(self.sched.pool.req_blocks[rid]), resumed))
        if num_computed_after < req.num_prompt_tokens + req.num_output_tokens:
            self.inflight[rid] = req

    def build_connector_meta(self, res: StepResult, now: float) -> None:
        """build_connector_meta, then the worker's handle_preemptions and start_load_kv.

        The request data is vLLM's ``yield_req_data`` order: new requests, running ones, resumed
        ones, each with its new block ids; a running request held the blocks of its computed
        tokens before the step, so its new ones are those past them. vLLM builds the meta before
        ``_update_after_schedule``; the simulated scheduler advances ``num_computed_tokens`` as it
        schedules, so the scheduled requests are rewound around the call."""
        s = self.sched
        requests, req_blocks, sched = s.requests, s.pool.req_blocks, res.sched
        bs, max_len = s.config.block_size, s.config.max_model_len
        admitted = {rid for rid, _, _ in self.new_reqs} | {rid for rid, _, _ in self.resumed_reqs}
        running = [(rid, req_blocks[rid][cdiv(min(res.computed_before[rid], max_len), bs):] or None, False)
                   for rid in sched if rid not in admitted]
        for rid, n in sched.items():
            requests[rid].num_computed_tokens -= n
        self._meta = self.kv.build_connector_meta(ko.SchedOut(self.new_reqs + running + self.resumed_reqs,
                                                              dict(sched), self.finished_req_ids, set(res.preempted)))
        for rid, n in sched.items():
            r = requests[rid]
            r.num_computed_tokens += n
            if r.num_computed_tokens >= r.num_prompt_tokens + r.num_output_tokens:
                self.inflight.pop(rid, None)
        self.worker.handle_preemptions(self._meta, now)
        self.worker.start_kv_transfers(self._meta, now)
        self.finished_req_ids = set()
        self.new_reqs, self.resumed_reqs = [], []
        res.kv = self.kv.events.take()
        if s.async_scheduling:  # the worker's execute_model ends here too (see the module docstring)
            try:
                self.get_finished(now)
            except ko.TransferFailed as exc:
                exc.batch = res
                raise

    def on_preempt(self, req) -> None:
        self.inflight.pop(req.req_id, None)
        self.num_preemptions[req.req_id] = self.num_preemptions.get(req.req_id, 0) + 1

    # -- update_from_output() -----------------------------------------------------------------

    def get_finished(self, now: float) -> None:
        """The worker's get_finished (sync: at the step's end; async: when the batch is
        scheduled); a failed transfer raises TransferFailed naming every job still pending (the
        engine dies)."""
        try:
            self._outputs.append(self.worker.get_finished(self._meta, now))
        except ko.TransferFailed as exc:
            raise ko.TransferFailed(exc.failed, self.kv.pending_jobs(), now) from None

    def request_finished(self, req) -> None:
        """Before the request's blocks are freed; its id is reported at the next schedule()."""
        self.inflight.pop(req.req_id, None)
        self.kv.request_finished(self.views.pop(req.req_id))
        self.finished_req_ids.add(req.req_id)

    def update_connector_output(self, res: StepResult) -> None:
        """The worker output of `res`'s batch (the oldest in flight)."""
        recving, completed = self._outputs.popleft()
        self.kv.update_connector_output(completed)
        requests = self.sched.requests
        for rid in recving:
            r = requests.get(rid)
            if r is not None and r.status == WAITING_FOR_REMOTE_KVS:
                self.finished_recving.add(rid)
        kv = self.kv.events.take()
        if kv:
            res.kv = {**(res.kv or {}), **kv}


class OffloadScheduler(Scheduler):
    """A scheduler core (models/step.py) with KV offloading; ``policy`` picks the vLLM release's
    rules (``kv_offload.policy_for``); transfer faults arrive through ``transfers`` (its
    ``TransferEngine``, armed by faults/sim_injector.py). Text requests only."""

    def __init__(self, config: SchedulerConfig, offload: ko.OffloadConfig, policy: ko.OffloadPolicy | None = None):
        if not config.enable_prefix_caching:
            raise ValueError("KV offloading needs prefix caching (block hashes): set enable_prefix_caching")
        if offload.block_size != config.block_size:
            raise ValueError("offload.block_size must equal the scheduler's block_size")
        super().__init__(config)
        self.policy = policy or ko.policy_for()
        self.attach_kv_connector(OffloadingConnector(self, offload, self.policy))

    @property
    def transfers(self) -> ko.TransferEngine:
        """The worker's transfer engine (its fault hooks: ``slow_down``, ``fail_between``)."""
        return self.kv_connector.engine

    def add_request(self, spec, now):
        if spec.mm:
            raise ValueError(f"request {spec.req_id}: the offloading scheduler is text-only")
        super().add_request(spec, now)

    def has_requests(self):
        c = self.kv_connector
        return bool(self.requests) or bool(c.finished_req_ids) or c.kv.has_pending_push_work()

    has_unfinished_requests = has_requests

    def pending_jobs(self):
        return self.kv_connector.kv.pending_jobs()

    def fail_all(self):
        self.kv_connector.views.clear()
        self.kv_connector.inflight.clear()
        self.kv_connector._outputs.clear()
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
                    if r.status == WAITING_FOR_REMOTE_KVS or r.num_computed_tokens > 0}
        stray = set(req_blocks) - holders
        if stray:
            return f"requests {sorted(stray)[:3]} hold KV blocks outside running / a KV load"
        return self.pool.conservation_error(deep)
