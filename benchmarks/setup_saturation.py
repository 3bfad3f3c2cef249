"""Where the named setup saturates: the default study's workload (Poisson, 512-token prompts,
128-token outputs, 30 s of arrivals, seed 0) on llama-3.1-8b-h200 over a range of rates, at
max_num_seqs 256 and 1024. Saturation is the throughput plateau (the most finished requests per
second over the rates); the default study's rates sit around it. Prints and records JSON.

    python benchmarks/setup_saturation.py [--out benchmarks/results/setup_saturation.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_faultsim.harness.metrics import overloaded
from vllm_faultsim.harness.named_setup import DEFAULT_SETUP
from vllm_faultsim.harness.runs.simulate import config_from_dict, simulate, step_time_model
from vllm_faultsim.models.step_time import describe

RATES = (20.0, 30.0, 40.0, 50.0, 55.0, 60.0, 65.0, 70.0, 80.0, 100.0)
MAX_NUM_SEQS = (256, 1024)
WORKLOAD = {"kind": "poisson", "duration": 30.0, "prompt": 512, "output": 128}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/setup_saturation.json")
    args = ap.parse_args()
    rows, clock = [], None
    for mns in MAX_NUM_SEQS:
        for rate in RATES:
            cfg = config_from_dict({"setup": DEFAULT_SETUP, "seed": 0, "scheduler": {"max_num_seqs": mns},
                                    "workload": {**WORKLOAD, "rate": rate}})
            clock = describe(step_time_model(cfg))
            res = simulate(cfg, keep=False, full_trace=False)
            s = res.summary
            rows.append({"max_num_seqs": mns, "rate": rate, "throughput_rps": s["throughput_rps"],
                         "ttft_p50_ms": s["ttft_p50_ms"], "ttft_p99_ms": s["ttft_p99_ms"],
                         "tpot_p50_ms": s["tpot_p50_ms"],
                         "overloaded": overloaded(e for e in res.events if e["kind"] == "req")})
            print(json.dumps(rows[-1]), flush=True)
    saturation = {str(mns): max(r["throughput_rps"] for r in rows if r["max_num_seqs"] == mns) for mns in MAX_NUM_SEQS}
    doc = {"setup": DEFAULT_SETUP, "clock": clock, "workload": WORKLOAD, "seed": 0,
           "saturation_rps": saturation, "rows": rows}
    print(f"saturation (max throughput over the rates), req/s: {saturation}  [{clock}]")
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
