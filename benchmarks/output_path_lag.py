"""Does the client-visible output path queue? Per committed recording (vLLM 0.26.0 on one H200),
from its request and step lines alone:

- ``lag``: client time - ``output_end`` of the step whose output carried the token (the step's
  ``first_token_reqs`` / ``finished_reqs`` where recorded, else the last step whose output ended
  before), p50 / p90 of first and last tokens, ms: AsyncLLM's output path (the core's
  ``process_output_sockets`` thread, ZMQ, ``output_handler``'s ``OutputProcessor.process_outputs``,
  the request's ``generate()``). A front-end that cannot keep up with the steps would make it grow
  along a request's life;
- ``client_over_engine_tpot``: the mean over requests of the client's TPOT over the engine's (the
  same with the two steps' ``output_end`` for first token and finish): 1 where the lag at the last
  token is the lag at the first;
- ``stalls``: deliveries that lagged over STALL_S, and the span of their steps' ``output_end``
  (a front-end that stopped for that long: the arrivals of that window reach the core late too);
- ``step_sum_ratio`` (``--steps``): sum of predicted over sum of measured step times
  (``fidelity.predicted_step_times`` / ``measured_step_times``), costs fitted as fidelity_table's
  ``calibrated`` mode: the time-weighted step error, which the loop's throughput sees (the table's
  step MAPE weighs every step alike).

    python benchmarks/output_path_lag.py [--steps] [--out benchmarks/results/output_path_lag.json]
"""

from __future__ import annotations

import argparse
import bisect
import json
import tempfile
from pathlib import Path

from vllm_faultsim.harness.metrics import percentile
from vllm_faultsim.harness.runs import fidelity as F
from vllm_faultsim.harness.runs.simulate import step_time_model
from vllm_faultsim.models.step_time import serving_costs

import fidelity_table as T

STALL_S = 0.05  # a delivery this late after its step's update_from_output() (the output path: <= 22 ms p90)


def lags(rec) -> dict:
    steps = rec.steps
    ends = [s["output_end"] for s in steps]
    listed = {(key, j): k for k, s in enumerate(steps) for key in ("first_token_reqs", "finished_reqs")
              for j in s.get(key, ())}
    first, last, ratios, stalled = [], [], [], []
    for j, r in enumerate(rec.requests):
        ks = [listed.get((key, j), bisect.bisect_right(ends, t) - 1)
              for key, t in (("first_token_reqs", r["first_token"]), ("finished_reqs", r["finish"]))]
        a, b = r["first_token"] - ends[ks[0]], r["finish"] - ends[ks[1]]
        first.append(a)
        last.append(b)
        stalled += [ends[k] for k, x in zip(ks, (a, b)) if x > STALL_S]
        if r["output_tokens"] > 1 and ends[ks[1]] > ends[ks[0]]:
            ratios.append((r["finish"] - r["first_token"]) / (ends[ks[1]] - ends[ks[0]]))
    ms = lambda xs, q: round(1000 * percentile(xs, q), 2)  # noqa: E731
    return {"lag_first_p50_ms": ms(first, 50), "lag_first_p90_ms": ms(first, 90),
            "lag_last_p50_ms": ms(last, 50), "lag_last_p90_ms": ms(last, 90),
            "client_over_engine_tpot": round(sum(ratios) / len(ratios), 4),
            "stalls": {"deliveries": len(stalled),
                       "steps_from_s": round(min(stalled), 3) if stalled else None,
                       "steps_to_s": round(max(stalled), 3) if stalled else None}}


def step_sum_ratio(rec_entry, every) -> float:
    _, _, path = rec_entry
    rec = F.load(path)
    fitted = F.fit(T.fit_sets(rec_entry, every)["calibrated"], model=rec.header["model"])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = F.run_config(rec, F.write_workload(rec, Path(tmp) / "w.jsonl"), fitted)
    pred = F.predicted_step_times(rec, step_time_model(cfg), serving_costs(cfg.serving or {}, cfg.scheduler))
    return round(sum(pred) / sum(m for _, m in F.measured_step_times(rec)), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", action="store_true", help="also the calibrated time-weighted step ratio (~2 min)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "output_path_lag.json"))
    args = ap.parse_args()
    every, rows = T.recordings(), []
    for entry in every:
        name = str(entry[2].relative_to(T.RECORDINGS))
        row = {"recording": name, **lags(F.load(entry[2]))}
        if args.steps:
            row["step_sum_ratio"] = step_sum_ratio(entry, every)
        rows.append(row)
        st = row["stalls"]
        print(f"{F.stem(name):<34} lag first {row['lag_first_p50_ms']:5.1f}/{row['lag_first_p90_ms']:5.1f} "
              f"last {row['lag_last_p50_ms']:5.1f}/{row['lag_last_p90_ms']:5.1f} ms  client/engine TPOT "
              f"{row['client_over_engine_tpot']:.4f}  stalls {st['deliveries']:3d}"
              + (f" ({st['steps_from_s']}-{st['steps_to_s']} s)" if st["deliveries"] else "")
              + (f"  step sum pred/meas {row['step_sum_ratio']:.3f}" if args.steps else ""), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
