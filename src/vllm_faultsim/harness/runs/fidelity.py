"""``vllm-faultsim fidelity RECORDING``: replay a recorded real vLLM run through the simulator and
say how far its latencies are from the measured ones.

A recording (``vllm-faultsim.recording/1``, harness/recording.py) holds what ran (model, GPU,
tensor-parallel size, dtype, vLLM's engine arguments), every request's client-side times and,
optionally, every engine step's shape and times. The run config comes from the header: the engine
arguments by vLLM's names become the ``scheduler`` section (``max_num_seqs``,
``max_num_batched_tokens``, ``max_model_len``, ``block_size``, ``enable_prefix_caching``,
``async_scheduling``, ``num_gpu_blocks``), the model, GPU, tensor-parallel size and dtype the
``step_time`` section; ``--config`` overrides any of it (a mapping merged over it, section by
section). The requests are replayed as recorded (arrival, prompt and output lengths: the real run
used ``ignore_eos``, so output lengths are exact).

Metrics, per request: TTFT (first token - arrival), TPOT ((finish - first token) / (outputs - 1),
requests with more than one output token), E2E (finish - arrival). Per step, where steps are
recorded: the step-time model evaluated on each *recorded* batch shape against that step's measured
time, ``output_start[N] - max(schedule_end[N], output_start[N-1])`` with async scheduling (the
step's GPU time bounded from above; see harness/recording.py) and ``output_start - schedule_end``
without. For each: MAPE (mean |pred - meas| / meas, %), signed bias (mean (pred - meas) / meas, %),
p50/p90/p99 of both sides (nearest rank).

Bad recordings (missing header, unknown model or GPU, non-monotonic times, a request finishing
before its first token, ...) raise :class:`~vllm_faultsim.harness.runs.simulate.ConfigError` with
one line (the CLI exits 2).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...inputs import show
from ...models.request import RequestSpec
from ...models.step_time import DECODE_BIN, OUTPUT_PROC_CHUNK_SIZE, output_requests_before, serving_costs
from .. import recording as recording_format
from ..metrics import percentile
from ..named_setup import merge  # the header's config, with --config merged over it
from .simulate import ConfigError, RunConfig, config_from_dict, simulate, step_time_model

# GPU names as torch.cuda.get_device_name() gives them -> aiconfigurator's system names.
GPU_SYSTEMS = {
    "NVIDIA H200": "h200_sxm", "NVIDIA H200 NVL": "h200_sxm",
    "NVIDIA H100 80GB HBM3": "h100_sxm", "NVIDIA H100": "h100_sxm",
    "NVIDIA B200": "b200_sxm", "NVIDIA B300": "b300_sxm", "NVIDIA GB200": "gb200", "NVIDIA GB300": "gb300",
    "NVIDIA L40S": "l40s", "NVIDIA RTX PRO 6000 Blackwell Server Edition": "rtx_pro_6000_server",
}
# Recording model names -> the name of a config aiconfigurator ships (used when the header has no hf_config).
MODELS = {"llama-3.1-8b": "meta-llama/Meta-Llama-3.1-8B", "llama-3.1-70b": "meta-llama/Meta-Llama-3.1-70B",
          "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B", "qwen3-8b": "Qwen/Qwen3-8B", "qwen3-32b": "Qwen/Qwen3-32B"}
SCHEDULER_ARGS = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "enable_prefix_caching",
                  "async_scheduling", "num_gpu_blocks", "enable_chunked_prefill", "long_prefill_token_threshold")
METRICS = ("ttft", "tpot", "e2e", "step")
LABELS = {"ttft": "TTFT", "tpot": "TPOT", "e2e": "E2E", "step": "step time"}


def load(path: str | Path) -> recording_format.Recording:
    """Read and validate a recording; any problem is a one-line ConfigError."""
    try:
        rec = recording_format.read(path)
    except recording_format.RecordingError as exc:
        raise ConfigError(str(exc)) from None
    h = rec.header
    if h["gpu"] not in GPU_SYSTEMS:
        raise ConfigError(f"{path}:1: gpu: unknown GPU, known: {', '.join(sorted(GPU_SYSTEMS))} (got {show(h['gpu'])})")
    if not isinstance(h.get("hf_config"), dict) and h["model"] not in MODELS:
        raise ConfigError(f"{path}:1: model: unknown model: no hf_config in the header and not one of "
                          f"{', '.join(sorted(MODELS))} (got {show(h['model'])})")
    return rec


def hf_config_dir(config: dict) -> str:
    """A folder holding `config` as config.json (content-addressed, under the temp dir), for
    estimators that take a Hugging Face model folder."""
    text = json.dumps(config, sort_keys=True, indent=1)
    d = Path(tempfile.gettempdir()) / "vllm-faultsim-hf" / hashlib.sha256(text.encode()).hexdigest()[:16]
    if not (d / "config.json").is_file():
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(text, encoding="utf-8")
    return str(d)


def header_config(rec: recording_format.Recording) -> dict:
    """The run config (as a mapping) of the recorded run: scheduler from vLLM's engine arguments,
    step time (aiconfigurator) from the model (the header's ``hf_config``, else a shipped config
    by name), GPU, tensor-parallel size and dtype."""
    h, e = rec.header, rec.header["engine"]
    sched = {k: e[k] for k in SCHEDULER_ARGS if k in e}
    model = hf_config_dir(h["hf_config"]) if isinstance(h.get("hf_config"), dict) else MODELS[h["model"]]
    step_time = {"backend": "aic", "model": model, "system": GPU_SYSTEMS[h["gpu"]],
                 "tp": h["tensor_parallel_size"], "dtype": h["dtype"]}
    out = {"scheduler": sched, "step_time": step_time}
    if e.get("async_scheduling", True):  # how the engine runs each batch (costs: zero until fitted)
        out["serving"] = engine_shape(rec)
    return out


def moe_layers(config: dict) -> int:
    """How many of a Hugging Face config's decoder layers vLLM builds with a MoE block: Qwen-MoE's
    rule (vllm/model_executor/models/qwen3_moe.py: ``num_experts > 0``, ``(i + 1) %
    decoder_sparse_step == 0``, not in ``mlp_only_layers``), DeepSeek's (deepseek_v2.py:
    ``n_routed_experts``, ``i >= first_k_dense_replace``, ``i % moe_layer_freq == 0``), and every
    layer of a model with ``num_local_experts`` (Mixtral)."""
    n = config.get("num_hidden_layers") or 0
    if config.get("n_routed_experts"):
        first, freq = config.get("first_k_dense_replace") or 0, config.get("moe_layer_freq") or 1
        return sum(1 for i in range(n) if i >= first and i % freq == 0)
    if config.get("num_experts"):
        step, dense = config.get("decoder_sparse_step") or 1, set(config.get("mlp_only_layers") or ())
        return sum(1 for i in range(n) if i not in dense and (i + 1) % step == 0)
    return n if config.get("num_local_experts") else 0


def engine_shape(rec: recording_format.Recording) -> dict:
    """The ``serving`` fields a recording's header fixes: the model's ``num_hidden_layers`` and
    ``num_moe_layers`` (its hf_config), ``cudagraph_mode`` (NONE with ``enforce_eager``) and
    ``max_cudagraph_capture_size`` (where the header records it; else vLLM's default from the
    engine's limits)."""
    h, e = rec.header, rec.header["engine"]
    out: dict[str, Any] = {"cudagraph_mode": "NONE" if e.get("enforce_eager") else "FULL_AND_PIECEWISE"}
    config = h.get("hf_config") or {}
    layers = config.get("num_hidden_layers")
    if isinstance(layers, int) and not isinstance(layers, bool):
        out["num_hidden_layers"] = layers
        out["num_moe_layers"] = moe_layers(config)
    if isinstance(e.get("max_cudagraph_capture_size"), int):
        out["max_cudagraph_capture_size"] = e["max_cudagraph_capture_size"]
    return out


def specs_of(rec: recording_format.Recording) -> tuple[RequestSpec, ...]:
    return tuple(RequestSpec(r["id"], r["arrival"], r["prompt_tokens"], r["output_tokens"]) for r in rec.requests)


def write_workload(rec: recording_format.Recording, path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": r["id"], "arrival": r["arrival"], "prompt_tokens": r["prompt_tokens"],
                                        "output_tokens": r["output_tokens"]}) + "\n" for r in rec.requests),
                    encoding="utf-8")
    return path


