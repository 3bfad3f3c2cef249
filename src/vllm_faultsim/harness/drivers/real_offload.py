"""``RealOffloadCore``: the real vLLM ``Scheduler`` with KV offloading to CPU, on CPU, as a core.

A scheduler core (models/step.py) over vLLM's own v1 ``Scheduler`` with prefix caching on
(requests carry a real ``block_hasher``) and a KV connector, one of:

- ``connector="real"``: vLLM's ``OffloadingConnector``. Its scheduler side is untouched; its CPU
  pool is vLLM's ``CPUOffloadingManager`` (LRU) built by :class:`FaultsimOffloadingSpec`, a
  ``CPUOffloadingSpec`` whose *worker* is a stand-in (in the spirit of upstream's mock
  offloading spec): vLLM's own ``OffloadingConnectorWorker`` (worker role) runs the real
  deferral / flush / completion logic over a virtual-clock transfer engine
  (:class:`models.kv_offload.TransferEngine`: bytes / bandwidth + latency, one FIFO stream per
  direction, ``kv_transfer_slow`` / ``kv_transfer_fail`` faults by submission time).
- ``connector="sim"``: :class:`SimOffloadingConnector`, the simulator's model
  (``models.kv_offload``) plugged into the real Scheduler through vLLM's connector factory, with
  the model's worker on the same transfer engine. Comparing the two isolates the offloading
  model: the scheduler, block pool and prefix cache are vLLM's on both sides.

One code path runs under vLLM 0.26.0 and 0.23.0 (the worker's API differs: ``get_worker`` /
``submit_store`` in 0.24+, ``get_handlers`` / ``transfer_async`` in 0.23).

Per step the core drives what vLLM's GPU model runner does: ``handle_preemptions`` ->
``bind_connector_metadata`` -> ``start_load_kv`` at the step's start (``schedule(now)``), then
``get_finished`` -> ``build_connector_worker_meta``, whose ``KVConnectorOutput`` goes back to
``Scheduler.update_from_output``. With synchronous scheduling (vLLM's ``Scheduler``) the second
half runs at the step's end (``update_from_output(res, now)``). With async scheduling
(``OffloadSchedConfig.async_scheduling``, vLLM 0.26.0's default: vLLM's ``AsyncScheduler``, two
batches in flight, driven by the engine loop's ``step_with_batch_queue``) the worker runs a
batch's whole ``execute_model`` when it is scheduled, as ``UniProcExecutor`` does inline
(``vllm_adapter``): the scheduler builds batch N+1's metadata before batch N's worker output is
applied, and a failed transfer raises from ``schedule()``. The engine must keep stepping while
:meth:`RealOffloadCore.has_requests` (vLLM's ``Scheduler.has_requests()``: with 0.24+ it includes
``has_pending_push_work``), running empty steps too.

KV events (``StepResult.kv``) are those of ``models.kv_offload`` (canonical job names, chunk
indices). One normalisation of the real side: vLLM completes a job's offload keys by iterating a
``set`` of bytes (order depends on the hash seed), which orders 0.24+'s LRU list; the spec's
manager wrapper passes them in chunk order, one of the orders real vLLM can take.

vLLM is imported on first use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from ...faults.sim_injector import SimInjector
from ...models import kv_offload as ko
from ...models.step import StepResult
from . import model_dirs
from ..mutants import offload_policy
from .vllm_adapter import VllmSchedulerCore, block_hasher

SPEC_NAME = "FaultsimOffloadingSpec"
SIM_CONNECTOR = "SimOffloadingConnector"
MODULE = "vllm_faultsim.harness.drivers.real_offload"


def vllm_version() -> str:
    import vllm
    return vllm.__version__


# ---- the spec: real CPU manager (observed), virtual worker ----------------------------------

class _ObservedManager:
    """Wraps vLLM's CPUOffloadingManager: records prepare_store outcomes (present / nostore /
    evict) for the trace and completes a job's keys in chunk order (see the module docstring)."""

    def __init__(self, inner):
        self._inner = inner
        self.core: RealOffloadCore | None = None

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _chunks(self, req_id: str, keys) -> list[int]:
        return self.core._chunk_indices(req_id, keys) if self.core else []

    def prepare_store(self, keys, req_context):
        keys = list(keys)
        out = self._inner.prepare_store(keys, req_context)
        core = self.core
        if core is not None:
            ev, rid = core.events, req_context.req_id
            if out is None:
                ev.nostore.setdefault(rid, []).extend(self._chunks(rid, keys))
            else:
                for key in out.evicted_keys:
                    ev.evict.append(list(core.names.owner.get(key, ("?", -1))))
                kept = set(out.keys_to_store)
                if len(kept) < len(keys):
                    ev.present.setdefault(rid, []).extend(self._chunks(rid, [k for k in keys if k not in kept]))
        return out

    def _order(self, keys):
        if self.core is None:
            return keys
        owner = self.core.names.owner
        return sorted(keys, key=lambda k: owner.get(k, ("", 0)))

    def complete_store(self, keys, req_context, *args, **kwargs):
        return self._inner.complete_store(self._order(keys), req_context, *args, **kwargs)

    def complete_load(self, keys, req_context):
        return self._inner.complete_load(self._order(keys), req_context)


