"""Record real vLLM 0.26.0 as it is served by default, on a GPU, as vllm-faultsim.recording/1 files.

    python benchmarks/record_serving.py --models llama-3.2-1b,llama-3.1-8b --out "$OUT" [--deadline-s 520]

For each model shape (config.json written here from the published Hugging Face configs; dummy
weights, bf16, TP 1) the engine is started the way ``vllm serve`` builds it, without the HTTP
layer: ``AsyncEngineArgs(...).create_engine_config(usage_context=OPENAI_API_SERVER)`` then
``AsyncLLM.from_vllm_config`` (engine core in its own process; async scheduling, CUDA graphs and
torch.compile, prefix caching, chunked prefill and ``max_num_batched_tokens`` all left to vLLM's
defaults for that entry point: 8192 on a >= 70 GiB GPU). Only ``max_num_seqs`` is set (64), and the
scheduler class is the recorder of :mod:`vllm_faultsim.harness.drivers.serving_recorder` for the
mode vLLM resolved (an ``AsyncScheduler`` subclass under async scheduling), which logs every
step's shape and times. Requests carry prompt token ids (no tokenizer), ``ignore_eos`` and a fixed
``max_tokens``, streamed back as deltas like a streaming client.

Per model: warm-up requests, a capacity probe (3 x max_num_seqs requests at once; the steady
completion rate while the queue is non-empty is the max sustainable rate), then Poisson runs at
0.3x (light), 0.9x (near saturation) and 1.3x (overload: the queue grows) of that rate (``--loads``
picks some), prompts uniform 64-1024 and outputs uniform 16-256 tokens (seeded from ``--seed``).
Run lengths shrink to fit ``--deadline-s``. Each run is written to ``OUT/<model>-<load>.jsonl.gz``
(``-mns<N>`` added when ``--max-num-seqs`` is not the table's 64; ``--max-num-seqs default``
leaves it to vLLM: 1024 on a >= 70 GiB GPU; ``-eager`` with ``--enforce-eager``). Each request line carries vLLM's own per-request
times (``RequestOutput.metrics``, a ``RequestStateStats``) as ``stats``, each step line the
requests it scheduled first, gave a first token and finished (recording.py says what each means).

``--dry-run`` checks the script on a CPU-only host (drivers/dry_run.py: vLLM's engine, scheduler
and output path are real, a deterministic stand-in replaces the GPU worker; timings mean nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vllm_faultsim.harness import recording as REC
from vllm_faultsim.harness.drivers import serving_recorder as SR

PROMPT_TOKENS = (64, 1024)
OUTPUT_TOKENS = (16, 256)
LOADS = (("light", 0.3), ("near", 0.9), ("overload", 1.3))
BASE_SEED = 20261201
MAX_FILE_BYTES = 1 << 20

_LLAMA_COMMON = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "initializer_range": 0.02,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}
# name -> (Hugging Face model, its config.json, max_num_seqs)
MODELS = {
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B", {
        **_LLAMA_COMMON, "head_dim": 64, "hidden_size": 2048, "intermediate_size": 8192,
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "transformers_version": "4.45.0.dev0"}, 64),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", {
        **_LLAMA_COMMON, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": False, "transformers_version": "4.43.0.dev0"}, 64),
    # as shipped in aiconfigurator-core 0.12.0 (model_configs/Qwen--Qwen3-30B-A3B_config.json)
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B", {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
        "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
        "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
        "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936}, 64),
    # as shipped in aiconfigurator-core 0.12.0 (model_configs/mistralai--Mixtral-8x7B-v0.1_config.json):
    # the second MoE shape (8 experts, top 2, every layer MoE; 46.7B parameters, 93 GiB in bf16)
    "mixtral-8x7b": ("mistralai/Mixtral-8x7B-v0.1", {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
        "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000}, 64),
}


def write_model_dir(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(MODELS[name][1], indent=2, sort_keys=True))
    return d


# ---- workload -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    id: str
    arrival: float     # planned, seconds from the run's start
    prompt_len: int
    output_len: int


def plan(prefix: str, n: int, rate: float | None, seed: int) -> list[Spec]:
    """``n`` requests, Poisson arrivals at ``rate`` per second (None: all at 0), uniform lengths."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for k in range(n):
        if rate:
            t += rng.expovariate(rate)
        out.append(Spec(f"{prefix}-{k}", t, rng.randint(*PROMPT_TOKENS), rng.randint(*OUTPUT_TOKENS)))
    return out