def run_config(rec: recording_format.Recording, workload_path: Path, overrides: dict | None = None) -> RunConfig:
    d = merge(header_config(rec), overrides or {})
    d["workload"] = {"kind": "jsonl", "path": str(workload_path)}
    return config_from_dict(d)


# ---- metrics --------------------------------------------------------------------------------

def request_metrics(r: dict) -> dict[str, float]:
    """TTFT, E2E and (more than one output) TPOT of a request from its times (recording or trace)."""
    out = {"ttft": r["first_token"] - r["arrival"], "e2e": r["finish"] - r["arrival"]}
    n = r.get("output_tokens", r.get("num_output"))
    if n > 1:
        out["tpot"] = (r["finish"] - r["first_token"]) / (n - 1)
    return out


def measured_step_times(rec: recording_format.Recording) -> list[tuple[dict, float]]:
    """(step, measured seconds) for every recorded step: the step's GPU time bounded from above."""
    asyncs = rec.header["engine"].get("async_scheduling", True)
    out, prev = [], None
    for s in rec.steps:
        start = s["schedule_end"]
        if asyncs and prev is not None and s["i"] == prev["i"] + 1:
            start = max(start, prev["output_start"])
        out.append((s, s["output_start"] - start))
        prev = s
    return out


def predicted_step_times(rec: recording_format.Recording, model, costs) -> list[float]:
    """The model's :func:`measured_step_times` of every recorded step: the recorded batches replayed
    through the engine loop's clock (models/engine.py ``step_with_batch_queue``): schedule() (costs),
    launch (ServingCosts.execute; the forward ends no earlier than its launch), block on the oldest
    batch when the queue is full, update_from_output(). A step the recorded engine scheduled after
    it had applied every batch (it was idle) starts no earlier than it was recorded to start (the
    work came then), the others as soon as the core is free; where the recorded engine blocked on a batch before
    scheduling the next one (the next was scheduled after the batch's output), the replay does too."""
    steps = rec.steps
    asyncs = rec.header["engine"].get("async_scheduling", True)
    out_start: dict[int, float] = {}
    cpu = gpu = 0.0
    queue: list[tuple[int, float]] = []  # (step index, forward end), oldest first
    sched_end: list[float] = []

    def block(k: int, end: float) -> None:
        nonlocal cpu
        n = steps[k]["num_prefill_requests"] + steps[k]["num_decode_requests"]
        out_start[k] = max(cpu, end)
        cpu = out_start[k] + costs.update_base_s + costs.update_per_req_s * n

    for k, s in enumerate(steps):
        n = s["num_prefill_requests"] + s["num_decode_requests"]
        if k == 0 or s["schedule_start"] > steps[k - 1]["output_end"]:  # the recorded engine was idle
            cpu = max(cpu, s["schedule_start"])
        cpu += costs.schedule_base_s + costs.schedule_per_req_s * n
        sched_end.append(cpu)
        end = max(gpu, cpu) + model.batch_seconds(shape_of(s))
        if asyncs:
            cpu += costs.execute_seconds(n, s["total_tokens"])
            end = max(end, cpu)
        gpu = end
        queue.append((k, end))
        nxt = steps[k + 1] if k + 1 < len(steps) else None
        full = len(queue) == 2
        while queue and (full or not asyncs or nxt is None or nxt["schedule_start"] > steps[queue[0][0]]["output_start"]):
            block(*queue.pop(0))
            full = False
    out, prev = [], None
    for k, s in enumerate(steps):
        start = sched_end[k]
        if asyncs and prev is not None and s["i"] == prev["i"] + 1:
            start = max(start, out_start[k - 1])
        out.append(out_start[k] - start)
        prev = s
    return out


