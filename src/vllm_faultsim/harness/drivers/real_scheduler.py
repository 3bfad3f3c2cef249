"""``RealSchedulerCore``: the scheduler-core protocol (models/step.py) on vLLM's own v1 ``Scheduler``.

The real ``vllm.v1.core.sched.scheduler.Scheduler`` runs on CPU with a tiny model folder
(``harness.model_dirs``), one full-attention KV cache group of ``num_gpu_blocks`` blocks, FCFS,
synchronous scheduling, prefix caching as configured (block hashes made as ``EngineCore`` makes
them). A deterministic model runner stands in for the GPU: a request whose prefill completes in a
step samples ``models.step.sampled_token``; a partial prefill chunk samples nothing. With an
``ec`` prefetch schedule, vLLM loads ``harness.real_ec_connector.FaultsimECConnector`` through its
connector factory.

vLLM is imported on first use (``import vllm`` takes ~10 s); the ``VllmConfig`` of a given
configuration is built once per process and shared by the cores that use it.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

from ..workload import RequestSpec, prompt_token_ids
from ...models.step import EOS_TOKEN_ID, Finished, StepResult, sampled_token
from . import model_dirs

EC_CONNECTOR = "FaultsimECConnector"
EC_CONNECTOR_MODULE = "vllm_faultsim.harness.drivers.real_ec_connector"


class _Key(NamedTuple):
    """Everything the shared VllmConfig depends on."""

    model: str
    multimodal: bool
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    num_gpu_blocks: int
    max_model_len: int
    enable_chunked_prefill: bool
    long_prefill_token_threshold: int
    watermark: float
    encoder_compute_budget: int
    encoder_cache_size: int
    enable_prefix_caching: bool
    ec_policy: str | None


@functools.lru_cache(maxsize=16)
def _vllm_config(key: _Key):
    import pydantic
    from vllm.config import (CacheConfig, DeviceConfig, ECTransferConfig, ModelConfig,
                             SchedulerConfig, VllmConfig)

    model = ModelConfig(model=key.model, max_model_len=key.max_model_len, dtype="float16", seed=0,
                        skip_tokenizer_init=not key.multimodal)
    try:
        sched = SchedulerConfig(max_num_seqs=key.max_num_seqs, max_num_batched_tokens=key.max_num_batched_tokens,
                                max_model_len=key.max_model_len, is_encoder_decoder=False,
                                enable_chunked_prefill=key.enable_chunked_prefill,
                                long_prefill_token_threshold=key.long_prefill_token_threshold,
                                watermark=key.watermark, async_scheduling=False)
    except pydantic.ValidationError as exc:  # several lines: keep the messages only
        raise ValueError("vLLM rejects the scheduler config: "
                         + "; ".join(e["msg"] for e in exc.errors())) from None
    # vLLM sets both to max_num_batched_tokens; MultiModalBudget raises them to the model's
    # largest item (16 tokens per tiny-llava image)
    sched.max_num_encoder_input_tokens = key.encoder_compute_budget
    sched.encoder_cache_size = key.encoder_cache_size
    cache = CacheConfig(block_size=key.block_size, enable_prefix_caching=key.enable_prefix_caching)
    cache.num_gpu_blocks = key.num_gpu_blocks
    ec = None
    if key.ec_policy is not None:
        ec = ECTransferConfig(ec_connector=EC_CONNECTOR, ec_connector_module_path=EC_CONNECTOR_MODULE,
                              ec_role="ec_consumer", engine_id="faultsim",
                              ec_connector_extra_config={"policy": key.ec_policy})
    return VllmConfig(model_config=model, scheduler_config=sched, cache_config=cache,
                      ec_transfer_config=ec, device_config=DeviceConfig("cpu"))


@functools.cache
def _none_hash(algo: str):
    """The hash function, with vLLM's global NONE_HASH set once per process: setting it again
    would change the hashes of new requests under the blocks cached by live cores."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import init_none_hash

    hash_fn = get_hash_fn_by_name(algo)
    init_none_hash(hash_fn)
    return hash_fn


def _block_hasher(vllm_config):
    """As ``EngineCore`` makes it."""
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher

    cache = vllm_config.cache_config
    return get_request_block_hasher(cache.block_size, _none_hash(cache.prefix_caching_hash_algo))