def prompt_ids(spec: Spec, vocab: int, seed: int) -> list[int]:
    rng = random.Random(f"{seed}:{spec.id}")
    return [rng.randrange(vocab) for _ in range(spec.prompt_len)]


@dataclass
class Served:
    t0: float                  # perf_counter at the run's start
    t0_unix: float
    requests: list[dict]       # recording/1 request lines, by arrival
    aborted: int
    lag_max: float             # submit time - planned arrival
    lag_mean: float
    end: float                 # perf_counter when the last request ended


async def serve(engine, specs: list[Spec], prompts: dict[str, list[int]], make_params,
                timeout: float) -> Served:
    """Submit ``specs`` at their planned times on this event loop; the client side times of each.
    ``engine.generate(prompt, params, request_id=...)`` streams outputs with
    ``.outputs[0].token_ids`` (delta) and ``.finished``. Requests still running after ``timeout``
    seconds are cancelled (vLLM aborts them) and left out."""
    t0 = time.perf_counter()
    t0_unix = time.time()
    # vLLM's request stats: arrival_time on time.time() (this process), the rest on the engine
    # core's time.monotonic(); both taken back to this run's perf_counter origin t0
    mono0 = time.monotonic() - (time.perf_counter() - t0)
    wall0 = time.time() - (time.perf_counter() - t0)
    done: dict[str, dict] = {}
    lags: list[float] = []

    async def one(spec: Spec):
        delay = spec.arrival - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        sub = time.perf_counter() - t0
        lags.append(sub - spec.arrival)
        first, n, stats = None, 0, None
        prompt = {"prompt_token_ids": prompts[spec.id]}
        async for out in engine.generate(prompt, make_params(spec), request_id=spec.id):
            k = len(out.outputs[0].token_ids)
            if k and first is None:
                first = time.perf_counter() - t0
            n += k
            stats = out.metrics
            if out.finished:
                break
        fin = time.perf_counter() - t0
        done[spec.id] = {"id": spec.id, "arrival": sub, "prompt_tokens": spec.prompt_len, "output_tokens": n,
                         "first_token": first if first is not None else fin, "finish": fin}
        if stats is not None and stats.queued_ts > 0:
            done[spec.id]["stats"] = {
                "arrival_time": stats.arrival_time - wall0,
                **{k: getattr(stats, k) - mono0
                   for k in ("queued_ts", "scheduled_ts", "first_token_ts", "last_token_ts")}}

    tasks = [asyncio.ensure_future(one(s)) for s in specs]
    finished, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    for t in finished:
        if t.exception() is not None:
            raise t.exception()
    end = time.perf_counter()
    reqs = sorted(done.values(), key=lambda r: (r["arrival"], r["id"]))
    return Served(t0, t0_unix, reqs, len(pending), max(lags, default=0.0),
                  sum(lags) / len(lags) if lags else 0.0, end)


def saturated_rate(finishes: list[float], max_num_seqs: int) -> float:
    """Completions per second of a burst while its queue is still non-empty: from the
    (max_num_seqs/2)-th completion to the (n - max_num_seqs)-th; at most 3x the rate from the
    first completion to the last (completions seen bunched, e.g. by a slow client, cannot make
    it absurd)."""
    f = sorted(finishes)
    whole = (len(f) - 1) / max(f[-1] - f[0], 1e-9)
    k1, k2 = max_num_seqs // 2, len(f) - max_num_seqs
    if k2 <= k1 or f[k2] <= f[k1]:
        return whole
    return min((k2 - k1) / (f[k2] - f[k1]), 3 * whole)


def loop_name() -> str:
    loop = asyncio.get_running_loop()
    return f"{type(loop).__module__}.{type(loop).__name__}"


# ---- host and engine description ------------------------------------------------------------

def _smi(query: str) -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


