"""``vllm-faultsim calibrate``: measure the real engine's step time on a GPU and fit the
simulator's step-time model (``models.step_time.LinearStepTime``) to it.

The real engine (in-process ``LLMEngine``, dummy weights, synchronous scheduling, eager mode or,
with ``--cuda-graphs``, vLLM's default CUDA graphs, the recording scheduler) is driven over a grid
of batch shapes: for each context length C and number of decode requests D, D requests with
C-token prompts are prefilled (those steps are measured too), then pure decode steps are measured, then one prefill of P tokens is added next to the D
decodes for each P of the grid. Each step's time is paired with its shape (prefill tokens, decode requests, context
tokens) as the recording scheduler saw it, and ``base + a*prefill + b*decode + c*context`` is
fitted by non-negative least squares (absolute error: the simulator adds step times up). A
Poisson *training* trace (seed 99, the held-out trace's distribution) served in real time adds
the steps of a serving loop to the fit; a step's time is the loop's period, from the previous
step's end, so work done between steps (adding requests) counts. The profile (coefficients, fit
statistics, device, host, vLLM version, engine settings) is written as JSON in the package's
profile format. With ``--heldout``, a Poisson trace that played no part in the fit is then served
in real time on the same engine and simulated with the new profile: TTFT, TPOT and end-to-end
latency errors (MAPE) are reported and written next to the profile.

Only this command imports numpy; the simulator does not need it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..drivers import real_engine as RE
from ..drivers.dry_run import EXECUTOR as DRYRUN_EXECUTOR, use_cpu_platform
from ..drivers.wall_clock import run_wall_clock
from .gpu import latency_metrics, mape, records_from_trace, write_json

# A Llama-3-8B-shaped config (dummy weights: for timing only).
LLAMA3_8B_SHAPE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_hidden_layers": 32, "vocab_size": 128256, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "bos_token_id": 1,
    "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu",
}
MODELS = ("tiny-llama", "llama3-8b-shape")

GRIDS = {
    # contexts (prompt length of the decode requests), decode counts, extra prefill sizes
    "quick": {"contexts": [128, 1024], "decodes": [1, 8, 32], "prefills": [16, 128, 512, 1536], "repeats": 3},
    "full": {"contexts": [128, 512, 1536], "decodes": [1, 4, 16, 48, 80],
             "prefills": [16, 64, 256, 768, 1536], "repeats": 4},
}


def model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """The folder of a named model (or a path given as is)."""
    from ..drivers import model_dirs
    if name == "tiny-llama":
        return model_dirs.tiny_llama(cache_dir)
    if name == "llama3-8b-shape":
        root = Path(cache_dir) if cache_dir else model_dirs.default_cache_dir()
        d = root / "llama3-8b-shape"
        d.mkdir(parents=True, exist_ok=True)
        cfg = d / "config.json"
        text = json.dumps(LLAMA3_8B_SHAPE, indent=2, sort_keys=True)
        if not cfg.exists() or cfg.read_text() != text:
            cfg.write_text(text)
        return d
    p = Path(name)
    if not (p / "config.json").exists():
        raise SystemExit(f"calibrate: unknown model {name!r} (use {', '.join(MODELS)} or a folder with config.json)")
    return p


def engine_settings(args) -> dict:
    """The engine configuration both the calibration and the held-out run use."""
    big = args.model == "llama3-8b-shape"
    return {
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "block_size": 16, "num_gpu_blocks": args.num_gpu_blocks, "max_model_len": args.max_model_len,
        "dtype": "bfloat16" if big else "float16", "enforce_eager": not args.cuda_graphs, "async_scheduling": False,
        "gpu_memory_utilization": args.gpu_memory_utilization or (0.85 if big else 0.15),
    }


def scheduler_config(settings: dict):
    """The simulator's scheduler config of the engine in ``settings``, in its scheduling mode (the
    held-out run is simulated as the engine ran it: sync, since the calibration engine is)."""
    from ...models.scheduler import SchedulerConfig
    return SchedulerConfig(max_num_seqs=settings["max_num_seqs"],
                           max_num_batched_tokens=settings["max_num_batched_tokens"],
                           block_size=settings["block_size"], num_gpu_blocks=settings["num_gpu_blocks"],
                           max_model_len=settings["max_model_len"], async_scheduling=settings["async_scheduling"])


def open_engine(model: Path, settings: dict, *, dry_run: bool = False):
    extra = {"distributed_executor_backend": DRYRUN_EXECUTOR} if dry_run else {}
    sched = scheduler_config(settings)
    kw = RE.engine_args(sched, model=model, dtype=settings["dtype"], async_scheduling=sched.async_scheduling,
                        enforce_eager=settings["enforce_eager"],
                        gpu_memory_utilization=settings["gpu_memory_utilization"], **extra)
    return RE.open_llm(**kw)


# ---- measuring ----------------------------------------------------------------------------

class _Clock:
    """The engine loop's period: a step's time runs from the previous step's end, so work done
    between steps (adding requests) counts, as it does in a serving loop."""

    def __init__(self):
        self.t_prev = time.perf_counter()


def _step(engine, sched, rows: list, clock: _Clock, keep: bool = True):
    sched.faultsim_last = None
    outs = engine.step()
    t1 = time.perf_counter()
    cycle, clock.t_prev = t1 - clock.t_prev, t1
    res = sched.faultsim_last
    if keep and res is not None and res.sched:
        rows.append((*res.shape(), cycle))
    return outs


DECODE_TOKENS = 256  # output budget of a grid cell's decode requests (a cell takes far fewer steps)


def measure_grid(llm, grid: dict, *, max_num_seqs: int, max_model_len: int, kv_tokens: int,
                 log=print) -> list[tuple]:
    """Rows (prefill tokens, decode requests, context tokens, wall seconds) over the grid."""
    from vllm import SamplingParams

    from ...models.request import RequestSpec, prompt_token_ids
    engine, sched = llm.llm_engine, RE.scheduler_of(llm)
    sched.faultsim_keep = False
    rows: list[tuple] = []
    clock = _Clock()
    n = 0

    def prompt(length: int) -> dict:
        nonlocal n
        n += 1
        return {"prompt_token_ids": prompt_token_ids(RequestSpec(f"c{n}", 0.0, length, 1))}

    def drain():
        while engine.has_unfinished_requests():
            _step(engine, sched, rows, clock, keep=False)

    # warm-up: every kernel shape once
    for p in (64, 512, 2048):
        engine.add_request(f"warm{p}", prompt(min(p, max_model_len - 8)), SamplingParams(max_tokens=4, ignore_eos=True,
                                                                                       detokenize=False))
        drain()
    for ctx in grid["contexts"]:
        for d in grid["decodes"]:
            # the cell must fit in the KV cache without preemption
            if (d + 1 > max_num_seqs or ctx + DECODE_TOKENS + 1 > max_model_len
                    or d * (ctx + DECODE_TOKENS) + max(grid["prefills"]) > 0.9 * kv_tokens):
                log(f"  context {ctx:5d}  decodes {d:4d}: skipped (does not fit the KV cache or the limits)")
                continue
            long = SamplingParams(max_tokens=DECODE_TOKENS, ignore_eos=True, detokenize=False)
            ids = [f"d{ctx}-{d}-{i}" for i in range(d)]
            clock.t_prev = time.perf_counter()  # a new cell: the first step counts from here
            for rid in ids:
                engine.add_request(rid, prompt(ctx), long)
            while any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running) or sched.waiting:
                _step(engine, sched, rows, clock)
            for _ in range(grid["repeats"]):
                _step(engine, sched, rows, clock)
            for p in grid["prefills"]:
                if ctx + p + 1 > max_model_len:
                    continue
                for _ in range(max(1, grid["repeats"] // 2)):
                    engine.add_request(f"p{n}", prompt(p), SamplingParams(max_tokens=1, ignore_eos=True,
                                                                          detokenize=False))
                    while sched.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
                        _step(engine, sched, rows, clock)
                    _step(engine, sched, rows, clock)  # a pure decode step in between
            engine.abort_request(ids)
            drain()
            log(f"  context {ctx:5d}  decodes {d:4d}: {len(rows)} steps measured")
    return rows


# ---- fitting ------------------------------------------------------------------------------

def fit(rows: list[tuple]) -> dict:
    """Non-negative least squares of step time ~ base + a*P + b*D + c*C (absolute error).

    Absolute, not relative, error: step times are noisy (eager mode is bound by the CPU's kernel
    launches and jitters by +-20% step to step), and the simulator adds steps up into TTFT,
    TPOT and end-to-end latency, so the fit must be unbiased in the sum; a fit on relative error
    leans towards the fast outliers and under-predicts totals."""
    import numpy as np
    data = np.asarray(rows, dtype=float)
    x = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1], data[:, 2]])
    y = data[:, 3]
    a, b = x, y
    try:
        from scipy.optimize import nnls
        coef, _ = nnls(a, b)
    except ImportError:  # plain least squares, negative coefficients dropped and refitted
        active = list(range(4))
        while True:
            sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
            if (sol >= 0).all():
                coef = np.zeros(4)
                coef[active] = sol
                break
            active = [i for i, v in zip(active, sol) if v >= 0 or i == 0]
    pred = x @ coef
    rel = np.abs(pred - y) / y
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    keys = ("base", "prefill_token", "decode_req", "context_token")
    return {"coeffs": {k: float(f"{v:.6g}") for k, v in zip(keys, coef)},
            "fit": {"steps": int(len(y)), "r2": round(1 - ss_res / ss_tot, 5),
                    "step_mape_pct": round(100 * float(rel.mean()), 3),
                    "total_err_pct": round(100 * float((pred.sum() - y.sum()) / y.sum()), 3),
                    "step_p90_rel_err_pct": round(100 * float(np.quantile(rel, 0.9)), 3),
                    "step_max_rel_err_pct": round(100 * float(rel.max()), 3),
                    "wall_ms_range": [round(1000 * float(y.min()), 3), round(1000 * float(y.max()), 3)],
                    "shape_ranges": {"prefill": [int(data[:, 0].min()), int(data[:, 0].max())],
                                     "decode": [int(data[:, 1].min()), int(data[:, 1].max())],
                                     "context": [int(data[:, 2].min()), int(data[:, 2].max())]}}}


def profile_doc(name: str, model: str, fitted: dict, settings: dict, grid_name: str) -> dict:
    info = RE.host_info()
    return {
        "name": name,
        "description": (f"Calibrated on {info.get('device')} with vLLM {info.get('vllm')}: {model}, dummy weights, "
                        f"{settings['dtype']}, {'eager' if settings['enforce_eager'] else 'CUDA graphs'}, "
                        "synchronous scheduling. Step time = LLMEngine.step() wall time."),
        "model": "linear",
        "coeffs": fitted["coeffs"],
        "host": {k: info.get(k) for k in ("hostname", "cpu_count", "torch", "cuda", "device_memory_gib")},
        "vllm": info.get("vllm"),
        "device": info.get("device"),
        "fit": fitted["fit"],
        "engine": {"model": model, "grid": grid_name, **settings},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---- the training and held-out traces ------------------------------------------------------

TRAIN_SEED = 99  # the training trace's seed; the held-out trace's default is 1234


def measure_trace(llm, specs) -> list[tuple]:
    """Rows (prefill, decode, context, loop period) of a Poisson trace served in real time."""
    from dataclasses import replace
    run = run_wall_clock(llm, [replace(s, req_id=f"train-{s.req_id}") for s in specs])
    return [(*st.shape, st.cycle) for st in run.steps]


def heldout_workload(model: str, seed: int, num_requests: int | None = None):
    from ..workload import poisson
    if model == "llama3-8b-shape":
        return poisson(6.0, num_requests=num_requests or 80, prompt={"uniform": [64, 1024]},
                       output={"uniform": [16, 160]}, seed=seed)
    return poisson(40.0, num_requests=num_requests or 200, prompt={"uniform": [16, 768]},
                   output={"uniform": [8, 128]}, seed=seed)


def fidelity(llm, profile_path: str | Path, settings: dict, specs, *, seed: int,
             steps_out: str | Path | None = None) -> dict:
    """Serve `specs` in real time and simulate them with the profile; latency errors."""
    from ...faults.plan import FaultPlan
    from ..metrics import percentile
    from .simulate import RunConfig, simulate

    real = run_wall_clock(llm, specs)
    if steps_out:
        with open(steps_out, "w") as fh:
            for st in real.steps:
                fh.write(json.dumps({"prefill": st.shape[0], "decode": st.shape[1], "context": st.shape[2],
                                     "wall": st.wall, "cycle": st.cycle}) + "\n")
    cfg = RunConfig(scheduler=scheduler_config(settings), seed=seed, profile=str(profile_path))
    sim = simulate(cfg, FaultPlan(), specs=specs, full_trace=False, keep=frozenset({"req"}))
    rm = latency_metrics(real.requests)
    sm = latency_metrics(records_from_trace(sim.events))
    out: dict = {"requests": len(specs), "real_span_s": round(real.span, 3),
                 "sim_span_s": sim.summary["sim_time_s"], "real_steps": len(real.steps),
                 "sim_steps": sim.summary["steps"]}
    for metric in ("ttft", "tpot", "e2e"):
        r = {k: v[metric] for k, v in rm.items() if metric in v}
        s = {k: v[metric] for k, v in sm.items() if metric in v}
        common = [k for k in r if k in s]
        mean_r = sum(r[k] for k in common) / len(common)
        mean_s = sum(s[k] for k in common) / len(common)
        entry = {"mape_pct": round(mape(s, r), 3), "n": len(common),
                 "mean_ms": {"real": round(1000 * mean_r, 3), "sim": round(1000 * mean_s, 3)},
                 "mean_err_pct": round(100 * (mean_s - mean_r) / mean_r, 3)}
        for q in (50, 90, 99):
            pr = percentile([r[k] for k in common], q)
            ps = percentile([s[k] for k in common], q)
            entry[f"p{q}_ms"] = {"real": round(1000 * pr, 3), "sim": round(1000 * ps, 3),
                                 "err_pct": round(100 * (ps - pr) / pr, 3)}
        out[metric] = entry
    # the step-time model on the held-out run's own steps
    prof = json.loads(Path(profile_path).read_text())["coeffs"]
    pred = [prof["base"] + prof["prefill_token"] * p + prof["decode_req"] * d + prof["context_token"] * c
            for (p, d, c) in (st.shape for st in real.steps)]
    cyc = [st.cycle for st in real.steps]
    if cyc:
        out["heldout_step_mape_pct"] = round(100 * sum(abs(a - b) / b for a, b in zip(pred, cyc)) / len(cyc), 3)
        out["heldout_step_total_err_pct"] = round(100 * (sum(pred) - sum(cyc)) / sum(cyc), 3)
    out["per_request"] = {rid: {m: round(1000 * v, 3) for m, v in rm[rid].items()} for rid in sorted(rm)}
    out["per_request_sim"] = {rid: {m: round(1000 * v, 3) for m, v in sm[rid].items()} for rid in sorted(sm)}
    return out


# ---- the command --------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-llama",
                   help=f"{' | '.join(MODELS)} | a model folder (dummy weights are used) [tiny-llama]")
    p.add_argument("--name", help="profile name [<device>-<model>]")
    p.add_argument("--out", help="profile path [the package's profiles/<name>.json]")
    p.add_argument("--grid", choices=sorted(GRIDS), default="quick", help="batch-shape grid [quick]")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--num-gpu-blocks", type=int, default=8192, help="KV blocks (both sides) [8192]")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--steps-out", help="write the raw measurements (JSON lines) here")
    p.add_argument("--heldout", action="store_true", help="then run a held-out Poisson trace: real vs simulated")
    p.add_argument("--heldout-seed", type=int, default=1234)
    p.add_argument("--heldout-requests", type=int, default=None)
    p.add_argument("--heldout-out", help="write the held-out comparison here "
                   "[benchmarks/results/gpu_fidelity_<name>.json]")
    p.add_argument("--heldout-steps-out", help="write the held-out run's real steps (JSON lines) here")
    p.add_argument("--no-train-trace", dest="train_trace", action="store_false",
                   help="fit on the grid alone (default: the grid plus a Poisson training trace, seed "
                        f"{TRAIN_SEED}, from the held-out trace's distribution)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="run the engine with CUDA graphs, vLLM's default (default: eager; the profile name "
                        "gets -cudagraphs)")
    p.add_argument("--model-cache-dir", default=None)
    p.add_argument("--dry-run", action="store_true",
                   help="check the command on a CPU-only machine: a deterministic stand-in replaces the GPU "
                        "worker (the numbers mean nothing)")


def device_slug() -> str:
    name = RE.host_info().get("device") or "gpu"
    for key in ("H200", "H100", "A100", "L40S", "B200", "GH200"):
        if key in name:
            return key.lower()
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def main(args: argparse.Namespace) -> int:
    reason = RE.gpu_skip_reason()
    if args.dry_run:
        use_cpu_platform()
    elif reason:
        print(f"calibrate: {reason}", file=sys.stderr)
        return 2
    model = model_dir(args.model, args.model_cache_dir)
    settings = engine_settings(args)
    label = args.model if args.model in MODELS else Path(args.model).name
    name = args.name or f"{device_slug()}-{label}" + ("-cudagraphs" if args.cuda_graphs else "")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent.parent / "profiles" / f"{name}.json"
    t0 = time.time()
    llm = open_engine(model, settings, dry_run=args.dry_run)
    print(f"calibrate: engine up in {time.time() - t0:.1f} s ({label}, {RE.host_info().get('device')})", flush=True)
    rows = measure_grid(llm, GRIDS[args.grid], max_num_seqs=settings["max_num_seqs"],
                        max_model_len=settings["max_model_len"],
                        kv_tokens=settings["num_gpu_blocks"] * settings["block_size"])
    sources = {"grid": len(rows)}
    if args.train_trace:
        trace_rows = measure_trace(llm, heldout_workload(args.model, TRAIN_SEED))
        sources.update(trace=len(trace_rows), trace_seed=TRAIN_SEED)
        print(f"  training trace (seed {TRAIN_SEED}): {len(trace_rows)} steps measured", flush=True)
        rows += [(*r, "trace") for r in trace_rows]
        rows = [r if len(r) == 5 else (*r, "grid") for r in rows]
    if args.steps_out:
        with open(args.steps_out, "w") as fh:
            for r in rows:
                fh.write(json.dumps({"prefill": r[0], "decode": r[1], "context": r[2], "cycle": r[3],
                                     "source": r[4] if len(r) > 4 else "grid"}) + "\n")
    fitted = fit([r[:4] for r in rows])
    fitted["fit"]["sources"] = sources
    doc = profile_doc(name, label, fitted, settings, args.grid)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    c, f = doc["coeffs"], doc["fit"]
    print(f"calibrate: {f['steps']} steps in {time.time() - t0:.1f} s; base {1e3 * c['base']:.3f} ms, "
          f"prefill {1e6 * c['prefill_token']:.3f} us/token, decode {1e6 * c['decode_req']:.3f} us/request, "
          f"context {1e9 * c['context_token']:.3f} ns/token; R^2 {f['r2']}, step MAPE {f['step_mape_pct']}%",
          flush=True)
    print(f"calibrate: wrote {out}", flush=True)
    if args.heldout:
        specs = heldout_workload(args.model, args.heldout_seed, args.heldout_requests)
        res = fidelity(llm, out, settings, specs, seed=args.heldout_seed, steps_out=args.heldout_steps_out)
        res.update({"profile": name, "device": doc["device"], "vllm": doc["vllm"], "model": label,
                    "seed": args.heldout_seed})
        hp = Path(args.heldout_out) if args.heldout_out else Path("benchmarks/results") / f"gpu_fidelity_{name}.json"
        write_json(hp, res)
        print("calibrate: held-out " + ", ".join(f"{m.upper()} MAPE {res[m]['mape_pct']}% (mean err "
                                                   f"{res[m]['mean_err_pct']}%)" for m in ("ttft", "tpot", "e2e")),
              flush=True)
        print(f"calibrate: wrote {hp}", flush=True)
    RE.shutdown_llm(llm)
    return 0


if __name__ == "__main__":  # python -m vllm_faultsim.harness.runs.calibrate ... = vllm-faultsim calibrate ...
    from ..cli import main as cli_main
    sys.exit(cli_main(["calibrate", *sys.argv[1:]]))