def shape_of(step: dict) -> tuple[int, int, int, int, int]:
    return (step["num_prefill_requests"], step["sum_prefill_tokens"], step["sum_prefill_kv_tokens"],
            step["num_decode_requests"], step["sum_decode_kv_tokens"])


def error_stats(pred: list[float], meas: list[float]) -> dict[str, Any]:
    """MAPE and signed bias (%), p50/p90/p99 of both sides (ms), over pairs with a positive measurement."""
    pairs = [(p, m) for p, m in zip(pred, meas) if m > 0]
    if not pairs:
        return {"n": 0}
    rel = [(p - m) / m for p, m in pairs]
    ps, ms = [p for p, _ in pairs], [m for _, m in pairs]
    out: dict[str, Any] = {"n": len(pairs), "mape_pct": round(100 * sum(abs(x) for x in rel) / len(rel), 2),
                           "bias_pct": round(100 * sum(rel) / len(rel), 2)}
    for q in (50, 90, 99):
        out[f"meas_p{q}_ms"] = round(1000 * percentile(ms, q), 3)
        out[f"pred_p{q}_ms"] = round(1000 * percentile(ps, q), 3)
    return out


@dataclass
class Fidelity:
    recording: str
    header: dict
    config: RunConfig
    metrics: dict[str, dict] = field(default_factory=dict)
    pairs: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # metric -> (pred, meas) s
    summary: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        h = self.header
        return {"recording": self.recording, "model": h["model"], "gpu": h["gpu"], "vllm": h["vllm"],
                "load": h["workload"].get("load"), "requests": len(self.pairs.get("e2e", ([], []))[0]),
                "config": self.config.to_dict(), "metrics": self.metrics, "simulated": self.summary,
                "notes": self.notes}


def fidelity(path: str | Path, overrides: dict | None = None, *, trace_path: str | Path | None = None,
             step_model=None) -> Fidelity:
    """Replay the recording at `path` through the simulator; the per-metric comparison."""
    rec = load(path)
    with tempfile.TemporaryDirectory() as tmp:
        wpath = write_workload(rec, (Path(trace_path).with_suffix(".workload.jsonl") if trace_path
                                     else Path(tmp) / "workload.jsonl"))
        cfg = run_config(rec, wpath, overrides)
        res = simulate(cfg, trace_path=trace_path, specs=specs_of(rec), keep=frozenset({"req"}), full_trace=True)
    out = Fidelity(str(path), rec.header, cfg, summary=res.summary)
    sim = {e["req"]: e for e in res.events if e.get("kind") == "req"}
    for metric in ("ttft", "tpot", "e2e"):
        out.pairs[metric] = ([], [])
    for r in rec.requests:
        s = sim.get(r["id"])
        if s is None or s.get("status") not in ("length", "stop"):
            out.notes.append(f"request {r['id']}: not finished in the simulation ({s and s.get('status')})")
            continue
        meas, pred = request_metrics(r), request_metrics(s)
        for metric, m in meas.items():
            if metric in pred:
                out.pairs[metric][0].append(pred[metric])
                out.pairs[metric][1].append(m)
    if rec.steps:
        model = step_model or step_time_model(cfg)
        costs = serving_costs(cfg.serving or {}, cfg.scheduler)
        out.pairs["step"] = (predicted_step_times(rec, model, costs), [m for _, m in measured_step_times(rec)])
    for metric, (pred, meas) in out.pairs.items():
        out.metrics[metric] = error_stats(pred, meas)
    return out


