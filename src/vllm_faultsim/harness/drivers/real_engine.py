"""The real vLLM engine (GPU tier): start/stop, a recording scheduler, an EC connector with a
worker side, the virtual-clock and wall-clock drivers, and engine-kill helpers.

How the real engine is driven
-----------------------------
- **Decisions (virtual clock).** :class:`RealEngineCore` is a scheduler core (models/step.py) on
  a real, in-process ``LLMEngine`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the simulator's own
  SimPy loop (``simulate.run_engine``) adds each request at the step where the simulator adds it,
  and each ``schedule(now)`` runs one whole real ``EngineCore.step()`` (schedule, GPU forward,
  sample, ``update_from_output``). The step's decisions are read from
  :class:`RecordingScheduler` (vLLM's ``scheduler_cls`` option), a subclass of vLLM's
  ``Scheduler`` that turns each ``SchedulerOutput`` into a :class:`StepResult`. Both sides use the
  same step-time model on the virtual clock, so their common traces are equal byte for byte when
  (and only when) the real engine decides as the simulator does; the real step's wall time is
  kept apart (``RealEngineCore.walls``) for timing comparisons.
- **Timing (wall clock).** :func:`run_wall_clock` runs the same loop in real time: arrivals
  when the wall clock reaches them, ``LLMEngine.step()`` back to back, sleeping only when idle.
  It measures TTFT/TPOT/E2E and every step's wall time and batch shape (calibration, fidelity).
- **Deaths.** :func:`kill_trial` runs ``AsyncLLM`` with the engine core in its own process (the
  serving layout), sends requests, then kills the engine core (SIGKILL, SIGTERM, or an exit from
  inside the engine via :data:`ENV_EXIT_FILE`), and times the client's detection
  (``engine_dead``) and every in-flight request's fate.

Classes that subclass vLLM types (``RecordingScheduler``, ``GpuFaultsimECConnector``,
``DryRunExecutor``) are built on first attribute access (PEP 562), so importing this module does not
import vLLM; vLLM finds them by qualified name (``scheduler_cls``, ``ec_connector_module_path``)
also in spawned processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from ...models.step import Finished, StepResult
from ..workload import RequestSpec, prompt_token_ids, spec_to_dict

MODULE = __name__
SCHEDULER_CLS = f"{MODULE}.RecordingScheduler"
EC_CONNECTOR = "GpuFaultsimECConnector"
# a directory: each engine process appends its steps to steps-<pid>.jsonl there
ENV_RECORD_DIR = "VLLM_FAULTSIM_RECORD_DIR"
# a file path: once it exists, the engine core exits (os._exit) at its next schedule() with the
# exit code written in the file (default 1): the "exit1"/"exit0" faults of a plan
ENV_EXIT_FILE = "VLLM_FAULTSIM_EXIT_FILE"
IMAGE_TOKENS = 16  # embeddings per tiny-llava image (56x56, 14x14 patches, CLS dropped)
# VLLM_FAULTSIM_DRYRUN=1: check the GPU tier's plumbing on a CPU-only machine. vLLM's CUDA build is
# told it runs on a CPU platform and a deterministic stand-in (DryRunExecutor) replaces the GPU
# worker; the scheduler, input and output processing and the engine loop are real. Decisions
# are meaningful, timings are not, and there is no worker process (no KV transfers, no worker
# side of the EC connector). Applied at import so that spawned engine processes inherit it.
DRYRUN = os.environ.get("VLLM_FAULTSIM_DRYRUN") == "1"


# ---- environment --------------------------------------------------------------------------

def gpu_skip_reason() -> str | None:
    """Why the GPU tier cannot run here (None: it can)."""
    if DRYRUN:
        return None
    try:
        import torch
    except ImportError:
        return "needs torch with CUDA"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        return f"needs vllm==0.26.0 ({exc})"
    return None


def host_info() -> dict:
    """Device, host and versions, for results and profiles."""
    import platform
    info: dict[str, Any] = {"hostname": platform.node(), "cpu_count": os.cpu_count()}
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["device"] = torch.cuda.get_device_name(0)
            info["device_memory_gib"] = round(p.total_memory / 2**30, 1)
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:
        import vllm
        info["vllm"] = vllm.__version__
    except ImportError:
        pass
    return info


def _set_inprocess_env() -> None:
    # the engine core in this process (the driver reaches the scheduler), ids kept as given
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_DISABLE_REQUEST_ID_RANDOMIZATION"] = "1"
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


# ---- engine arguments ---------------------------------------------------------------------

def engine_args(sched, *, model: str | Path, multimodal: bool = False, ec_policy: str | None = None,
                ec_log: str | Path | None = None, ec_save_delay: float = 0.0,
                kv_offload_gib: float | None = None, prefix_caching: bool = False,
                gpu_memory_utilization: float = 0.2, dtype: str = "float16", record: bool = True,
                **extra) -> dict:
    """``LLM(**kwargs)`` for the real engine with the simulator's scheduler config ``sched``
    (``models.scheduler.SchedulerConfig``): same budgets, block size, block count (block 0 is the
    null block on both sides), chunking and watermark; synchronous scheduling; FCFS."""
    kw: dict[str, Any] = dict(
        model=str(model), load_format="dummy", enforce_eager=True, dtype=dtype, seed=0,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=sched.max_model_len, max_num_seqs=sched.max_num_seqs,
        max_num_batched_tokens=sched.max_num_batched_tokens, block_size=sched.block_size,
        num_gpu_blocks_override=sched.num_gpu_blocks, enable_chunked_prefill=sched.enable_chunked_prefill,
        long_prefill_token_threshold=sched.long_prefill_token_threshold, watermark=sched.watermark,
        enable_prefix_caching=prefix_caching, async_scheduling=False, disable_log_stats=True,
        skip_tokenizer_init=not multimodal,
    )
    if record:
        kw["scheduler_cls"] = SCHEDULER_CLS
    if multimodal:
        kw["limit_mm_per_prompt"] = {"image": 4}
    if ec_policy is not None:
        kw["ec_transfer_config"] = {
            "ec_connector": EC_CONNECTOR, "ec_connector_module_path": MODULE, "ec_role": "ec_both",
            "engine_id": "faultsim",
            "ec_connector_extra_config": {"policy": ec_policy, "event_log": str(ec_log) if ec_log else "",
                                          "save_delay": ec_save_delay}}
    if kv_offload_gib is not None:
        kw["kv_offloading_size"] = kv_offload_gib
        kw["kv_offloading_backend"] = "native"
    kw.update(extra)
    if DRYRUN:
        kw["distributed_executor_backend"] = f"{MODULE}.DryRunExecutor"
        kw["dtype"] = "float32"
    return kw


def open_llm(**kwargs):
    """An in-process ``vllm.LLM`` (engine core in this process; executor per ``kwargs``)."""
    _set_inprocess_env()
    from vllm import LLM
    return LLM(**kwargs)


def scheduler_of(llm):
    """The engine's scheduler object (in-process engines only)."""
    client = llm.llm_engine.engine_core
    core = getattr(client, "engine_core", None)
    if core is None:
        raise RuntimeError("the engine core runs in another process: use open_llm() (in-process)")
    return core.scheduler


