"""The wall-clock drivers of the real engine: requests served in real time on an in-process engine.

:func:`run_wall_clock` adds each request when the wall clock reaches its arrival and runs
``LLMEngine.step()`` back to back, sleeping only when idle: TTFT/TPOT/E2E and every step's wall
time and batch shape (calibration, fidelity). :func:`run_rounds` serves request rounds one after
another and keeps stepping while a KV connector has work (KV offloading on the GPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ...models.request import RequestSpec
from .real_engine import StepWall, prompt_for, sampling_for, scheduler_of


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