def format_report(f: Fidelity) -> str:
    h = f.header
    d = f.config.to_dict()
    st = d.get("step_time") or {"backend": "linear", "profile": f.config.profile}
    st_text = ", ".join(f"{k}={Path(str(v)).name if k == 'model' else v}" for k, v in st.items())
    lines = [f"{f.recording}: {h['model']} on {h['gpu']} (tp {h['tensor_parallel_size']}, {h['dtype']}), "
             f"vLLM {h['vllm']}, {len(f.header and f.pairs['e2e'][1])} requests, async_scheduling "
             f"{str(f.config.scheduler.async_scheduling).lower()}; step time: {st_text}",
             f"  {'metric':<10} {'n':>6} {'MAPE%':>7} {'bias%':>7}   {'p50 meas/sim ms':<18} {'p90 meas/sim ms':<18} "
             f"{'p99 meas/sim ms':<18}"]
    for metric in METRICS:
        m = f.metrics.get(metric)
        if not m or not m.get("n"):
            continue
        cells = [f"{m[f'meas_p{q}_ms']:.2f}/{m[f'pred_p{q}_ms']:.2f}".ljust(18) for q in (50, 90, 99)]
        lines.append(f"  {LABELS[metric]:<10} {m['n']:>6} {m['mape_pct']:>7.1f} {m['bias_pct']:>+7.1f}   " + " ".join(cells))
    lines += f.notes[:5]
    if len(f.notes) > 5:
        lines.append(f"... {len(f.notes) - 5} more notes")
    return "\n".join(lines)