def shutdown_llm(llm) -> None:
    """Shut the engine down now (scheduler and workers), not at garbage collection, and give
    its GPU memory back so that the next in-process engine starts clean."""
    import gc
    llm.llm_engine.engine_core.shutdown()
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ---- StepResult from a SchedulerOutput ----------------------------------------------------

def step_result(scheduler, out) -> StepResult:
    """One real step's decisions in the common form (the same mapping as the CPU driver)."""
    res = StepResult()
    before = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
    cached = out.scheduled_cached_reqs
    before.update(zip(cached.req_ids, cached.num_computed_tokens))
    requests = scheduler.requests
    for rid, n in out.num_scheduled_tokens.items():
        res.sched[rid] = n
        res.computed_before[rid] = before[rid]
        res.prompt_len[rid] = requests[rid].num_prompt_tokens
    preempted = out.preempted_req_ids or set()
    if preempted:
        # _preempt_request prepends each victim to `waiting`: newest first at its head
        head = [r.request_id for r in islice(scheduler.waiting, len(preempted))][::-1]
        res.preempted = head if set(head) == set(preempted) else sorted(preempted)
    res.enc = {rid: list(ids) for rid, ids in out.scheduled_encoder_inputs.items()}
    meta = out.ec_connector_metadata
    if meta is not None and hasattr(meta, "loads"):
        res.ec_loaded, res.deferred = list(meta.loads), list(meta.deferred)
    kv = out.kv_connector_metadata
    if kv is not None and hasattr(kv, "store_jobs"):
        res.kv = {"store": [[j, job.req_id, _gpu_chunks(job.src_spec)] for j, job in kv.store_jobs.items()],
                  "load": [[j, job.req_id, _gpu_chunks(job.dst_spec)] for j, job in kv.load_jobs.items()],
                  "flush": sorted(kv.jobs_to_flush or ()), "done": []}
    return res


def _gpu_chunks(spec) -> list[int]:
    """The request-relative GPU block indices a transfer job covers (one KV group; with one GPU
    block per offloaded chunk these are the chunk indices of the simulator's trace)."""
    ids = getattr(spec, "block_ids", None)
    n = len(ids) if ids is not None else 0
    first = getattr(spec, "block_indices", None)
    start = int(first[0]) if first is not None and len(first) else 0
    return list(range(start, start + n))


def _kv_done(model_runner_output) -> list[int]:
    kco = getattr(model_runner_output, "kv_connector_output", None)
    meta = getattr(kco, "kv_connector_worker_meta", None) if kco is not None else None
    return sorted(getattr(meta, "completed_jobs", {}) or {})


