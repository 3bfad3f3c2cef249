"""Deliberately broken twins (mutants): each breaks one vLLM rule, and the check that claims to
judge that rule must catch it. They live here, beside the checkers, not in any user config.

- scheduler (``vllm-faultsim diff --mutant NAME``; tests/diff): subclasses of the simulated
  ``Scheduler`` that break PR #41627's deferral rules or full-sequence admission, and the
  ``all-features`` EC connector policy (waits for features already computed too);
- async scheduling (the same; ``ASYNC`` names those that only an async run can show): no output
  placeholders, blocks cached without subtracting the placeholders, a batch queue of 1 under the
  AsyncScheduler, and outputs applied in the step that produced them;
- EPLB (runs/eplb.py ``run_check``; tests/sim/test_eplb.py): subclasses of ``EplbState`` whose
  worker publishes without syncing its stream, or all layers at once.

The KV-offload mutants are policy variants of models/kv_offload.py (``OffloadPolicy.mutant``), and
the engine-process mutants named liveness policies of models/engine_procs.py (``mutant:...``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.engine import EngineCore
from ..models.eplb import EplbState
from ..models.scheduler import Scheduler


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
    "no-placeholders": Mutant(_NoPlaceholders),                  # async: decode without placeholders
    "cache-with-placeholders": Mutant(_CacheWithPlaceholders),   # async: cache_blocks(num_computed_tokens)
    "batch-queue-1": Mutant(engine_cls=_QueueOfOne),             # async scheduler, no batch queue
    "outputs-in-same-step": Mutant(engine_cls=_OutputsAtOnce),   # output applied in the step that made it
}
ASYNC = ("no-placeholders", "cache-with-placeholders", "batch-queue-1", "outputs-in-same-step")
KV_CONNECTOR = ("ec-local-tokens-only",)  # shown only with a KV connector offering external tokens


class _NoStreamSync(EplbState):
    sync_stream_before_publish = False


class _PublishAllAtOnce(EplbState):
    publish_each_layer = False


EPLB_MUTANTS: dict[str, type[EplbState]] = {
    "publish-all-at-once": _PublishAllAtOnce,  # one step consumes every layer
    "no-stream-sync": _NoStreamSync,           # published before the copy finished
}