def plot(f: Fidelity, path: str | Path) -> bool:
    """Predicted against measured, one panel per metric (log-log, y = x drawn); False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = [m for m in METRICS if f.pairs.get(m) and f.pairs[m][0]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        pred, meas = f.pairs[metric]
        xs, ys = [1000 * m for m in meas], [1000 * p for p in pred]
        ax.scatter(xs, ys, s=4, alpha=0.4)
        pos = [v for v in xs + ys if v > 0]
        if pos:
            lo, hi = min(pos), max(pos)
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
            ax.set(xscale="log", yscale="log")
        m = f.metrics[metric]
        ax.set(xlabel="measured (ms)", ylabel="simulated (ms)",
               title=f"{LABELS[metric]}: MAPE {m['mape_pct']:.1f}%, bias {m['bias_pct']:+.1f}%")
    h = f.header
    fig.suptitle(f"vllm-faultsim fidelity: {Path(f.recording).name} ({h['model']}, {h['gpu']})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- calibration on other recordings ---------------------------------------------------------

def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares a + b x, both clamped to >= 0."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var > 0 else 0.0
    return max(0.0, my - b * mx), b


LAUNCH_QUANTILE = 10  # FULL graphs: a launch is at most the time it is measured to take (a lower envelope, p10)
LAUNCH_BIN = 8  # requests per bin of that envelope (the CUDA-graph capture sizes' stride)


def launch_samples(rec: recording_format.Recording, costs) -> list[tuple[str, int, float, str]]:
    """(CUDA-graph runtime mode, requests, seconds, mode of step N) of every recorded step N+1
    launched while step N was in flight: from the end of N+1's schedule() to the start of N's
    update_from_output(), the core launches N+1 (ServingCosts.execute) and then waits for N's
    output: at least the launch, exactly the launch where the GPU finished N before it."""
    def mode(s: dict) -> str:
        return costs.runtime_mode(s["num_prefill_requests"] + s["num_decode_requests"], s["total_tokens"])

    return [(mode(c), c["num_prefill_requests"] + c["num_decode_requests"], b["output_start"] - c["schedule_end"], mode(b))
            for b, c in zip(rec.steps, rec.steps[1:]) if c["i"] == b["i"] + 1 and c["schedule_end"] <= b["output_start"]]


def fit(paths: list[str | Path], overrides: dict | None = None, model: str | None = None) -> dict:
    """A ``serving`` section calibrated on the recordings at `paths` (least squares and robust
    statistics over their step lines; costs per request and per layer, so they carry to other
    loads and models): ``schedule()`` and ``update_from_output()`` against the scheduled requests;
    the launch (ServingCosts.execute) from :func:`launch_samples` (:func:`launch_costs`); the
    request's path into the core and the outputs' path to the client from the requests' client
    times against the step lines (:func:`input_seconds`, :func:`output_costs`). The step-time
    correction (:func:`gpu_ratios`) comes from the recordings of `model` (a header's ``model``)
    among them only, all where None: it corrects aiconfigurator's data for one model, which says
    nothing of another's (none of that model: no correction)."""
    reqs, sched, upd = [], [], []
    full: list[dict[int, list[float]]] = []
    piecewise: list[tuple[int, int, float]] = []
    eager: list[list[tuple[int, int, int, float]]] = []
    inputs: list[tuple[float, float]] = []
    outputs: list[tuple[int, float]] = []
    for path in paths:
        rec = load(path)
        if not rec.steps:
            raise ConfigError(f"{path}: no step lines to calibrate on")
        with tempfile.TemporaryDirectory() as tmp:
            cfg = run_config(rec, write_workload(rec, Path(tmp) / "w.jsonl"), overrides)
        costs = serving_costs(cfg.serving or {}, cfg.scheduler)
        for s in rec.steps:
            reqs.append(s["num_prefill_requests"] + s["num_decode_requests"])
            sched.append(s["schedule_end"] - s["schedule_start"])
            upd.append(s["output_end"] - s["output_start"])
        full.append({})
        eager.append([])
        dense = costs.num_hidden_layers - costs.num_moe_layers
        for mode, n, x, behind in launch_samples(rec, costs):
            if mode == "FULL":
                full[-1].setdefault(n // LAUNCH_BIN, []).append(x)
            elif behind == "FULL" and costs.num_hidden_layers:
                if mode == "PIECEWISE":
                    piecewise.append((n, costs.num_hidden_layers, x))
                else:
                    eager[-1].append((n, dense, costs.num_moe_layers, x))
        inputs += input_bounds(rec)
        outputs += output_samples(rec)
    sa, sb = _line(reqs, sched)
    ua, ub = _line(reqs, upd)
    oa, ob = output_costs(outputs)
    serving = {"schedule_base_s": sa, "schedule_per_req_s": sb, "update_base_s": ua, "update_per_req_s": ub,
               **launch_costs(full, piecewise, eager), "input_s": input_seconds(inputs),
               "output_base_s": oa, "output_per_req_s": ob}
    ratios = gpu_ratios([p for p in paths if model is None or load(p).header["model"] == model], overrides, serving)
    return {"serving": {k: round(v, 9) for k, v in serving.items()},
            "step_time": {k: [round(x, 4) for x in v] if isinstance(v, list) else round(v, 4) for k, v in ratios.items()}}


def first_scheduled(rec: recording_format.Recording) -> list[int | None]:
    """The index (in ``rec.steps``) of the step that first scheduled each request: the steps'
    ``new_reqs`` where recorded, else the prefill requests replayed in FCFS order (a request's
    prompt tokens across its chunks; vLLM schedules running requests, then waiting ones in
    arrival order). All None where that replay disagrees with the recorded token sums (prefix-cache
    hits or preemptions)."""
    steps, reqs = rec.steps, rec.requests
    out: list[int | None] = [None] * len(reqs)
    if steps and "new_reqs" in steps[0]:
        for k, s in enumerate(steps):
            for j in s.get("new_reqs", ()):
                out[j] = k
        return out
    nxt, active, left = 0, [], {}
    for k, s in enumerate(steps):
        new = s["num_prefill_requests"] - len(active)
        if new < 0 or nxt + new > len(reqs):
            return [None] * len(reqs)
        for j in range(nxt, nxt + new):
            out[j], left[j] = k, reqs[j]["prompt_tokens"]
            active.append(j)
        nxt += new
        tokens = s["sum_prefill_tokens"]
        for j in active:
            take = min(left[j], tokens)
            left[j] -= take
            tokens -= take
        if tokens:
            return [None] * len(reqs)
        active = [j for j in active if left[j]]
    return out


def input_bounds(rec: recording_format.Recording) -> list[tuple[float, float]]:
    """(lo, hi] around each request's time from the client's add_request to the core's input queue:
    it was not in the scheduler at the schedule() before the one that first scheduled it (if that
    step left nothing waiting and followed at once: lo = its schedule_start - arrival; else -inf)
    and was in it by that one's (hi = its schedule_start - arrival), or by vLLM's ``stats.queued_ts``
    where recorded (``Scheduler.add_request``, called as the busy loop drains the input queue: the
    input path plus the wait for the loop to come round, an upper bound, not the path itself)."""
    steps, out = rec.steps, []
    for r, k in zip(rec.requests, first_scheduled(rec)):
        if k is None:
            continue
        lo = float("-inf")
        if k and steps[k - 1]["i"] == steps[k]["i"] - 1 and steps[k - 1].get("num_waiting", 1) == 0:
            lo = steps[k - 1]["schedule_start"] - r["arrival"]
        hi = (r["stats"]["queued_ts"] if "stats" in r else steps[k]["schedule_start"]) - r["arrival"]
        out.append((lo, max(lo, hi)))
    return out


INPUT_GRID_S = 1e-5  # input_s is searched on a 10 us grid up to 20 ms
INPUT_MAX_S = 0.02


def input_seconds(bounds: list[tuple[float, float]]) -> float:
    """The input path's time most consistent with :func:`input_bounds` (interval-censored: the
    value inside the most (lo, hi] intervals; the mean of the grid points that tie; an empty
    interval (lo = hi) counts as (hi - INPUT_GRID_S, hi])."""
    if not bounds:
        return 0.0
    los = sorted(lo if lo < hi else hi - INPUT_GRID_S for lo, hi in bounds)
    his = sorted(hi for _, hi in bounds)
    best, at = -1, []
    for g in range(int(INPUT_MAX_S / INPUT_GRID_S) + 1):
        x = g * INPUT_GRID_S
        inside = (len(his) - bisect.bisect_left(his, x)) - (len(los) - bisect.bisect_left(los, x))
        if inside > best:
            best, at = inside, [x]
        elif inside == best:
            at.append(x)
    return sum(at) / len(at)


def output_samples(rec: recording_format.Recording) -> list[tuple[int, float]]:
    """(requests the output handler processed before the client had the token (ServingCosts'
    ``output_requests_before``), seconds from the step's update_from_output()'s end to the client)
    for each request's first and last token: the step is the one whose ``first_token_reqs`` /
    ``finished_reqs`` name the request where recorded, else the last step whose output ended
    before the client had the token. A request's position in the step's outputs is its rank by
    admission among the requests running then (vLLM schedules running requests, then new ones;
    admission by :func:`first_scheduled`, ties in arrival order); unknown: the whole step."""
    steps = rec.steps
    ends = [s["output_end"] for s in steps]
    listed: dict[tuple[str, int], int] = {}
    for k, s in enumerate(steps):
        for key in ("first_token_reqs", "finished_reqs"):
            for j in s.get(key, ()):
                listed[key, j] = k
    found = []  # (step, request, seconds, is its finish)
    for j, r in enumerate(rec.requests):
        for key, t in (("first_token_reqs", r["first_token"]), ("finished_reqs", r["finish"])):
            k = listed.get((key, j), bisect.bisect_right(ends, t) - 1)
            if k >= 0 and ends[k] <= t:
                found.append((k, j, t - ends[k], key == "finished_reqs"))
    size = lambda k: steps[k]["num_prefill_requests"] + steps[k]["num_decode_requests"]  # noqa: E731
    if not any(size(k) > OUTPUT_PROC_CHUNK_SIZE for k, *_ in found):
        return [(size(k), x) for k, _, x, _ in found]
    first = first_scheduled(rec)
    last = {j: k for k, j, _, done in found if done}
    admitted: dict[int, list[int]] = {}
    for j, k in enumerate(first):
        if k is not None:
            admitted.setdefault(k, []).append(j)
    queries: dict[int, list[int]] = {}
    for n, (k, j, _, _) in enumerate(found):
        queries.setdefault(k, []).append(n)
    out, running = [0] * len(found), []  # running: the running requests' ids, in admission order
    for k in range(len(steps)):
        running += admitted.get(k, ())  # by id within a step: FCFS
        for n in queries.get(k, ()):
            _, j, x, _ = found[n]
            m = size(k) if first[j] is None or j not in running else output_requests_before(running.index(j), size(k))
            out[n] = (m, x)
        if any(last.get(j) == k for j in running):
            running = [j for j in running if last.get(j, k + 1) > k]
    return out


def output_costs(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """ServingCosts' output_base_s, output_per_req_s: a line through the medians of LAUNCH_BIN-request
    bins of :func:`output_samples`."""
    bins: dict[int, list[float]] = {}
    for n, x in samples:
        bins.setdefault(n // LAUNCH_BIN, []).append(x)
    keys = sorted(bins)
    if not keys:
        return 0.0, 0.0
    meds = [percentile(bins[k], 50) for k in keys]
    return _line([LAUNCH_BIN * k + LAUNCH_BIN / 2 for k in keys], meds) if len(keys) > 1 else (meds[0], 0.0)


GPU_BOUND = 1.2  # a step is GPU-bound where its forward (by the model) is 1.2x the core's CPU time per step


def cpu_speed(rec: recording_format.Recording, serving: dict) -> float:
    """How slow the recorded engine core's CPU ran against a fitted ``serving`` section: the median
    over the recorded steps of the measured ``schedule()`` time over the section's line
    (``schedule_base_s + schedule_per_req_s x requests``). Measured: the same model and load
    recorded twice (r2) gives 1.37x on the 1B (its eager launches 1.45x as long), 0.99-1.03x on the
    8B at 64 requests a step."""
    line = lambda s: (serving["schedule_base_s"] + serving["schedule_per_req_s"]  # noqa: E731
                      * (s["num_prefill_requests"] + s["num_decode_requests"]))
    ratios = [(s["schedule_end"] - s["schedule_start"]) / line(s) for s in rec.steps if line(s) > 0]
    return percentile(ratios, 50) if ratios else 0.0  # 0: nothing to read it from (no steps, no fitted line)


def at_cpu_speed(fitted: dict, fit_paths: list[str | Path], path: str | Path) -> dict:
    """`fitted` (:func:`fit` on `fit_paths`) with every serving cost scaled to the CPU speed of the
    run at `path` relative to theirs (:func:`cpu_speed`; the median over `fit_paths`): the engine
    core's and the client's CPU work (schedule, launch, update, the request's path) all run on
    the recording host's CPU. It reads the replayed recording's schedule() times (none of its
    latencies)."""
    return scale_serving(fitted, cpu_speed_factor(fitted, fit_paths, path))


def scale_serving(fitted: dict, k: float) -> dict:
    """`fitted` with every serving cost times `k`."""
    return {**fitted, "serving": {key: round(v * k, 9) for key, v in fitted["serving"].items()}}


def cpu_speed_factor(fitted: dict, fit_paths: list[str | Path], path: str | Path) -> float:
    """The factor :func:`at_cpu_speed` scales by: the run at `path`'s :func:`cpu_speed` over the
    median of `fit_paths`'; 1.0 where either side recorded no schedule() time."""
    serving = fitted["serving"]
    ref = percentile([cpu_speed(load(p), serving) for p in fit_paths], 50)
    own = cpu_speed(load(path), serving)
    return own / ref if ref > 0 and own > 0 else 1.0


DECODE_BIN_MIN = 20  # GPU-bound decode steps a bin of decode_scale needs


def gpu_ratios(paths: list[str | Path], overrides: dict | None, serving: dict) -> dict[str, Any]:
    """The step-time correction ``decode_scale``, one per DECODE_BIN decode requests: measured over
    predicted forward time of FULL decode steps, summed over the GPU-bound ones (the forward
    GPU_BOUND times the core's schedule + launch + update by ``serving``) between two FULL decode
    steps that follow at once (the spacing of their ``output_start`` is then their forward), per
    bin of DECODE_BIN_MIN steps or more, up to the largest such bin, a bin without enough steps
    taking its smaller neighbour's (the first: the first measured); 1 where there are none.
    Measured on Qwen3-30B-A3B: 1.29 / 1.20 / 1.08 at 0-15 / 16-31 / 32+ requests, the same at every
    load; the 8B 0.98-1.03. Steps with prefill work get no correction: their forward overlaps their
    own launch (an eager one is launch-bound), so no recorded spacing measures it."""
    meas: dict[int, float] = {}
    pred: dict[int, float] = {}
    count: dict[int, int] = {}
    for path in paths:
        rec = load(path)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = run_config(rec, write_workload(rec, Path(tmp) / "w.jsonl"), merge(overrides or {}, {"serving": serving}))
        model, costs = step_time_model(cfg), serving_costs(cfg.serving, cfg.scheduler)
        for a, b, c in zip(rec.steps, rec.steps[1:], rec.steps[2:]):
            n = [s["num_prefill_requests"] + s["num_decode_requests"] for s in (a, b, c)]
            if not (b["i"] == a["i"] + 1 and c["i"] == b["i"] + 1 and b["schedule_end"] <= a["output_start"]
                    and c["schedule_end"] <= b["output_start"]
                    and all(costs.runtime_mode(k, s["total_tokens"]) == "FULL" for k, s in zip(n, (a, b, c)))):
                continue
            cpu = (costs.schedule_base_s + costs.schedule_per_req_s * n[2] + costs.execute_seconds(n[2], n[2])
                   + costs.update_base_s + costs.update_per_req_s * n[1])
            g = model.batch_seconds(shape_of(b))
            if g > GPU_BOUND * cpu:
                k = n[1] // DECODE_BIN
                meas[k] = meas.get(k, 0.0) + b["output_start"] - a["output_start"]
                pred[k] = pred.get(k, 0.0) + g
                count[k] = count.get(k, 0) + 1
    bins = sorted(k for k, c in count.items() if c >= DECODE_BIN_MIN)
    if not bins:
        return {"decode_scale": 1.0}
    scales, last = [], meas[bins[0]] / pred[bins[0]]
    for k in range(bins[-1] + 1):
        if k in bins:
            last = meas[k] / pred[k]
        scales.append(last)
    return {"decode_scale": scales}


LAUNCH_BIN_MIN = 10  # samples a recording needs in a bin for its p10 there


def launch_costs(full: list[dict[int, list[float]]], piecewise: list[tuple[int, int, float]],
                 eager: list[list[tuple[int, int, int, float]]]) -> dict[str, float]:
    """ServingCosts' launch fields from :func:`launch_samples`: FULL graphs a line through the
    lowest p10 (LAUNCH_QUANTILE) over the recordings (`full`: one mapping each) of each
    LAUNCH_BIN-request bin (of LAUNCH_BIN_MIN samples or more: where the GPU is the bottleneck of
    FULL steps a recording's p10 is an upper bound, so a smaller model's CPU-bound loop sets it);
    over that line, for the launches behind a FULL decode step (whose short
    forward they outlast: measured 10-80 ms against 1-17 ms), PIECEWISE (`piecewise`: requests,
    layers, seconds; the attention of every layer runs eagerly) the mean excess per layer, and
    NONE (`eager`: per recording, requests, dense and MoE layers, seconds) a least-squares split
    of each recording's mean excess into a cost per dense layer and per MoE layer
    (:func:`layer_costs`). Means, not medians: the launches' spread (8B p10-p90 19-33 ms) is not
    explained by the batch, and the run's throughput sees their mean."""
    lowest: dict[int, float] = {}
    for bins_of in full:
        for k, xs in bins_of.items():
            if len(xs) >= LAUNCH_BIN_MIN:
                lowest[k] = min(lowest.get(k, float("inf")), percentile(xs, LAUNCH_QUANTILE))
    bins = sorted(lowest)
    env = [lowest[k] for k in bins]
    ea, eb = _line([LAUNCH_BIN * k + LAUNCH_BIN / 2 for k in bins], env) if len(bins) > 1 else (env[0] if env else 0.0, 0.0)
    vals = [max(0.0, x - ea - eb * n) / layers for n, layers, x in piecewise]
    rows = [(xs[0][1], xs[0][2], sum(max(0.0, x - ea - eb * n) for n, _, _, x in xs) / len(xs)) for xs in eager if xs]
    dense, moe = layer_costs(rows)
    return {"execute_base_s": ea, "execute_per_req_s": eb, "piecewise_per_layer_s": sum(vals) / len(vals) if vals else 0.0,
            "eager_per_layer_s": dense, "eager_per_moe_layer_s": moe}


def layer_costs(rows: list[tuple[int, int, float]]) -> tuple[float, float]:
    """(seconds per dense layer, per MoE layer) from (dense layers, MoE layers, eager launch excess)
    rows: least squares through the origin, both >= 0. A kind no row has is taken to cost what the
    other does (no MoE model among the recordings: a MoE layer costs a dense one)."""
    sdd = sum(d * d for d, _, _ in rows)
    smm = sum(m * m for _, m, _ in rows)
    sdm = sum(d * m for d, m, _ in rows)
    sdy = sum(d * y for d, _, y in rows)
    smy = sum(m * y for _, m, y in rows)
    if not sdd and not smm:
        return 0.0, 0.0
    det = sdd * smm - sdm * sdm
    if not smm or not sdd or det <= 1e-9 * sdd * smm:  # one kind only, or always in one ratio
        c = (sdy + smy) / (sdd + smm + 2 * sdm)
        return c, c
    a, b = (sdy * smm - smy * sdm) / det, (smy * sdd - sdy * sdm) / det
    if a < 0:
        return 0.0, smy / smm
    if b < 0:
        return sdy / sdd, 0.0
    return a, b


def stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def fidelity_main(args) -> int:
    """The ``fidelity`` subcommand (arguments: harness/cli.py)."""
    overrides = None
    if args.config:
        from ..config_file import read_config_file
        overrides = read_config_file(args.config)
    if args.trace and len(args.recording) > 1:
        raise ConfigError("--trace takes one recording")
    if args.cpu_speed and not args.fit:
        raise ConfigError("--cpu-speed scales costs fitted on other recordings: it needs --fit REC ...")
    fitted: dict[str, dict] = {}  # by the replayed recording's model (the step-time correction is per model)
    if args.fit:
        held = sorted(set(map(str, args.fit)) & set(map(str, args.recording)))
        if held:
            print(f"  note: {', '.join(stem(p) for p in held)} also used for calibration: not held out")
    results = []
    for path in args.recording:
        over = overrides
        if args.fit:
            model = load(path).header["model"]
            if model not in fitted:
                fitted[model] = fit(args.fit, overrides, model)
                print(f"calibrated on {len(args.fit)} recording(s) ({', '.join(stem(p) for p in args.fit)}; "
                      f"step time: those of {model}): {json.dumps(fitted[model])}")
            own = fitted[model]
            if args.cpu_speed:
                if not load(path).steps:
                    raise ConfigError(f"{path}: --cpu-speed: no step lines to read the run's CPU speed from")
                k = cpu_speed_factor(own, args.fit, path)  # at_cpu_speed's factor, read once
                own = scale_serving(own, k)
                print(f"  {stem(path)}: serving costs x{k:.3f} (its schedule() times against the fit recordings')")
            over = merge(overrides or {}, own)
        f = fidelity(path, over, trace_path=args.trace)
        results.append(f)
        print(format_report(f))
        png = Path(args.out) / (stem(path) + ".png")
        if plot(f, png):
            print(f"  plot: {png}")
        else:
            print("  plot: skipped (matplotlib not installed: pip install 'vllm-faultsim[plot]')")
    if args.trace:
        print(f"trace: {args.trace}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([f.to_dict() for f in results], indent=1) + "\n", encoding="utf-8")
        print(f"json: {args.json}")
    return 0