CPU_PROBE_N, CPU_PROBE_REPEATS = 200_000, 7


def cpu_probe_ms() -> float:
    """The host CPU's speed for single-threaded Python, which the engine core's loop is: the median
    over CPU_PROBE_REPEATS of the time of one fixed pure-Python loop (no allocation, no I/O), ms.
    Recorded in each run's header (``cpu_probe_ms``, just before the run) so that runs of different
    machine sessions compare."""
    times = []
    for _ in range(CPU_PROBE_REPEATS):
        t = time.perf_counter()
        acc = 0
        for i in range(CPU_PROBE_N):
            acc += i * i % 7
        times.append(time.perf_counter() - t)
    return round(sorted(times)[CPU_PROBE_REPEATS // 2] * 1e3, 3)


def _engine_core_pid() -> int | None:
    """The engine-core process: this process's child whose command line is vLLM's EngineCore."""
    me = os.getpid()
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me \
                    and b"EngineCore" in (d / "cmdline").read_bytes() + (d / "comm").read_bytes():
                return int(d.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def cpu_counters(pid: int | None) -> dict:
    """What the host's CPUs and the engine core's busy-loop thread (its main thread) did so far:
    /proc/stat's jiffies (user, system, idle, steal, ...) and the thread's schedstat (ns on a CPU,
    ns runnable but waiting for one, timeslices) and involuntary context switches."""
    out: dict = {"t": time.perf_counter()}
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        out["stat"] = dict(zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"),
                               (int(x) for x in fields)))
        if pid is not None:
            run, wait, slices = (int(x) for x in Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split())
            out["loop"] = {"run_ns": run, "wait_ns": wait, "timeslices": slices}
            for line in Path(f"/proc/{pid}/task/{pid}/status").read_text().splitlines():
                if line.startswith("nonvoluntary_ctxt_switches"):
                    out["loop"]["nonvoluntary"] = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return out


def cpu_during(before: dict, after: dict) -> dict:
    """The run's share of each /proc/stat state, and its engine-core loop thread's time on a CPU
    and waiting for one as fractions of the run's wall time (a loop thread kept off its CPU by
    other work launches slower)."""
    wall = after["t"] - before["t"]
    res: dict = {"wall_s": round(wall, 3)}
    if "stat" in before and "stat" in after:
        d = {k: after["stat"][k] - before["stat"][k] for k in before["stat"]}
        total = sum(d.values()) or 1
        res["host"] = {k: round(v / total, 4) for k, v in d.items()}
    if "loop" in before and "loop" in after:
        b, a = before["loop"], after["loop"]
        res["engine_loop"] = {"on_cpu": round((a["run_ns"] - b["run_ns"]) / 1e9 / wall, 4),
                              "runnable_waiting": round((a["wait_ns"] - b["wait_ns"]) / 1e9 / wall, 4),
                              "timeslices": a["timeslices"] - b["timeslices"],
                              "nonvoluntary_switches": a.get("nonvoluntary", 0) - b.get("nonvoluntary", 0)}
    return res


def host_info() -> dict:
    rows = [r.split(", ") for r in _smi("name,driver_version,memory.total")]
    name, driver, mem = rows[0] if rows else ("unknown", "unknown", "?")
    try:
        import torch
        torch_v, cuda_v = torch.__version__, torch.version.cuda
    except ImportError:
        torch_v, cuda_v = "none", None
    try:
        import vllm
        vllm_v = vllm.__version__
    except ImportError:
        vllm_v = "none"
    device = f"{len(rows)}x {name} ({mem} MiB), CUDA {cuda_v}, {os.cpu_count()} CPUs, {os.uname().release}"
    return {"gpu": name, "driver": driver, "device": device, "torch": torch_v, "vllm": vllm_v}


def wait_gpu_free(limit_mib: int = 4096, timeout: float = 90.0) -> float:
    """Wait until the GPU's used memory drops below ``limit_mib`` (the last engine's processes gone)."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        used = _smi("memory.used")
        if not used or int(used[0]) < limit_mib:
            break
        time.sleep(0.5)
    return time.monotonic() - t


def _enum_name(value) -> str:
    return getattr(value, "name", None) or str(value)


class VllmEngine:
    """AsyncLLM built as ``vllm serve`` builds it (usage context OPENAI_API_SERVER), with the
    recording scheduler of the resolved scheduling mode."""

    ENTRY = ("AsyncLLM.from_vllm_config(AsyncEngineArgs(...).create_engine_config("
             "usage_context=OPENAI_API_SERVER)), as vllm serve builds it, without the HTTP server; "
             "engine core in its own process")

    def __init__(self, model_dir: Path, max_num_seqs: int | None, steps_file: Path, **extra):
        """``max_num_seqs`` None: vLLM's default for the entry point."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        if max_num_seqs is not None:
            extra["max_num_seqs"] = max_num_seqs
        self.args = dict(model=str(model_dir), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                         seed=0, **extra)
        cfg = AsyncEngineArgs(**self.args).create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        sc = cfg.scheduler_config
        sc.scheduler_cls = SR.scheduler_cls_for(bool(sc.async_scheduling))
        os.environ[SR.ENV_STEPS_FILE] = str(steps_file)
        self.steps_file = steps_file
        self.config = cfg
        self.client = AsyncLLM.from_vllm_config(vllm_config=cfg, usage_context=UsageContext.OPENAI_API_SERVER)

    def generate(self, prompt, params, request_id):
        return self.client.generate(prompt, params, request_id=request_id)

    def make_params(self, spec: Spec):
        from vllm.sampling_params import RequestOutputKind, SamplingParams
        return SamplingParams(max_tokens=spec.output_len, ignore_eos=True, detokenize=False,
                              output_kind=RequestOutputKind.DELTA)

    def describe(self, meta: dict) -> tuple[dict, dict]:
        """(engine, extra) header parts; ``meta`` is the engine core's line from the steps file."""
        c = self.config
        sc, cc, mc, comp = c.scheduler_config, c.cache_config, c.model_config, c.compilation_config
        engine = {
            "max_num_seqs": sc.max_num_seqs, "max_num_batched_tokens": sc.max_num_batched_tokens,
            "max_model_len": mc.max_model_len, "block_size": int(meta.get("block_size") or cc.block_size),
            "enable_prefix_caching": bool(cc.enable_prefix_caching), "async_scheduling": bool(sc.async_scheduling),
            "enforce_eager": bool(mc.enforce_eager), "gpu_memory_utilization": float(cc.gpu_memory_utilization),
            "num_gpu_blocks": int(meta["num_gpu_blocks"]),
            "enable_chunked_prefill": bool(sc.enable_chunked_prefill),
            "long_prefill_token_threshold": sc.long_prefill_token_threshold,
            "scheduler_cls": sc.scheduler_cls, "engine_core_scheduler": meta.get("scheduler_cls"),
            "compilation_mode": _enum_name(getattr(comp, "mode", None)),
            "cudagraph_mode": _enum_name(getattr(comp, "cudagraph_mode", None)),
            "max_cudagraph_capture_size": getattr(comp, "max_cudagraph_capture_size", None),
            "load_format": "dummy", "seed": 0,
        }
        return engine, {"dtype": str(mc.dtype).replace("torch.", ""),
                        "tensor_parallel_size": c.parallel_config.tensor_parallel_size}

    def close(self) -> None:
        self.client.shutdown()


# ---- one model ------------------------------------------------------------------------------

def _write(path: Path, rec: REC.Recording, log) -> Path | None:
    """Write ``rec``; one that fails validation is written unvalidated beside it (device time is
    scarce: the data are kept to look at), the error logged, and None returned."""
    try:
        return REC.write(path, rec)
    except REC.RecordingError as exc:
        bad = path.with_name(path.name.replace(".jsonl.gz", ".unvalidated.jsonl.gz"))
        objs = [{"kind": "header", **rec.header}, *({"kind": "request", **r} for r in rec.requests),
                *({"kind": "step", **st} for st in rec.steps)]
        bad.write_bytes(gzip.compress("".join(json.dumps(o) + "\n" for o in objs).encode(), mtime=0))
        log(f"WARNING: {exc}; written unvalidated to {bad}")
        return None

def _steps_rate(steps: list[list], t0: float, t1: float) -> float:
    n = sum(1 for s in steps if t0 <= s[1] <= t1)
    return n / max(t1 - t0, 1e-9)


def _profile_rows(trace_dir: Path, dest: Path, log) -> str | None:
    """The newest trace in ``trace_dir`` parsed into per-step rows at ``dest`` (step_profile.py);
    its name, or None (logged) where there is none."""
    import step_profile

    traces = sorted(trace_dir.glob("*.pt.trace.json*"), key=lambda p: p.stat().st_mtime)
    if not traces:
        log(f"no profiler trace in {trace_dir}")
        return None
    rows = step_profile.parse(step_profile.load_events(traces[-1]))
    dest.write_text(json.dumps({"trace": traces[-1].name, "rows": rows}))
    log(f"profile: {len(rows)} steps from {traces[-1].name} ({traces[-1].stat().st_size >> 20} MiB) -> {dest.name}")
    return dest.name


async def record_model(name: str, out: Path, work: Path, share_end: float, open_engine,
                       max_duration: float, host: dict, log=print, warm_bursts: int = 1,
                       base_seed: int = BASE_SEED, max_num_seqs: int | str | None = None,
                       loads: tuple = LOADS, probe_n: int | None = None) -> list[dict]:
    """``max_num_seqs``: None = the MODELS table's, "default" = vLLM's default for the entry point;
    ``probe_n``: requests of the capacity probe (None: 3 x max_num_seqs)."""
    hf_name, hf_config, table_seqs = MODELS[name]
    vocab = hf_config["vocab_size"]
    seed0 = base_seed + 1000 * list(MODELS).index(name)
    steps_file = work / f"{name}-steps.jsonl"
    steps_file.unlink(missing_ok=True)
    t_start = time.perf_counter()
    asked = table_seqs if max_num_seqs is None else None if max_num_seqs == "default" else int(max_num_seqs)
    engine = open_engine(write_model_dir(work / "models", name), asked, steps_file)
    max_num_seqs = engine.config.scheduler_config.max_num_seqs
    suffix = "" if max_num_seqs == table_seqs else f"-mns{max_num_seqs}"
    if engine.config.model_config.enforce_eager:
        suffix += "-eager"
    prof = engine.config.profiler_config
    profiling = prof is not None and prof.profiler == "torch"
    startup = time.perf_counter() - t_start
    log(f"[{name}] engine up in {startup:.1f} s (max_num_seqs {max_num_seqs})")
    results = []
    try:
        def prompts_for(specs, seed):
            return {s.id: prompt_ids(s, vocab, seed) for s in specs}

        warm = [Spec("warm-long", 0.0, PROMPT_TOKENS[1], OUTPUT_TOKENS[1])]
        await serve(engine, warm, prompts_for(warm, seed0), engine.make_params, 120)
        warm = plan("warm", 16, None, seed0 + 1)
        w = await serve(engine, warm, prompts_for(warm, seed0 + 1), engine.make_params, 120)
        for b in range(warm_bursts):  # the probe's shapes once unmeasured (Triton JIT of new sizes)
            burst = plan(f"warmburst{b}", 3 * max_num_seqs, None, seed0 + 3 + b)
            await serve(engine, burst, prompts_for(burst, seed0 + 3 + b), engine.make_params, 300)
        probe = plan("probe", probe_n or 3 * max_num_seqs, None, seed0 + 2)
        p = await serve(engine, probe, prompts_for(probe, seed0 + 2), engine.make_params, 300)
        await asyncio.sleep(0.5)
        _, steps = SR.read_steps(steps_file)
        cap = saturated_rate([r["finish"] for r in p.requests], max_num_seqs)
        busy_rate = _steps_rate(steps, p.t0, p.end)
        light_rate = _steps_rate(steps, w.t0, w.end)
        out_tps = sum(r["output_tokens"] for r in p.requests) / (p.end - p.t0)
        probe_info = {"n": len(probe), "capacity_rps": cap, "duration_s": p.end - p.t0,
                      "output_tokens_per_s": out_tps, "steps_per_s_busy": busy_rate,
                      "steps_per_s_16_requests": light_rate, "engine_startup_s": startup,
                      "warmup": f"1 request of {PROMPT_TOKENS[1]}+{OUTPUT_TOKENS[1]} tokens, 16 at once, then "
                                f"{warm_bursts} unmeasured burst(s) of {3 * max_num_seqs}",
                      "method": f"{len(probe)} requests at once; completions per second from the "
                                f"{max_num_seqs // 2}th to the {len(probe) - max_num_seqs}th completion"}
        log(f"[{name}] probe: capacity {cap:.2f} req/s, {out_tps:.0f} output tok/s, "
            f"{busy_rate:.0f} steps/s busy, {light_rate:.0f} steps/s at 16 requests")
        for li, (load, factor) in enumerate(loads):
            rate = factor * cap
            left = share_end - time.perf_counter() - 12.0 - 4.0 * (len(loads) - li)
            weights = sum(max(1.0, f) * 1.2 for _, f in loads[li:])
            dur = min(max_duration, left / weights)
            step_rate = max(busy_rate, light_rate)
            # gzip'd bytes: ~25 per request and ~35 per step seen on CPU; 40 and 60 leave room
            bytes_per_s = 40 * rate + 60 * step_rate * max(1.0, factor)
            shortest = min(4.0, max_duration)
            while dur > shortest and bytes_per_s * dur > 0.9 * MAX_FILE_BYTES:
                dur *= 0.9
            if dur < shortest:
                log(f"[{name}] {load}: skipped, {left:.0f} s left")
                continue
            n = max(10, round(rate * dur))
            seed = seed0 + 10 + [x for x, _ in LOADS].index(load)  # the same for a load whatever --loads picks
            specs = plan(load, n, rate, seed)
            prompts = prompts_for(specs, seed)
            timeout = specs[-1].arrival * max(1.0, factor) * 2.0 + 30.0
            cpu_ms = cpu_probe_ms()  # the host's CPU speed just before the run (the engine idle)
            profiled = profiling and li == 0
            if profiled:  # it starts after cfg.delay_iterations steps and writes its trace after max_iterations
                await engine.client.start_profile()
                timeout += 120.0  # the trace is written inside a step: the engine stops meanwhile
            core_pid = _engine_core_pid()
            before = cpu_counters(core_pid)
            s = await serve(engine, specs, prompts, engine.make_params, timeout)
            during = cpu_during(before, cpu_counters(core_pid))
            await asyncio.sleep(0.5)
            if profiled:
                await engine.client.stop_profile()  # nothing left to do if it stopped itself
            metas, steps = SR.read_steps(steps_file)
            meta = metas[-1] if metas else {}
            engine_hdr, extra = engine.describe(meta)
            rec_steps = SR.to_recording_steps(steps, s.t0, s.end + 0.25,
                                              {r["id"]: j for j, r in enumerate(s.requests)})
            want = {x.id: x.output_len for x in specs}
            wrong = [r["id"] for r in s.requests if r["output_tokens"] != want[r["id"]]]
            header = {
                "format": REC.FORMAT, "model": name, "hf_model": hf_name, "hf_config": hf_config,
                "gpu": host["gpu"], "tensor_parallel_size": extra["tensor_parallel_size"], "dtype": extra["dtype"],
                "vllm": host["vllm"], "torch": host["torch"], "driver": host["driver"], "device": host["device"],
                "entry_point": getattr(engine, "ENTRY", type(engine).__name__), "cpu_probe_ms": cpu_ms,
                "cpu_during_run": during,
                "workload": {"load": load, "rate": rate, "rate_factor": factor, "n": len(s.requests),
                             "n_planned": n, "n_aborted": s.aborted, "arrival": "poisson",
                             "prompt_tokens": list(PROMPT_TOKENS), "output_tokens": list(OUTPUT_TOKENS),
                             "length_distribution": "uniform integers, inclusive", "seed": seed,
                             "planned_duration_s": specs[-1].arrival,
                             "prompt_token_ids": "uniform over the vocabulary, seeded by seed and request id",
                             "sampling": "SamplingParams(max_tokens=output_tokens, ignore_eos=True, detokenize=False, "
                                         "output_kind=DELTA), other fields default (temperature 1.0)",
                             "submit_lag_max_s": s.lag_max, "submit_lag_mean_s": s.lag_mean,
                             "output_tokens_mismatch": len(wrong)},
                "engine": engine_hdr,
                "probe": probe_info,
                "client": f"one asyncio task per request on {loop_name()} (vllm serve runs uvloop), in the "
                          "process of AsyncLLM (the API server's place); times from time.perf_counter",
                "clock": "seconds from the run's start: client perf_counter at t0 (CLOCK_MONOTONIC, shared with the "
                         "engine-core process on this host); step times measured in the engine core",
                "t0_unix": s.t0_unix,
                # time.time() - time.perf_counter() in the engine core minus the same in this process: ~0
                # when both processes read one monotonic clock
                "clock_offset_check_s": (meta["wall_minus_perf"] - (time.time() - time.perf_counter())
                                         if "wall_minus_perf" in meta else None),
                "steps_note": "every step that scheduled tokens with schedule_start in [0, last finish + 0.25 s]",
                "stats_note": "request stats: vLLM's RequestStateStats (RequestOutput.metrics); arrival_time "
                              "time.time() in this process, the rest time.monotonic() in the engine core, "
                              "both as seconds from t0",
            }
            run = f"{name}-{load}{suffix}"
            if profiled:
                run += "-profiled"
                header["profiled"] = {
                    "steps": prof.max_iterations, "after_steps": prof.delay_iterations,
                    "note": "vLLM's torch worker profiler ran over these steps (slower launches) and wrote "
                            "its trace inside a step (the engine stopped meanwhile): not a fidelity recording",
                    "rows": _profile_rows(Path(prof.torch_profiler_dir), out / f"{run}.profile.json", log)}
            path = _write(out / f"{run}.jsonl.gz", REC.Recording(header, s.requests, rec_steps), log)
            if path is None:
                continue
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                log(f"[{name}] {load}: WARNING {path.name} is {size} bytes (> 1 MiB)")
            sm = REC.summary(REC.read(path))
            line = {"model": name, "load": load, "rate": round(rate, 3), "n": sm["n"], "aborted": s.aborted,
                    "ttft_p50_ms": round(sm["ttft_p50"] * 1e3, 2), "tpot_p50_ms": round(sm["tpot_p50"] * 1e3, 3),
                    "e2e_p50_s": round(sm["e2e_p50"], 3), "steps": sm["steps"], "bytes": size,
                    "max_num_batched_tokens": engine_hdr["max_num_batched_tokens"],
                    "num_gpu_blocks": engine_hdr["num_gpu_blocks"], "wall_s": round(s.end - s.t0, 1),
                    "max_waiting": max((st["num_waiting"] for st in rec_steps), default=0),
                    "submit_lag_max_ms": round(s.lag_max * 1e3, 1), "output_tokens_mismatch": len(wrong)}
            log(f"[{name}] {load}: " + json.dumps(line))
            results.append(line)
    finally:
        engine.close()
    return results


async def main_async(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    names = [m for m in args.models.split(",") if m]
    for m in names:
        if m not in MODELS:
            print(f"record_serving: unknown model {m!r} (known: {', '.join(MODELS)})", file=sys.stderr)
            return 2
    known = dict(LOADS)
    loads = tuple((x, known[x]) for x in args.loads.split(",") if x in known)
    if len(loads) != len([x for x in args.loads.split(",") if x]):
        print(f"record_serving: --loads {args.loads!r}: each of {', '.join(known)}", file=sys.stderr)
        return 2
    if args.max_num_seqs not in (None, "default") and not args.max_num_seqs.isdigit():
        print(f"record_serving: --max-num-seqs {args.max_num_seqs!r}: an integer or 'default'", file=sys.stderr)
        return 2
    engine_args = {"enforce_eager": True} if args.enforce_eager else {}
    if args.profile_steps:
        from vllm.config import ProfilerConfig
        engine_args["profiler_config"] = ProfilerConfig(
            profiler="torch", torch_profiler_dir=str(Path(args.work).resolve() / "profile"),
            torch_profiler_with_stack=False, torch_profiler_dump_cuda_time_total=False,
            detailed_trace_annotation=True, ignore_frontend=True,
            delay_iterations=args.profile_delay, max_iterations=args.profile_steps)

    def open_engine(model_dir, max_num_seqs, steps_file):
        return VllmEngine(model_dir, max_num_seqs, steps_file, **engine_args)
    if args.dry_run:
        from vllm_faultsim.harness.drivers.dry_run import EXECUTOR, use_cpu_platform
        use_cpu_platform()

        def open_engine(model_dir, max_num_seqs, steps_file):
            return VllmEngine(model_dir, max_num_seqs, steps_file, distributed_executor_backend=EXECUTOR,
                              **engine_args)
    host = host_info()
    print("host:", json.dumps(host), flush=True)
    deadline = time.perf_counter() + args.deadline_s
    rows = []
    for k, name in enumerate(names):
        wait_gpu_free()
        share_end = time.perf_counter() + (deadline - time.perf_counter()) / (len(names) - k)
        if share_end - time.perf_counter() < 100:
            print(f"[{name}] skipped: {deadline - time.perf_counter():.0f} s left", flush=True)
            continue
        try:
            rows += await record_model(name, out, work, share_end, open_engine, args.max_duration_s, host,
                                       log=lambda s: print(s, flush=True), warm_bursts=args.warm_bursts,
                                       base_seed=args.seed, max_num_seqs=args.max_num_seqs, loads=loads,
                                       probe_n=args.probe_n)
        except Exception as exc:  # noqa: BLE001 (the next model still runs)
            import traceback
            traceback.print_exc()
            print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
    print("summary:", flush=True)
    for r in rows:
        print(f"  {r['model']:14s} {r['load']:8s} rate {r['rate']:7.2f}/s n {r['n']:5d}  TTFT p50 {r['ttft_p50_ms']:8.1f} ms"
              f"  TPOT p50 {r['tpot_p50_ms']:6.2f} ms  E2E p50 {r['e2e_p50_s']:6.2f} s  steps {r['steps']:6d}"
              f"  {r['bytes'] / 1024:6.0f} KiB  mnbt {r['max_num_batched_tokens']}", flush=True)
    return 0 if len(rows) == len(names) * len(loads) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/recordings"))
    ap.add_argument("--work", default="/tmp/record-serving", help="model folders and engine step files")
    ap.add_argument("--deadline-s", type=float, default=520.0, help="finish everything within this many seconds")
    ap.add_argument("--max-duration-s", type=float, default=30.0, help="longest arrival window of one run")
    ap.add_argument("--warm-bursts", type=int, default=1,
                    help="unmeasured bursts of 3 x max_num_seqs requests before the capacity probe")
    ap.add_argument("--seed", type=int, default=BASE_SEED,
                    help=f"base seed of the workloads ({BASE_SEED}: the first set; a new seed: a new set)")
    ap.add_argument("--max-num-seqs", default=None,
                    help="N, or 'default' (vLLM's for vllm serve); without it the table's 64")
    ap.add_argument("--loads", default=",".join(x for x, _ in LOADS), help="comma-separated, of: "
                    + ", ".join(f"{x} ({f}x capacity)" for x, f in LOADS))
    ap.add_argument("--probe-n", type=int, default=None, help="requests of the capacity probe (3 x max_num_seqs)")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="vLLM's enforce_eager (no CUDA graphs, no torch.compile); '-eager' added to the file names")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="run vLLM's worker profiler over this many steps of the first load's run (after "
                         "--profile-delay of them); its per-step GPU rows go to OUT as <run>.profile.json "
                         "(step_profile.py) and the run, slowed by the profiler, is written as <run>-profiled")
    ap.add_argument("--profile-delay", type=int, default=150, help="steps of the profiled run before the profiler starts")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the script on a CPU-only host (a stand-in for the GPU worker; timings mean nothing)")
    args = ap.parse_args(argv)
    if args.dry_run and args.profile_steps:
        ap.error("--profile-steps needs the GPU worker (its profiler): not with --dry-run")
    if args.dry_run:
        os.environ["VLLM_FAULTSIM_DRYRUN"] = "1"  # the engine-core process picks the CPU platform too
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_async(args))
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
