"""What each engine step costs on the GPU, from a torch-profiler trace of real vLLM as served.

    python benchmarks/step_profile.py parse TRACE.pt.trace.json.gz --out ROWS.json     # on the GPU host
    python benchmarks/step_profile.py compare RUN-profiled.jsonl.gz [--json OUT.json]  # here: against aiconfigurator

A recording's step lines time a step from the engine core (its launch and its output), never the
GPU itself, so where a step's time is both the launch and the forward (the large mixed batches at
``max_num_seqs`` 1024) they cannot say which of the two the clock lacks. ``record_serving.py
--profile-steps N`` runs vLLM's own worker profiler (``ProfilerConfig(profiler="torch",
detailed_trace_annotation=True)``) over N steps of one run: each ``Worker.execute_model`` is a
``record_function`` named by its batch (``execute_T_context_N(sq.. sk.. ..)_generation_M(sq.. sk..
..)``: requests, scheduled tokens and KV length after the step, per phase), and CUPTI gives every
kernel, memcpy and memset with the correlation id of the CPU call that launched it (a CUDA graph's
kernels carry its ``cudaGraphLaunch``'s).

``parse`` turns the trace into one row per step: the batch's shape; ``fwd_busy_us``, the GPU busy
time (union of kernel intervals) of the work ``execute_model`` launched, i.e. the forward as the GPU
ran it, whatever the launch; ``seg_busy_us`` the same for everything launched until the next
``execute_model`` (sampling, copies); ``fwd_gpu_start_us`` / ``fwd_gpu_end_us``, its first kernel's
start and last kernel's end, and ``cpu_start_us`` / ``cpu_end_us`` the annotation (the launch, slowed
by the profiler's own cost per op), all from the first step's annotation. ``compare`` puts the
forward busy time beside aiconfigurator's estimate for the same shape, by CUDA-graph runtime mode
(vLLM's ``CudagraphDispatcher`` rule, ``step_time.ServingCosts.runtime_mode``) and batch size.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DETAILED = re.compile(r"execute_(\d+)_context_(\d+)\(sq(\d+)sk(\d+)sqsq\d+sqsk\d+\)"
                      r"_generation_(\d+)\(sq(\d+)sk(\d+)sqsq\d+sqsk\d+\)")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def _busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def parse(events: list[dict]) -> list[dict]:
    """One row per ``execute_model`` annotation of a kineto trace's events (see the module doc)."""
    steps, launches, gpu = [], {}, {}
    for ev in events:
        if ev.get("ph") != "X":
            continue
        cat = ev.get("cat")
        if cat == "user_annotation" and (m := DETAILED.fullmatch(ev.get("name", ""))):
            steps.append((float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0.0)), m))
        elif cat in LAUNCH_CATS and "correlation" in ev.get("args", {}):
            launches[ev["args"]["correlation"]] = (float(ev["ts"]), ev.get("name", ""))
        elif cat in GPU_CATS and "correlation" in ev.get("args", {}):
            gpu.setdefault(ev["args"]["correlation"], []).append((float(ev["ts"]), float(ev["ts"]) + float(ev["dur"])))
    steps.sort(key=lambda s: s[0])
    if not steps:
        return []
    starts = [s[0] for s in steps]
    fwd = [[] for _ in steps]
    seg = [[] for _ in steps]
    graphs = [0] * len(steps)
    for corr, (ts, name) in launches.items():
        i = bisect.bisect_right(starts, ts) - 1
        if i < 0 or corr not in gpu:
            continue
        seg[i] += gpu[corr]
        if ts <= steps[i][1]:
            fwd[i] += gpu[corr]
            graphs[i] += name.startswith("cudaGraphLaunch")
    t0 = starts[0]
    rows = []
    for i, (s, e, m) in enumerate(steps):
        total, nc, csq, csk, ng, gsq, gsk = (int(x) for x in m.groups())
        rows.append({
            "total_tokens": total, "num_prefill_requests": nc, "sum_prefill_tokens": csq,
            "sum_prefill_kv_tokens": csk - csq, "num_decode_requests": ng, "sum_decode_kv_tokens": gsk - gsq,
            "cpu_start_us": s - t0, "cpu_end_us": e - t0,
            "fwd_kernels": len(fwd[i]), "graph_launches": graphs[i],
            "fwd_busy_us": _busy(fwd[i]), "seg_busy_us": _busy(seg[i]),
            "fwd_gpu_start_us": min(a for a, _ in fwd[i]) - t0 if fwd[i] else None,
            "fwd_gpu_end_us": max(b for _, b in fwd[i]) - t0 if fwd[i] else None,
        })
    return rows


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        return json.load(fh)["traceEvents"]


