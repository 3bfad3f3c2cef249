"""What a request sees before its first token, per recorded real run: TTFT split into the input
path, waiting for the core's loop, the prefill step to its ``update_from_output()`` (its launch,
its forward, the next step's launch: async scheduling's one-step-late output) and the output
path, p50/p90 in ms; beside them the request-path constants fitted on that recording alone
(harness/runs/fidelity.py ``input_seconds``, ``output_costs``).

Where a recording has vLLM's per-request engine times (``stats``: ``queued_ts``,
``scheduled_ts``, ``first_token_ts``; the held-out set r2/) each component is also read from them
directly (``queued_ts`` is ``Scheduler.add_request``, as the busy loop drains its input queue: the
input path plus the wait for the loop); otherwise from the step lines (``first_scheduled``: the
FCFS replay of prefills).

    python benchmarks/ttft_components.py [--out benchmarks/results/ttft_components.json]
"""

from __future__ import annotations

import argparse
import bisect
import json
from pathlib import Path

from vllm_faultsim.harness.metrics import percentile
from vllm_faultsim.harness.runs import fidelity as F

RECORDINGS = Path(__file__).parent / "results" / "recordings"


def quantiles(xs: list[float]) -> dict[str, float] | None:
    return {f"p{q}_ms": round(1000 * percentile(xs, q), 3) for q in (50, 90)} if xs else None


def components(path: Path) -> dict:
    rec = F.load(path)
    steps = rec.steps
    ends = [s["output_end"] for s in steps]
    first = F.first_scheduled(rec)
    parts: dict[str, list[float]] = {k: [] for k in ("to_first_schedule", "schedule_to_output", "output_path", "ttft")}
    stats: dict[str, list[float]] = {k: [] for k in ("arrival_to_queued", "queued_to_scheduled", "scheduled_to_first_token",
                                                     "first_token_to_client")}
    for r, k in zip(rec.requests, first):
        parts["ttft"].append(r["first_token"] - r["arrival"])
        j = bisect.bisect_right(ends, r["first_token"]) - 1
        if k is not None and j >= k:
            parts["to_first_schedule"].append(steps[k]["schedule_start"] - r["arrival"])
            parts["schedule_to_output"].append(ends[j] - steps[k]["schedule_start"])
            parts["output_path"].append(r["first_token"] - ends[j])
        if "stats" in r:
            st = r["stats"]
            stats["arrival_to_queued"].append(st["queued_ts"] - r["arrival"])
            stats["queued_to_scheduled"].append(st["scheduled_ts"] - st["queued_ts"])
            stats["scheduled_to_first_token"].append(st["first_token_ts"] - st["scheduled_ts"])
            stats["first_token_to_client"].append(r["first_token"] - st["first_token_ts"])
    out_a, out_b = F.output_costs(F.output_samples(rec))
    return {"recording": str(path.relative_to(RECORDINGS)), "requests": len(rec.requests),
            "from_steps": {k: quantiles(v) for k, v in parts.items()},
            "from_engine_stats": {k: quantiles(v) for k, v in stats.items()} if stats["arrival_to_queued"] else None,
            "fitted_here": {"input_s_ms": round(1000 * F.input_seconds(F.input_bounds(rec)), 3),
                            "output_base_ms": round(1000 * out_a, 3), "output_per_req_us": round(1e6 * out_b, 1)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ttft_components.json"))
    args = ap.parse_args()
    rows = [components(p) for p in sorted(RECORDINGS.glob("*.jsonl.gz")) + sorted(RECORDINGS.glob("r2/*.jsonl.gz"))]
    for r in rows:
        s, f = r["from_steps"], r["fitted_here"]
        cells = " ".join(f"{k}={v['p50_ms']:.2f}" for k, v in s.items() if v)
        print(f"{F.stem(r['recording']):<32} p50 ms: {cells}; fitted: input {f['input_s_ms']:.2f} ms, output "
              f"{f['output_base_ms']:.2f} ms + {f['output_per_req_us']:.0f} us/req")
        if r["from_engine_stats"]:
            print(" " * 33 + "engine stats p50 ms: " + " ".join(
                f"{k}={v['p50_ms']:.2f}" for k, v in r["from_engine_stats"].items() if v))
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
