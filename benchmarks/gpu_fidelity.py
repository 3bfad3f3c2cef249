"""Held-out fidelity of a calibrated step-time profile, and the GPU tier's summary.

    python benchmarks/gpu_fidelity.py run --profile h100-llama3-8b-shape [--seed 1234] [--requests 80]
    python benchmarks/gpu_fidelity.py summary RESULTS_DIR

``run`` starts the real engine with the profile's own engine settings (model, dtype, limits),
serves a Poisson trace that took no part in the fit in real time, simulates the same trace with
the profile, and writes TTFT / TPOT / E2E errors (per-request MAPE, mean and percentile errors)
to benchmarks/results/gpu_fidelity_<profile>.json. ``vllm-faultsim calibrate --heldout`` does the
same right after fitting, on the engine it already has.

``summary`` prints the GPU tier's figures from the JSON files the tests wrote (device, vLLM
version, kill-detection percentiles, EC deferral and KV offload comparisons, calibration
coefficients, held-out errors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def cmd_run(args) -> int:
    from vllm_faultsim.harness.runs import calibrate
    from vllm_faultsim.harness.drivers import real_engine as RE
    from vllm_faultsim.harness.runs.gpu import write_json
    from vllm_faultsim.models.step_time import load_profile

    reason = RE.gpu_skip_reason()
    if reason:
        print(f"gpu_fidelity: {reason}", file=sys.stderr)
        return 2
    path = Path(args.profile)
    if not path.exists():
        path = ROOT / "src" / "vllm_faultsim" / "profiles" / f"{args.profile}.json"
    load_profile(str(path))  # validates
    doc = json.loads(path.read_text())
    eng = doc["engine"]
    settings = {k: eng[k] for k in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_gpu_blocks",
                                    "max_model_len", "dtype", "enforce_eager", "async_scheduling",
                                    "gpu_memory_utilization")}
    llm = calibrate.open_engine(calibrate.model_dir(eng["model"]), settings)
    specs = calibrate.heldout_workload(eng["model"], args.seed, args.requests)
    res = calibrate.fidelity(llm, path, settings, specs, seed=args.seed)
    res.update({"profile": doc["name"], "device": RE.host_info().get("device"), "vllm": RE.host_info().get("vllm"),
                "model": eng["model"], "seed": args.seed, "profile_device": doc.get("device")})
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"gpu_fidelity_{doc['name']}.json"
    write_json(out, res)
    print(json.dumps({m: res[m]["mape_pct"] for m in ("ttft", "tpot", "e2e")}))
    RE.shutdown_llm(llm)
    return 0


def _load(d: Path, name: str):
    p = d / name
    return json.loads(p.read_text()) if p.exists() else None


def cmd_summary(args) -> int:
    d = Path(args.dir)
    lines = []
    say = lines.append
    dev = None
    for name in ("decisions.json", "ec_deferral.json", "kv_offload.json", "engine_kill.json"):
        j = _load(d, name)
        if j and j.get("device"):
            dev = j["device"]
            break
    if dev:
        say(f"device: {dev.get('device')} ({dev.get('device_memory_gib')} GiB), {dev.get('cpu_count')} CPUs; "
            f"vLLM {dev.get('vllm')}, torch {dev.get('torch')}, CUDA {dev.get('cuda')}")
    for name in ("decisions_async.json", "decisions.json"):
        j = _load(d, name)
        if j:
            say(f"decisions ({j.get('mode', 'sync')} scheduling, tiny-llama, virtual clock): {j['requests']} requests, "
                f"{j['steps']} steps, {j['preemptions']} preemptions, trace identical to the simulator: "
                f"{j['identical']}; real step wall p50/p99 {j['real_step_wall_ms']['p50']}/"
                f"{j['real_step_wall_ms']['p99']} ms")
    j = _load(d, "engine_kill.json")
    if j:
        k = j["detect_s"]
        mode = "async" if j.get("async_scheduling") else "sync"
        say(f"engine kills ({mode} scheduling on both sides; the engine's resolved mode: "
            f"{j.get('engine_async_scheduling')}): {j['completed']}/{j['trials']} trials "
            f"({j['parallel_engines']} engines at a time), "
            f"errors {len(j['errors'])}; predicted detection " + ", ".join(
                f"{sig} {1000 * p:.0f} ms (tolerance {1000 * j['tolerance_s'][sig]:.0f} ms)"
                for sig, p in j["predicted_detection_s"].items()))
        for sig, v in k.items():
            n = v.get("n", "")
            say(f"  detect {sig:<14} " + (f"n={n} " if n else "") + " ".join(
                f"{q}={1000 * v[q]:.1f}ms" for q in ("p50", "p90", "p99") if v.get(q) is not None))
        rf = j["request_fail_after_kill_s_SIGKILL"]
        say(f"  in-flight request -> EngineDeadError after SIGKILL: n={rf['n']} p50={1000 * rf['p50']:.1f}ms "
            f"p99={1000 * rf['p99']:.1f}ms")
        for sig, fates in j["fates"].items():
            say(f"  fates {sig}: {', '.join(sorted({f.split(':')[1] for f in fates}))}; exit codes "
                f"{j['exit_codes'][sig]}")
        if j.get("tokens_seen_before_death"):
            t = j["tokens_seen_before_death"]
            say(f"  output tokens an in-flight request had streamed before EngineDeadError: n={t['n']} "
                f"min={t['min']} max={t['max']}")
        say(f"  fates vs simulator (every request, every signal): {len(j['fate_mismatches_vs_sim'])} mismatches; "
            f"after detection a new request gets {', '.join(j['after_death'])}")
    j = _load(d, "ec_deferral.json")
    if j:
        ev = {e["role"]: e for e in j["connector_events"] if e["event"] == "shutdown"}
        say(f"EC deferral (tiny-llava, mp executor): {j['requests']} requests ({j['mm_requests']} with images), "
            f"{j['steps']} steps, {j['deferrals_total']} deferrals in {j['steps_with_deferral']} steps, "
            f"{j['ec_loads']} EC loads, {j['local_encodes']} local encodes; identical to the simulator "
            f"(per-step deferrals, TTFT): {j['identical']}")
        for role, e in sorted(ev.items()):
            say(f"  connector shutdown in {role} (pid {e['pid']}{', this process' if e['pid'] == j['this_pid'] else ''}): "
                f"pending {e['pending_at_shutdown']}, drained {e['drained']}, left {e['left']}")
    j = _load(d, "kv_offload.json")
    if j:
        say(f"KV offload (48 GPU blocks, CPU tier, 3 rounds of 6 prompts): {j['requests']} requests; vs simulator: "
            f"cached tokens identical {j['cached_identical']}, store chunks identical {j['store_chunks_identical']}, "
            f"load chunks identical {j['load_chunks_identical']}; {j['store_jobs']} store / {j['load_jobs']} load "
            f"jobs, {len(j['flushed_jobs'])} flushed, {j['done_jobs']} done; {j['drain_steps']} drain steps "
            f"({j['drain_ms']} ms); pending at stop: {j['pending_jobs_at_stop']} jobs, push work "
            f"{j['pending_push_work_at_stop']}")
    for prof in sorted(d.glob("*-tiny-llama.json")) + sorted(d.glob("*-llama3-8b-shape.json")):
        p = json.loads(prof.read_text())
        c, f = p["coeffs"], p["fit"]
        say(f"profile {p['name']}: base {1e3 * c['base']:.4f} ms, prefill {1e6 * c['prefill_token']:.4f} us/token, "
            f"decode {1e6 * c['decode_req']:.4f} us/req, context {1e9 * c['context_token']:.4f} ns/token; "
            f"{f['steps']} steps {f.get('sources', '')}, R^2 {f['r2']}, step MAPE {f['step_mape_pct']}%, "
            f"total {f.get('total_err_pct')}%")
    for fid in sorted(d.glob("fidelity_*.json")):
        r = json.loads(fid.read_text())
        say(f"held-out {r['model']} ({r['requests']} Poisson requests, seed {r['seed']}): " + "; ".join(
            f"{m.upper()} MAPE {r[m]['mape_pct']}% mean {r[m]['mean_err_pct']:+}% p50 {r[m]['p50_ms']['err_pct']:+}% "
            f"p90 {r[m]['p90_ms']['err_pct']:+}%" for m in ("ttft", "tpot", "e2e"))
            + f"; held-out steps: MAPE {r.get('heldout_step_mape_pct')}%, total {r.get('heldout_step_total_err_pct')}%")
    print("\n".join(lines) if lines else f"no GPU results under {d}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="held-out fidelity of a calibrated profile")
    r.add_argument("--profile", required=True, help="profile name (packaged) or JSON path")
    r.add_argument("--seed", type=int, default=1234)
    r.add_argument("--requests", type=int, default=None)
    r.add_argument("--out")
    s = sub.add_parser("summary", help="print the GPU tier's summary from its results")
    s.add_argument("dir", nargs="?", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    args = ap.parse_args()
    return cmd_run(args) if args.cmd == "run" else cmd_summary(args)


if __name__ == "__main__":
    sys.exit(main())
