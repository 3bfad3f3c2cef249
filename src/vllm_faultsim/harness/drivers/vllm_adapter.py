"""The one vLLM adapter of the real drivers: a vLLM ``Request`` from a ``RequestSpec``, a step's
``SchedulerOutput`` as a ``StepResult`` (preempted requests in vLLM's preemption order), the
deterministic model runner, vLLM's own outputs of a step (:class:`VllmStep`), and
:class:`VllmSchedulerCore`, the scheduler-core protocol (models/step.py) on a vLLM ``Scheduler``.

Also the requests' block hasher (prefix caching). Used by the CPU cores (``real_scheduler``,
``real_offload``), the engine's recording scheduler (``real_engine``) and the dry-run executor
(``dry_run``). vLLM is imported on first use.

**Preemption order.** vLLM reports a step's preempted requests as a set
(``SchedulerOutput.preempted_req_ids``). Their order is recovered from the waiting queue:
``Scheduler._preempt_request`` puts each victim at the head of ``waiting``
(``self.waiting.prepend_request(request)``, vllm/v1/core/sched/scheduler.py:1233 in 0.26.0), and
a step that preempted admits nothing from ``waiting`` (``if not preempted_reqs and ...``,
scheduler.py:666), so at the end of ``schedule()`` the first ``len(preempted)`` requests of
``waiting`` are that step's victims, newest first. Requests preempted between steps (by
``reset_prefix_cache(reset_running_requests=True)``, which pops ``running`` from its end) are
noted when it runs and come first. Anything else is not vLLM's behaviour and raises.

**Async scheduling** (``VllmSchedulerCore(..., async_scheduling=True)`` on vLLM's
``AsyncScheduler``): a batch's output is applied a step late, after the next batch was scheduled,
so what it samples is fixed when it is scheduled (:func:`async_samples`, as a worker that got the
``SchedulerOutput`` at ``execute_model(non_block=True)`` would): nothing for a request that is a
prefill chunk right after ``schedule()`` (``request.is_prefill_chunk``), else output number
``len(output_token_ids) + num_output_placeholders`` (the placeholders include this batch's).
Outputs are applied oldest batch first, as ``EngineCore.step_with_batch_queue`` pops its queue.
A KV connector's worker runs a batch's whole ``execute_model`` when the batch is scheduled (vLLM's
``UniProcExecutor`` calls it inline: ``handle_preemptions``, ``start_load_kv``, ``get_finished``), so
the ``KVConnectorOutput`` a batch carries is the worker's at its schedule time, applied with it.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterable, Mapping

from ...models.kv_offload import TransferFailed
from ...models.request import RequestSpec, prompt_token_ids
from ...models.step import EOS_TOKEN_ID, Finished, StepResult, sampled_token

_NONE_HASH_FN: list = []  # the hash function vLLM's global NONE_HASH was set with (once per process)


@functools.cache
def block_hasher(block_size: int, algo: str = "sha256"):
    """A request's block hasher as ``EngineCore`` makes it (``get_request_block_hasher``), with
    vLLM's global ``NONE_HASH`` set once per process: setting it again would change the hashes
    of new requests under the blocks cached by live cores."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    hash_fn = get_hash_fn_by_name(algo)
    if not _NONE_HASH_FN:
        init_none_hash(hash_fn)
        _NONE_HASH_FN.append(hash_fn)
    return get_request_block_hasher(block_size, hash_fn)


def vllm_request(spec: RequestSpec, *, block_hasher=None):
    """The vLLM ``Request`` of ``spec`` as the engine's input processor makes it: the simulator's
    prompt token ids, one image feature per multimodal item (identifier and placeholder range), at
    most ``output_len`` tokens, EOS stopping only for a spec with ``stop_at``."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=spec.output_len, ignore_eos=spec.stop_at is None)
    params.update_from_generation_config({}, EOS_TOKEN_ID)  # as the engine's input processor does
    features = [MultiModalFeatureSpec(data=None, modality="image", identifier=m.identifier,
                                      mm_position=PlaceholderRange(offset=m.offset, length=m.length))
                for m in spec.mm]
    return Request(request_id=spec.req_id, prompt_token_ids=prompt_token_ids(spec), sampling_params=params,
                   pooling_params=None, mm_features=features or None, arrival_time=spec.arrival,
                   block_hasher=block_hasher)


def computed_before(out) -> dict[str, int]:
    """Each scheduled request's ``num_computed_tokens`` before the step (``SchedulerOutput``)."""
    before = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
    cached = out.scheduled_cached_reqs
    before.update(zip(cached.req_ids, cached.num_computed_tokens))
    return before


