"""What one engine step decided: the contract between the engine loop and a scheduler core.

A *scheduler core* is anything with this shape (the simulator's :class:`models.scheduler.Scheduler`
and the real-vLLM adapters in ``harness.drivers.real_*`` both are)::

    add_request(spec: RequestSpec, now: float) -> None
    schedule(now: float) -> StepResult             # mirrors Scheduler.schedule()
    update_from_output(result: StepResult, now: float) -> list[Finished]
                                                   # mirrors Scheduler.update_from_output()
    has_unfinished_requests() -> bool
    counts() -> tuple[int, int]                    # (running, waiting incl. skipped)
    shutdown() -> None

The engine loop (:mod:`models.engine`) owns the virtual clock, arrivals, step times, faults
and the trace; a core owns only scheduling decisions. Two cores fed the same workload therefore
produce traces that differ only where their decisions differ.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

EOS_TOKEN_ID = 2


def sampled_token(req_id: str, index: int, stop_at: int | None) -> int:
    """The token a deterministic model runner samples as output number `index` (1-based)."""
    if stop_at is not None and index == stop_at:
        return EOS_TOKEN_ID
    return 3 + (hash_str(req_id) + 31 * index) % 1000


@functools.lru_cache(maxsize=1 << 14)  # called per sampled token: the live requests' ids stay cached
def hash_str(s: str) -> int:
    h = 0
    for ch in s.encode():
        h = (h * 131 + ch) % 1_000_000_007
    return h


@dataclass
class StepResult:
    """One step's decisions, in the order the scheduler made them."""

    sched: dict[str, int] = field(default_factory=dict)        # req -> tokens scheduled
    computed_before: dict[str, int] = field(default_factory=dict)  # req -> num_computed_tokens before
    prompt_len: dict[str, int] = field(default_factory=dict)   # req -> num_prompt_tokens (for the shape)
    deferred: list[str] = field(default_factory=list)          # skipped: EC prefetch in flight
    preempted: list[str] = field(default_factory=list)
    enc: dict[str, list[int]] = field(default_factory=dict)    # encoder inputs computed locally
    ec_loaded: list[str] = field(default_factory=list)         # items loaded from the EC connector
    kv: dict | None = None                                     # KV offload events of this step
    sampling: set[str] | None = None                           # async scheduling: the requests that sample

    def shape(self) -> tuple[int, int, int]:
        """(prefill tokens, decode requests, context tokens): the linear step-time model's inputs."""
        _, prefill_tokens, prefill_kv, decode, decode_kv = self.batch_shape()
        return prefill_tokens, decode, prefill_kv + decode_kv

    def batch_shape(self) -> tuple[int, int, int, int, int]:
        """(num_prefill_requests, sum_prefill_tokens, sum_prefill_kv_tokens, num_decode_requests,
        sum_decode_kv_tokens), as Dynamo's ForwardPassMetrics and aiconfigurator take it: a request
        is a decode request when it schedules 1 token past its prompt; the KV sums are the tokens
        computed before this step."""
        decode = context = decode_kv = 0
        computed_before, prompt_len = self.computed_before, self.prompt_len
        for rid, n in self.sched.items():
            before = computed_before[rid]
            context += before
            if n == 1 and before >= prompt_len[rid]:
                decode += 1
                decode_kv += before
        return (len(self.sched) - decode, sum(self.sched.values()) - decode, context - decode_kv, decode,
                decode_kv)


@dataclass(frozen=True)
class Finished:
    req_id: str
    status: str        # "length" | "stop"
    num_output: int


@dataclass(slots=True)
class DecodeBatch:
    """A step of a macro-step (models/engine.py): every request of ``sched`` decodes one token,
    with ``context`` tokens computed before it in all; the shape of the StepResult such a step
    would have, for the step-time backends."""

    sched: dict[str, int]
    context: int

    def shape(self) -> tuple[int, int, int]:
        return 0, len(self.sched), self.context

    def batch_shape(self) -> tuple[int, int, int, int, int]:
        return 0, 0, 0, len(self.sched), self.context