class RealSchedulerCore:
    """A scheduler core (see models/step.py) backed by the real vLLM ``Scheduler``.

    ``config`` is any object with the fields of ``models.scheduler.SchedulerConfig``:
    max_num_seqs, max_num_batched_tokens, block_size, num_gpu_blocks, max_model_len,
    enable_chunked_prefill, long_prefill_token_threshold, watermark, encoder_compute_budget,
    encoder_cache_size, enable_prefix_caching (other fields, such as a sim mutant, are ignored).
    ``ec``: the shared prefetch schedule; ``None`` runs without an EC connector (every encoder
    input is computed locally). ``ec_policy`` selects the connector's ``ensure_cache_available`` policy
    (``real_ec_connector.POLICIES``). ``multimodal=False`` runs the text-only tiny-llama (no
    encoder cache). ``model_cache_dir``: where the model folders live (``model_dirs``).
    """

    def __init__(self, config, ec=None, *, ec_policy: str = "future-only", multimodal: bool = True,
                 model_cache_dir=None):
        try:
            from vllm.v1.core.sched.scheduler import Scheduler
        except ImportError:
            raise ImportError("RealSchedulerCore needs vllm==0.26.0 (pip install -e .[vllm])") from None
        import torch
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        model = model_dirs.tiny_llava(model_cache_dir) if multimodal else model_dirs.tiny_llama(model_cache_dir)
        key = _Key(str(model), multimodal, config.max_num_seqs, config.max_num_batched_tokens,
                   config.block_size, config.num_gpu_blocks, config.max_model_len,
                   config.enable_chunked_prefill, config.long_prefill_token_threshold, config.watermark,
                   config.encoder_compute_budget, config.encoder_cache_size, config.enable_prefix_caching,
                   ec_policy if ec is not None else None)
        vllm_config = _vllm_config(key)
        spec = FullAttentionSpec(block_size=config.block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)
        kv_cache_config = KVCacheConfig(num_blocks=config.num_gpu_blocks, kv_cache_tensors=[],
                                        kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
        self.scheduler = Scheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                                   structured_output_manager=StructuredOutputManager(vllm_config),
                                   block_size=config.block_size, log_stats=False)
        self.multimodal = multimodal
        # the budgets vLLM really uses (0 for a text-only model): the simulator must use the same
        self.encoder_compute_budget = self.scheduler.max_num_encoder_input_tokens
        self.encoder_cache_size = self.scheduler.encoder_cache_manager.cache_size
        if multimodal and (self.encoder_compute_budget, self.encoder_cache_size) != (
                config.encoder_compute_budget, config.encoder_cache_size):
            raise ValueError(f"vLLM raised the encoder budget/cache size to {self.encoder_compute_budget}/"
                             f"{self.encoder_cache_size} (the model's largest item): configure at least that")
        self.ec_connector = self.scheduler.get_ec_connector()
        if self.ec_connector is not None:
            self.ec_connector.bind(ec)
        self._block_hasher = _block_hasher(vllm_config) if config.enable_prefix_caching else None
        self._requests = {}   # req_id -> vllm Request, until it finishes
        self._stop_at: dict[str, int | None] = {}
        self._last = None     # (StepResult, SchedulerOutput) of the latest schedule()

    # ---- protocol ----------------------------------------------------------------------

    def add_request(self, spec: RequestSpec, now: float) -> None:
        from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        if spec.mm and not self.multimodal:
            raise ValueError(f"request {spec.req_id} has images but this core runs the text-only tiny-llama")
        params = SamplingParams(max_tokens=spec.output_len, ignore_eos=spec.stop_at is None)
        params.update_from_generation_config({}, EOS_TOKEN_ID)  # as the engine's input processor does
        features = [MultiModalFeatureSpec(data=None, modality="image", identifier=m.identifier,
                                          mm_position=PlaceholderRange(offset=m.offset, length=m.length))
                    for m in spec.mm]
        req = Request(request_id=spec.req_id, prompt_token_ids=prompt_token_ids(spec), sampling_params=params,
                      pooling_params=None, mm_features=features or None, arrival_time=spec.arrival,
                      block_hasher=self._block_hasher)
        self._requests[spec.req_id] = req
        self._stop_at[spec.req_id] = spec.stop_at
        self.scheduler.add_request(req)

    def schedule(self, now: float) -> StepResult:
        if self.ec_connector is not None:
            self.ec_connector.now = now
        out = self.scheduler.schedule()
        res = StepResult()
        before = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        before.update(zip(cached.req_ids, cached.num_computed_tokens))
        requests = self._requests
        for rid, n in out.num_scheduled_tokens.items():
            res.sched[rid] = n
            res.computed_before[rid] = before[rid]
            res.prompt_len[rid] = requests[rid].num_prompt_tokens
        res.preempted = self._preemption_order(out.preempted_req_ids)
        res.enc = {rid: list(ids) for rid, ids in out.scheduled_encoder_inputs.items()}
        if self.ec_connector is not None:
            meta = out.ec_connector_metadata
            res.ec_loaded, res.deferred = list(meta.loads), list(meta.deferred)
        self._last = (res, out)
        return res

    def _preemption_order(self, preempted: set[str]) -> list[str]:
        """Preempted ids in preemption order: ``_preempt_request`` prepends each victim to
        ``waiting`` and a step that preempts admits nothing from it, so the queue's head holds them
        newest first."""
        head = [r.request_id for r in itertools.islice(self.scheduler.waiting, len(preempted))][::-1]
        if set(head) != preempted:
            raise RuntimeError(f"preempted {sorted(preempted)} are not the head of vLLM's waiting queue {head}")
        return head

    def update_from_output(self, result: StepResult, now: float) -> list[Finished]:
        from vllm.v1.outputs import ModelRunnerOutput

        if self._last is None or self._last[0] is not result:
            raise ValueError("update_from_output() takes the StepResult of the latest schedule()")
        out = self._last[1]
        self._last = None
        req_ids = list(out.num_scheduled_tokens)
        sampled = []
        for rid in req_ids:
            req = self._requests[rid]
            sampled.append([] if req.is_prefill_chunk
                           else [sampled_token(rid, req.num_output_tokens + 1, self._stop_at[rid])])
        runner_output = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                          sampled_token_ids=sampled)
        finished = []
        for client_outputs in self.scheduler.update_from_output(out, runner_output).values():
            for o in client_outputs.outputs:
                if o.finish_reason is not None:
                    req = self._requests.pop(o.request_id)
                    del self._stop_at[o.request_id]
                    finished.append(Finished(o.request_id, str(o.finish_reason), req.num_output_tokens))
        return finished

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def counts(self) -> tuple[int, int]:
        return self.scheduler.get_request_counts()

    def fail_all(self) -> list[str]:
        """The engine died: abort every unfinished request; returns their ids in the order added."""
        from vllm.v1.request import RequestStatus

        ids = list(self.scheduler.requests)
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        self._requests.clear()
        self._stop_at.clear()
        self._last = None
        return ids

    def shutdown(self) -> None:
        self.scheduler.shutdown()