def preemption_order(preempted: Iterable[str] | None, waiting, before_step: Iterable[str] = ()) -> list[str]:
    """A step's preempted request ids in the order vLLM preempted them (see the module docstring):
    those preempted between steps (``before_step``, in their order), then the head of ``waiting``,
    oldest victim first."""
    preempted = set(preempted or ())
    if not preempted:
        return []
    first = [r for r in before_step if r in preempted]
    head = [r.request_id for r in islice(waiting, len(preempted) - len(first))][::-1]
    if set(first) | set(head) != preempted:
        raise RuntimeError(f"preempted {sorted(preempted)} are not the head of vLLM's waiting queue {head} "
                           f"(preempted before the step: {first})")
    return first + head


def step_result(out, requests: Mapping[str, Any], waiting, before_step: Iterable[str] = ()) -> StepResult:
    """One step's decisions in the common form: scheduled tokens (in scheduling order), computed
    tokens before, prompt lengths (``requests``: id -> vLLM Request), preempted (vLLM's order),
    encoder inputs computed locally and, with ``FaultsimECConnector``'s metadata, the EC items
    loaded and the requests ``ensure_cache_available`` deferred."""
    res = StepResult()
    before = computed_before(out)
    for rid, n in out.num_scheduled_tokens.items():
        res.sched[rid] = n
        res.computed_before[rid] = before[rid]
        res.prompt_len[rid] = requests[rid].num_prompt_tokens
    res.preempted = preemption_order(out.preempted_req_ids, waiting, before_step)
    res.enc = {rid: list(ids) for rid, ids in out.scheduled_encoder_inputs.items()}
    meta = out.ec_connector_metadata
    if meta is not None and hasattr(meta, "loads"):
        res.ec_loaded, res.deferred = list(meta.loads), list(meta.deferred)
    return res


def running_preemption_order(scheduler) -> list[str]:
    """The order ``reset_prefix_cache(reset_running_requests=True)`` preempts in: ``running``
    popped from its end."""
    return [r.request_id for r in reversed(scheduler.running)]


class DeterministicRunner:
    """The model runner of the real drivers in place of a GPU: a request whose scheduled tokens
    reach its prompt plus the outputs sampled so far samples ``models.step.sampled_token`` (EOS
    at its ``stop_at``); a partial prefill chunk samples nothing. Like a worker it follows the
    requests from the ``SchedulerOutput`` alone: prompt length when first scheduled, outputs
    sampled since; a request is forgotten when ``finished_req_ids`` names it."""

    def __init__(self, stop_at: Mapping[str, int | None] | None = None):
        self.stop_at = {} if stop_at is None else stop_at
        self._reqs: dict[str, list[int]] = {}  # req -> [prompt tokens, outputs sampled]

    def execute_model(self, so, kv_connector_output=None):
        """The ``ModelRunnerOutput`` of ``so`` (with ``kv_connector_output``, if any)."""
        from vllm.v1.outputs import ModelRunnerOutput

        reqs = self._reqs
        for rid in so.finished_req_ids:
            reqs.pop(rid, None)
        for r in so.scheduled_new_reqs:  # a resumed request is "new" again to the v2 model runner
            reqs.setdefault(r.req_id, [len(r.prompt_token_ids or ()), 0])
        before = computed_before(so)
        req_ids = list(so.num_scheduled_tokens)
        sampled = []
        for rid in req_ids:
            st = reqs[rid]
            if before[rid] + so.num_scheduled_tokens[rid] >= st[0] + st[1]:
                st[1] += 1
                sampled.append([sampled_token(rid, st[1], self.stop_at.get(rid))])
            else:
                sampled.append([])
        return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                 sampled_token_ids=sampled, kv_connector_output=kv_connector_output)

    def clear(self) -> None:
        self._reqs.clear()


