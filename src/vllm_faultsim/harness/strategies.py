"""Hypothesis strategies for workloads, engine configs and fault plans (exported for users).

    from vllm_faultsim.harness.strategies import workloads, scheduler_configs, fault_plans

Workloads mix text and multimodal requests of varied lengths; ``scheduler_configs`` can force KV
pressure (few GPU blocks, so requests are preempted); ``fault_plans`` draw from the kinds the
simulator models. Every strategy shrinks towards small, simple cases.
"""

from __future__ import annotations

from hypothesis import strategies as st

from ..faults.plan import validate_plan
from ..models.scheduler import SchedulerConfig
from .workload import MMItem, RequestSpec, validate


PREFETCH = st.one_of(st.none(), st.sampled_from([0.0, 0.002, 0.02, 0.1]))


@st.composite
def request_specs(draw, index: int, *, max_prompt: int = 300, max_output: int = 24, mm: bool = True,
                  max_arrival: float = 0.5) -> RequestSpec:
    """A request: text or multimodal, optionally sharing a prefix (and the image in it) with
    others of its group, so prefix-cache hits can cover images."""
    prompt = draw(st.integers(1, max_prompt))
    output = draw(st.integers(1, max_output))
    prefix, items = None, []
    if prompt >= 16 and draw(st.booleans()):
        group = draw(st.integers(0, 1))
        prefix = (group, min(prompt, draw(st.sampled_from([16, 32, 48]))))
        if mm and draw(st.booleans()):
            items.append(MMItem(f"pfx{group}", 0, 8, draw(PREFETCH)))   # the image inside the shared prefix
    lo = items[-1].offset + items[-1].length if items else 0
    if mm and prompt - lo >= 12 and draw(st.booleans()):
        length = draw(st.integers(4, max(4, (prompt - lo) // 3)))
        for j, off in enumerate(sorted(draw(st.lists(st.integers(lo, prompt - length), min_size=1, max_size=2,
                                                      unique=True)))):
            if off >= lo:
                # a shared identifier names the same image (same length) across requests: encoder-cache hits
                name = draw(st.sampled_from([f"img{index}_{j}", f"shared{length}"]))
                if all(m.identifier != name for m in items):
                    items.append(MMItem(name, off, length, draw(PREFETCH)))
                    lo = off + length
    stop_at = draw(st.one_of(st.none(), st.integers(1, output)))
    arrival = draw(st.floats(0.0, max_arrival, allow_nan=False).map(lambda x: round(x, 4)))
    return RequestSpec(f"r{index}", arrival, prompt, output, tuple(items), prefix, stop_at)


@st.composite
def workloads(draw, *, min_size: int = 1, max_size: int = 12, mm: bool = True, max_prompt: int = 300,
              max_output: int = 24) -> tuple[RequestSpec, ...]:
    n = draw(st.integers(min_size, max_size))
    specs = [draw(request_specs(i, max_prompt=max_prompt, max_output=max_output, mm=mm)) for i in range(n)]
    return validate(specs)


@st.composite
def scheduler_configs(draw, *, kv_pressure: bool | None = None, max_prompt: int = 300,
                      max_output: int = 24, async_scheduling: bool = True) -> SchedulerConfig:
    """Configs under which every request of `workloads(max_prompt, max_output)` fits the KV cache
    on its own (so a run cannot stall), with KV pressure (preemptions) when asked for, in the
    scheduling mode asked for (vLLM 0.26.0's default: async)."""
    block_size = draw(st.sampled_from([4, 8, 16]))
    one_request = -(-(max_prompt + max_output) // block_size) + 1
    pressure = draw(st.booleans()) if kv_pressure is None else kv_pressure
    blocks = (draw(st.integers(one_request + 1, 2 * one_request)) if pressure
              else draw(st.integers(8 * one_request, 12 * one_request)))
    return SchedulerConfig(
        enable_prefix_caching=draw(st.booleans()),
        max_num_seqs=draw(st.integers(1, 8)),
        max_num_batched_tokens=draw(st.sampled_from([32, 64, 128, 512, 2048])),
        block_size=block_size,
        num_gpu_blocks=blocks,
        max_model_len=max_prompt + max_output + 8,
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 48])),
        encoder_compute_budget=draw(st.sampled_from([max_prompt, 2 * max_prompt])),
        encoder_cache_size=draw(st.sampled_from([max_prompt, 2 * max_prompt])),
        async_scheduling=async_scheduling,
    )


@st.composite
def fault_plans(draw, *, kinds: tuple[str, ...] = ("slow_steps", "ec_prefetch_stall", "ec_prefetch_fail"),
                horizon: float = 2.0, items: tuple[str, ...] = ("*",)):
    faults = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(kinds))
        if kind == "slow_steps":
            start = draw(st.floats(0, horizon).map(lambda x: round(x, 3)))
            faults.append({"kind": kind, "start": start, "end": round(start + draw(st.floats(0.01, horizon)), 3),
                           "factor": draw(st.sampled_from([0.5, 2.0, 10.0]))})
        elif kind == "ec_prefetch_stall":
            faults.append({"kind": kind, "item": draw(st.sampled_from(items)),
                           "delay": draw(st.sampled_from([0.01, 0.2, 1.0]))})
        elif kind == "ec_prefetch_fail":
            faults.append({"kind": kind, "item": draw(st.sampled_from(items))})
        elif kind == "kill_engine":
            faults.append({"kind": kind, "at": draw(st.floats(0, horizon).map(lambda x: round(x, 3)))})
    return validate_plan({"version": 1, "faults": faults}, "<generated>")
