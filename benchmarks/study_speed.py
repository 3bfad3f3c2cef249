"""A 1,000-point what-if study's wall time on 2 cores, summary-only points (``keep=frozenset(),
full_trace=False``: the summary streams), each with the ``linear`` step time and the ``aic`` one.

The points: arrival rate (5..50 req/s, 10 values) x max_num_seqs (16..256, 5) x seed (10) x plan
(none; a 2x slow stretch and a SIGKILL), 30 s of Poisson traffic of 512/128-token requests each,
the default scheduler otherwise; two worker processes (multiprocessing, fork), each building
the step-time backend once (inside the timed wall). Prints and records JSON.

    python benchmarks/study_speed.py [--points 1000] [--workers 2] [--out benchmarks/results/study_speed.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

from vllm_faultsim.faults.plan import validate_plan
from vllm_faultsim.harness.runs.simulate import RunConfig, simulate, with_scheduler
from vllm_faultsim.models.step_time import check_section, from_config

AIC = {"backend": "aic", "model": "meta-llama/Meta-Llama-3.1-8B", "system": "h200_sxm"}
BACKENDS = {"linear": None, "aic": AIC}
PLANS = {"none": [], "degraded": [{"kind": "slow_steps", "start": 10.0, "end": 20.0, "factor": 2.0},
                                  {"kind": "kill_engine", "at": 25.0, "rank": 0, "signal": "SIGKILL"}]}
GRID = (tuple(5.0 * i for i in range(1, 11)), (16, 32, 64, 128, 256), tuple(range(10)), tuple(PLANS))


def points(n: int) -> list[tuple]:
    return list(itertools.product(*GRID))[:n]


def run_point(args: tuple) -> tuple[float, dict]:
    (rate, max_num_seqs, seed, plan), step_time = args
    cfg = with_scheduler(RunConfig(workload={"kind": "poisson", "rate": rate, "duration": 30.0, "prompt": 512,
                                             "output": 128}, seed=seed), max_num_seqs=max_num_seqs)
    if step_time is not None:
        cfg = replace(cfg, step_time=check_section(step_time))
    from_config(cfg.step_time)  # built once per process (step_time._BUILT)
    t0 = time.process_time()
    res = simulate(cfg, validate_plan({"version": 1, "faults": PLANS[plan]}, plan), keep=frozenset(),
                   full_trace=False)
    return time.process_time() - t0, {"steps": res.summary["steps"], "requests": res.summary["requests"],
                                      "sim_time_s": res.summary["sim_time_s"], "overloaded": res.overloaded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "study_speed.json"))
    args = ap.parse_args()
    pts = points(args.points)
    load_before = os.getloadavg()
    results = {}
    for backend, section in BACKENDS.items():
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            t0 = time.perf_counter()
            out = pool.map(run_point, [(p, section) for p in pts], chunksize=4)
            wall = time.perf_counter() - t0
        cpu = sum(c for c, _ in out)
        steps = sum(r["steps"] for _, r in out)
        sim = sum(r["sim_time_s"] for _, r in out)
        results[backend] = {"points": len(pts), "workers": args.workers, "wall_s": round(wall, 1),
                            "cpu_s_in_points": round(cpu, 1), "steps": steps, "sim_time_s": round(sim, 1),
                            "requests": sum(r["requests"] for _, r in out),
                            "overloaded_points": sum(r["overloaded"] for _, r in out),
                            "ms_per_point_wall": round(1000 * wall / len(pts), 1)}
        print(f"{backend:>6}: {len(pts)} points in {wall:.1f} s wall on {args.workers} workers "
              f"({cpu:.1f} s CPU inside the points, {steps} steps, {sim:.0f} simulated seconds)", flush=True)
    out = {"benchmark": "study_speed", "grid": {"rate": GRID[0], "max_num_seqs": GRID[1], "seeds": len(GRID[2]),
                                                "plans": PLANS, "duration_s": 30.0, "prompt": 512, "output": 128},
           "aic": AIC, "results": results,
           "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