def _build_recording_scheduler():
    from vllm.v1.core.sched.scheduler import Scheduler

    class RecordingScheduler(Scheduler):
        """vLLM's Scheduler, unchanged, plus a record of every step: the decisions as a
        StepResult, the batch shape and the wall time from schedule() to the end of
        update_from_output() (the GPU forward pass lies in between). Steps go to
        ``self.faultsim_steps`` and, with ``VLLM_FAULTSIM_RECORD_DIR`` set, to
        ``steps-<pid>.jsonl`` in that directory (engine cores in other processes)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.faultsim_steps: list[dict] = []
            self.faultsim_last: StepResult | None = None
            self.faultsim_keep = True
            self._fs_t0 = 0.0
            self._fs_exit = os.environ.get(ENV_EXIT_FILE) or None
            d = os.environ.get(ENV_RECORD_DIR)
            self._fs_fh = None
            if d:
                Path(d).mkdir(parents=True, exist_ok=True)
                self._fs_fh = open(Path(d) / f"steps-{os.getpid()}.jsonl", "a", encoding="utf-8")

        def schedule(self, *args, **kwargs):
            if self._fs_exit is not None and os.path.exists(self._fs_exit):
                try:
                    code = int(Path(self._fs_exit).read_text().strip() or 1)
                except ValueError:
                    code = 1
                os._exit(code)  # the engine core dies mid-run, from inside
            self._fs_t0 = time.perf_counter()
            out = super().schedule(*args, **kwargs)
            self.faultsim_last = step_result(self, out)
            return out

        def update_from_output(self, scheduler_output, model_runner_output):
            outputs = super().update_from_output(scheduler_output, model_runner_output)
            t1 = time.perf_counter()
            res = self.faultsim_last
            if res is not None and res.kv is not None:
                res.kv["done"] = _kv_done(model_runner_output)
            if res is not None and (self.faultsim_keep or self._fs_fh is not None):
                finished = [o.request_id for eco in outputs.values() for o in eco.outputs
                            if o.finish_reason is not None]
                rec = {"i": len(self.faultsim_steps), "t0": self._fs_t0, "dur": t1 - self._fs_t0,
                       "shape": list(res.shape()), "sched": res.sched, "finished": finished}
                for key in ("deferred", "preempted", "ec_loaded"):
                    if getattr(res, key):
                        rec[key] = getattr(res, key)
                if res.kv is not None:
                    rec["kv"] = res.kv
                if self.faultsim_keep:
                    self.faultsim_steps.append(rec)
                if self._fs_fh is not None:
                    self._fs_fh.write(json.dumps(rec) + "\n")
                    self._fs_fh.flush()
            return outputs

        def shutdown(self) -> None:
            super().shutdown()
            if self._fs_fh is not None:
                self._fs_fh.close()
                self._fs_fh = None

    RecordingScheduler.__module__ = MODULE
    RecordingScheduler.__qualname__ = "RecordingScheduler"
    return RecordingScheduler


# ---- the EC connector, with a worker side -------------------------------------------------

def _log_event(path: str, event: dict) -> None:
    if not path:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "t": time.time(), **event}) + "\n")


def _build_ec_connector():
    from concurrent.futures import ThreadPoolExecutor

    from .real_ec_connector import FaultsimECConnector

    class GpuFaultsimECConnector(FaultsimECConnector):
        """``FaultsimECConnector`` (scheduler side: prefetch readiness from the shared
        schedule) plus a worker side for a real model runner. The remote store is the
        prefetch schedule's: an item it reports loadable is materialised by
        ``start_load_caches`` as an encoder output of the item's shape (the weights are dummy,
        so are the embeddings). ``save_caches`` (items encoded locally) copies the output to
        host memory asynchronously, ``save_delay`` seconds each (a slow store): those are the
        pending operations ``shutdown()`` drains (PR #42423). Lifecycle events go, one JSON line
        each with the process id, to ``event_log``."""

        def __init__(self, vllm_config, role):
            super().__init__(vllm_config, role)
            cfg = vllm_config.ec_transfer_config
            self.event_log = cfg.get_from_extra_config("event_log", "") or ""
            self.save_delay = float(cfg.get_from_extra_config("save_delay", 0.0) or 0.0)
            self.role_name = getattr(role, "name", str(role)).lower()
            self._sizes: dict[str, int] = {}
            self._pool = None
            self._pending: list = []
            self.store: dict[str, Any] = {}
            self.loaded = self.saved = 0
            mc = vllm_config.model_config
            self._hidden = mc.get_hidden_size()
            self._dtype = mc.dtype
            _log_event(self.event_log, {"event": "init", "role": self.role_name})

        # scheduler side: remember each loaded item's size for the worker
        def update_state_after_alloc(self, request, index: int) -> None:
            feature = request.mm_features[index]
            self._sizes[feature.identifier] = feature.mm_position.get_num_embeds() \
                if hasattr(feature.mm_position, "get_num_embeds") else feature.mm_position.length
            super().update_state_after_alloc(request, index)

        def build_connector_meta(self, scheduler_output):
            meta = super().build_connector_meta(scheduler_output)
            meta.sizes = {i: self._sizes[i] for i in meta.loads}
            return meta

        # worker side
        def start_load_caches(self, encoder_cache, **kwargs) -> None:
            import torch
            meta = self._get_connector_metadata()
            for ident in getattr(meta, "loads", ()):
                if ident in encoder_cache:
                    continue
                stored = self.store.get(ident)
                if stored is not None:
                    encoder_cache[ident] = stored.to("cuda", non_blocking=True)
                else:
                    n = meta.sizes[ident]
                    encoder_cache[ident] = torch.zeros(n, self._hidden, dtype=self._dtype, device="cuda")
                self.loaded += 1

        def save_caches(self, encoder_cache, mm_hash, **kwargs) -> None:
            if not self.is_producer:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ec-save")
            host = encoder_cache[mm_hash].to("cpu", non_blocking=False)

            def put(key=mm_hash, value=host):
                time.sleep(self.save_delay)
                self.store[key] = value
                return key

            self._pending.append(self._pool.submit(put))

        def shutdown(self) -> None:
            pending = [f for f in self._pending if not f.done()]
            drained = 0
            for f in self._pending:
                f.result()
                drained += 1
            self._pending = []
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            in_flight = 0
            if self.schedule is not None and hasattr(self.schedule, "ready_at"):
                in_flight = sum(1 for at in self.schedule.ready_at.values() if at > self.now)
            _log_event(self.event_log, {
                "event": "shutdown", "role": self.role_name, "pending_at_shutdown": len(pending),
                "drained": drained, "left": sum(1 for f in self._pending if not f.done()),
                "saved": len(self.store), "loaded": self.loaded, "prefetch_in_flight": in_flight})
            super().shutdown()

    GpuFaultsimECConnector.__module__ = MODULE
    GpuFaultsimECConnector.__qualname__ = "GpuFaultsimECConnector"
    return GpuFaultsimECConnector


# ---- a stand-in GPU for checking the harness on a CPU-only machine -----------------------

def _build_dry_run_executor():
    from concurrent.futures import Future

    import torch
    from vllm.v1.executor.abstract import Executor
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.outputs import ModelRunnerOutput

    from ...models.step import sampled_token

    class DryRunExecutor(Executor):
        """A deterministic model runner in place of the GPU worker (``distributed_executor_backend``):
        every other part of the engine (input processing, EngineCore.step, the scheduler, output
        processing) is real. A request whose prefill completes samples
        ``models.step.sampled_token``. For checking this harness where no GPU is."""

        uses_ray = False
        supports_pp = False

        def _init_executor(self) -> None:
            self._reqs: dict[str, list[int]] = {}

        def collective_rpc(self, method, timeout=None, args=(), kwargs=None, non_block=False):
            name = method if isinstance(method, str) else getattr(method, "__name__", "")
            if name == "get_kv_cache_spec":
                bs = self.cache_config.block_size
                out = [{"model.layers.0.self_attn.attn": FullAttentionSpec(
                    block_size=bs, num_kv_heads=1, head_size=8, dtype=torch.float16)}]
            elif name == "determine_available_memory":
                out = [1 << 30]
            elif name == "get_supported_tasks":
                out = [("generate",)]
            elif name in ("get_kv_connector_handshake_metadata", "compile_or_warm_up_model"):
                out = []
            else:
                out = [None]
            if non_block:
                f: Future = Future()
                f.set_result(out)
                return f
            return out

        def execute_model(self, so, non_block=False):
            for rid in so.finished_req_ids:
                self._reqs.pop(rid, None)
            before = {r.req_id: r.num_computed_tokens for r in so.scheduled_new_reqs}
            for r in so.scheduled_new_reqs:
                self._reqs[r.req_id] = [len(r.prompt_token_ids or ()), 0]
            cached = so.scheduled_cached_reqs
            before.update(zip(cached.req_ids, cached.num_computed_tokens))
            req_ids = list(so.num_scheduled_tokens)
            sampled = []
            for rid in req_ids:
                st = self._reqs[rid]
                if before[rid] + so.num_scheduled_tokens[rid] >= st[0] + st[1]:
                    st[1] += 1
                    sampled.append([sampled_token(rid, st[1], None)])
                else:
                    sampled.append([])
            out = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                    sampled_token_ids=sampled)
            if non_block:
                f: Future = Future()
                f.set_result(out)
                return f
            return out

        def check_health(self) -> None:
            return None

        def shutdown(self) -> None:
            return None

    DryRunExecutor.__module__ = MODULE
    DryRunExecutor.__qualname__ = "DryRunExecutor"
    return DryRunExecutor


def use_cpu_platform() -> None:
    """Dry runs only: make vLLM's CUDA build treat this machine as a CPU platform."""
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform
    platforms._current_platform = CpuPlatform()


if DRYRUN:
    use_cpu_platform()

_LAZY = {"RecordingScheduler": _build_recording_scheduler,
         "GpuFaultsimECConnector": _build_ec_connector,
         "DryRunExecutor": _build_dry_run_executor}


def __getattr__(name: str):
    build = _LAZY.get(name)
    if build is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    obj = build()
    globals()[name] = obj
    return obj


# ---- prompts ------------------------------------------------------------------------------

def image_for(identifier: str):
    """A deterministic 56x56 RGB image per identifier (tiny-llava's size: 16 embeddings)."""
    import numpy as np
    from PIL import Image
    seed = sum(identifier.encode()) * 7919 % (2**31)
    arr = (np.random.default_rng(seed).random((56, 56, 3)) * 255).astype("uint8")
    return Image.fromarray(arr)


def prompt_for(spec: RequestSpec) -> dict:
    """The engine prompt of a request: the simulator's token ids, images with their identifiers
    as ``multi_modal_uuids`` (so the scheduler sees the same item identifiers as the simulator)."""
    toks = prompt_token_ids(spec)
    if spec.mm:
        # one placeholder token per image: vLLM's processor expands it to the image's embeddings
        # (16 for tiny-llava), giving back the simulator's prompt (checked by RealEngineCore)
        keep = list(toks)
        for m in sorted(spec.mm, key=lambda m: m.offset, reverse=True):
            del keep[m.offset + 1:m.offset + m.length]
        toks = keep
    prompt: dict[str, Any] = {"prompt_token_ids": toks}
    if spec.mm:
        prompt["multi_modal_data"] = {"image": [image_for(m.identifier) for m in spec.mm]}
        prompt["multi_modal_uuids"] = {"image": [m.identifier for m in spec.mm]}
    return prompt


def sampling_for(spec: RequestSpec):
    from vllm import SamplingParams
    # greedy, no EOS stop: a request finishes by length, as in the simulator without stop_at
    return SamplingParams(max_tokens=spec.output_len, ignore_eos=True, temperature=0.0, detokenize=False)


# ---- the virtual-clock driver: a scheduler core on the real engine ------------------------

@dataclass
class StepWall:
    shape: tuple[int, int, int]
    wall: float       # LLMEngine.step() wall time (s)
    core: float       # schedule() .. update_from_output() (s), from the recording scheduler
    cycle: float = 0.0  # the engine loop's period: from the previous step's end (or the wake-up
    #                     from an idle wait) to this step's end, requests added in between included


class RealEngineCore:
    """The scheduler-core protocol (models/step.py) on a real in-process ``LLMEngine``.

    ``schedule(now)`` runs one whole real engine step and returns its decisions (the recording
    scheduler's StepResult); ``update_from_output`` returns the requests that step finished.
    ``prefetch`` (a ``PrefetchSchedule``) is bound to the engine's EC connector, whose virtual
    time is set to ``now`` before each step."""

    def __init__(self, llm, *, prefetch=None):
        self.llm = llm
        self.engine = llm.llm_engine
        self.scheduler = scheduler_of(llm)
        if not hasattr(self.scheduler, "faultsim_last"):
            raise RuntimeError(f"the engine's scheduler is not {SCHEDULER_CLS} (pass scheduler_cls)")
        self.ec = self.scheduler.get_ec_connector()
        if self.ec is not None:
            if prefetch is None:
                raise ValueError("the engine has an EC connector: give the prefetch schedule")
            self.ec.bind(prefetch)
        self.walls: list[StepWall] = []
        self.cached_tokens: dict[str, int] = {}
        self.outputs: dict[str, list[int]] = {}
        self._finished: list[Finished] = []

    # protocol
    def add_request(self, spec: RequestSpec, now: float) -> None:
        self.engine.add_request(spec.req_id, prompt_for(spec), sampling_for(spec))
        req = self.scheduler.requests.get(spec.req_id)
        if req is not None and req.num_prompt_tokens != spec.prompt_len:
            raise ValueError(f"request {spec.req_id}: the engine's prompt has {req.num_prompt_tokens} tokens, "
                             f"the simulator's {spec.prompt_len} (image items must be {IMAGE_TOKENS} tokens "
                             "for tiny-llava)")

    def schedule(self, now: float) -> StepResult:
        if self.ec is not None:
            self.ec.now = now
        self.scheduler.faultsim_last = None
        t0 = time.perf_counter()
        outs = self.engine.step()
        wall = time.perf_counter() - t0
        res = self.scheduler.faultsim_last
        if res is None:  # nothing was scheduled (no requests left in the scheduler)
            res = StepResult()
        else:
            core = self.scheduler.faultsim_steps[-1]["dur"] if self.scheduler.faultsim_steps else wall
            self.walls.append(StepWall(res.shape(), wall, core))
        fin = []
        for o in outs:
            if o.finished:
                c = o.outputs[0]
                fin.append(Finished(o.request_id, str(c.finish_reason), len(c.token_ids)))
                self.cached_tokens[o.request_id] = o.num_cached_tokens or 0
                self.outputs[o.request_id] = list(c.token_ids)
        self._finished = fin
        return res

    def update_from_output(self, result: StepResult, now: float) -> list[Finished]:
        fin, self._finished = self._finished, []
        return fin

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def counts(self) -> tuple[int, int]:
        return self.scheduler.get_request_counts()

    def fail_all(self) -> list[str]:
        ids = list(self.scheduler.requests)
        self.engine.abort_request(ids)
        return ids

    def shutdown(self) -> None:
        return None  # the engine outlives a run; shutdown_llm() ends it


def run_virtual(llm, cfg, plan, specs, *, prefetch=None, trace_path=None, side: str = "gpu"):
    """The real engine through the simulator's engine loop: (RunResult, RealEngineCore)."""
    from ..runs.simulate import run_engine
    core = RealEngineCore(llm, prefetch=prefetch)
    result = run_engine(core, specs, cfg, plan, side=side, trace_path=trace_path, prefetch=prefetch)
    return result, core


# ---- the wall-clock driver ----------------------------------------------------------------

@dataclass
class WallRun:
    requests: dict[str, dict] = field(default_factory=dict)   # req -> arrival, first_token, finish, num_output
    steps: list[StepWall] = field(default_factory=list)
    span: float = 0.0


def run_wall_clock(llm, specs, *, time_scale: float = 1.0, warmup: bool = True) -> WallRun:
    """Serve ``specs`` in real time on an in-process engine: requests are added when the wall
    clock reaches their arrival, steps run back to back, the loop sleeps only when idle.
    Times are relative to the start (s). ``time_scale`` stretches arrivals."""
    engine = llm.llm_engine
    sched = scheduler_of(llm)
    # prompts are built before the clock starts: the harness's own work stays off the timeline
    inputs = {s.req_id: (prompt_for(s), sampling_for(s)) for s in specs}
    if warmup:
        from vllm import SamplingParams
        engine.add_request(f"__warmup-{time.monotonic_ns()}", {"prompt_token_ids": list(range(3, 67))},
                           SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False))
        while engine.has_unfinished_requests():
            engine.step()
    run = WallRun()
    pending = sorted(specs, key=lambda s: s.arrival)
    k = 0
    t_start = time.perf_counter()
    t_prev = t_start
    while True:
        now = time.perf_counter() - t_start
        while k < len(pending) and pending[k].arrival * time_scale <= now:
            s = pending[k]
            k += 1
            engine.add_request(s.req_id, *inputs[s.req_id])
            run.requests[s.req_id] = {"arrival": s.arrival * time_scale, "first_token": None,
                                      "finish": None, "num_output": 0}
        if not engine.has_unfinished_requests():
            if k == len(pending):
                break
            time.sleep(max(0.0, pending[k].arrival * time_scale - (time.perf_counter() - t_start)))
            t_prev = time.perf_counter()
            continue
        sched.faultsim_last = None
        t0 = time.perf_counter()
        outs = engine.step()
        t1 = time.perf_counter()
        res = sched.faultsim_last
        if res is not None and res.sched:
            core = sched.faultsim_steps[-1]["dur"] if sched.faultsim_steps else t1 - t0
            run.steps.append(StepWall(res.shape(), t1 - t0, core, t1 - t_prev))
        t_prev = t1
        end = t1 - t_start
        for o in outs:
            rec = run.requests.get(o.request_id)
            if rec is None:
                continue
            n = len(o.outputs[0].token_ids)
            if n and rec["first_token"] is None:
                rec["first_token"] = end
            if o.finished:
                rec["finish"], rec["num_output"] = end, n
    run.span = time.perf_counter() - t_start
    return run


