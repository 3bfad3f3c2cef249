"""Simulator speed on one core: one hour of a 20 req/s Poisson workload (512 prompt / 128 output
tokens, max_num_seqs 256), summary-only (``keep=frozenset(), full_trace=False``: what a study or
search point runs) and with the full per-step trace written to disk, each with the ``linear``
step time (the default profile) and the ``aic`` one (aiconfigurator-core, Llama-3.1-8B on an
H200), with macro-steps (the default) and without (``macro_steps=False``, the per-step loop).
A decode-heavy hour (1 req/s, 512/1024 tokens), where macro-steps have long stretches to take,
is run beside it, and the 20 req/s hour with vLLM's default prefix caching on (summary-only; the
decode cohort is off there, prompts are hashed and cached block by block). Targets (issue 16):
summary-only >= 1000x real time, full trace >= 300x.
Also the peak memory (ru_maxrss, a fresh process each) of one hour at 100 req/s (overloaded: the
queue holds what has arrived), summary-only and with the req events kept (``keep=False``, what
``vllm-faultsim run`` and the study keep today). Prints and records JSON.

    taskset -c 0 python benchmarks/sim_speed.py [--hours 1] [--out benchmarks/results/sim_speed.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from vllm_faultsim.harness.runs.simulate import RunConfig, simulate, with_scheduler
from vllm_faultsim.models.step_time import check_section, from_config

AIC = {"backend": "aic", "model": "meta-llama/Meta-Llama-3.1-8B", "system": "h200_sxm"}
BACKENDS = {"linear": None, "aic": AIC}


def config(hours: float, rate: float = 20.0, output: int = 128, step_time: dict | None = None,
           enable_prefix_caching: bool = False) -> RunConfig:
    cfg = with_scheduler(RunConfig(workload={"kind": "poisson", "rate": rate, "duration": 3600.0 * hours,
                                             "prompt": 512, "output": output}), max_num_seqs=256,
                         enable_prefix_caching=enable_prefix_caching)
    return cfg if step_time is None else replace(cfg, step_time=check_section(step_time))


def timed(cfg: RunConfig, *, full_trace: bool, macro_steps: bool) -> dict:
    """One run: summary-only, or the full trace written to a file; wall and CPU seconds."""
    from_config(cfg.step_time)  # built (and loaded) before the clock starts
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.jsonl" if full_trace else None
        t0, c0 = time.perf_counter(), time.process_time()
        res = simulate(cfg, trace_path=trace, keep=frozenset(), full_trace=full_trace, macro_steps=macro_steps)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        trace_mib = round(trace.stat().st_size / 2**20, 1) if trace else None
    s = res.summary
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "steps": s["steps"], "requests": s["requests"],
            "sim_time_s": s["sim_time_s"], "sim_over_wall": round(s["sim_time_s"] / wall, 1),
            "sim_over_cpu": round(s["sim_time_s"] / cpu, 1), "us_per_step_cpu": round(1e6 * cpu / s["steps"], 1),
            "trace_mib": trace_mib, "summary": s}


def _peak(cfg: RunConfig, keep, out) -> None:
    t0 = time.perf_counter()
    res = simulate(cfg, keep=keep, full_trace=False)
    out.put({"wall_s": round(time.perf_counter() - t0, 2), "requests": res.summary["requests"],
             "steps": res.summary["steps"], "overloaded": res.overloaded,
             "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})


def peak_memory(cfg: RunConfig, keep) -> dict:
    """Peak memory of a run without the per-step trace, in a fresh process."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_peak, args=(cfg, keep, out))
    p.start()
    res = out.get()
    p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sim_speed.json"))
    args = ap.parse_args()
    runs = []
    for backend, section in BACKENDS.items():
        for workload, kw in (("20 req/s, 512/128", {}), ("decode-heavy: 1 req/s, 512/1024", {"rate": 1.0, "output": 1024}),
                             ("prefix caching on: 20 req/s, 512/128", {"enable_prefix_caching": True})):
            for full_trace in (False, True):
                if kw and full_trace:
                    continue
                for macro in (True, False):
                    r = timed(config(args.hours, step_time=section, **kw), full_trace=full_trace, macro_steps=macro)
                    runs.append({"backend": backend, "workload": workload,
                                 "mode": "full trace" if full_trace else "summary-only", "macro_steps": macro, **r})
                    print(f"{backend:>6} {workload:<36} {runs[-1]['mode']:<12} macro={macro!s:<5}: "
                          f"{r['wall_s']:7.2f} s wall ({r['sim_over_wall']:7.1f}x real time), {r['cpu_s']:7.2f} s CPU "
                          f"({r['sim_over_cpu']:7.1f}x), {r['steps']} steps, {r['us_per_step_cpu']} us/step", flush=True)
    # the same decisions with and without macro-steps: the summaries are equal
    for a, b in zip(runs[::2], runs[1::2]):
        assert a["summary"] == b["summary"], (a, b)
    mem = {"summary-only (keep=frozenset())": peak_memory(config(args.hours, rate=100.0), frozenset()),
           "req events kept (keep=False)": peak_memory(config(args.hours, rate=100.0), False)}
    print(f"peak memory, {args.hours} h at 100 req/s: {mem}", flush=True)

    def best(backend, mode):
        return next(r for r in runs if r["backend"] == backend and r["mode"] == mode and r["macro_steps"]
                    and r["workload"].startswith("20"))
    out = {
        "benchmark": "sim_speed", "hours": args.hours, "aic": AIC, "runs": [{k: v for k, v in r.items() if k != "summary"}
                                                                            for r in runs],
        "targets": {"summary_only_over_real_time": 1000, "full_trace_over_real_time": 300},
        "meets": {f"{b} {m}": best(b, m)["sim_over_wall"] >= (1000 if m == "summary-only" else 300)
                  for b in BACKENDS for m in ("summary-only", "full trace")},
        "peak_memory_100rps": mem,
        "host": {"cpus_allowed": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                 "machine": platform.machine(), "loadavg_before_after": os.getloadavg()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"meets": out["meets"]}, indent=2))


if __name__ == "__main__":
    main()
