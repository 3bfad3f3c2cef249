"""The speed to beat: RealSchedulerCore (vLLM 0.26.0's own v1 Scheduler, on CPU, fake model output)
on a 20 req/s Poisson workload of 512-token prompts and 128-token outputs, max_num_seqs 256,
driven by a fixed-step loop (25 ms per step, no SimPy, no trace).

    PYTHONPATH=src python benchmarks/real_scheduler_speed.py [--duration 600] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from vllm_faultsim.harness.workload import poisson
from vllm_faultsim.models.scheduler import SchedulerConfig


def run(core, specs, step: float) -> tuple[int, float]:
    """(steps, virtual seconds): arrivals join at step starts; an idle engine jumps to the next one."""
    steps, now, i = 0, 0.0, 0
    while True:
        while i < len(specs) and specs[i].arrival <= now:
            core.add_request(specs[i], now)
            i += 1
        if not core.has_unfinished_requests():
            if i == len(specs):
                return steps, now
            now = specs[i].arrival
            continue
        res = core.schedule(now)
        if res.sched:
            core.update_from_output(res, now + step)
        steps += 1
        now += step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    ap.add_argument("--step", type=float, default=0.025, help="fixed step time (s)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "real_scheduler_speed.json"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    from vllm_faultsim.harness.real_scheduler import RealSchedulerCore
    core = RealSchedulerCore(SchedulerConfig(max_num_seqs=256), multimodal=False)
    setup = time.perf_counter() - t0
    specs = poisson(20.0, duration=args.duration, prompt=512, output=128, seed=0)
    t1 = time.perf_counter()
    steps, virtual = run(core, specs, args.step)
    wall = time.perf_counter() - t1
    out = {
        "benchmark": "real_scheduler_speed", "duration_s": args.duration, "step_s": args.step,
        "requests": len(specs), "steps": steps, "wall_s": round(wall, 2),
        "steps_per_wall_s": round(steps / wall), "sim_time_s": round(virtual, 3),
        "sim_over_wall": round(virtual / wall, 1), "setup_s": round(setup, 1),
        "cpus_allowed": len(os.sched_getaffinity(0)), "python": platform.python_version(),
        "machine": platform.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for k, v in out.items():
        print(f"{k:>18}: {v}")


if __name__ == "__main__":
    main()
