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


@st.composite
def request_specs(draw, index: int, *, max_prompt: int = 300, max_output: int = 24, mm: bool = True,
                  max_arrival: float = 0.5) -> RequestSpec:
    prompt = draw(st.integers(1, max_prompt))
    output = draw(st.integers(1, max_output))
    items: tuple[MMItem, ...] = ()
    if mm and prompt >= 12 and draw(st.booleans()):
        n = draw(st.integers(1, 2))
        length = draw(st.integers(4, max(4, prompt // (2 * n))))
        offsets = sorted(draw(st.lists(st.integers(0, prompt - length), min_size=n, max_size=n, unique=True)))
        kept, end = [], -1
        for off in offsets:
            if off >= end:
                kept.append(off)
                end = off + length
        # a shared identifier names the same image (same length) across requests: encoder-cache hits
        names = [draw(st.sampled_from([f"img{index}_{j}", f"shared0_{length}", f"shared1_{length}"]))
                 for j in range(len(kept))]
        items = tuple(MMItem(name, off, length, draw(st.one_of(st.none(), st.sampled_from([0.0, 0.002, 0.02, 0.1]))))
                      for name, off in zip(dict.fromkeys(names), kept))
    stop_at = draw(st.one_of(st.none(), st.integers(1, output)))
    arrival = draw(st.floats(0.0, max_arrival, allow_nan=False).map(lambda x: round(x, 4)))
    return RequestSpec(f"r{index}", arrival, prompt, output, items, None, stop_at)


@st.composite
def workloads(draw, *, min_size: int = 1, max_size: int = 12, mm: bool = True, max_prompt: int = 300,
              max_output: int = 24) -> tuple[RequestSpec, ...]:
    n = draw(st.integers(min_size, max_size))
    specs = [draw(request_specs(i, max_prompt=max_prompt, max_output=max_output, mm=mm)) for i in range(n)]
    return validate(specs)


@st.composite
def scheduler_configs(draw, *, kv_pressure: bool | None = None, max_prompt: int = 300,
                      max_output: int = 24) -> SchedulerConfig:
    """Configs under which every request of `workloads(max_prompt, max_output)` fits the KV cache
    on its own (so a run cannot stall), with KV pressure (preemptions) when asked for."""
    block_size = draw(st.sampled_from([4, 8, 16]))
    one_request = -(-(max_prompt + max_output) // block_size) + 1
    pressure = draw(st.booleans()) if kv_pressure is None else kv_pressure
    blocks = (draw(st.integers(one_request + 1, 2 * one_request)) if pressure
              else draw(st.integers(8 * one_request, 12 * one_request)))
    return SchedulerConfig(
        max_num_seqs=draw(st.integers(1, 8)),
        max_num_batched_tokens=draw(st.sampled_from([32, 64, 128, 512, 2048])),
        block_size=block_size,
        num_gpu_blocks=blocks,
        max_model_len=max_prompt + max_output + 8,
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 48])),
        encoder_compute_budget=draw(st.sampled_from([max_prompt, 2 * max_prompt])),
        encoder_cache_size=draw(st.sampled_from([max_prompt, 2 * max_prompt])),
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