class _VirtualWorker:
    """vLLM's OffloadingWorker (0.24+) / OffloadingHandler (0.23) over a TransferEngine."""

    def __init__(self, engine: ko.TransferEngine):
        self.engine = engine
        self.failed: list[int] = []

    @staticmethod
    def _nblocks(spec) -> int:
        return len(spec.block_ids)

    # 0.24+: OffloadingWorker
    def submit_store(self, job_id, src_spec, dst_spec) -> bool:
        self.engine.submit(job_id, "store", self._nblocks(src_spec))
        return True

    def submit_load(self, job_id, src_spec, dst_spec) -> bool:
        self.engine.submit(job_id, "load", self._nblocks(dst_spec))
        return True

    # 0.23: OffloadingHandler
    def transfer_async(self, job_id, spec) -> bool:
        from vllm.v1.kv_offload.base import GPULoadStoreSpec
        src, dst = spec
        if isinstance(src, GPULoadStoreSpec):
            return self.submit_store(job_id, src, dst)
        return self.submit_load(job_id, src, dst)

    def get_finished(self):
        try:
            from vllm.v1.kv_offload.base import TransferResult
        except ImportError:
            from vllm.v1.kv_offload.worker.worker import TransferResult
        out = []
        for tr in self.engine.poll():
            if not tr.ok:
                self.failed.append(tr.job_id)
            out.append(TransferResult(job_id=tr.job_id, success=tr.ok))
        return out

    def wait(self, job_ids) -> None:
        self.engine.waited += self.engine.wait(job_ids)

    def shutdown(self) -> None:
        pass


def _spec_base():
    from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec
    return CPUOffloadingSpec


def _make_spec_class():
    base = _spec_base()

    class FaultsimOffloadingSpec(base):
        """CPUOffloadingSpec with an observed manager and a virtual-clock worker. The worker-side
        entry points receive the TransferEngine in place of the KV cache tensors."""

        def get_manager(self):
            if not isinstance(getattr(self, "_manager", None), _ObservedManager):
                self._manager = None
                inner = base.get_manager(self)
                self._manager = _ObservedManager(inner)
            return self._manager

        def get_worker(self, kv_caches):  # 0.24+
            if getattr(self, "_faultsim_worker", None) is None:
                self._faultsim_worker = _VirtualWorker(kv_caches)
            return self._faultsim_worker

        def get_handlers(self, kv_caches):  # 0.23
            from vllm.v1.kv_offload.base import GPULoadStoreSpec
            from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec
            if getattr(self, "_faultsim_worker", None) is None:
                self._faultsim_worker = _VirtualWorker(kv_caches)
            yield GPULoadStoreSpec, CPULoadStoreSpec, self._faultsim_worker
            yield CPULoadStoreSpec, GPULoadStoreSpec, self._faultsim_worker

    return FaultsimOffloadingSpec


def __getattr__(name):  # vLLM's spec factory does getattr(module, "FaultsimOffloadingSpec")
    if name == SPEC_NAME:
        cls = _make_spec_class()
        globals()[SPEC_NAME] = cls
        return cls
    if name == SIM_CONNECTOR:
        cls = _make_sim_connector_class()
        globals()[SIM_CONNECTOR] = cls
        return cls
    raise AttributeError(name)


# ---- the simulator's model as a vLLM KV connector -------------------------------------------

