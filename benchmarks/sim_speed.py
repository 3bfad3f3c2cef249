"""Simulator speed: one hour of a 20 req/s Poisson workload (512 prompt / 128 output tokens,
max_num_seqs 256), with the full per-step trace written to disk. Target: < 60 s wall on one core.

    taskset -c 0 python benchmarks/sim_speed.py [--hours 1] [--out benchmarks/results/sim_speed.json]
        [--step-time '{"backend": "aic", "model": "meta-llama/Meta-Llama-3.1-8B", "system": "h200_sxm"}']
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from vllm_faultsim.harness.runs.simulate import RunConfig, simulate, with_scheduler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sim_speed.json"))
    ap.add_argument("--step-time", help="the run config's step_time section as JSON (default: the linear profile)")
    args = ap.parse_args()
    cfg = with_scheduler(RunConfig(workload={"kind": "poisson", "rate": 20.0, "duration": 3600.0 * args.hours,
                                             "prompt": 512, "output": 128}), max_num_seqs=256)
    if args.step_time:
        from dataclasses import replace

        from vllm_faultsim.models.step_time import check_section, from_config
        cfg = replace(cfg, step_time=check_section(json.loads(args.step_time)))
        from_config(cfg.step_time)  # built (and loaded) before the clock starts
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.jsonl"
        t0 = time.perf_counter()
        res = simulate(cfg, trace_path=trace, keep=False)
        wall = time.perf_counter() - t0
        trace_mb = trace.stat().st_size / 2**20
    s = res.summary
    out = {
        "benchmark": "sim_speed", "hours": args.hours, "step_time": cfg.step_time or {"profile": cfg.profile}, "wall_s": round(wall, 2), "steps": s["steps"],
        "steps_per_wall_s": round(s["steps"] / wall), "sim_time_s": s["sim_time_s"],
        "sim_over_wall": round(s["sim_time_s"] / wall, 1), "requests": s["requests"],
        "trace_mib": round(trace_mb, 1), "cpus_allowed": len(os.sched_getaffinity(0)),
        "python": platform.python_version(), "machine": platform.machine(), "target_wall_s": 60 * args.hours,
        "meets_target": wall < 60 * args.hours,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for k, v in out.items():
        print(f"{k:>18}: {v}")


if __name__ == "__main__":
    main()
