"""Peak memory of one hour at 100 req/s (512 prompt / 128 output tokens, max_num_seqs 256, the
placeholder clock: overloaded, the queue holds what has arrived; 360k requests), each case in a
fresh process: ``ru_maxrss`` of a plain run, and the ``tracemalloc`` peak (Python allocations)
of a second run under tracemalloc. Cases: ``simulate`` summary-only (``keep=frozenset(),
full_trace=False``: what a study or search point runs); ``vllm-faultsim run --config C --trace T``
(the full per-step trace written); ``vllm-faultsim plot T`` on that trace; ``vllm-faultsim diff
--traces T T`` (the checker on two 1-hour traces); ``mooncake`` (simulate summary-only on the same
arrivals written as a Mooncake JSONL file of 360k rows, one hash id per 512-token block);
``deploy`` (``vllm-faultsim deploy --spec S --trace T``: 4 servers, round robin, the same workload).
Prints and records JSON.

    python benchmarks/peak_memory.py [--hours 1] [--label after] [--cases CASE,...] [--out benchmarks/results/peak_memory.json]

``--label`` names the entry the run adds to (or replaces in) the result file; to measure another
commit, run this script with ``PYTHONPATH`` at that commit's ``src``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, tracemalloc
case, traced, cfg_path, trace = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]
if traced:
    tracemalloc.start()
t0 = time.perf_counter()
if case in ("summary-only", "mooncake"):
    import yaml
    from vllm_faultsim.harness.runs.simulate import config_from_dict, simulate
    cfg = yaml.safe_load(open(cfg_path))
    if case == "mooncake":
        cfg["workload"] = {"kind": "mooncake", "path": trace + ".mooncake.jsonl"}
    res = simulate(config_from_dict(cfg), keep=frozenset(), full_trace=False)
    rc, extra = 0, {"requests": res.summary["requests"], "steps": res.summary["steps"]}
else:
    from vllm_faultsim.harness.cli import main
    argv = {"run --trace": ["run", "--config", cfg_path, "--trace", trace, "--no-progress", "--json"],
            "plot": ["plot", trace, "--out", trace + ".png"],
            "diff --traces": ["diff", "--traces", trace, trace],
            "deploy": ["deploy", "--spec", cfg_path + ".deploy.json", "--trace", trace + ".deploy.jsonl", "--no-progress",
                       "--json"]}[case]
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    extra = {}
out = {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1), **extra}
if traced:
    out["tracemalloc_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
else:
    out["ru_maxrss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
print(json.dumps(out))
"""

CASES = ("summary-only", "run --trace", "plot", "diff --traces", "mooncake", "deploy")
DEPLOYMENT = {"servers": 4, "router": "round_robin"}


def config(hours: float) -> dict:
    return {"scheduler": {"max_num_seqs": 256},
            "workload": {"kind": "poisson", "rate": 100.0, "duration": 3600.0 * hours, "prompt": 512, "output": 128}}


def write_mooncake(path: Path, hours: float) -> int:
    """The config's Poisson arrivals (100 req/s, 512/128) as a Mooncake trace: ms timestamps, one
    hash id per 512-token block (all distinct). Returns its rows."""
    import random
    rng, t, n = random.Random(0), 0.0, 0
    with open(path, "w") as fh:
        while True:
            t += rng.expovariate(100.0)
            if t >= 3600.0 * hours:
                return n
            fh.write(f'{{"timestamp": {round(t * 1000, 3)}, "input_length": 512, "output_length": 128, '
                     f'"hash_ids": [{n}]}}\n')
            n += 1


def measure(case: str, traced: bool, cfg_path: Path, trace: Path) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, case, "1" if traced else "0", str(cfg_path), str(trace)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{case}: exit {p.returncode}\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--label", default="after")
    ap.add_argument("--no-tracemalloc", action="store_true", help="ru_maxrss only (tracemalloc runs are 2-3x slower)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)} (plot and "
                    "diff --traces read the trace run --trace writes: it is written first, unmeasured, if not among them)")
    ap.add_argument("--keep-dir", help="write the config, trace and Mooncake file here (kept) instead of a temporary folder")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "peak_memory.json"))
    args = ap.parse_args()
    entry: dict = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True).stdout.strip(),
                   "pythonpath": os.environ.get("PYTHONPATH"), "hours": args.hours, "config": config(args.hours),
                   "loadavg_before": os.getloadavg(), "cases": {}}
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case {unknown[0]!r} (cases: {', '.join(CASES)})")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        cfg_path, trace = folder / "run.json", folder / "trace.jsonl"
        cfg_path.write_text(json.dumps(config(args.hours)))
        Path(f"{cfg_path}.deploy.json").write_text(json.dumps({"deployment": DEPLOYMENT, "run": config(args.hours)}))
        if "mooncake" in cases and not Path(f"{trace}.mooncake.jsonl").exists():
            entry["mooncake_rows"] = write_mooncake(Path(f"{trace}.mooncake.jsonl"), args.hours)
        if {"plot", "diff --traces"} & set(cases) and "run --trace" not in cases and not trace.exists():
            measure("run --trace", False, cfg_path, trace)
        for case in cases:
            r = measure(case, False, cfg_path, trace)
            if case == "run --trace":
                r["trace_mib"] = round(trace.stat().st_size / 2**20, 1)
            if not args.no_tracemalloc:
                r.update({k: v for k, v in measure(case, True, cfg_path, trace).items() if k == "tracemalloc_peak_mib"})
            entry["cases"][case] = r
            print(f"{args.label} {case:<13}: {r}", flush=True)
    entry["loadavg_after"] = os.getloadavg()
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"benchmark": "peak_memory", "runs": {}}
    data["runs"].setdefault(args.label, entry)["cases"].update(entry["cases"])  # a run of some cases adds to its label
    data["runs"][args.label].update({k: v for k, v in entry.items() if k != "cases"})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