def compare(rows: list[dict], aic, max_num_seqs: int, capture: int, first: int = 0) -> list[dict]:
    """Per (mode, 64-request bin): steps, median measured forward busy time, median aiconfigurator
    estimate, median ratio measured / aiconfigurator (the forward alone, and with what the step launched
    after it: sampling, copies), median GPU span beyond the launch's end."""
    from vllm_faultsim.harness.runs.fidelity import shape_of
    from vllm_faultsim.models.step_time import ServingCosts

    costs = ServingCosts(max_num_seqs=max_num_seqs, max_cudagraph_capture_size=capture)  # its runtime_mode
    groups: dict[tuple, list[dict]] = {}
    for r in rows[first:]:
        if not r["fwd_kernels"]:
            continue
        est = aic.batch_seconds(shape_of(r)) * 1e6
        reqs = r["num_prefill_requests"] + r["num_decode_requests"]
        key = (costs.runtime_mode(reqs, r["total_tokens"]), min(reqs // 64, 4))
        groups.setdefault(key, []).append({**r, "aic_us": est, "ratio": r["fwd_busy_us"] / est,
                                           "seg_ratio": r["seg_busy_us"] / est,
                                           "tail_us": r["fwd_gpu_end_us"] - r["cpu_end_us"]})
    out = []
    for (mode, b), g in sorted(groups.items()):
        med = lambda k: statistics.median(x[k] for x in g)  # noqa: E731
        out.append({"mode": mode, "requests": f"{64 * b}-{64 * b + 63}" if b < 4 else "256+", "steps": len(g),
                    "busy_ms": med("fwd_busy_us") / 1e3, "aic_ms": med("aic_us") / 1e3, "ratio": med("ratio"),
                    "with_sampling_ratio": med("seg_ratio"),
                    "prefill_tokens": med("sum_prefill_tokens"), "gpu_after_launch_ms": med("tail_us") / 1e3})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parse", help="a kineto trace -> per-step rows (JSON)")
    p.add_argument("trace", type=Path)
    p.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare", help="a profiled recording's rows -> measured forward against aiconfigurator, "
                                       "by runtime mode and size")
    c.add_argument("recordings", type=Path, nargs="+",
                   help="the <run>-profiled.jsonl.gz files record_serving wrote beside their rows")
    c.add_argument("--skip", type=int, default=2, help="first steps left out (the profiler's start)")
    c.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "parse":
        rows = parse(load_events(args.trace))
        args.out.write_text(json.dumps({"trace": args.trace.name, "rows": rows}))
        print(f"{len(rows)} steps -> {args.out}")
        return 0 if rows else 1
    from vllm_faultsim.harness.runs import fidelity
    from vllm_faultsim.models.step_time import AicStepTime

    report = {}
    for path in args.recordings:
        rec = fidelity.load(path)
        data = json.loads((path.parent / rec.header["profiled"]["rows"]).read_text())
        aic = AicStepTime({**fidelity.header_config(rec)["step_time"], "kv_bucket": False, "version": "0.24.0"})
        e = rec.header["engine"]
        table = report[path.name] = compare(data["rows"], aic, e["max_num_seqs"], e["max_cudagraph_capture_size"],
                                            args.skip)
        print(f"{path.name}: {rec.header['model']} on {rec.header['gpu']}, max_num_seqs {e['max_num_seqs']}")
        print(f"  {'mode':10s} {'requests':>9s} {'steps':>5s} {'busy ms':>8s} {'aic ms':>7s} {'ratio':>6s} "
              f"{'+sampling':>9s} {'prefill tok':>11s} {'GPU after launch ms':>19s}")
        for t in table:
            print(f"  {t['mode']:10s} {t['requests']:>9s} {t['steps']:5d} {t['busy_ms']:8.2f} {t['aic_ms']:7.2f} "
                  f"{t['ratio']:6.3f} {t['with_sampling_ratio']:9.3f} {t['prefill_tokens']:11.0f} {t['gpu_after_launch_ms']:19.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
