"""Deliberately broken twins (mutants): each breaks one vLLM rule, and the check that claims to
judge that rule must catch it. They live here, beside the checkers, not in any user config.

- scheduler (``vllm-faultsim diff --mutant NAME``; tests/diff): subclasses of the simulated
  ``Scheduler`` that break PR #41627's deferral rules or full-sequence admission, and the
  ``all-features`` EC connector policy (waits for features already computed too);
- EPLB (runs/eplb.py ``run_check``; tests/sim/test_eplb.py): subclasses of ``EplbState`` whose
  worker publishes without syncing its stream, or all layers at once.

The KV-offload mutants are policy variants of models/kv_offload.py (``OffloadPolicy.mutant``), and
the engine-process mutants named liveness policies of models/engine_procs.py (``mutant:...``).
"""

from __future__ import annotations

from ..models.eplb import EplbState
from ..models.scheduler import Scheduler


class _StopAtDeferred(Scheduler):
    continue_past_deferred = False


class _RequeueAtBack(Scheduler):
    requeue_skipped_at_front = False


class _NoFullAdmission(Scheduler):
    admit_full_sequence = False


# name -> (scheduler class, EC connector policy), applied to the simulator side of a diff
SCHEDULER_MUTANTS: dict[str, tuple[type[Scheduler], str]] = {
    "ec-stop-at-deferred": (_StopAtDeferred, "future-only"),  # break at the first deferred request
    "ec-check-all-features": (Scheduler, "all-features"),     # wait for past features too
    "ec-requeue-back": (_RequeueAtBack, "future-only"),       # deferred request to the back
    "no-full-admission": (_NoFullAdmission, "future-only"),   # admit when the first chunk fits
}


class _NoStreamSync(EplbState):
    sync_stream_before_publish = False


class _PublishAllAtOnce(EplbState):
    publish_each_layer = False


EPLB_MUTANTS: dict[str, type[EplbState]] = {
    "publish-all-at-once": _PublishAllAtOnce,  # one step consumes every layer
    "no-stream-sync": _NoStreamSync,           # published before the copy finished
}