def _make_sim_connector_class():
    from vllm.distributed.kv_transfer.kv_connector.utils import yield_req_data
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                   KVConnectorRole, KVConnectorWorkerMetadata)

    @dataclass
    class SimMeta(KVConnectorMetadata):
        inner: Any = None

    @dataclass
    class SimWorkerMeta(KVConnectorWorkerMetadata):
        completed_jobs: dict | None = None

        def aggregate(self, other):
            return self

    class SimOffloadingConnector(KVConnectorBase_V1):
        """The scheduler side is ``models.kv_offload.OffloadingConnectorScheduler``; the worker
        side is driven by :class:`RealOffloadCore` (no worker-role instance is made)."""

        Meta, WorkerMeta = SimMeta, SimWorkerMeta

        def __init__(self, vllm_config, role, kv_cache_config=None):
            super().__init__(vllm_config, role, kv_cache_config)
            extra = vllm_config.kv_transfer_config.kv_connector_extra_config
            self.offload_config: ko.OffloadConfig = extra["faultsim_offload_config"]
            self.policy = offload_policy(extra["faultsim_policy"], extra.get("faultsim_mutant"))
            self.model: ko.OffloadingConnectorScheduler | None = None
            if role == KVConnectorRole.SCHEDULER:
                self.model = ko.OffloadingConnectorScheduler(
                    self.offload_config, self.policy,
                    prefix_caching=vllm_config.cache_config.enable_prefix_caching)

        # scheduler side
        def on_new_request(self, request) -> None:
            self.model.on_new_request(request)

        def get_num_new_matched_tokens(self, request, num_computed_tokens):
            return self.model.get_num_new_matched_tokens(request, num_computed_tokens)

        def update_state_after_alloc(self, request, blocks, num_external_tokens):
            group = blocks.blocks[0]
            hashed = len(group)
            for i, b in enumerate(group):
                if not b.is_null and b.block_hash is None:
                    hashed = i
                    break
            self.model.update_state_after_alloc(request, [b.block_id for b in group], num_external_tokens,
                                                num_hashed_blocks=hashed)

        def build_connector_meta(self, scheduler_output):
            req_data = [(rid, list(groups[0]) if groups else None, bool(resumed))
                        for rid, groups, resumed in yield_req_data(scheduler_output)]
            so = ko.SchedOut(req_data, dict(scheduler_output.num_scheduled_tokens),
                             scheduler_output.finished_req_ids or (), scheduler_output.preempted_req_ids or ())
            return SimMeta(self.model.build_connector_meta(so))

        def update_connector_output(self, connector_output):
            meta = connector_output.kv_connector_worker_meta
            if meta is not None and meta.completed_jobs:
                self.model.update_connector_output(meta.completed_jobs)

        def request_finished(self, request, block_ids):
            return self.model.request_finished(request)

        def has_pending_push_work(self) -> bool:
            return self.model.has_pending_push_work()

        # worker side: unused (RealOffloadCore drives the model's worker)
        def start_load_kv(self, forward_context, **kwargs) -> None:
            pass

        def wait_for_layer_load(self, layer_name) -> None:
            pass

        def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
            pass

        def wait_for_save(self):
            pass

    return SimOffloadingConnector


# ---- the core ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class OffloadSchedConfig:
    """The engine limits of the offload differential runs (a subset of SchedulerConfig)."""

    max_num_seqs: int = 8
    max_num_batched_tokens: int = 256
    block_size: int = 16
    num_gpu_blocks: int = 64
    max_model_len: int = 2048
    async_scheduling: bool = True  # vLLM 0.26.0's default: AsyncScheduler and the batch queue


@functools.lru_cache(maxsize=8)
def _base_vllm_config(model: str, sc: OffloadSchedConfig):
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
    mc = ModelConfig(model=model, max_model_len=sc.max_model_len, dtype="float16", seed=0, skip_tokenizer_init=True)
    sched = SchedulerConfig(max_num_seqs=sc.max_num_seqs, max_num_batched_tokens=sc.max_num_batched_tokens,
                            max_model_len=sc.max_model_len, is_encoder_decoder=False,
                            async_scheduling=sc.async_scheduling)
    cache = CacheConfig(block_size=sc.block_size, enable_prefix_caching=True)
    cache.num_gpu_blocks = sc.num_gpu_blocks
    return VllmConfig(model_config=mc, scheduler_config=sched, cache_config=cache, device_config=DeviceConfig("cpu"))