def async_samples(so, requests: Mapping[str, Any], stop_at: Mapping[str, int | None]) -> dict[str, int | None]:
    """What the batch ``so`` samples under async scheduling, read right after ``schedule()``
    (``requests``: the scheduler's id -> vLLM Request): per scheduled request, ``None`` for a prefill
    chunk, else ``models.step.sampled_token`` of the output number the batch produces."""
    out: dict[str, int | None] = {}
    for rid in so.num_scheduled_tokens:
        req = requests[rid]
        if req.is_prefill_chunk:
            out[rid] = None
        else:
            out[rid] = sampled_token(rid, len(req.output_token_ids) + req.num_output_placeholders, stop_at.get(rid))
    return out


def _runner_output(samples: Mapping[str, int | None], kv_connector_output=None):
    """The ``ModelRunnerOutput`` of a batch whose requests sample ``samples`` (None: nothing)."""
    from vllm.v1.outputs import ModelRunnerOutput

    req_ids = list(samples)
    return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                             sampled_token_ids=[[] if t is None else [t] for t in samples.values()],
                             kv_connector_output=kv_connector_output)


@dataclass
class VllmStep:
    """vLLM's own outputs of one step, beside the ``StepResult`` made of them."""

    index: int                       # 0-based: the core's schedule() calls so far
    now: float                       # the virtual time the step was scheduled at
    result: StepResult
    scheduler_output: Any            # vLLM's SchedulerOutput of the step
    model_runner_output: Any = None  # the ModelRunnerOutput given to update_from_output (None before / without)
    engine_core_outputs: Any = None  # what Scheduler.update_from_output returned: {client: EngineCoreOutputs}

    @property
    def kv_connector_metadata(self):
        """The KV connector's metadata of the step (``ExternalTokensKVConnector``'s carries the
        tokens each request loaded: ``num_external_tokens``)."""
        return self.scheduler_output.kv_connector_metadata

    @property
    def ec_connector_metadata(self):
        """The EC connector's metadata of the step (``FaultsimECConnector``: ``loads``, ``deferred``)."""
        return self.scheduler_output.ec_connector_metadata


def ec_item_ready(prefetch, step_times: list[float], identifier: str, *, at: float | None = None,
                  step: int | None = None) -> bool:
    """Whether EC item ``identifier`` could be loaded from the store (``prefetch``, a
    ``PrefetchSchedule``) at virtual time ``at``, or when step ``step`` was scheduled."""
    if (at is None) == (step is None):
        raise ValueError("give the time (at=) or the step (step=)")
    if prefetch is None:
        raise ValueError("this core runs without an EC prefetch schedule")
    return prefetch.has_item(identifier, step_times[step] if step is not None else at)