def run_rounds(llm, rounds: list[list[RequestSpec]], *, drain_timeout: float = 30.0) -> dict:
    """Serve request rounds one after another (a round starts when the previous one has
    finished and its KV transfers are done), then keep stepping while the scheduler still has work (a KV connector's pending
    push work included, as ``EngineCore``'s busy loop does) and report what is left pending.
    Returns per-request records (round, cached tokens, outputs), the recorded steps and the
    connector's state at the end."""
    engine, sched = llm.llm_engine, scheduler_of(llm)
    sched.faultsim_steps.clear()
    reqs: dict[str, dict] = {}
    t_start = time.perf_counter()
    for r, specs in enumerate(rounds):
        for s in specs:
            engine.add_request(s.req_id, prompt_for(s), sampling_for(s))
            reqs[s.req_id] = {"round": r, "prompt_len": s.prompt_len, "arrival": time.perf_counter() - t_start,
                              "first_token": None, "finish": None, "num_output": 0, "cached": None}
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter() - t_start
            for o in outs:
                rec = reqs[o.request_id]
                if rec["first_token"] is None and o.outputs[0].token_ids:
                    rec["first_token"] = now
                if o.finished:
                    rec.update(finish=now, num_output=len(o.outputs[0].token_ids), cached=o.num_cached_tokens or 0)
        if r + 1 < len(rounds):  # the next round comes once this one's transfers are done
            t_gap = time.perf_counter()
            while sched.has_requests() and time.perf_counter() - t_gap < drain_timeout:
                engine.step()
    served = len(sched.faultsim_steps)
    t_drain = time.perf_counter()
    while sched.has_requests() and time.perf_counter() - t_drain < drain_timeout:
        engine.step()
    conn = sched.get_kv_connector()
    cs = getattr(conn, "connector_scheduler", None)
    return {"requests": reqs, "steps": list(sched.faultsim_steps), "served_steps": served,
            "drain_steps": len(sched.faultsim_steps) - served,
            "drain_s": time.perf_counter() - t_drain,
            "pending_jobs": len(getattr(cs, "_jobs", {}) or {}) if cs is not None else None,
            "pending_push_work": bool(conn.has_pending_push_work()) if conn is not None else None,
            "has_requests": sched.has_requests()}


