"""Deliberately broken twins (mutants): each breaks one vLLM rule, and the check that claims to
judge that rule must catch it. They live here, beside the checkers, not in any user config.

- scheduler (``vllm-faultsim diff --mutant NAME``; tests/diff): subclasses of the simulated
  ``Scheduler`` that break PR #41627's deferral rules or full-sequence admission, and the
  ``all-features`` EC connector policy (waits for features already computed too);
- async scheduling (the same; ``ASYNC`` names those that only an async run can show): no output
  placeholders, blocks cached without subtracting the placeholders, a batch queue of 1 under the
  AsyncScheduler, and outputs applied in the step that produced them;
- macro-steps (tests/sim/test_macro_steps.py: the same trace with and without them): a decode run
  (``Scheduler.decode_run``) that runs past a request's finish, or past the block the pool cannot
  give (where the per-step loop preempts); a decode cohort (steady decodes advanced lazily,
  ``Scheduler._cohort_round``) that finishes a member at max_tokens past its EOS, or that, with prefix
  caching, never caches its members' full blocks (the per-step loop catches up only when it dissolves);
- EPLB (runs/eplb.py ``run_check``; tests/sim/test_eplb.py): subclasses of ``EplbState`` whose
  worker publishes without syncing its stream, or all layers at once.
- DP load balancing (runs/dp_lb.py; tests/diff/test_dp_lb_real.py): a ``DPLoadBalancer`` that weighs a
  waiting request like a running one, a ``DPCoordinator`` that publishes the latest counts where
  vLLM publishes the previous step's.
- deployments (checkers/deploy.py; tests/sim/test_deploy.py): a DP server whose rank's death takes
  down only that rank (vLLM's engine-core monitor ends the whole server).

- engine processes (runs/procs.py ``run_fault_matrix``; tests/sim/test_engine_procs.py): liveness
  policies of models/engine_procs.py that name a clean exit as the failure, shut nobody down, or skip
  the EC connector's shutdown drain.
- KV offload (runs/offload.py; tests/diff/test_offload_real.py): ``OffloadPolicy`` rule switches of
  models/kv_offload.py turned off: no flush of a preempted request's stores, of a job whose block is
  re-allocated, or 0.23.0 without PR #42611's flush-all; and, shown only under async scheduling,
  offloadable tokens not clamped to ``req.num_tokens`` (the placeholders of the batches in flight
  counted: ``offload-placeholders``);
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..models.cluster import Server
from ..models.dp_lb import DPCoordinator, DPLoadBalancer
from ..models.engine import EngineCore
from ..models.engine_procs import POLICIES, LivenessPolicy
from ..models.kv_offload import OffloadPolicy
from ..models.eplb import EplbState
from ..models.scheduler import Scheduler
from ..models.shutdown_drain import DRAIN_POLICIES


class _StopAtDeferred(Scheduler):
    continue_past_deferred = False


class _RequeueAtBack(Scheduler):
    requeue_skipped_at_front = False


class _NoFullAdmission(Scheduler):
    admit_full_sequence = False


class _EcLocalTokensOnly(Scheduler):
    ec_sees_external_tokens = False


class _NoPlaceholders(Scheduler):
    use_output_placeholders = False


class _CacheWithPlaceholders(Scheduler):
    cache_less_placeholders = False


class _FreeAtOnce(Scheduler):
    defers_freed_blocks = False


class _FreeInOrder(Scheduler):
    frees_hashless_first = False


class _DecodeRunPastFinish(Scheduler):
    decode_run_stops_at_finish = False


class _DecodeRunPastPool(Scheduler):
    decode_run_fits_the_pool = False


class _CohortPastEos(Scheduler):
    cohort_finishes_at_eos = False


class _CohortUncached(Scheduler):
    cohort_caches_blocks = False


MACRO_MUTANTS: dict[str, type[Scheduler]] = {
    "macro-past-finish": _DecodeRunPastFinish,  # a macro-step ignores a finish inside it
    "macro-past-pool": _DecodeRunPastPool,      # ... or a block the pool cannot give (a preemption)
    "cohort-past-eos": _CohortPastEos,          # the lazy decode cohort finishes a member at max_tokens, not EOS
    "cohort-uncached": _CohortUncached,         # ... or caches no member's full block (prefix caching)
}


class _QueueOfOne(EngineCore):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "max_concurrent_batches": 1})


class _OutputsAtOnce(EngineCore):
    apply_outputs_late = False


@dataclass(frozen=True)
class Mutant:
    """A broken simulator side: its scheduler, EC connector policy and engine loop."""
    scheduler_cls: type[Scheduler] = Scheduler
    ec_policy: str = "future-only"
    engine_cls: type[EngineCore] = EngineCore


SCHEDULER_MUTANTS: dict[str, Mutant] = {
    "ec-stop-at-deferred": Mutant(_StopAtDeferred),              # break at the first deferred request
    "ec-check-all-features": Mutant(ec_policy="all-features"),   # wait for past features too
    "ec-requeue-back": Mutant(_RequeueAtBack),                   # deferred request to the back
    "no-full-admission": Mutant(_NoFullAdmission),               # admit when the first chunk fits
    "ec-local-tokens-only": Mutant(_EcLocalTokensOnly),          # EC lookup without the KV connector's tokens
    "free-at-once": Mutant(_FreeAtOnce),                         # async + KV connector: no defer_block_free
    "free-in-order": Mutant(_FreeInOrder),                       # freed blocks without a hash not first (0.23.0)
    "no-placeholders": Mutant(_NoPlaceholders),                  # async: decode without placeholders
    "cache-with-placeholders": Mutant(_CacheWithPlaceholders),   # async: cache_blocks(num_computed_tokens)
    "batch-queue-1": Mutant(engine_cls=_QueueOfOne),             # async scheduler, no batch queue
    "outputs-in-same-step": Mutant(engine_cls=_OutputsAtOnce),   # output applied in the step that made it
}
ASYNC = ("no-placeholders", "cache-with-placeholders", "batch-queue-1", "outputs-in-same-step")
KV_CONNECTOR = ("ec-local-tokens-only", "free-at-once")  # shown only with a KV connector offering external tokens


class _NoStreamSync(EplbState):
    sync_stream_before_publish = False


class _PublishAllAtOnce(EplbState):
    publish_each_layer = False


EPLB_MUTANTS: dict[str, type[EplbState]] = {
    "publish-all-at-once": _PublishAllAtOnce,  # one step consumes every layer
    "no-stream-sync": _NoStreamSync,           # published before the copy finished
}


class _WaitingWeightOne(DPLoadBalancer):
    waiting_weight = 1


class _LatestCountsOnly(DPCoordinator):
    keep_previous_step = False


DP_LB_MUTANTS: dict[str, type[DPLoadBalancer | DPCoordinator]] = {
    "waiting-weight-1": _WaitingWeightOne,      # score waiting + running instead of waiting * 4 + running
    "no-previous-step": _LatestCountsOnly,      # no last_step_counts snapshot: always the latest counts
}


class _OneRankDown(Server):
    def _shut_down(self, rank: int, cause: str, latency: float):
        env = self.env
        yield env.timeout(latency)
        self._down(rank, cause)
        self.up = True  # the other ranks serve on
        self.ranks[rank].close()
        yield env.timeout(self.restart_s)
        self.ranks[rank], self.prefetch[rank] = self._build(rank)
        self.going_down = False
        self._up()


DEPLOYMENT_MUTANTS: dict[str, type[Server]] = {
    "dp-death-one-rank": _OneRankDown,   # a DP rank's death takes down that rank only
}


_MP = POLICIES["mp-0.26"]
PROCS_MUTANTS: dict[str, LivenessPolicy] = {
    "mutant:name-exit0": replace(_MP, name="mutant:name-exit0", names_exit0=True),      # exit code 0 named failed
    "mutant:no-shutdown": replace(_MP, name="mutant:no-shutdown", shutdown_on_exit=False),  # nobody shut down
    "mutant:skip-ec-shutdown": replace(_MP, name="mutant:skip-ec-shutdown",              # pre-PR #42423 drain
                                       drain=DRAIN_POLICIES["pre-pr42423"]),
}


OFFLOAD_MUTANTS: dict[str, dict[str, bool]] = {
    "no-preempt-flush": {"flush_preempted": False},  # a preempted request's pending stores not flushed
    "no-fence-flush": {"flush_fenced": False},        # a job whose GPU block is re-allocated not flushed
    "no-flush-all": {"flush_all": False},             # 0.23.0 without PR #42611
    # async only: the tokens of the batches in flight (output placeholders) counted as offloadable,
    # so the chunks past the known tokens are skipped for good (vLLM: min(computed, req.num_tokens))
    "offload-placeholders": {"clamp_to_num_tokens": False},
}


def offload_policy(version: str, mutant: str | None = None) -> OffloadPolicy:
    """The offload policy of ``version``, or its mutant ``mutant``."""
    if mutant is None:
        return OffloadPolicy(version)
    if mutant not in OFFLOAD_MUTANTS:
        raise ValueError(f"unknown offload mutant {mutant!r} (known: {', '.join(OFFLOAD_MUTANTS)})")
    return OffloadPolicy(version, mutant=mutant, **OFFLOAD_MUTANTS[mutant])
