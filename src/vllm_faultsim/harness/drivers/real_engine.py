"""The real vLLM engine in this process (GPU tier): engine arguments, start and stop, the recording
scheduler, prompts, and :class:`RealEngineCore`, a scheduler core (models/step.py) on ``LLMEngine``.

:class:`RealEngineCore` runs on a real, in-process ``LLMEngine`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
the simulator's engine loop (``runs.gpu.run_virtual``) adds each request at the step where the
simulator adds it, and each ``schedule(now)`` runs one whole real ``EngineCore.step()`` (schedule,
GPU forward, sample, ``update_from_output``). The step's decisions are read from
``RecordingScheduler`` (vLLM's ``scheduler_cls`` option), a subclass of vLLM's ``Scheduler``
that turns each ``SchedulerOutput`` into a ``StepResult`` (``vllm_adapter``). With async
scheduling (``engine_args(..., async_scheduling=True)``) the scheduler is
``AsyncRecordingScheduler``, the same recording on vLLM's ``AsyncScheduler`` (a subclass of plain
``Scheduler`` would make vLLM run without output placeholders), and each ``schedule(now)`` runs one
real ``EngineCore.step_with_batch_queue`` call, which schedules one batch and may apply the oldest
one's output; ``update_from_output`` returns what that batch finished (see
``RealEngineCore``). Both sides use the
same step-time model on the virtual clock, so their common traces are equal byte for byte when
(and only when) the real engine decides as the simulator does; the real step's wall time is
kept apart (``RealEngineCore.walls``). The wall-clock drivers are in ``wall_clock``, the
engine-kill trials in ``engine_kill``, the EC connector in ``gpu_ec_connector``, the CPU
stand-in of the GPU worker in ``dry_run``.

``RecordingScheduler`` and ``AsyncRecordingScheduler`` subclass vLLM types: they are built on
first attribute access (PEP 562), so importing this module does not import vLLM; vLLM finds them
by qualified name (``scheduler_cls``), also in spawned processes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ...models.request import RequestSpec, prompt_token_ids
from ...models.step import Finished, StepResult
from .dry_run import DRYRUN, EXECUTOR as DRYRUN_EXECUTOR
from .vllm_adapter import VllmStep, ec_item_ready, running_preemption_order, step_result

SCHEDULER_CLS = f"{__name__}.RecordingScheduler"
ASYNC_SCHEDULER_CLS = f"{__name__}.AsyncRecordingScheduler"
EC_CONNECTOR = "GpuFaultsimECConnector"
EC_CONNECTOR_MODULE = "vllm_faultsim.harness.drivers.gpu_ec_connector"
# a directory: each engine process appends its steps to steps-<pid>.jsonl there
ENV_RECORD_DIR = "VLLM_FAULTSIM_RECORD_DIR"
# a file path: once it exists, the engine core exits (os._exit) at its next schedule() with the
# exit code written in the file (default 1): how engine_kill applies a plan's exit1/exit0 faults
ENV_EXIT_FILE = "VLLM_FAULTSIM_EXIT_FILE"
IMAGE_TOKENS = 16  # embeddings per tiny-llava image (56x56, 14x14 patches, CLS dropped)


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
                async_scheduling: bool = False, **extra) -> dict:
    """``LLM(**kwargs)`` for the real engine with the simulator's scheduler config ``sched``
    (``models.scheduler.SchedulerConfig``): same budgets, block size, block count (block 0 is the
    null block on both sides), chunking and watermark; FCFS; synchronous scheduling unless
    ``async_scheduling`` (vLLM 0.26.0's default; pass ``sched.async_scheduling`` to follow the
    simulator's config). The recording scheduler follows the engine's resolved mode
    (``AsyncRecordingScheduler`` when async, ``extra`` included)."""
    kw: dict[str, Any] = dict(
        model=str(model), load_format="dummy", enforce_eager=True, dtype=dtype, seed=0,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=sched.max_model_len, max_num_seqs=sched.max_num_seqs,
        max_num_batched_tokens=sched.max_num_batched_tokens, block_size=sched.block_size,
        num_gpu_blocks_override=sched.num_gpu_blocks, enable_chunked_prefill=sched.enable_chunked_prefill,
        long_prefill_token_threshold=sched.long_prefill_token_threshold, watermark=sched.watermark,
        enable_prefix_caching=prefix_caching, async_scheduling=async_scheduling, disable_log_stats=True,
        skip_tokenizer_init=not multimodal,
    )
    if multimodal:
        kw["limit_mm_per_prompt"] = {"image": 4}
    if ec_policy is not None:
        kw["ec_transfer_config"] = {
            "ec_connector": EC_CONNECTOR, "ec_connector_module_path": EC_CONNECTOR_MODULE, "ec_role": "ec_both",
            "engine_id": "faultsim",
            "ec_connector_extra_config": {"policy": ec_policy, "event_log": str(ec_log) if ec_log else "",
                                          "save_delay": ec_save_delay}}
    if kv_offload_gib is not None:
        kw["kv_offloading_size"] = kv_offload_gib
        kw["kv_offloading_backend"] = "native"
    kw.update(extra)
    if record and "scheduler_cls" not in extra:
        kw["scheduler_cls"] = ASYNC_SCHEDULER_CLS if kw["async_scheduling"] else SCHEDULER_CLS
    if DRYRUN:
        kw["distributed_executor_backend"] = DRYRUN_EXECUTOR
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


# ---- the recording scheduler --------------------------------------------------------------

def _offload_jobs(out) -> dict | None:
    """The KV offloading jobs of a step (``OffloadingConnector``'s metadata), as trace events."""
    kv = out.kv_connector_metadata
    if kv is None or not hasattr(kv, "store_jobs"):
        return None
    return {"store": [[j, job.req_id, _gpu_chunks(job.src_spec)] for j, job in kv.store_jobs.items()],
            "load": [[j, job.req_id, _gpu_chunks(job.dst_spec)] for j, job in kv.load_jobs.items()],
            "flush": sorted(kv.jobs_to_flush or ()), "done": []}


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


def _build_recording_scheduler(async_scheduling: bool = False):
    if async_scheduling:
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler as Base
    else:
        from vllm.v1.core.sched.scheduler import Scheduler as Base

    class RecordingScheduler(Base):
        """vLLM's Scheduler (``AsyncRecordingScheduler``: its AsyncScheduler), unchanged, plus a
        record of every step: the decisions as a StepResult (``faultsim_last``) beside vLLM's own
        outputs (``faultsim_output``, the ``SchedulerOutput``; ``faultsim_runner_output`` and
        ``faultsim_engine_outputs``, what ``update_from_output`` took and returned), the batch
        shape and the wall time from schedule() to the end of update_from_output() (the GPU forward
        pass lies in between). Under async scheduling a batch's output is applied after the next
        batch was scheduled: ``faultsim_applied`` is (StepResult, SchedulerOutput, runner output,
        engine outputs) of the batch the latest ``update_from_output`` applied. Steps go to
        ``self.faultsim_steps`` and, with ``VLLM_FAULTSIM_RECORD_DIR`` set, to
        ``steps-<pid>.jsonl`` in that directory (engine cores in other processes)."""

        faultsim_async = async_scheduling

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            mode = bool(self.scheduler_config.async_scheduling)
            if mode != self.faultsim_async:
                raise RuntimeError(f"{type(self).__name__} records {'async' if self.faultsim_async else 'sync'} "
                                   f"scheduling but the engine runs async_scheduling={mode}")
            self.faultsim_steps: list[dict] = []
            self.faultsim_last: StepResult | None = None
            self.faultsim_output = self.faultsim_runner_output = self.faultsim_engine_outputs = None
            self.faultsim_applied: tuple | None = None
            self.faultsim_keep = True
            self._fs_preempted_between: list[str] = []
            self._fs_pending: dict[int, tuple[StepResult, Any, float]] = {}  # id(SchedulerOutput) -> (res, out, t0)
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
            t0 = time.perf_counter()
            out = super().schedule(*args, **kwargs)
            res = step_result(out, self.requests, self.waiting, self._fs_preempted_between)
            self._fs_preempted_between = []
            res.kv = _offload_jobs(out)
            self.faultsim_last, self.faultsim_output = res, out
            self.faultsim_runner_output = self.faultsim_engine_outputs = None
            self._fs_pending[id(out)] = (res, out, t0)
            return out

        def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
            victims = running_preemption_order(self) if reset_running_requests else []
            ok = super().reset_prefix_cache(reset_running_requests, reset_connector)
            self._fs_preempted_between += victims  # the next step reports them, in this order
            return ok

        def update_from_output(self, scheduler_output, model_runner_output):
            outputs = super().update_from_output(scheduler_output, model_runner_output)
            t1 = time.perf_counter()
            self.faultsim_runner_output, self.faultsim_engine_outputs = model_runner_output, outputs
            res, _, t0 = self._fs_pending.pop(id(scheduler_output), (None, None, 0.0))
            self.faultsim_applied = (res, scheduler_output, model_runner_output, outputs)
            if res is not None and res.kv is not None:
                res.kv["done"] = _kv_done(model_runner_output)
            if res is not None and (self.faultsim_keep or self._fs_fh is not None):
                finished = [o.request_id for eco in outputs.values() for o in eco.outputs
                            if o.finish_reason is not None]
                rec = {"i": len(self.faultsim_steps), "t0": t0, "dur": t1 - t0,
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

    name = "AsyncRecordingScheduler" if async_scheduling else "RecordingScheduler"
    RecordingScheduler.__name__ = RecordingScheduler.__qualname__ = name
    RecordingScheduler.__module__ = __name__
    return RecordingScheduler


def __getattr__(name: str):
    if name not in ("RecordingScheduler", "AsyncRecordingScheduler"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = globals()[name] = _build_recording_scheduler(name == "AsyncRecordingScheduler")
    return cls


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
    time is set to ``now`` before each step.

    Under async scheduling (the engine's ``AsyncRecordingScheduler``) one engine step is one call
    of vLLM's ``step_with_batch_queue``: it schedules one batch (returned by ``schedule``) and,
    once two are in flight, applies the oldest one's output, whose finished requests
    ``update_from_output`` of that batch returns. The simulator's loop is the twin of
    ``step_with_batch_queue`` (tests/diff/test_batch_queue_loop.py), so its calls meet vLLM's
    but where vLLM spins: an empty batch that the loop applies at once (nothing with tokens in
    flight) is applied by vLLM when it next blocks, a step later, and carries nothing; and where
    the loop blocks on a batch vLLM has not applied yet (no unfinished request left), engine steps
    run until vLLM has applied it (the empty batches vLLM schedules meanwhile, for its finished
    requests' ids, are its own).

    vLLM's own outputs of each step: ``last_step`` / ``on_step`` (``vllm_adapter.VllmStep``: the
    ``SchedulerOutput``, connector metadata, runner and engine-core outputs); ``step_times``."""

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
        self.prefetch = prefetch
        self.last_step: VllmStep | None = None
        """vLLM's outputs of the latest step that scheduled something (async: whose output came back)."""
        self.on_step: Callable[[VllmStep], None] | None = None
        """Called with the ``VllmStep`` of each step that scheduled something (async: when its output
        is applied)."""
        self.step_times: list[float] = []
        """The virtual time each ``schedule()`` ran at: step ``k`` is ``step_times[k]``."""
        self.walls: list[StepWall] = []
        self.cached_tokens: dict[str, int] = {}
        self.outputs: dict[str, list[int]] = {}
        self._finished: list[Finished] = []
        self.async_scheduling = bool(getattr(self.scheduler, "faultsim_async", False))
        # async: id(StepResult) -> (StepResult, finished) of the batches vLLM applied, not yet taken
        self._applied: dict[int, tuple[StepResult, list[Finished]]] = {}
        # async: batches whose output vLLM applies without the loop asking (empty ones)
        self._unasked: dict[int, StepResult] = {}
        self._scheduled_at: dict[int, tuple[int, float]] = {}  # async: id(StepResult) -> (step index, time)

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
        if self.async_scheduling:
            return self._schedule_async(now)
        self.scheduler.faultsim_last = None
        t0 = time.perf_counter()
        outs = self.engine.step()
        wall = time.perf_counter() - t0
        sched = self.scheduler
        res = sched.faultsim_last
        if res is None:  # nothing was scheduled (no requests left in the scheduler)
            res = StepResult()
        else:
            core = sched.faultsim_steps[-1]["dur"] if sched.faultsim_steps else wall
            self.walls.append(StepWall(res.shape(), wall, core))
            self.last_step = VllmStep(len(self.step_times), now, res, sched.faultsim_output,
                                      sched.faultsim_runner_output, sched.faultsim_engine_outputs)
            if self.on_step is not None:
                self.on_step(self.last_step)
        self.step_times.append(now)
        self._finished = self._finished_of(outs)
        return res

    def update_from_output(self, result: StepResult, now: float) -> list[Finished]:
        if self.async_scheduling:
            return self._update_async(result)
        fin, self._finished = self._finished, []
        return fin

    # async scheduling: one engine step is one call of vLLM's step_with_batch_queue
    def _engine_step(self, index: int | None = None, now: float = 0.0) -> StepResult | None:
        """One engine step; returns the batch it scheduled (None: none; ``index``, ``now``: the
        loop's schedule() it answers) and files the one whose output it applied, with the requests
        that finished."""
        sched = self.scheduler
        sched.faultsim_last = sched.faultsim_applied = None
        t0 = time.perf_counter()
        outs = self.engine.step()
        wall = time.perf_counter() - t0
        if sched.faultsim_last is not None and index is not None:
            self._scheduled_at[id(sched.faultsim_last)] = (index, now)
        fin = self._finished_of(outs)
        applied = sched.faultsim_applied
        if applied is not None and applied[0] is not None:
            res, so, mro, eco = applied
            if self._unasked.pop(id(res), None) is not None:
                if fin:
                    raise RuntimeError(f"an empty batch finished {[f.req_id for f in fin]}")
            else:
                self._applied[id(res)] = (res, fin)
            index, at = self._scheduled_at.pop(id(res), (None, None))
            if res.sched:  # (an engine step applies at most one batch: its wall is this step's)
                self.walls.append(StepWall(res.shape(), wall, sched.faultsim_steps[-1]["dur"]
                                           if sched.faultsim_steps else wall))
                self.last_step = VllmStep(index, at, res, so, mro, eco)
                if self.on_step is not None:
                    self.on_step(self.last_step)
        elif fin:
            raise RuntimeError(f"requests {[f.req_id for f in fin]} finished with no batch applied")
        return sched.faultsim_last

    def _schedule_async(self, now: float) -> StepResult:
        index = len(self.step_times)
        self.step_times.append(now)
        res = self._engine_step(index, now)
        if res is None:
            raise RuntimeError("the engine scheduled nothing though it has unfinished requests")
        return res

    def _update_async(self, result: StepResult) -> list[Finished]:
        key = id(result)
        if key not in self._applied:
            if not result.sched:  # vLLM applies it when it next blocks: nothing comes back from it
                self._unasked[key] = result
                return []
            while key not in self._applied:
                extra = self._engine_step()
                if extra is not None:
                    if extra.sched:
                        raise RuntimeError(f"the engine scheduled {extra.sched} the simulator's loop did not ask for")
                    self._unasked[id(extra)] = extra
        return self._applied.pop(key)[1]

    def _finished_of(self, outs) -> list[Finished]:
        fin = []
        for o in outs:
            if o.finished:
                c = o.outputs[0]
                fin.append(Finished(o.request_id, str(c.finish_reason), len(c.token_ids)))
                self.cached_tokens[o.request_id] = o.num_cached_tokens or 0
                self.outputs[o.request_id] = list(c.token_ids)
        return fin

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def counts(self) -> tuple[int, int]:
        return self.scheduler.get_request_counts()

    def fail_all(self) -> list[str]:
        ids = list(self.scheduler.requests)
        self.engine.abort_request(ids)
        self._applied.clear()
        self._unasked.clear()
        self._scheduled_at.clear()
        return ids

    def shutdown(self) -> None:
        return None  # the engine outlives a run; shutdown_llm() ends it

    # beyond the protocol
    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """vLLM's ``LLMEngine.reset_prefix_cache`` (see ``VllmSchedulerCore.reset_prefix_cache``)."""
        return self.engine.reset_prefix_cache(reset_running_requests, reset_connector)

    def ec_item_ready(self, identifier: str, *, at: float | None = None, step: int | None = None) -> bool:
        """Whether EC item ``identifier`` could be loaded from the store at virtual time ``at``,
        or when step ``step`` (0-based, see ``step_times``) was scheduled."""
        return ec_item_ready(self.prefetch, self.step_times, identifier, at=at, step=step)
