"""Availability of one DP server against N independent servers under the same engine MTBF.

The same N engine cores, the same workload and the same deaths (faults/rates.py pairs engine core
``server * data_parallel_size + rank`` across topologies, so each seed kills the same cores at the
same times in both): one vLLM server with ``data_parallel_size`` N (one death takes every rank
down until the restart) against N servers of one rank behind a least-outstanding router (a death
takes one down). Prints a table and records benchmarks/results/deploy_availability.json. Simulated
figures only (no wall-clock figure is judged).

    python benchmarks/deploy_availability.py [--engines 4] [--rate 20] [--duration 3600]
        [--mtbf 1800] [--restart 120] [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vllm_faultsim.faults.rates import FaultRates
from vllm_faultsim.harness.runs.deploy import SLO, DeploymentConfig, simulate_deployment
from vllm_faultsim.harness.runs.simulate import RunConfig
from vllm_faultsim.models.client import RetryPolicy

KEYS = ("availability", "slo_attainment", "goodput_rps", "uptime", "engine_deaths", "finished", "failed", "lost",
        "retried", "rejected", "ttft_p99_ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--mtbf", type=float, default=1800.0, help="engine_mtbf_s: per engine core")
    ap.add_argument("--restart", type=float, default=120.0, help="restart_s: model load + warm-up")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "deploy_availability.json"))
    args = ap.parse_args()
    run_cfg = RunConfig(workload={"kind": "poisson", "rate": args.rate, "duration": args.duration,
                                  "prompt": 512, "output": 128})
    retry, slo = RetryPolicy(attempts=3, backoff_s=1.0, backoff_multiplier=2.0, timeout_s=60.0), SLO(500.0, 50.0)
    topologies = {
        f"1 server, data_parallel_size {args.engines}": DeploymentConfig(
            servers=1, data_parallel_size=args.engines, restart_s=args.restart, retry=retry, slo=slo),
        f"{args.engines} servers, least_outstanding": DeploymentConfig(
            servers=args.engines, router="least_outstanding", restart_s=args.restart, retry=retry, slo=slo),
    }
    rates = FaultRates(engine_mtbf_s=args.mtbf)
    rows = []
    for name, dep in topologies.items():
        for seed in args.seeds:
            t0 = time.perf_counter()
            s = simulate_deployment(dep, run_cfg, seed=seed, fault_rates=rates)
            rows.append({"topology": name, "seed": seed, **{k: s[k] for k in KEYS},
                         "wall_s": round(time.perf_counter() - t0, 1)})
            print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    means = {name: {k: round(sum(r[k] for r in rows if r["topology"] == name) / len(args.seeds), 4)
                    for k in ("availability", "slo_attainment", "goodput_rps", "uptime", "engine_deaths")}
             for name in topologies}
    print(f"\nmeans over seeds {args.seeds}:")
    for name, m in means.items():
        print(f"  {name:32s} " + "  ".join(f"{k} {v}" for k, v in m.items()))
    out = {"benchmark": "deploy_availability", "engines": args.engines, "rate": args.rate, "duration_s": args.duration,
           "engine_mtbf_s": args.mtbf, "restart_s": args.restart, "retry": retry.__dict__, "slo": slo.__dict__,
           "workload": run_cfg.workload, "rows": rows, "means": means}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