def latency_metrics(requests: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per request: ttft, tpot, e2e (s), from records with arrival/first_token/finish/num_output."""
    out = {}
    for rid, r in requests.items():
        if r.get("finish") is None or r.get("first_token") is None:
            continue
        m = {"ttft": r["first_token"] - r["arrival"], "e2e": r["finish"] - r["arrival"]}
        if r["num_output"] > 1:
            m["tpot"] = (r["finish"] - r["first_token"]) / (r["num_output"] - 1)
        out[rid] = m
    return out


def records_from_trace(events: list[dict]) -> dict[str, dict]:
    return {e["req"]: {"arrival": e["arrival"], "first_token": e["first_token"], "finish": e["finish"],
                       "num_output": e["num_output"] or 0}
            for e in events if e["kind"] == "req" and e["status"] != "failed"}


# ---- engine deaths ------------------------------------------------------------------------

@dataclass
class KillResult:
    signal: str
    pid: int
    kill_at: float              # seconds after the first request was sent
    detect_s: float | None      # kill -> client's engine_dead flag
    fates: dict[str, str]       # req -> finished | aborted | EngineDeadError | <other error> | hung
    fail_s: dict[str, float]    # req -> kill -> the moment its generate() raised / ended
    exitcode: int | None
    in_flight: list[str]        # requests neither finished nor failed when the kill was sent
    after_death: str            # what a new generate() did after detection
    failed_proc_name: str | None = None  # what the liveness monitor named (None: a clean exit)


async def _kill_trial_async(engine_kwargs: dict, specs: list[RequestSpec], sig: str, kill_at: float,
                            exit_file: str | None, hang_timeout: float) -> KillResult:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError

    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs))
    resources = llm.engine_core.resources
    proc = resources.engine_manager.processes[0]
    fates: dict[str, str] = {}
    ended: dict[str, float] = {}
    t_kill = [None]

    async def one(spec: RequestSpec, t0: float):
        await asyncio.sleep(max(0.0, spec.arrival - (time.perf_counter() - t0)))
        try:
            last = None
            async for out in llm.generate(prompt_for(spec), sampling_for(spec), request_id=spec.req_id):
                last = out
            reason = last.outputs[0].finish_reason if last is not None else None
            fates[spec.req_id] = "aborted" if reason == "abort" else "finished"
        except EngineDeadError:
            fates[spec.req_id] = "EngineDeadError"
        except asyncio.CancelledError:
            fates[spec.req_id] = "hung"
            raise
        except Exception as exc:  # any other error is recorded by name
            fates[spec.req_id] = type(exc).__name__
        ended[spec.req_id] = time.perf_counter()

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(one(s, t0)) for s in specs]
    await asyncio.sleep(kill_at)
    in_flight = [s.req_id for s in specs if s.req_id not in fates]
    detected = threading.Event()
    detect = [None]

    def watch():
        while not resources.engine_dead and time.perf_counter() - t_kill[0] < hang_timeout:
            time.sleep(0.0002)
        if resources.engine_dead:
            detect[0] = time.perf_counter() - t_kill[0]
        detected.set()

    t_kill[0] = time.perf_counter()
    threading.Thread(target=watch, daemon=True).start()
    if sig == "SIGKILL":
        os.kill(proc.pid, signal.SIGKILL)
    elif sig == "SIGTERM":
        os.kill(proc.pid, signal.SIGTERM)
    elif sig in ("exit1", "exit0"):
        if exit_file is None:
            raise ValueError("exit faults need the engine started with VLLM_FAULTSIM_EXIT_FILE")
        Path(exit_file).write_text("1" if sig == "exit1" else "0")
    else:
        raise ValueError(f"unsupported signal {sig!r}")
    done, pending = await asyncio.wait(tasks, timeout=hang_timeout)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    while not detected.is_set():
        await asyncio.sleep(0.001)
    failed_name = getattr(resources.engine_manager, "failed_proc_name", None)
    after = "no error"
    try:
        async for _ in llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=2, detokenize=False),
                                    request_id="after-death"):
            pass
    except Exception as exc:
        after = type(exc).__name__
    proc.join(timeout=10)
    exitcode = proc.exitcode
    llm.shutdown()
    if exit_file:
        Path(exit_file).unlink(missing_ok=True)
    fail_s = {r: ended[r] - t_kill[0] for r in in_flight if r in ended}
    return KillResult(sig, proc.pid, kill_at, detect[0], {r: fates.get(r, "hung") for r in (s.req_id for s in specs)},
                      fail_s, exitcode, in_flight, after, failed_name)


def kill_trial(engine_kwargs: dict, specs: list[RequestSpec], sig: str = "SIGKILL", *, kill_at: float = 0.5,
               exit_file: str | None = None, hang_timeout: float = 30.0) -> KillResult:
    """One engine (AsyncLLM, engine core in its own process) serving ``specs`` (arrivals in
    seconds after the start), killed ``kill_at`` seconds in with ``sig`` (SIGKILL, SIGTERM,
    exit1, exit0). A request still running ``hang_timeout`` seconds after the kill is "hung"."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if exit_file:
        os.environ[ENV_EXIT_FILE] = exit_file
        Path(exit_file).unlink(missing_ok=True)
    return asyncio.run(_kill_trial_async(engine_kwargs, specs, sig, kill_at, exit_file, hang_timeout))


def kill_trials_parallel(engine_kwargs: dict, specs: list[RequestSpec], trials: list[tuple[str, float]], *,
                         workers: int = 4, workdir: str | Path, hang_timeout: float = 30.0,
                         timeout: float = 540.0) -> list[dict]:
    """Run ``trials`` ([(signal, kill_at)]) in ``workers`` processes, each its own client of
    one engine at a time (``python -m vllm_faultsim.harness.drivers.real_engine kill``); results as dicts
    (KillResult fields, plus ``error`` for a trial that could not run)."""
    import subprocess
    import sys

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    kw = {k: (v if isinstance(v, (str, int, float, bool, dict, list, type(None))) else str(v))
          for k, v in engine_kwargs.items()}
    procs = []
    for w in range(workers):
        mine = trials[w::workers]
        if not mine:
            continue
        job = {"engine": kw, "specs": [spec_to_dict(s) for s in specs], "trials": mine,
               "exit_file": str(workdir / f"exit-{w}"), "hang_timeout": hang_timeout}
        jp, rp = workdir / f"job-{w}.json", workdir / f"results-{w}.jsonl"
        jp.write_text(json.dumps(job))
        rp.unlink(missing_ok=True)
        log = open(workdir / f"worker-{w}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", MODULE, "kill", str(jp), str(rp)],
                                       stdout=log, stderr=subprocess.STDOUT), rp, log))
    t_end = time.monotonic() + timeout
    for p, _, log in procs:
        try:
            p.wait(timeout=max(1.0, t_end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()
    out = []
    for _, rp, _ in procs:
        if rp.exists():
            out += [json.loads(line) for line in rp.read_text().splitlines() if line.strip()]
    return out


def _kill_main(job_path: str, results_path: str) -> int:
    from dataclasses import asdict

    from ..workload import spec_from_dict
    job = json.loads(Path(job_path).read_text())
    specs = [spec_from_dict(d, f"r{i}") for i, d in enumerate(job["specs"])]
    for sig, at in job["trials"]:
        try:
            res = asdict(kill_trial(job["engine"], specs, sig, kill_at=at, exit_file=job["exit_file"],
                                    hang_timeout=job["hang_timeout"]))
        except Exception as exc:  # recorded, the next trial still runs
            res = {"signal": sig, "kill_at": at, "error": f"{type(exc).__name__}: {exc}"}
        with open(results_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(res) + "\n")
    return 0


def percentiles(values, qs=(50, 90, 99)) -> dict[str, float]:
    from ..metrics import percentile
    return {f"p{q}": percentile(list(values), q) for q in qs}


def mape(pred: dict[str, float], real: dict[str, float]) -> float | None:
    """Mean absolute percentage error of pred vs real over their common keys (in %)."""
    keys = [k for k in real if k in pred and real[k]]
    if not keys:
        return None
    return 100.0 * sum(abs(pred[k] - real[k]) / abs(real[k]) for k in keys) / len(keys)


def write_json(path: str | Path, data: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")



if __name__ == "__main__":  # python -m vllm_faultsim.harness.drivers.real_engine kill JOB.json RESULTS.jsonl
    import sys
    if len(sys.argv) == 4 and sys.argv[1] == "kill":
        sys.exit(_kill_main(sys.argv[2], sys.argv[3]))
    print("usage: python -m vllm_faultsim.harness.drivers.real_engine kill JOB.json RESULTS.jsonl", file=sys.stderr)
    sys.exit(2)