class RealOffloadCore(VllmSchedulerCore):
    """A scheduler core on the real vLLM Scheduler with KV offloading (see the module docstring).

    ``policy``/``mutant`` select the simulator model's rules (``connector="sim"`` only; default:
    the installed vLLM's). ``plan``: the fault plan (``kv_transfer_slow``/``kv_transfer_fail``).
    """

    def __init__(self, sched_config: OffloadSchedConfig, offload: ko.OffloadConfig, *, connector: str = "real",
                 policy: str | None = None, mutant: str | None = None, plan=None, model_cache_dir=None):
        try:
            from vllm.config import KVTransferConfig
        except ImportError:
            raise ImportError("RealOffloadCore needs vllm (0.26.0 or 0.23.0)") from None
        import copy

        import torch
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
        from vllm.v1.structured_output import StructuredOutputManager

        if connector not in ("real", "sim"):
            raise ValueError(f"connector must be 'real' or 'sim', got {connector!r}")
        if offload.block_size != sched_config.block_size:
            raise ValueError("offload.block_size must equal the scheduler's block_size")
        self.connector_kind = connector
        self.offload = offload.validate()
        self.version = vllm_version()
        self.new = ko.version_policy(self.version) == "0.24+"
        self.policy = offload_policy(ko.policy_for(policy).version, mutant) if connector == "sim" else ko.OffloadPolicy(
            ko.version_policy(self.version))
        model = str(model_dirs.tiny_llama(model_cache_dir))
        vc = copy.copy(_base_vllm_config(model, sched_config))
        spec = FullAttentionSpec(block_size=sched_config.block_size, num_kv_heads=1, head_size=8, dtype=torch.float16)
        page = spec.page_size_bytes
        extra: dict[str, Any] = {
            "spec_name": SPEC_NAME, "spec_module_path": MODULE,
            "cpu_bytes_to_use": offload.num_cpu_chunks * page * offload.blocks_per_chunk,
            "block_size": offload.tokens_per_chunk,
            "offload_prompt_only": offload.offload_prompt_only,
        }
        if connector == "real":
            kt = KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both", engine_id="faultsim",
                                  kv_connector_extra_config=extra)
        else:
            extra.update(faultsim_offload_config=offload, faultsim_policy=self.policy.version,
                         faultsim_mutant=self.policy.mutant)
            kt = KVTransferConfig(kv_connector=SIM_CONNECTOR, kv_connector_module_path=MODULE, kv_role="kv_both",
                                  engine_id="faultsim", kv_connector_extra_config=extra)
        vc.kv_transfer_config = kt
        if vc.scheduler_config.async_scheduling != sched_config.async_scheduling:
            raise RuntimeError(f"vLLM resolved async_scheduling={vc.scheduler_config.async_scheduling}, "
                               f"asked for {sched_config.async_scheduling}")
        nb = sched_config.num_gpu_blocks
        self.kv_cache_config = KVCacheConfig(num_blocks=nb, kv_cache_tensors=[KVCacheTensor(size=page * nb,
                                                                                          shared_by=["layer"])],
                                             kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
        scheduler_cls = AsyncScheduler if sched_config.async_scheduling else Scheduler
        super().__init__(scheduler_cls(vllm_config=vc, kv_cache_config=self.kv_cache_config,
                                       structured_output_manager=StructuredOutputManager(vc),
                                       block_size=sched_config.block_size, log_stats=False),
                         block_hasher(sched_config.block_size), async_scheduling=sched_config.async_scheduling)
        self.block_size = sched_config.block_size
        self.engine = ko.TransferEngine(offload)  # the transfers run on the virtual clock, as in the model
        SimInjector(plan).arm_transfers(self.engine)
        self.engine.waited = 0.0
        self.conn = self.scheduler.connector
        if connector == "real":
            self.events = ko.KVEvents()
            self.names = ko.JobNames()
            self.cs = self.conn.connector_scheduler
            manager = self.cs.manager
            assert isinstance(manager, _ObservedManager), type(manager)
            manager.core = self
            cpu_blocks = manager._num_blocks
            from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import OffloadingConnector
            self.wconn = OffloadingConnector(vc, KVConnectorRole.WORKER, self.kv_cache_config)
            cw = self.wconn.connector_worker
            if hasattr(cw, "_init_worker"):
                cw._init_worker(self.engine)        # 0.24+: spec.get_worker(engine)
            else:
                cw._register_handlers(self.engine)  # 0.23: spec.get_handlers(engine)
            self.vworker = cw.spec._faultsim_worker
            orig = self.conn.get_num_new_matched_tokens

            def get_num_new_matched_tokens(request, num_computed_tokens):
                n, load = orig(request, num_computed_tokens)
                if n is None:
                    self.events.delayed.append(request.request_id)
                return n, load

            self.conn.get_num_new_matched_tokens = get_num_new_matched_tokens
            orig_update = self.conn.update_connector_output

            def update_connector_output(connector_output):
                """Completions are retired (``done``) when the scheduler applies the batch's output."""
                meta = connector_output.kv_connector_worker_meta
                if meta is not None:
                    self.events.done.extend(self.names[j] for j in meta.completed_jobs)
                return orig_update(connector_output)

            self.conn.update_connector_output = update_connector_output
        else:
            model_ = self.conn.model
            self.events, self.names = model_.events, model_.names
            cpu_blocks = model_.manager._num_blocks
            self.sim_worker = ko.OffloadingConnectorWorker(self.engine, self.policy, self.names, self.events)
        if cpu_blocks != offload.num_cpu_chunks:
            raise RuntimeError(f"CPU pool has {cpu_blocks} chunks, configured {offload.num_cpu_chunks}")
        self.dead = False

    # ---- helpers -----------------------------------------------------------------------

    def _chunk_indices(self, req_id: str, keys) -> list[int]:
        st = self.cs._req_status.get(req_id)
        if st is None:
            return []
        okeys = st.group_states[0].offload_keys
        index = {k: i for i, k in enumerate(okeys)}
        return sorted(index[k] for k in keys if k in index)

    def _name_new_jobs(self, meta) -> None:
        cs, names, ev = self.cs, self.names, self.events
        for kind, jobs in (("L", meta.load_jobs), ("S", meta.store_jobs)):
            for job_id in sorted(jobs):
                js = cs._jobs[job_id]
                chunks = self._chunk_indices(js.req_id, js.keys)
                name = names.name(job_id, js.req_id, kind, chunks)
                (ev.load if kind == "L" else ev.store).append([name, js.req_id, chunks])
                if kind == "S":
                    st = cs._req_status[js.req_id]
                    okeys = st.group_states[0].offload_keys
                    for i, k in enumerate(okeys):
                        if k in js.keys:
                            names.owner.setdefault(k, (js.req_id, i))

    # ---- protocol (the rest is VllmSchedulerCore's) ----------------------------------------

    def _before_schedule(self, now: float) -> None:
        self.engine.now = now
        self.engine.waited = 0.0

    def _after_schedule(self, out, res: StepResult, now: float) -> None:
        """What the GPU model runner does at the step's start: ``handle_preemptions`` ->
        ``bind_connector_metadata`` -> ``start_load_kv``."""
        meta = out.kv_connector_metadata
        if self.connector_kind == "real":
            self._name_new_jobs(meta)
            self.events.flush.extend(self.names[j] for j in (meta.jobs_to_flush or ()))
            self.wconn.handle_preemptions(meta)
            self.wconn.bind_connector_metadata(meta)
            self.wconn.start_load_kv(None)
            self.events.wait += self.engine.waited
        else:
            self.sim_worker.handle_preemptions(meta.inner, now)
            self.sim_worker.start_kv_transfers(meta.inner, now)
        res.kv = self.events.take()

    def _connector_output(self, out, now: float):
        """What the GPU model runner does at the step's end: ``get_finished`` ->
        ``build_connector_worker_meta``, as a ``KVConnectorOutput``."""
        from vllm.v1.outputs import KVConnectorOutput
        self.engine.now = now
        if self.connector_kind == "real":
            try:
                sending, recving = self.wconn.get_finished(out.finished_req_ids)
            except AssertionError:
                if not self.vworker.failed:
                    raise
                self.dead = True
                raise ko.TransferFailed([self.names[self.vworker.failed[0]]], self.pending_jobs(), now) from None
            worker_meta = self.wconn.build_connector_worker_meta()
            self.wconn.clear_connector_metadata()
        else:
            try:
                recving, completed = self.sim_worker.get_finished(out.kv_connector_metadata.inner, now)
            except ko.TransferFailed as exc:
                self.dead = True
                raise ko.TransferFailed(exc.failed, self.pending_jobs(), now) from None
            sending = set()
            worker_meta = self.conn.WorkerMeta(completed) if completed else None
        return KVConnectorOutput(finished_sending=sending or None, finished_recving=recving or None,
                                 kv_connector_worker_meta=worker_meta)

    def _after_update(self, result: StepResult) -> None:
        kv = self.events.take()
        if kv:
            result.kv = {**(result.kv or {}), **kv}

    @property
    def transfers(self) -> ko.TransferEngine:
        """The worker's virtual-clock transfer engine (the engine loop sets ``compute_done_at``)."""
        return self.engine

    def has_requests(self) -> bool:
        """vLLM's ``Scheduler.has_requests()``: what ``EngineCore.step()`` checks before stepping."""
        return self.scheduler.has_requests()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_requests()

    def counts(self) -> tuple[int, int]:
        return self.scheduler.get_request_counts()

    def pending_jobs(self) -> list[str]:
        """Canonical names of the offloading jobs not retired yet."""
        if self.connector_kind == "real":
            return sorted(self.names[j] for j in self.cs._jobs)
        return self.conn.model.pending_jobs()

    def fail_all(self) -> list[str]:
        """The engine died: the unfinished requests, in the order added."""
        unfinished = [r for r in self.scheduler.requests if r in self._requests]
        self._forget_all()
        self.dead = True
        return unfinished


