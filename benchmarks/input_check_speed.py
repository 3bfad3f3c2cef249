"""What the schema layer (inputs.py) costs, on one core: a JSONL replay read and checked line by
line (a TypeAdapter's ``validate_json`` per line), a generated workload checked once and drawn
(the 1-hour speed benchmark's: 20 req/s, and 100 req/s), a trace's events checked by the trace
schema, a run config checked; and the share of the 1-hour benchmark's summary-only run
(benchmarks/sim_speed.py, linear step time) spent building and checking its workload. Best of
`--repeat` runs each. Prints and records JSON.

    taskset -c 0 python benchmarks/input_check_speed.py [--lines 360000] [--out benchmarks/results/input_check_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

from vllm_faultsim.harness import workload as wl
from vllm_faultsim.harness.runs.simulate import RunConfig, build_workload, config_from_dict, simulate, with_scheduler
from vllm_faultsim.harness.trace import validate_trace

HOUR = {"kind": "poisson", "rate": 20.0, "duration": 3600.0, "prompt": 512, "output": 128}


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=360_000, help="JSONL requests (default: 1 h at 100 req/s)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/input_check_speed.json")
    args = ap.parse_args()
    rng = random.Random(0)
    out: dict = {"host": platform.node(), "python": platform.python_version(), "cpu_affinity": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.jsonl"
        t = 0.0
        with open(path, "w", encoding="utf-8") as fh:
            for _ in range(args.lines):
                t += rng.expovariate(100.0)
                fh.write(json.dumps({"arrival": round(t, 6), "prompt_tokens": rng.randint(64, 1024),
                                     "output_tokens": rng.randint(8, 256)}) + "\n")
        s = best(lambda: wl.load_jsonl(path), args.repeat)
        out["jsonl"] = {"lines": args.lines, "seconds": round(s, 3), "us_per_line": round(s / args.lines * 1e6, 2)}
    for rate in (20.0, 100.0):
        cfg = RunConfig(workload={**HOUR, "rate": rate})
        n = len(build_workload(cfg))
        s = best(lambda: build_workload(cfg), args.repeat)
        out[f"poisson_1h_{rate:g}rps"] = {"requests": n, "seconds": round(s, 3), "us_per_request": round(s / n * 1e6, 2)}
    events = simulate(config_from_dict({"workload": {**HOUR, "duration": 60.0}, "scheduler": {"max_num_seqs": 256}})).events
    s = best(lambda: validate_trace(events), args.repeat)
    out["trace_events"] = {"events": len(events), "seconds": round(s, 3), "us_per_event": round(s / len(events) * 1e6, 2)}
    d = {"workload": {**HOUR, "duration": 1.0}, "scheduler": {"max_num_seqs": 64}, "seed": 3}
    s = best(lambda: [config_from_dict(d) for _ in range(100)], args.repeat)
    out["config_from_dict_ms"] = round(s / 100 * 1e3, 3)
    hour = with_scheduler(RunConfig(workload=HOUR), max_num_seqs=256)
    t0 = time.perf_counter()
    build_workload(hour)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    simulate(hour, keep=frozenset(), full_trace=False)
    total = time.perf_counter() - t0
    out["speed_benchmark_1h"] = {"run_seconds": round(total, 2), "workload_seconds": round(build, 3),
                                 "workload_share": round(build / total, 4)}
    print(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
