"""``RealSchedulerCore``: the scheduler-core protocol (models/step.py) on vLLM's own v1 ``Scheduler``.

The real ``vllm.v1.core.sched.scheduler.Scheduler`` runs on CPU with a tiny model folder
(``harness.model_dirs``), one full-attention KV cache group of ``num_gpu_blocks`` blocks, FCFS,
prefix caching as configured (block hashes made as ``EngineCore`` makes them), and the scheduling
mode of the config's ``async_scheduling`` (vLLM 0.26.0's default, True: vLLM's ``AsyncScheduler``
with a ``VllmConfig`` whose ``max_concurrent_batches`` is 2, its batches' outputs applied oldest
first by the engine loop that drives it, ``models.engine.EngineCore.step_with_batch_queue``;
False: the synchronous ``Scheduler``). The deterministic model runner of ``vllm_adapter`` stands
in for the GPU (under async scheduling, what a batch samples is fixed when it is scheduled:
``vllm_adapter.async_samples``). With an ``ec``
prefetch schedule, vLLM loads ``real_ec_connector.FaultsimECConnector`` through its connector
factory; with ``kv_external``, the stand-in KV connector ``external_kv_connector.ExternalTokensKVConnector``.

vLLM is imported on first use (``import vllm`` takes ~10 s); the ``VllmConfig`` of a given
configuration is built once per process and shared by the cores that use it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from ...models.request import RequestSpec
from . import model_dirs
from .vllm_adapter import VllmSchedulerCore, block_hasher, ec_item_ready

EC_CONNECTOR = "FaultsimECConnector"
EC_CONNECTOR_MODULE = "vllm_faultsim.harness.drivers.real_ec_connector"
KV_CONNECTOR = "ExternalTokensKVConnector"
KV_CONNECTOR_MODULE = "vllm_faultsim.harness.drivers.external_kv_connector"


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
    kv_external: bool
    async_scheduling: bool


@functools.lru_cache(maxsize=16)
def _vllm_config(key: _Key):
    import pydantic
    from vllm.config import (CacheConfig, DeviceConfig, ECTransferConfig, KVTransferConfig, ModelConfig,
                             SchedulerConfig, VllmConfig)

    model = ModelConfig(model=key.model, max_model_len=key.max_model_len, dtype="float16", seed=0,
                        skip_tokenizer_init=not key.multimodal)
    try:
        sched = SchedulerConfig(max_num_seqs=key.max_num_seqs, max_num_batched_tokens=key.max_num_batched_tokens,
                                max_model_len=key.max_model_len, is_encoder_decoder=False,
                                enable_chunked_prefill=key.enable_chunked_prefill,
                                long_prefill_token_threshold=key.long_prefill_token_threshold,
                                async_scheduling=key.async_scheduling,
                                # 0.23.0 has no watermark (an unknown keyword there): given only when set
                                **({"watermark": key.watermark} if key.watermark else {}))
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
    kv = None
    if key.kv_external:
        kv = KVTransferConfig(kv_connector=KV_CONNECTOR, kv_connector_module_path=KV_CONNECTOR_MODULE,
                              kv_role="kv_both", engine_id="faultsim")
    config = VllmConfig(model_config=model, scheduler_config=sched, cache_config=cache,
                        ec_transfer_config=ec, kv_transfer_config=kv, device_config=DeviceConfig("cpu"))
    if config.scheduler_config.async_scheduling != key.async_scheduling:
        raise RuntimeError(f"vLLM resolved async_scheduling={config.scheduler_config.async_scheduling}, "
                           f"asked for {key.async_scheduling}")
    return config


class RealSchedulerCore(VllmSchedulerCore):
    """A scheduler core (see models/step.py) backed by the real vLLM ``Scheduler``.

    ``config`` is any object with the fields of ``models.scheduler.SchedulerConfig``:
    max_num_seqs, max_num_batched_tokens, block_size, num_gpu_blocks, max_model_len,
    enable_chunked_prefill, long_prefill_token_threshold, watermark, encoder_compute_budget,
    encoder_cache_size, enable_prefix_caching, async_scheduling (missing: False; other fields
    are ignored). With ``async_scheduling`` the scheduler is vLLM's ``AsyncScheduler`` and
    ``update_from_output`` takes the oldest batch in flight.
    ``ec``: the shared prefetch schedule; ``None`` runs without an EC connector (every encoder
    input is computed locally). ``ec_policy`` selects the connector's ``ensure_cache_available`` policy
    (``real_ec_connector.POLICIES``). ``kv_external`` (request id -> tokens) loads vLLM with the
    stand-in KV connector (``external_kv_connector.ExternalTokensKVConnector``): the remote store
    holds that many first tokens of those requests' prompts (``kv_connector.external`` takes more
    later). ``multimodal=False`` runs the text-only tiny-llama (no encoder cache).
    ``model_cache_dir``: where the model folders live (``model_dirs``).

    vLLM's own outputs of each step: ``last_step`` / ``on_step`` (``vllm_adapter.VllmStep``: the
    ``SchedulerOutput``, connector metadata, runner and engine-core outputs).
    """

    def __init__(self, config, ec=None, *, ec_policy: str = "future-only", kv_external=None,
                 multimodal: bool = True, model_cache_dir=None):
        try:
            from vllm.v1.core.sched.async_scheduler import AsyncScheduler
            from vllm.v1.core.sched.scheduler import Scheduler
        except ImportError:
            raise ImportError("RealSchedulerCore needs vllm==0.26.0 (pip install -e .[vllm])") from None
        import torch
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        model = model_dirs.tiny_llava(model_cache_dir) if multimodal else model_dirs.tiny_llama(model_cache_dir)
        async_scheduling = bool(getattr(config, "async_scheduling", False))
        key = _Key(str(model), multimodal, config.max_num_seqs, config.max_num_batched_tokens,
                   config.block_size, config.num_gpu_blocks, config.max_model_len,
                   config.enable_chunked_prefill, config.long_prefill_token_threshold, config.watermark,
                   config.encoder_compute_budget, config.encoder_cache_size, config.enable_prefix_caching,
                   ec_policy if ec is not None else None, kv_external is not None, async_scheduling)
        vllm_config = _vllm_config(key)
        spec = FullAttentionSpec(block_size=config.block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)
        kv_cache_config = KVCacheConfig(num_blocks=config.num_gpu_blocks, kv_cache_tensors=[],
                                        kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
        scheduler_cls = AsyncScheduler if async_scheduling else Scheduler
        scheduler = scheduler_cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                                  structured_output_manager=StructuredOutputManager(vllm_config),
                                  block_size=config.block_size, log_stats=False)
        cache = vllm_config.cache_config
        super().__init__(scheduler, block_hasher(cache.block_size, cache.prefix_caching_hash_algo)
                         if config.enable_prefix_caching else None, async_scheduling=async_scheduling)
        self.multimodal = multimodal
        # the budgets vLLM really uses (0 for a text-only model): the simulator must use the same
        self.encoder_compute_budget = scheduler.max_num_encoder_input_tokens
        self.encoder_cache_size = scheduler.encoder_cache_manager.cache_size
        if multimodal and (self.encoder_compute_budget, self.encoder_cache_size) != (
                config.encoder_compute_budget, config.encoder_cache_size):
            raise ValueError(f"vLLM raised the encoder budget/cache size to {self.encoder_compute_budget}/"
                             f"{self.encoder_cache_size} (the model's largest item): configure at least that")
        self.prefetch = ec
        self.ec_connector = scheduler.ec_connector  # (0.26.0 also has get_ec_connector(); 0.23.0 only this)
        if self.ec_connector is not None:
            self.ec_connector.bind(ec)
        self.kv_connector = scheduler.get_kv_connector()
        if self.kv_connector is not None:
            self.kv_connector.external.update(kv_external)

    # ---- protocol ----------------------------------------------------------------------

    def add_request(self, spec: RequestSpec, now: float) -> None:
        if spec.mm and not self.multimodal:
            raise ValueError(f"request {spec.req_id} has images but this core runs the text-only tiny-llama")
        super().add_request(spec, now)

    def _before_schedule(self, now: float) -> None:
        if self.ec_connector is not None:
            self.ec_connector.now = now

    def fail_all(self) -> list[str]:
        """The engine died: abort every unfinished request; returns their ids in the order added."""
        from vllm.v1.request import RequestStatus

        ids = list(self.scheduler.requests)
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        self._forget_all()
        return ids

    # ---- beyond the protocol -------------------------------------------------------------

    def ec_item_ready(self, identifier: str, *, at: float | None = None, step: int | None = None) -> bool:
        """Whether EC item ``identifier`` could be loaded from the store at virtual time ``at``,
        or when step ``step`` (0-based, see ``step_times``) was scheduled."""
        return ec_item_ready(self.prefetch, self.step_times, identifier, at=at, step=step)
