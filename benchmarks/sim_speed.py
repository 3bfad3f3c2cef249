"""Simulator speed on one core: one hour of a 20 req/s Poisson workload (512 prompt / 128 output
tokens, max_num_seqs 256), summary-only (``keep=frozenset(), full_trace=False``: what a study or
search point runs) and with the full per-step trace written to disk, each with the ``linear``
step time (the default profile) and the ``aic`` one (aiconfigurator-core, Llama-3.1-8B on an
H200), with macro-steps (the default) and without (``macro_steps=False``, the per-step loop).
A decode-heavy hour (1 req/s, 512/1024 tokens, summary-only), where macro-steps have long stretches
to take, is run beside it, and the 20 req/s hour with vLLM's default prefix caching on (summary-only
and full trace; prompts hashed and cached block by block, the decode cohort caching its members'
blocks). Targets (issue 16): summary-only >= 1000x real time, full trace >= 300x. Peak memory is
benchmarks/peak_memory.py's. Prints and records JSON (wall and CPU time of each run).

    taskset -c 0 python benchmarks/sim_speed.py [--hours 1] [--out benchmarks/results/sim_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sim_speed.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    runs = []
    for backend, section in BACKENDS.items():
        for workload, kw in (("20 req/s, 512/128", {}), ("decode-heavy: 1 req/s, 512/1024", {"rate": 1.0, "output": 1024}),
                             ("prefix caching on: 20 req/s, 512/128", {"enable_prefix_caching": True})):
            for full_trace in (False, True):
                if full_trace and "rate" in kw:  # the decode-heavy hour: summary-only
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

    def best(backend, mode):
        return next(r for r in runs if r["backend"] == backend and r["mode"] == mode and r["macro_steps"]
                    and r["workload"].startswith("20"))
    out = {
        "benchmark": "sim_speed", "hours": args.hours, "aic": AIC, "runs": [{k: v for k, v in r.items() if k != "summary"}
                                                                            for r in runs],
        "targets": {"summary_only_over_real_time": 1000, "full_trace_over_real_time": 300},
        "meets": {f"{b} {m}": best(b, m)["sim_over_wall"] >= (1000 if m == "summary-only" else 300)
                  for b in BACKENDS for m in ("summary-only", "full trace")},
        "meets_on_cpu_time": {f"{b} {m}": best(b, m)["sim_over_cpu"] >= (1000 if m == "summary-only" else 300)
                              for b in BACKENDS for m in ("summary-only", "full trace")},
        "host": {"cpus_allowed": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                 "machine": platform.machine(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("meets", "meets_on_cpu_time")}, indent=2))


if __name__ == "__main__":
    main()
