"""Sweep speed-up on this machine: the same study run serially (``--workers 1``) and on a local Ray
cluster of all cores (harness/sweep.py), wall time end to end (Ray's start-up and shut-down
included), the rows asserted identical. Two studies: the embedded default study (12 points, the
README's main job) and a 48-point grid of the same setup (rates x max_num_seqs x max_num_batched_tokens
x plans, 10 s points). Prints and records JSON.

    python benchmarks/sweep_speedup.py [--out benchmarks/results/sweep_speedup.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from vllm_faultsim.harness.runs.study import load_study, run_study

GRID = {"workload.rate": [20.0, 40.0, 60.0], "scheduler.max_num_seqs": [64, 256, 1024, 2048],
        "scheduler.max_num_batched_tokens": [2048, 8192]}


def timed(spec: dict, workers: int) -> tuple[float, list[dict]]:
    with tempfile.TemporaryDirectory(prefix="vfs-sweep-") as tmp:
        t0 = time.perf_counter()
        rows = run_study(copy.deepcopy(spec), Path(tmp), progress=False, workers=workers)
        return time.perf_counter() - t0, rows


def measure(name: str, spec: dict, workers: int) -> dict:
    serial_s, serial = timed(spec, 1)
    ray_s, on_ray = timed(spec, workers)
    assert serial == on_ray, f"{name}: the Ray sweep's rows differ from the serial run's"
    row = {"study": name, "points": len(serial), "serial_s": round(serial_s, 2), "ray_s": round(ray_s, 2),
           "ray_workers": workers, "speedup": round(serial_s / ray_s, 2), "rows_identical": True}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/sweep_speedup.json")
    args = ap.parse_args()
    workers = os.cpu_count() or 1
    t0 = time.perf_counter()
    import ray

    from vllm_faultsim.harness.drivers.scratch import socket_dir
    with socket_dir("vfs-ray-", room=66) as tmp:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR", _temp_dir=tmp)
        ray.shutdown()
    startup = time.perf_counter() - t0
    default = load_study(None)
    grid = {**copy.deepcopy(default), "name": "48-point grid", "grid": GRID}
    grid["base"]["workload"]["duration"] = 10.0
    rows = [measure("default study", default, workers), measure("48-point grid", grid, workers)]
    doc = {"host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
                    "load_average_at_end": os.getloadavg()},
           "ray_version": ray.__version__, "ray_start_and_shutdown_s": round(startup, 2), "rows": rows,
           "note": "wall time end to end on a 2-core host shared with other jobs; Ray's start-up and shut-down "
                   "are inside ray_s"}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
