"""Engine-side recorder of real vLLM serving runs: scheduler classes that record every step's shape and times, and the reader that turns those records into recording/1 step lines.

vLLM's engine core picks its scheduler through ``scheduler_cls``; async scheduling (the default)
needs a subclass of ``AsyncScheduler`` (its output placeholders let step N+1 be scheduled while
step N runs), and without it a subclass of plain ``Scheduler``. So there are two classes with the
same recording, :data:`ASYNC_CLS` and :data:`SYNC_CLS`; :func:`scheduler_cls_for` picks the one for
the resolved mode, and each refuses to start in the other mode.

The scheduler lives in the engine-core process. Each step that schedules tokens is kept in memory
as a short list (shape computed from the ``SchedulerOutput``; times from ``time.perf_counter``,
CLOCK_MONOTONIC on Linux, so comparable with the client's clock on the same host) and written,
one JSON line each, to the file named by :data:`ENV_STEPS_FILE` whenever the engine runs out of
unfinished requests, every :data:`FLUSH_EVERY` steps, and at shutdown: the hot path does no I/O
and no JSON while requests are in flight. The file's first line is a ``meta`` object (pid, class,
mode, KV blocks, limits).

Besides its shape, each step record names the requests it concerns, by the engine's request ids
(the client's id plus vLLM's 8-character suffix, ``InputProcessor.assign_request_id``): those
scheduled for the first time in that step, those whose first output token that step's output
carries, and those that finished in it (:func:`to_recording_steps` maps them to the recording's
request indices).

vLLM is imported only when a scheduler class is first asked for (PEP 562 ``__getattr__``), so the
sim tier can import :func:`read_steps` and :func:`to_recording_steps` without it.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

ENV_STEPS_FILE = "VLLM_FAULTSIM_STEPS_FILE"
ASYNC_CLS = f"{__name__}.AsyncRecordingScheduler"
SYNC_CLS = f"{__name__}.SyncRecordingScheduler"
FLUSH_EVERY = 20000
# the columns of one step record in the steps file
COLUMNS = ("i", "schedule_start", "schedule_end", "output_start", "output_end",
           "num_prefill_requests", "sum_prefill_tokens", "sum_prefill_kv_tokens",
           "num_decode_requests", "sum_decode_kv_tokens", "total_tokens",
           "num_waiting", "num_running", "num_preempted",
           "new_reqs", "first_token_reqs", "finished_reqs")


def scheduler_cls_for(async_scheduling: bool) -> str:
    """The qualified name to give vLLM as ``scheduler_cls`` for the resolved scheduling mode."""
    return ASYNC_CLS if async_scheduling else SYNC_CLS


def step_shape(requests, out) -> tuple[int, int, int, int, int, int]:
    """(num_prefill_requests, sum_prefill_tokens, sum_prefill_kv_tokens, num_decode_requests,
    sum_decode_kv_tokens, total_tokens) of one ``SchedulerOutput``. ``requests`` maps request id
    to vLLM's Request (the scheduler's ``self.requests``). A request is in prefill while the KV it
    had before the step is shorter than its prompt, or when it is given more than one token (a
    preempted request recomputing); otherwise it decodes one token. The KV before the step is the
    ``num_computed_tokens`` the output carries (vLLM advances the request's own counter at the end
    of ``schedule()``, so the request object already holds the value after the step)."""
    sched = out.num_scheduled_tokens
    npre = spre = spkv = ndec = sdkv = 0
    cached = out.scheduled_cached_reqs
    for rid, before in itertools.chain(((r.req_id, r.num_computed_tokens) for r in out.scheduled_new_reqs),
                                       zip(cached.req_ids, cached.num_computed_tokens)):
        n = sched.get(rid, 0)
        if n > 1 or before < requests[rid].num_prompt_tokens:
            npre += 1
            spre += n
            spkv += before
        elif n:
            ndec += 1
            sdkv += before
    return npre, spre, spkv, ndec, sdkv, out.total_num_scheduled_tokens


class _RecorderMixin:
    """The recording, over whichever vLLM scheduler class comes next in the MRO."""

    _fs_async = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mode = bool(self.scheduler_config.async_scheduling)
        if mode != self._fs_async:
            raise RuntimeError(f"{type(self).__name__} records {'async' if self._fs_async else 'sync'} "
                               f"scheduling but the engine runs async_scheduling={mode}; use "
                               f"scheduler_cls_for({mode})")
        self.faultsim_steps: list[list] = []   # unwritten step records (COLUMNS)
        self._fs_pending: dict[int, list] = {}  # id(SchedulerOutput) -> its record, until its output
        self._fs_i = 0
        self._fs_scheduled: set[str] = set()  # scheduled at least once, not finished
        self._fs_tokened: set[str] = set()    # given an output token, not finished
        self._fs_path = os.environ.get(ENV_STEPS_FILE) or None
        self._fs_fh = None
        if self._fs_path:
            Path(self._fs_path).parent.mkdir(parents=True, exist_ok=True)
            self._fs_fh = open(self._fs_path, "a", encoding="utf-8")  # noqa: SIM115 (closed at shutdown)
            cache = self.cache_config
            meta = {"kind": "meta", "pid": os.getpid(), "scheduler_cls": type(self).__name__,
                    "async_scheduling": mode, "clock": "time.perf_counter", "wall_minus_perf": time.time() - time.perf_counter(),
                    "num_gpu_blocks": self.kv_cache_config.num_blocks, "block_size": self.block_size,
                    "max_num_seqs": self.max_num_running_reqs,
                    "max_num_batched_tokens": self.max_num_scheduled_tokens,
                    "max_model_len": self.max_model_len,
                    "enable_prefix_caching": bool(cache.enable_prefix_caching), "columns": list(COLUMNS)}
            self._fs_fh.write(json.dumps(meta) + "\n")
            self._fs_fh.flush()

    def schedule(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = super().schedule(*args, **kwargs)
        t1 = time.perf_counter()
        self._fs_i += 1
        if out.total_num_scheduled_tokens:
            new = [r.req_id for r in out.scheduled_new_reqs if r.req_id not in self._fs_scheduled]
            self._fs_scheduled.update(new)
            rec = [self._fs_i, t0, t1, 0.0, 0.0, *step_shape(self.requests, out),
                   len(self.waiting), len(self.running), len(out.preempted_req_ids or ()), new, [], []]
            self._fs_pending[id(out)] = rec
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        t2 = time.perf_counter()
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        t3 = time.perf_counter()
        rec = self._fs_pending.pop(id(scheduler_output), None)
        if rec is not None:
            rec[3], rec[4] = t2, t3
            first, finished = rec[-2], rec[-1]
            for eco in outputs.values():
                for o in eco.outputs:
                    rid = o.request_id
                    if o.new_token_ids and rid not in self._fs_tokened:
                        self._fs_tokened.add(rid)
                        first.append(rid)
                    if o.finish_reason is not None:
                        finished.append(rid)
                        self._fs_tokened.discard(rid)
                        self._fs_scheduled.discard(rid)
            self.faultsim_steps.append(rec)
            if len(self.faultsim_steps) >= FLUSH_EVERY or not self.get_num_unfinished_requests():
                self.faultsim_flush()
        return outputs

    def faultsim_flush(self) -> None:
        """Write the unwritten step records (kept in memory when no file is named)."""
        if self._fs_fh is None or not self.faultsim_steps:
            return
        self._fs_fh.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in self.faultsim_steps))
        self._fs_fh.flush()
        self.faultsim_steps.clear()

    def shutdown(self) -> None:
        try:
            self.faultsim_flush()
            if self._fs_fh is not None:
                self._fs_fh.close()
                self._fs_fh = None
        finally:
            super().shutdown()


def _build(name: str):
    if name == "AsyncRecordingScheduler":
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler as base
        is_async = True
    else:
        from vllm.v1.core.sched.scheduler import Scheduler as base
        is_async = False
    cls = type(name, (_RecorderMixin, base), {"_fs_async": is_async, "__module__": __name__,
                                              "__qualname__": name,
                                              "__doc__": f"vLLM's {base.__name__}, unchanged, plus the step recording."})
    return cls


_BUILT: dict[str, type] = {}


def __getattr__(name: str):
    if name in ("AsyncRecordingScheduler", "SyncRecordingScheduler"):
        if name not in _BUILT:
            _BUILT[name] = _build(name)
        return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- reading the steps file (no vLLM) -------------------------------------------------------

def read_steps(path: str | Path) -> tuple[list[dict], list[list]]:
    """(meta lines, step records) of a steps file; a torn last line (engine killed) is dropped."""
    metas, steps = [], []
    for text in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            metas.append(obj)
        elif isinstance(obj, list) and len(obj) == len(COLUMNS):
            steps.append(obj)
    return metas, steps


REQ_LISTS = ("new_reqs", "first_token_reqs", "finished_reqs")


def request_index(engine_id: str, index: dict[str, int]) -> int | None:
    """The recording's index of the request the engine calls ``engine_id`` (the client's id, or
    it plus vLLM's ``-xxxxxxxx`` suffix); None for a request outside the recording."""
    if engine_id in index:
        return index[engine_id]
    return index.get(engine_id.rsplit("-", 1)[0])


def to_recording_steps(steps: list[list], t0: float, t1: float, index: dict[str, int]) -> list[dict]:
    """The step records scheduled in [t0, t1] (perf_counter seconds), as recording/1 step lines
    with times relative to ``t0`` and the request lists as indices of ``index`` (client request id
    -> its request line's position); requests outside the recording are left out."""
    out = []
    for rec in steps:
        if not t0 <= rec[1] <= t1:
            continue
        d = dict(zip(COLUMNS, rec))
        for k in ("schedule_start", "schedule_end", "output_start", "output_end"):
            d[k] = d[k] - t0
        for k in REQ_LISTS:
            d[k] = [j for j in (request_index(rid, index) for rid in d[k]) if j is not None]
        out.append(d)
    out.sort(key=lambda d: d["i"])
    return out
