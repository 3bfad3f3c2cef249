"""Async EPLB timing on this host: vLLM 0.26.0's real worker on 2 gloo processes (CPU) or 2 GPUs
against the calibrated model, with every wall-clock judgement on (harness/runs/eplb.py
``run_check(timing=True)``): per-layer transfer time within the tolerance, each layer consumed in
the model's step (one step either side near a boundary), the later rearrangement steps, the model
that ignores the slow link caught, and the step the engine fails in after a rank death within one
of the model's. The CPU diff tier (tests/diff/test_eplb_real_cpu.py) judges only the deterministic
part of the same check; these figures depend on the host and its load, so they are recorded here.

    PYTHONPATH=src python benchmarks/eplb_timing.py [--device cpu|cuda] [--runs 1]
        [--out benchmarks/results/eplb_timing_cpu.json]

Prints the summary of each run and whether it passed the timing acceptance; writes every
summary (per-layer real/model times and steps, link calibration, load average) to --out.
Exit 0 when every run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from vllm_faultsim.harness.checkers import eplb as ce
from vllm_faultsim.harness.drivers import real_eplb
from vllm_faultsim.harness.runs import eplb as re_eplb

SETTINGS = {  # the CPU diff tier's shapes and the GPU tier's (tests/gpu/test_gpu_eplb.py)
    "cpu": dict(hidden=(16384, 32768), forward_s=0.1, slow_min_s=0.015,
                tol=ce.Tolerance(rel=1.0, abs=0.010, step_margin=0.02, outliers=1)),
    "cuda": dict(hidden=(1 << 19, 1 << 20), forward_s=0.2, slow_min_s=0.0,
                 tol=ce.Tolerance(rel=0.3, abs=0.005, step_margin=0.02)),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=tuple(SETTINGS), default="cpu")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/eplb_timing_<device>.json")
    args = ap.parse_args()
    reason = real_eplb.skip_reason(args.device, 2)
    if reason:
        print(f"cannot run: {reason}")
        return 2
    out = Path(args.out or Path(__file__).parent / "results" / f"eplb_timing_{args.device}.json")
    st = SETTINGS[args.device]
    runs, passed = [], 0
    for i in range(args.runs):
        load = os.getloadavg()
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            summary = re_eplb.run_check(args.device, tmp, timing=True, **st)
        bad = re_eplb.verdict(summary)
        passed += not bad
        print(re_eplb.format_summary(summary))
        print(f"run {i + 1}/{args.runs}: {'PASS' if not bad else 'FAIL'} in {time.perf_counter() - t:.1f} s "
              f"(load average before {load[0]:.2f})")
        for b in bad:
            print(f"    {b}")
        runs.append({"summary": summary, "verdict": bad, "loadavg_before": load,
                     "seconds": round(time.perf_counter() - t, 1)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": platform.node(), "cpus": os.cpu_count(), "device": args.device,
                               "passed": passed, "runs": runs}, indent=1, default=str) + "\n")
    print(f"{passed}/{args.runs} runs passed the timing acceptance; written to {out}")
    return 0 if passed == args.runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