class VllmSchedulerCore:
    """The scheduler-core protocol (models/step.py) on a vLLM ``Scheduler`` in this process,
    stepped by :class:`DeterministicRunner`. Subclasses build the scheduler and its connectors.

    With ``async_scheduling`` (the scheduler is vLLM's ``AsyncScheduler``) several batches may be
    in flight: ``update_from_output`` takes the oldest one's ``StepResult``, and what each batch
    samples was fixed when it was scheduled (:func:`async_samples`). Without it,
    ``update_from_output`` takes the latest ``schedule()``'s.

    Beside each ``StepResult`` it keeps vLLM's own outputs: :attr:`last_step` (a
    :class:`VllmStep`), :attr:`on_step` (called with each finished step's ``VllmStep``),
    :attr:`step_times` (the virtual time of every step)."""

    def __init__(self, scheduler, block_hasher=None, *, async_scheduling: bool = False):
        if async_scheduling != any(c.__name__ == "AsyncScheduler" for c in type(scheduler).__mro__):
            raise TypeError(f"async_scheduling={async_scheduling} needs {'an' if async_scheduling else 'no'} "
                            f"AsyncScheduler, got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self.block_hasher = block_hasher
        self.async_scheduling = async_scheduling
        # async: the batches in flight, oldest first: (StepResult, SchedulerOutput, samples, VllmStep,
        # the worker's KVConnectorOutput of the batch)
        self._in_flight: deque[tuple[StepResult, Any, dict[str, int | None], VllmStep, Any]] = deque()
        self._requests: dict[str, Any] = {}   # req_id -> vLLM Request, until it finishes
        self._stop_at: dict[str, int | None] = {}
        self.runner = DeterministicRunner(self._stop_at)
        self._preempted_between: list[str] = []  # by reset_prefix_cache, for the next step
        self._last: tuple[StepResult, Any] | None = None
        self.last_step: VllmStep | None = None
        """vLLM's outputs of the latest step (its ``model_runner_output`` and
        ``engine_core_outputs`` once ``update_from_output`` ran)."""
        self.on_step: Callable[[VllmStep], None] | None = None
        """Called with the ``VllmStep`` of each step whose output came back (a test keeps them all)."""
        self.step_times: list[float] = []
        """The virtual time each ``schedule()`` ran at: step ``k`` is ``step_times[k]``."""

    # ---- subclass hooks ------------------------------------------------------------------

    def _before_schedule(self, now: float) -> None:
        pass

    def _after_schedule(self, out, res: StepResult, now: float) -> None:
        pass

    def _connector_output(self, out, now: float):
        """The step's ``KVConnectorOutput`` (None: no KV connector worker)."""
        return None

    def _after_update(self, result: StepResult) -> None:
        pass

    # ---- protocol ------------------------------------------------------------------------

    def add_request(self, spec: RequestSpec, now: float) -> None:
        req = vllm_request(spec, block_hasher=self.block_hasher)
        self._requests[spec.req_id] = req
        self._stop_at[spec.req_id] = spec.stop_at
        self.scheduler.add_request(req)

    def schedule(self, now: float) -> StepResult:
        self._before_schedule(now)
        out = self.scheduler.schedule()
        res = step_result(out, self.scheduler.requests, self.scheduler.waiting, self._preempted_between)
        self._preempted_between = []
        self._after_schedule(out, res, now)
        self.last_step = step = VllmStep(len(self.step_times), now, res, out)
        self.step_times.append(now)
        if self.async_scheduling:
            samples = async_samples(out, self.scheduler.requests, self._stop_at)
            res.sampling = {rid for rid, token in samples.items() if token is not None}
            try:  # execute_model(non_block=True) runs the worker inline: its get_finished is this batch's
                kv_output = self._connector_output(out, now)
            except TransferFailed as exc:  # ... and re-raises at once (the engine core dies)
                exc.batch = res
                raise
            self._in_flight.append((res, out, samples, step, kv_output))
        else:
            self._last = (res, out)
        return res

    def update_from_output(self, result: StepResult, now: float) -> list[Finished]:
        if self.async_scheduling:
            if not self._in_flight or self._in_flight[0][0] is not result:
                raise ValueError("update_from_output() takes the StepResult of the oldest batch in flight")
            _, out, samples, step, kv_output = self._in_flight.popleft()
            runner_output = _runner_output(samples, kv_output)
        else:
            if self._last is None or self._last[0] is not result:
                raise ValueError("update_from_output() takes the StepResult of the latest schedule()")
            out = self._last[1]
            self._last = None
            step = self.last_step
            runner_output = self.runner.execute_model(out, self._connector_output(out, now))
        outputs = self.scheduler.update_from_output(out, runner_output)
        finished = []
        for client_outputs in outputs.values():
            for o in client_outputs.outputs:
                if o.finish_reason is not None:
                    req = self._requests.pop(o.request_id)
                    del self._stop_at[o.request_id]
                    finished.append(Finished(o.request_id, str(o.finish_reason), req.num_output_tokens))
        self._after_update(result)
        step.model_runner_output, step.engine_core_outputs = runner_output, outputs
        if self.on_step is not None:
            self.on_step(step)
        return finished

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def counts(self) -> tuple[int, int]:
        return self.scheduler.get_request_counts()

    def _forget_all(self) -> None:
        self._requests.clear()
        self._stop_at.clear()
        self.runner.clear()
        self._last = None
        self._in_flight.clear()

    def shutdown(self) -> None:
        self.scheduler.shutdown()

    # ---- beyond the protocol ---------------------------------------------------------------

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """vLLM's ``Scheduler.reset_prefix_cache``: drop the prefix cache (only when no request
        holds blocks, unless ``reset_running_requests`` preempts them all first; the next step
        reports them as preempted); ``reset_connector`` resets the KV connector's cache too.
        Returns whether the reset succeeded. Call it between steps."""
        victims = running_preemption_order(self.scheduler) if reset_running_requests else []
        ok = self.scheduler.reset_prefix_cache(reset_running_requests, reset_connector)
        self._preempted_between += victims
        return ok
