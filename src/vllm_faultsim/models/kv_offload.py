"""KV offloading to CPU: a small twin of vLLM's ``OffloadingConnector`` (scheduler side + worker).

Mirrored from ``vllm/distributed/kv_transfer/kv_connector/v1/offloading/{scheduler,worker}.py``
and ``vllm/v1/kv_offload/cpu/{manager,policies/lru}.py`` of vLLM **0.23.0** and **0.26.0**, for one
full-attention KV cache group, the CPU medium with LRU eviction, one worker (TP=1), the
block-level offload policy, no ``max_offload_tokens``, ``store_threshold`` 0 and no
``reset_cache``. Names are vLLM's, so a vLLM developer can read one against the other.

How the engine calls the connector (both versions)
--------------------------------------------------
Prefix caching must be on: every request carries ``block_hashes`` (one per full GPU block, chained,
from ``get_request_block_hasher``); an *offload key* is the hash of the last GPU block of a
*chunk* (``blocks_per_chunk`` GPU blocks, ``tokens_per_chunk = block_size * blocks_per_chunk``).

- ``Scheduler.add_request`` -> ``on_new_request(req)``: the request is *tracked*
  (``_req_status``).
- ``Scheduler.schedule()``, for a WAITING request with ``num_computed_tokens == 0``, after the
  local prefix-cache lookup (``get_computed_blocks``, full blocks, at most ``num_tokens - 1``):
  ``get_num_new_matched_tokens(req, num_local)`` -> ``(n, load_async)``. ``None`` skips the
  request for this step (it goes to ``step_skipped_waiting``). After ``allocate_slots(...,
  num_external_computed_tokens=n, delay_cache_blocks=load_async)``:
  ``update_state_after_alloc(req, blocks, n)``; with ``load_async`` the request waits in
  ``WAITING_FOR_REMOTE_KVS`` until the worker reports the load in ``finished_recving``.
- End of ``schedule()`` (before ``_update_after_schedule``, so ``num_computed_tokens`` is the
  pre-step value): ``build_connector_meta(scheduler_output)`` -> ``load_jobs``, ``store_jobs``,
  ``jobs_to_flush``.
- The worker, at the start of the step: ``handle_preemptions(meta)`` submits the stores deferred
  from the previous step and *waits* for ``jobs_to_flush``; ``start_load_kv`` submits the loads.
  After the forward: ``get_finished()`` defers this step's stores to the next step's start and
  collects finished transfers (``assert success``: a failed transfer kills the engine);
  ``build_connector_worker_meta()`` -> ``completed_jobs`` travels back in
  ``ModelRunnerOutput.kv_connector_output``.
- ``update_from_output``: a request that finishes calls ``request_finished(req)`` before its blocks
  are freed (it returns ``(False, None)``: the blocks are freed at once, so a pending store's
  source block may be re-allocated -- hence the *fence*); its id is reported in the next step's
  ``finished_req_ids``. Last (``_update_from_kv_xfer_finished``), ``update_connector_output``
  retires the completed jobs and ``finished_recving`` makes loaded requests schedulable again.

Scheduler side, step by step
----------------------------
``get_num_new_matched_tokens``: clear the request's block ids; [0.24+] if the request still has
jobs in flight return ``None`` (delay); extend the offload keys; look up from chunk
``num_local // tokens_per_chunk`` while the CPU manager says HIT (HIT_PENDING = the store is still
in flight: counts, but the lookup is deferred -> ``None``); fewer than a chunk of new hits -> 0;
if any hit chunk is being loaded by another request -> ``None``; touch the keys (LRU);
return ``(hits, hits > 0)``.

``update_state_after_alloc`` (only with external tokens): every block of the request is an
*allocated block of this batch*; the chunks from the first non-hashed block to
``cdiv(cached, tokens_per_chunk)`` are loaded (``prepare_load`` pins them) into the
non-hashed blocks: a *load job* (new job id from the one counter shared with stores);
``next_stored_chunk_idx`` jumps past the loaded chunks (block-level policy).

``build_connector_meta``: (1) ``_update_req_states``: extend keys; a resumed request's block ids
are reset; new block ids of scheduled requests are *allocated blocks of this batch*.
(2) **preemption flush**: the in-flight (store) jobs of every preempted request join
``jobs_to_flush``. (3) **fence flush**: every pending job registered on a block id allocated in
this batch joins ``jobs_to_flush`` (a request's store blocks are registered when it finishes).
(4) [0.23.0, PR #42611] **flush-all**: if every tracked request is finished (``_req_status``
non-empty and all ``is_finished()``), *all* pending jobs (stores and loads) join
``jobs_to_flush`` -- "there might not be a future scheduler step to trigger their completion".
(5) ``_build_store_jobs``: for each scheduled request (in scheduling order) [0.24+: then each
request finished since the last step, with ``num_tokens`` as its extent], the chunks that are
full after this batch (``num_computed_tokens + scheduled``, clamped to ``num_prompt_tokens``
when ``offload_prompt_only``, the default) from ``next_stored_chunk_idx`` on are offered to
``prepare_store``: ``None`` (the CPU pool is full of pinned/in-flight chunks) -> retried next
step; keys already in the pool are filtered out; the rest get CPU slots (evicting LRU chunks)
and become a *store job* of their GPU blocks; ``next_stored_chunk_idx`` advances
[0.23: set to the new extent, 0.24+: never backwards]. [0.24+] A finished request's store job
registers its blocks for the fence at once, and is flushed in the same batch if one of them
was just re-allocated.

``update_connector_output``: a completed store makes its chunks loadable (``complete_store``),
a completed load unpins them (``complete_load``); the job leaves the fence index; a finished
request with no jobs left is untracked.

``request_finished``: [0.23] untrack at once if no jobs are in flight, else register the jobs'
blocks for the fence. [0.24+] keep the request tracked (its final stores are built at the next
``build_connector_meta``) and register in-flight jobs' blocks for the fence.

``has_pending_push_work`` [0.24+]: ``bool(_jobs)``. ``Scheduler.has_requests()`` ORs it in and
``EngineCore.step()`` keeps stepping (empty steps, ``kv_connector_no_forward``, 1 ms sleep)
until every job has completed. 0.23.0 has no such hook: the engine stops when no request is
unfinished and no finished id is left to report -- which is why it flushes everything on
that last step.

CPU pool (``CPUOffloadingManager`` + ``LRUCachePolicy``): ``num_cpu_chunks`` slots; a chunk is
*pending* (``ref_cnt == -1``) from ``prepare_store`` to ``complete_store``, pinned while loads
read it. 0.23.0: one OrderedDict of all chunks in insertion order, ``touch`` moves any present
chunk to the end, eviction takes the first unpinned ready chunks. 0.24+: a separate evictable
list: a chunk enters it (at the end) when its store completes or its last load completes;
``touch`` reorders only evictable chunks. Chunks offered in the same ``prepare_store`` call are
never evicted by it.

This module's additions: the policy objects (``"0.23"``, ``"0.24+"``, and mutants), the
virtual-clock transfer engine shared with the real driver (``TransferEngine``), canonical job
names for traces, and the KV events of a step.

KV events of a step (``StepResult.kv``; only non-empty fields)::

    store:   [[job, req, [chunk...]], ...]  store jobs built this step
    load:    [[job, req, [chunk...]], ...]  load jobs built this step
    flush:   [job, ...]                     jobs_to_flush sent to the worker
    done:    [job, ...]                     completions retired by update_connector_output
    present: [[req, [chunk...]], ...]       offered to prepare_store, already in the CPU pool
    nostore: [[req, [chunk...]], ...]       prepare_store returned None (pool full of pinned chunks)
    evict:   [[req, chunk], ...]            chunks the LRU evicted (named by who stored them)
    delayed: [req, ...]                     get_num_new_matched_tokens returned None
    wait:    seconds                        how long the worker blocked on flushed jobs

A job is named ``"<req>:S<first chunk>"`` (store) or ``"<req>:L<first chunk>"`` (load), with
``#2``, ``#3`` ... on repeats; a chunk is its index in the request's token sequence
(``position // tokens_per_chunk``). Names, not vLLM's job ids or block ids, so that the trace is
comparable across versions and between the simulator and real vLLM. Lists are sorted.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

# ---- policies -------------------------------------------------------------------------------

VERSIONS = ("0.23", "0.24+")
POLICY_ENV = "VLLM_FAULTSIM_OFFLOAD_POLICY"


@dataclass(frozen=True)
class OffloadPolicy:
    """Which vLLM release's offloading rules to follow. The rule switches are off only in the
    mutants of harness/mutants.py (``OFFLOAD_MUTANTS``), which name themselves in ``mutant``."""

    version: str = "0.24+"
    flush_preempted: bool = True  # a preempted request's pending store jobs are flushed
    flush_fenced: bool = True     # a pending job whose GPU block is re-allocated is flushed
    flush_all: bool = True        # 0.23: flush every job once every tracked request is finished (PR #42611)
    clamp_to_num_tokens: bool = True  # offloadable tokens <= req.num_tokens (async: not the placeholders in flight)
    mutant: str | None = None

    def __post_init__(self):
        if self.version not in VERSIONS:
            raise ValueError(f"unknown offload policy version {self.version!r} (known: {', '.join(VERSIONS)})")

    @property
    def new(self) -> bool:
        return self.version == "0.24+"

    @property
    def flush_all_when_finished(self) -> bool:
        return self.version == "0.23" and self.flush_all

    @property
    def name(self) -> str:
        return self.version + (f"/{self.mutant}" if self.mutant else "")


def version_policy(vllm_version: str) -> str:
    """``"0.23"`` for vLLM < 0.24 (flush-all, PR #42611), else ``"0.24+"`` (has_pending_push_work)."""
    parts = []
    for p in vllm_version.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    major, minor = (parts + [0, 0])[:2]
    return "0.23" if (major, minor) < (0, 24) else "0.24+"


def installed_vllm_version() -> str | None:
    """The installed vLLM's version, read from its metadata (vllm is not imported)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("vllm")
    except PackageNotFoundError:
        return None


def policy_for(force: str | None = None) -> OffloadPolicy:
    """The policy of the installed vLLM; ``force`` (or $VLLM_FAULTSIM_OFFLOAD_POLICY) overrides it.
    Without vLLM installed the default is the primary target's (0.26.0 -> ``"0.24+"``)."""
    force = force or os.environ.get(POLICY_ENV) or None
    if force is None:
        v = installed_vllm_version()
        force = version_policy(v) if v else "0.24+"
    return OffloadPolicy(force)


# ---- configuration --------------------------------------------------------------------------

@dataclass(frozen=True)
class OffloadConfig:
    block_size: int = 16              # tokens per GPU block (= tokens per block hash)
    blocks_per_chunk: int = 1         # GPU blocks per offloaded chunk
    num_cpu_chunks: int = 1024        # CPU pool capacity, in chunks
    offload_prompt_only: bool = True  # vLLM's default: decode-phase KV is never offloaded
    bytes_per_block: int = 2 << 20    # KV bytes of one GPU block (8B Llama, 16 tokens, fp16: 2 MiB)
    bandwidth: float = 25e9           # bytes/s per direction (one CUDA stream each way)
    latency: float = 50e-6            # fixed cost per transfer job, seconds

    @property
    def tokens_per_chunk(self) -> int:
        return self.block_size * self.blocks_per_chunk

    def validate(self) -> "OffloadConfig":
        for name in ("block_size", "blocks_per_chunk", "num_cpu_chunks", "bytes_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"offload.{name} must be >= 1, got {getattr(self, name)}")
        if not self.bandwidth > 0 or self.latency < 0:
            raise ValueError("offload.bandwidth must be > 0 and offload.latency >= 0")
        return self


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- the worker's transfer engine (shared with the real driver) ------------------------------

class TransferFailed(RuntimeError):
    """A KV transfer failed. vLLM's offloading worker ``assert``s success, so the engine dies;
    ``failed`` names the failed jobs and ``lost`` every job that was still pending."""

    def __init__(self, failed: list[str], lost: list[str], t: float):
        super().__init__(failed, lost, t)
        self.failed, self.lost, self.t = failed, lost, t
        self.batch = None  # async: the StepResult whose execute_model raised (at its schedule())

    def __str__(self) -> str:
        return (f"KV transfer failed at t={self.t:.6f}s ({', '.join(self.failed)}); the offloading worker "
                f"asserts success, so the engine dies with {len(self.lost)} jobs pending")


@dataclass
class Transfer:
    job_id: int
    kind: str      # "store" (GPU -> CPU) | "load" (CPU -> GPU)
    nblocks: int
    submit: float
    end: float
    ok: bool
    waited: bool = False


class TransferEngine:
    """Asynchronous KV transfers on a virtual clock: one FIFO stream per direction; a job takes
    ``latency + bytes / bandwidth`` (times the ``kv_transfer_slow`` factor of its submission
    time) after the previous job on its stream; one submitted in a ``kv_transfer_fail`` window
    fails at its end time. ``poll(now)`` returns the jobs ended by ``now``; ``wait(jobs, now)``
    makes them reportable at once and returns how long a blocking wait would have taken."""

    def __init__(self, config: OffloadConfig):
        self.config = config
        self.slow: list[tuple[float, float, float]] = []
        self.fail: list[tuple[float, float]] = []
        self.free_at = {"store": 0.0, "load": 0.0}
        self.pending: dict[int, Transfer] = {}
        self.now = 0.0  # the real driver sets this before each worker call
        # the end of the forwards launched so far (async: the batch in flight): a store (GPU -> CPU)
        # starts after them, as the transfer stream's wait_stream(compute) makes it on a GPU
        self.compute_done_at = 0.0

    def slow_down(self, start: float, end: float, factor: float) -> None:
        """Fault hook: a job submitted in [start, end) takes ``factor`` times as long."""
        self.slow.append((start, end, factor))

    def fail_between(self, start: float, end: float) -> None:
        """Fault hook: a job submitted in [start, end) fails at its end time."""
        self.fail.append((start, end))

    def duration(self, nblocks: int, submit: float) -> float:
        c = self.config
        d = c.latency + nblocks * c.bytes_per_block / c.bandwidth
        for start, end, factor in self.slow:
            if start <= submit < end:
                d *= factor
        return d

    def submit(self, job_id: int, kind: str, nblocks: int, now: float | None = None) -> None:
        now = self.now if now is None else now
        start = max(now, self.free_at[kind], self.compute_done_at if kind == "store" else now)
        end = start + self.duration(nblocks, now)
        self.free_at[kind] = end
        ok = not any(s <= now < e for s, e in self.fail)
        self.pending[job_id] = Transfer(job_id, kind, nblocks, now, end, ok)

    def wait(self, job_ids: Iterable[int], now: float | None = None) -> float:
        now = self.now if now is None else now
        blocked = 0.0
        for jid in job_ids:
            tr = self.pending.get(jid)
            if tr is not None:
                tr.waited = True
                blocked = max(blocked, tr.end - now)
        return blocked

    def poll(self, now: float | None = None) -> list[Transfer]:
        now = self.now if now is None else now
        done = [tr for tr in self.pending.values() if tr.waited or tr.end <= now]
        done.sort(key=lambda tr: (tr.end, tr.job_id))
        for tr in done:
            del self.pending[tr.job_id]
        return done

    def next_event(self, now: float) -> float | None:
        """The next time a transfer ends (for an engine loop that sleeps until then)."""
        ends = [tr.end for tr in self.pending.values() if tr.end > now]
        return min(ends) if ends else None


# ---- canonical names and the step's KV events ------------------------------------------------

class JobNames:
    """job id -> canonical name (``r3:S0``, ``r3:L0#2``), and offload key -> (req, chunk) owner."""

    def __init__(self):
        self.names: dict[int, str] = {}
        self._count: dict[str, int] = {}
        self.owner: dict[Any, tuple[str, int]] = {}

    def name(self, job_id: int, req_id: str, kind: str, chunks: list[int]) -> str:
        base = f"{req_id}:{kind}{chunks[0] if chunks else '-'}"
        n = self._count.get(base, 0) + 1
        self._count[base] = n
        name = base if n == 1 else f"{base}#{n}"
        self.names[job_id] = name
        return name

    def __getitem__(self, job_id: int) -> str:
        return self.names[job_id]


class KVEvents:
    """Collects one step's KV events; ``take()`` returns the canonical dict (or None)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.store: list = []
        self.load: list = []
        self.flush: list[str] = []
        self.done: list[str] = []
        self.present: dict[str, list[int]] = {}
        self.nostore: dict[str, list[int]] = {}
        self.evict: list = []
        self.delayed: list[str] = []
        self.wait = 0.0

    def take(self) -> dict | None:
        kv: dict = {}
        if self.store:
            kv["store"] = sorted(self.store)
        if self.load:
            kv["load"] = sorted(self.load)
        if self.flush:
            kv["flush"] = sorted(self.flush)
        if self.done:
            kv["done"] = sorted(self.done)
        if self.present:
            kv["present"] = sorted([r, sorted(c)] for r, c in self.present.items())
        if self.nostore:
            kv["nostore"] = sorted([r, sorted(set(c))] for r, c in self.nostore.items())
        if self.evict:
            kv["evict"] = sorted(self.evict)
        if self.delayed:
            kv["delayed"] = sorted(self.delayed)
        if self.wait > 0:
            kv["wait"] = round(self.wait, 9)
        self.reset()
        return kv or None


# ---- the CPU pool: CPUOffloadingManager + LRUCachePolicy ------------------------------------

HIT, HIT_PENDING, MISS = "hit", "hit_pending", "miss"


class _Block:
    __slots__ = ("ref_cnt", "block_id")

    def __init__(self, block_id: int):
        self.ref_cnt = -1  # not ready until complete_store
        self.block_id = block_id

    @property
    def is_ready(self) -> bool:
        return self.ref_cnt >= 0


@dataclass
class PrepareStoreOutput:
    keys_to_store: list
    evicted_keys: list


class CPUOffloadingManager:
    """The CPU pool, with vLLM's per-version LRU policy (see the module docstring)."""

    def __init__(self, num_blocks: int, new_lru: bool, order_key: Callable[[Any], Any] | None = None):
        self._num_blocks = num_blocks
        self._num_allocated_blocks = 0
        self._free_list: list[int] = []
        self.new_lru = new_lru
        self.blocks: dict | OrderedDict = {} if new_lru else OrderedDict()
        self.evictable: OrderedDict = OrderedDict()  # 0.24+ only
        self._num_evictable = 0
        # the order in which a job's key *set* is completed (vLLM iterates a set of bytes: the
        # real driver normalises it to chunk order, and so does the model)
        self.order_key = order_key

    def _ordered(self, keys):
        return sorted(keys, key=self.order_key) if self.order_key is not None else list(keys)

    def _num_free(self) -> int:
        return len(self._free_list) + self._num_blocks - self._num_allocated_blocks

    def lookup(self, key) -> str:
        block = self.blocks.get(key)
        if block is None:
            return MISS
        return HIT if block.is_ready else HIT_PENDING

    def prepare_load(self, keys) -> None:
        for key in keys:
            block = self.blocks[key]
            assert block.is_ready
            if self.new_lru and block.ref_cnt == 0:
                del self.evictable[key]
                self._num_evictable -= 1
            block.ref_cnt += 1

    def touch(self, keys) -> None:
        target = self.evictable if self.new_lru else self.blocks
        for key in reversed(list(keys)):
            if key in target:
                target.move_to_end(key)

    def complete_load(self, keys) -> None:
        for key in self._ordered(keys):
            block = self.blocks[key]
            assert block.ref_cnt > 0
            block.ref_cnt -= 1
            if self.new_lru and block.ref_cnt == 0:
                self._num_evictable += 1
                self.evictable[key] = None

    def _evict(self, n: int, protected: set) -> list | None:
        if n == 0:
            return []
        cands = []
        if self.new_lru:
            for key in self.evictable:
                if key in protected:
                    continue
                cands.append(key)
                if len(cands) == n:
                    break
        else:
            for key, block in self.blocks.items():
                if block.ref_cnt == 0 and key not in protected:
                    cands.append(key)
                    if len(cands) == n:
                        break
        if len(cands) < n:
            return None
        for key in cands:
            if self.new_lru:
                del self.evictable[key]
            self._free_list.append(self.blocks.pop(key).block_id)
        return cands

    def prepare_store(self, keys: list) -> PrepareStoreOutput | None:
        keys_to_store = [k for k in keys if k not in self.blocks]
        if not keys_to_store:
            return PrepareStoreOutput([], [])
        n_evict = len(keys_to_store) - self._num_free()
        evicted: list = []
        if n_evict > 0:
            if self.new_lru and n_evict > self._num_evictable:
                return None
            got = self._evict(n_evict, set(keys))
            if got is None:
                return None
            if self.new_lru:
                self._num_evictable -= len(got)
            evicted = got
        num_fresh = min(len(keys_to_store), self._num_blocks - self._num_allocated_blocks)
        ids = list(range(self._num_allocated_blocks, self._num_allocated_blocks + num_fresh))
        self._num_allocated_blocks += num_fresh
        ids += [self._free_list.pop() for _ in range(len(keys_to_store) - num_fresh)]
        for key, bid in zip(keys_to_store, ids):
            self.blocks[key] = _Block(bid)
        return PrepareStoreOutput(keys_to_store, evicted)

    def complete_store(self, keys) -> None:
        for key in self._ordered(keys):
            block = self.blocks.get(key)
            if block is not None and not block.is_ready:
                block.ref_cnt = 0
                if self.new_lru:
                    self._num_evictable += 1
                    self.evictable[key] = None


# ---- the scheduler side ---------------------------------------------------------------------

@dataclass
class _ReqState:
    req: Any
    offload_keys: list = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    next_stored_chunk_idx: int = 0
    num_locally_computed_tokens: int = 0
    transfer_jobs: set[int] = field(default_factory=set)
    key_index: dict = field(default_factory=dict)


@dataclass
class _Job:
    req_id: str
    keys: set
    is_store: bool
    block_ids: list[int]
    chunks: list[int]
    pending_count: int = 1


@dataclass
class StoreJob:
    req_id: str
    block_ids: list[int]   # GPU source blocks
    chunks: list[int]


@dataclass
class LoadJob:
    req_id: str
    block_ids: list[int]   # GPU destination blocks
    chunks: list[int]


@dataclass
class OffloadingConnectorMetadata:
    load_jobs: dict[int, LoadJob]
    store_jobs: dict[int, StoreJob]
    jobs_to_flush: set[int]


@dataclass
class SchedOut:
    """What ``build_connector_meta`` reads of vLLM's ``SchedulerOutput``.

    ``req_data``: ``(req_id, new_block_ids or None, resumed)`` in ``yield_req_data`` order (new
    requests, then cached ones); ``num_scheduled_tokens`` in scheduling order.
    """

    req_data: list[tuple[str, list[int] | None, bool]]
    num_scheduled_tokens: dict[str, int]
    finished_req_ids: Iterable[str] = ()
    preempted_req_ids: Iterable[str] = ()


class OffloadingConnectorScheduler:
    """The scheduler side. ``req`` objects need vLLM's ``request_id``, ``num_tokens``,
    ``num_prompt_tokens``, ``num_computed_tokens``, ``block_hashes`` and ``is_finished()``;
    block ids are those of the GPU block pool (0 = the null block)."""

    def __init__(self, config: OffloadConfig, policy: OffloadPolicy, *, prefix_caching: bool = True,
                 events: KVEvents | None = None, names: JobNames | None = None):
        self.config = config.validate()
        self.policy = policy
        self.block_size = config.block_size
        self.blocks_per_chunk = config.blocks_per_chunk
        self.tokens_per_chunk = config.tokens_per_chunk
        self.events = events if events is not None else KVEvents()
        self.names = names if names is not None else JobNames()
        self.manager = CPUOffloadingManager(config.num_cpu_chunks, new_lru=policy.new,
                                            order_key=self._key_order)
        self._req_status: dict[str, _ReqState] = {}
        self._current_batch_load_jobs: dict[int, LoadJob] = {}
        self._current_batch_jobs_to_flush: set[int] = set()
        self._current_batch_allocated_block_ids: set[int] = set()
        self._chunks_being_loaded: set | None = set() if prefix_caching else None
        self._job_counter = 0
        self._jobs: dict[int, _Job] = {}
        self._block_id_to_pending_jobs: dict[int, set[int]] = {}

    def _key_order(self, key):
        return self.names.owner.get(key, ("", 0))

    # -- helpers ----------------------------------------------------------------------------

    def _update_offload_keys(self, st: _ReqState) -> None:
        hpc = self.blocks_per_chunk
        hashes = st.req.block_hashes
        keys = st.offload_keys
        for i in range(hpc * len(keys) + hpc - 1, len(hashes), hpc):
            st.key_index[hashes[i]] = len(keys)
            keys.append(hashes[i])

    def _generate_job_id(self) -> int:
        jid = self._job_counter
        self._job_counter += 1
        return jid

    def _remove_pending_job(self, job_id: int, block_ids) -> None:
        for bid in block_ids or ():
            pending = self._block_id_to_pending_jobs[bid]
            pending.remove(job_id)
            if not pending:
                del self._block_id_to_pending_jobs[bid]

    def _maybe_cleanup_finished_req(self, req_id: str, st: _ReqState) -> None:
        if st.req.is_finished() and not st.transfer_jobs:
            del self._req_status[req_id]

    def _advance_stored_idx(self, st: _ReqState, num_offloadable_tokens: int) -> None:
        n = num_offloadable_tokens // self.tokens_per_chunk
        st.next_stored_chunk_idx = max(st.next_stored_chunk_idx, n) if self.policy.new else n

    def _chunks(self, st: _ReqState, keys) -> list[int]:
        return sorted(st.key_index[k] for k in keys)

    # -- connector API ----------------------------------------------------------------------

    def on_new_request(self, request) -> None:
        self._req_status[request.request_id] = _ReqState(request)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._req_status[request.request_id]
        st.block_ids.clear()
        if self.policy.new and st.transfer_jobs:
            self.events.delayed.append(request.request_id)
            return None, False
        self._update_offload_keys(st)
        st.num_locally_computed_tokens = num_computed_tokens
        hits = self._lookup(st)
        self.manager.touch(st.offload_keys)
        if hits is None:
            self.events.delayed.append(request.request_id)
        return hits, bool(hits)

    def _lookup(self, st: _ReqState) -> int | None:
        tpc = self.tokens_per_chunk
        num_computed = st.num_locally_computed_tokens
        keys = st.offload_keys
        max_hit = min(st.req.num_tokens, len(keys) * tpc)
        if max_hit - num_computed < tpc:
            return 0
        num_chunks = min(cdiv(max_hit, tpc), len(keys))
        start = num_computed // tpc
        hit, defer = 0, False
        for key in keys[start:num_chunks]:
            r = self.manager.lookup(key)
            if r == HIT:
                hit += 1
            elif r == HIT_PENDING:
                defer = True
                hit += 1
            else:
                break
        if hit == 0:
            return 0
        if not defer:
            max_hit = min(max_hit, tpc * (start + hit))
        num_hit = max_hit - num_computed
        if num_hit < tpc:
            return 0
        if defer:
            return None
        if self._chunks_being_loaded:
            end = cdiv(num_computed + num_hit, tpc)
            if any(k in self._chunks_being_loaded for k in keys[start:end]):
                return None
        return num_hit

    def update_state_after_alloc(self, request, block_ids: list[int], num_external_tokens: int,
                                 num_hashed_blocks: int | None = None) -> None:
        """``block_ids``: the request's GPU blocks; ``num_hashed_blocks``: how many leading ones
        carry a block hash (the local prefix-cache hits; default: the local hit tokens' blocks)."""
        if num_external_tokens == 0:
            return
        st = self._req_status[request.request_id]
        n_local = st.num_locally_computed_tokens
        n_cached = n_local + num_external_tokens
        self._current_batch_allocated_block_ids.update(b for b in block_ids if b != 0)
        bs, bpc = self.block_size, self.blocks_per_chunk
        num_gpu_blocks = cdiv(n_cached, bs)
        if num_hashed_blocks is None:
            num_hashed_blocks = n_local // bs
        local_blocks = min(num_hashed_blocks, num_gpu_blocks)
        num_pending = num_gpu_blocks - local_blocks
        num_chunks = cdiv(n_cached, self.tokens_per_chunk)
        keys_to_load = list(st.offload_keys[local_blocks // bpc:num_chunks]) if num_pending else []
        dst = list(block_ids[local_blocks:num_gpu_blocks])
        st.next_stored_chunk_idx = num_chunks
        self.manager.prepare_load(keys_to_load)
        job_id = self._generate_job_id()
        chunks = self._chunks(st, keys_to_load)
        self._current_batch_load_jobs[job_id] = LoadJob(request.request_id, dst, chunks)
        assert not st.transfer_jobs, f"load for {request.request_id} while jobs are in flight"
        st.transfer_jobs.add(job_id)
        self._jobs[job_id] = _Job(request.request_id, set(keys_to_load), False, [], chunks)
        if self._chunks_being_loaded is not None:
            self._chunks_being_loaded.update(keys_to_load)
        name = self.names.name(job_id, request.request_id, "L", chunks)
        self.events.load.append([name, request.request_id, chunks])

    def _update_req_states(self, so: SchedOut) -> None:
        for req_id, new_block_ids, resumed in so.req_data:
            st = self._req_status[req_id]
            self._update_offload_keys(st)
            if resumed:
                st.block_ids.clear()
            if new_block_ids:
                st.block_ids.extend(new_block_ids)
                self._current_batch_allocated_block_ids.update(b for b in new_block_ids if b != 0)

    def build_connector_meta(self, so: SchedOut) -> OffloadingConnectorMetadata:
        pol = self.policy
        self._update_req_states(so)
        flush = self._current_batch_jobs_to_flush
        if pol.flush_preempted:
            for req_id in so.preempted_req_ids or ():
                st = self._req_status.get(req_id)
                if st is None or not st.transfer_jobs:
                    continue
                assert self._jobs[next(iter(st.transfer_jobs))].is_store
                flush.update(st.transfer_jobs)
        if (pol.flush_fenced and self._block_id_to_pending_jobs
                and not self._block_id_to_pending_jobs.keys().isdisjoint(self._current_batch_allocated_block_ids)):
            flush.update(jid for bid in self._current_batch_allocated_block_ids
                         if bid in self._block_id_to_pending_jobs
                         for jid in self._block_id_to_pending_jobs[bid])
        if pol.flush_all_when_finished and self._req_status and all(
                st.req.is_finished() for st in self._req_status.values()):
            flush.update(self._jobs.keys())
        store_jobs = self._build_store_jobs(so)
        meta = OffloadingConnectorMetadata(self._current_batch_load_jobs, store_jobs, flush)
        self.events.flush.extend(self.names[j] for j in flush)
        self._current_batch_load_jobs = {}
        self._current_batch_jobs_to_flush = set()
        self._current_batch_allocated_block_ids = set()
        return meta

    def _build_store_jobs(self, so: SchedOut) -> dict[int, StoreJob]:
        pol, cfg, ev = self.policy, self.config, self.events
        bpc, tpc = self.blocks_per_chunk, self.tokens_per_chunk
        store_jobs: dict[int, StoreJob] = {}
        order = list(so.num_scheduled_tokens)
        if pol.new:
            order += list(so.finished_req_ids or ())
        for req_id in order:
            st = self._req_status.get(req_id)
            if st is None:
                continue
            req = st.req
            finished = pol.new and req.is_finished()
            if finished:
                n_after = req.num_tokens
            else:
                n_after = req.num_computed_tokens + so.num_scheduled_tokens[req_id]
            n_off = min(n_after, req.num_tokens) if pol.clamp_to_num_tokens else n_after
            if cfg.offload_prompt_only:
                n_off = min(n_off, req.num_prompt_tokens)
            num_chunks = n_off // tpc
            start = st.next_stored_chunk_idx
            new_keys: list = []
            if num_chunks > start:
                keys = st.offload_keys[start:num_chunks]
                bids = st.block_ids[start * bpc + bpc - 1:num_chunks * bpc:bpc]
                if not pol.clamp_to_num_tokens:  # (the mutant) chunks past the known tokens have no key yet
                    bids = bids[:len(keys)]
                assert len(keys) == len(bids), (req_id, len(keys), len(bids))
                new_keys = [k for k, b in zip(keys, bids) if b != 0]
            if not new_keys:
                self._advance_stored_idx(st, n_off)
                if pol.new:
                    self._maybe_cleanup_finished_req(req_id, st)
                continue
            out = self.manager.prepare_store(new_keys)
            if out is None:
                ev.nostore.setdefault(req_id, []).extend(self._chunks(st, new_keys))
                continue
            for key in out.evicted_keys:
                ev.evict.append(list(self.names.owner.get(key, ("?", -1))))
            if len(out.keys_to_store) < len(new_keys):
                kept = set(out.keys_to_store)
                ev.present.setdefault(req_id, []).extend(self._chunks(st, [k for k in new_keys if k not in kept]))
            if not out.keys_to_store:
                self._advance_stored_idx(st, n_off)
                if pol.new:
                    self._maybe_cleanup_finished_req(req_id, st)
                continue
            self.manager.touch(st.offload_keys)
            keys_to_store = set(out.keys_to_store)
            src: list[int] = []
            chunks: list[int] = []
            for idx, key in enumerate(st.offload_keys[start:num_chunks]):
                if key not in keys_to_store:
                    continue
                chunk = start + idx
                chunks.append(chunk)
                self.names.owner.setdefault(key, (req_id, chunk))
                for i in range(bpc):
                    bid = st.block_ids[chunk * bpc + i]
                    if bid != 0:
                        src.append(bid)
            st.next_stored_chunk_idx = max(start, num_chunks) if pol.new else num_chunks
            job_id = self._generate_job_id()
            if st.transfer_jobs:
                assert self._jobs[next(iter(st.transfer_jobs))].is_store
            st.transfer_jobs.add(job_id)
            self._jobs[job_id] = _Job(req_id, keys_to_store, True, src, chunks)
            store_jobs[job_id] = StoreJob(req_id, src, chunks)
            name = self.names.name(job_id, req_id, "S", chunks)
            ev.store.append([name, req_id, chunks])
            if finished:
                for bid in src:
                    self._block_id_to_pending_jobs.setdefault(bid, set()).add(job_id)
                    if bid in self._current_batch_allocated_block_ids and pol.flush_fenced:
                        self._current_batch_jobs_to_flush.add(job_id)
        return store_jobs

    def has_pending_push_work(self) -> bool:
        return self.policy.new and bool(self._jobs)

    def update_connector_output(self, completed_jobs: dict[int, int]) -> None:
        for job_id, count in completed_jobs.items():
            js = self._jobs[job_id]
            js.pending_count -= count
            if js.pending_count > 0:
                continue
            st = self._req_status[js.req_id]
            if js.is_store:
                self.manager.complete_store(js.keys)
            else:
                self.manager.complete_load(js.keys)
                if self._chunks_being_loaded:
                    self._chunks_being_loaded.difference_update(js.keys)
            if self._block_id_to_pending_jobs and st.req.is_finished():
                self._remove_pending_job(job_id, js.block_ids)
            del self._jobs[job_id]
            st.transfer_jobs.remove(job_id)
            if not st.transfer_jobs and st.req.is_finished():
                del self._req_status[js.req_id]
            self.events.done.append(self.names[job_id])

    def request_finished(self, request) -> tuple[bool, None]:
        st = self._req_status.get(request.request_id)
        if st is None:
            return False, None
        if self.policy.new:
            self._update_offload_keys(st)
        elif not st.transfer_jobs:
            del self._req_status[request.request_id]
            return False, None
        for job_id in st.transfer_jobs:
            for bid in self._jobs[job_id].block_ids:
                self._block_id_to_pending_jobs.setdefault(bid, set()).add(job_id)
        return False, None

    # -- reporting ----------------------------------------------------------------------------

    def pending_jobs(self) -> list[str]:
        """Canonical names of the jobs not yet retired (what an engine death loses)."""
        return sorted(self.names[j] for j in self._jobs)


# ---- the worker side ------------------------------------------------------------------------

class OffloadingConnectorWorker:
    """``OffloadingConnectorWorker`` over a :class:`TransferEngine`: stores are deferred to the
    next step's start; jobs to flush are submitted (0.24+: even this step's) and waited for."""

    def __init__(self, engine: TransferEngine, policy: OffloadPolicy, names: JobNames, events: KVEvents):
        self.engine, self.policy, self.names, self.events = engine, policy, names, events
        self._load_jobs: dict[int, str] = {}
        self._unsubmitted_store_jobs: list[tuple[int, StoreJob]] = []

    def handle_preemptions(self, meta: OffloadingConnectorMetadata, now: float) -> None:
        if self.policy.new and meta.jobs_to_flush:
            for job_id in meta.jobs_to_flush:
                entry = meta.store_jobs.pop(job_id, None)
                if entry is not None:
                    self._unsubmitted_store_jobs.append((job_id, entry))
        for job_id, entry in self._unsubmitted_store_jobs:
            self.engine.submit(job_id, "store", len(entry.block_ids), now)
        self._unsubmitted_store_jobs.clear()
        if meta.jobs_to_flush:
            self.events.wait += self.engine.wait(meta.jobs_to_flush, now)

    def start_kv_transfers(self, meta: OffloadingConnectorMetadata, now: float) -> None:
        for job_id, entry in self._unsubmitted_store_jobs:
            self.engine.submit(job_id, "store", len(entry.block_ids), now)
        self._unsubmitted_store_jobs.clear()
        for job_id, entry in meta.load_jobs.items():
            self._load_jobs[job_id] = entry.req_id
            self.engine.submit(job_id, "load", len(entry.block_ids), now)

    def get_finished(self, meta: OffloadingConnectorMetadata, now: float) -> tuple[set[str], dict[int, int]]:
        """-> (finished_recving, completed_jobs). Raises :class:`TransferFailed` like vLLM's assert."""
        for job_id, entry in meta.store_jobs.items():
            self._unsubmitted_store_jobs.append((job_id, entry))
        finished_recving: set[str] = set()
        completed: dict[int, int] = {}
        for tr in self.engine.poll(now):
            if not tr.ok:
                raise TransferFailed([self.names[tr.job_id]], [], now)
            completed[tr.job_id] = 1
            req_id = self._load_jobs.pop(tr.job_id, None)
            if req_id is not None:
                finished_recving.add(req_id)
        return finished_recving, completed
