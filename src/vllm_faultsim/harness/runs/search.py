"""SLO search: the cheapest deployment (GPU system, tensor-parallel size, servers or DP ranks, engine
arguments) whose simulated serving meets TTFT/TPOT/goodput/availability SLOs, with and without a
fault profile, over the ``aic`` step-time backend (aiconfigurator-core's measured GPU data).

A search spec (YAML)::

    name: llama8b-40rps
    model: meta-llama/Meta-Llama-3.1-8B     # a config aiconfigurator ships, or a HF config.json path
    workload: {kind: poisson, rate: 40, duration: 60, prompt: 512, output: 128}   # or a trace file kind
    base: {seed: 0, scheduler: {max_model_len: 8192}}   # the rest of the run config the points start from
    slo:
      ttft_ms: {percentile: 99, max: 500}
      tpot_ms: {percentile: 50, max: 50}
      goodput: 0.99          # fraction of requests with TTFT <= ttft max and TPOT <= tpot max (failed: miss)
      availability: 0.999    # fraction of requests finished
    space:
      system: [h100_sxm, h200_sxm, b200_sxm]
      tensor_parallel_size: [1, 2]
      servers: [1, 2, 4]     # independent servers behind a router; or data_parallel_size: [...]
      max_num_seqs: [256]
      max_num_batched_tokens: [8192]
    cost_per_gpu_hour: {h100_sxm: 3.0}   # USD; over DEFAULT_PRICES
    faults: {engine_mtbf_s: 3600}   # a fault profile: faults/rates.py FaultRates (MTBF, slow episodes, ...)
    deployment: {router: least_outstanding, restart_s: 60}   # harness/runs/deploy.py DeploymentConfig fields

Each point's run config is ``base`` + ``workload`` + the point's ``max_num_seqs`` and
``max_num_batched_tokens`` + a ``step_time`` section ``{backend: aic, model, system, tp, dtype}`` +
``num_gpu_blocks`` from aiconfigurator-core's vLLM memory model (``estimate_num_gpu_blocks``: weights,
activations and the KV budget at ``gpu_memory_utilization``, vLLM 0.26.0's default 0.92), unless
``base`` sets it. Cost = GPUs (tp x servers x dp) x price per GPU-hour. Every point runs through
the deployment simulator (harness/runs/deploy.py ``simulate_deployment``: one server is the single
engine of ``simulate``, more are routed; the fault profile is expanded per server from the point's
seed), its SLO maxima the deployment's ``slo``.

Pruned, never simulated (counted and listed with the reason):
- ``memory``: the model does not fit at that TP (no KV budget), or a request of the workload needs
  more KV blocks than the cache holds;
- ``capacity``: an upper bound on one engine's request rate from the step-time backend, times the
  engine cores (servers x DP ranks), is below the offered rate (``capacity_bound``);
- ``cost``: the points are visited in ascending cost, in waves of whole equal-cost tiers (at least
  ``WAVE`` points, so the points simulated do not depend on the number of workers); once a wave has a
  point meeting the SLOs, every costlier point is pruned;
- ``faults: fails without faults``: the search with the fault profile skips points that missed the
  SLOs without faults (faults only take capacity away).

The points run through a sweep (harness/sweep.py): on Ray or serially, cached in ``--out`` so an
interrupted search continues. Outputs: a table (stdout), ``search.csv`` (every point, pruned ones with
their reason) and ``pareto.png`` (cost against SLO attainment, the Pareto front of each scenario).
"""

from __future__ import annotations

import copy
import csv
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from ...faults.rates import rates_from_dict
from ...inputs import Positive, PositiveInt, Section, checked, read_mapping_file
from ..metrics import percentile
from .deploy import deployment_from_dict, simulate_deployment
from .simulate import ConfigError, config_from_dict, iter_workload

# USD per GPU-hour, on-demand: ILLUSTRATIVE defaults, set your own (cost_per_gpu_hour). h100_sxm and
# h200_sxm: midpoints of the specialty-cloud ranges ($2.50-3.50, $3.50-4.50) in "Cloud GPU pricing",
# mercatus-ai.com/blog/cloud-gpu-pricing (May 2026); b200_sxm: spheron.network's on-demand rate of
# 17 March 2026 ($6.03, spheron.network/blog/nvidia-h200-vs-b200-vs-gb200).
DEFAULT_PRICES = {"h100_sxm": 3.00, "h200_sxm": 4.00, "b200_sxm": 6.03}
PRICE_SOURCE = "illustrative on-demand USD/GPU-h (README: Capacity planning): set cost_per_gpu_hour"

SPACE_KEYS = ("system", "tensor_parallel_size", "servers", "data_parallel_size", "max_num_seqs",
              "max_num_batched_tokens")
SLO_KEYS = ("ttft_ms", "tpot_ms", "goodput", "availability")
GPU_MEMORY_UTILIZATION = 0.92  # vLLM 0.26.0 CacheConfig.gpu_memory_utilization default
WAVE = 4  # points simulated per wave at least (whole equal-cost tiers): fixed, so results do not depend on workers
CAPACITY_MARGIN = 0.10  # prune on capacity only when the bound, 10% up, is still below the offered rate

OpenFraction = Annotated[float, Field(gt=0, le=1)]
Choices = Annotated[list[PositiveInt], Field(min_length=1)]  # a space axis: the values to try


class PercentileSLO(Section):
    percentile: Annotated[float, Field(gt=0, le=100)]
    max: Positive  # ms


class SearchSLO(Section):
    ttft_ms: PercentileSLO | None = None
    tpot_ms: PercentileSLO | None = None
    goodput: OpenFraction | None = None  # of requests meeting ttft_ms/tpot_ms
    availability: OpenFraction | None = None

    @model_validator(mode="after")
    def _some(self):
        if not self.model_fields_set:
            raise ValueError(f"give at least one of {', '.join(SLO_KEYS)}")
        if self.goodput is not None and self.ttft_ms is None and self.tpot_ms is None:
            raise ValueError("goodput counts requests meeting ttft_ms/tpot_ms: give one of them")
        return self


class SearchSpace(Section):
    system: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]  # GPU systems of the aic backend
    tensor_parallel_size: Choices | None = None
    servers: Choices | None = None  # independent servers
    data_parallel_size: Choices | None = None  # one server's DP ranks
    max_num_seqs: Choices | None = None
    max_num_batched_tokens: Choices | None = None

    @model_validator(mode="after")
    def _one_topology(self):
        if self.servers is not None and self.data_parallel_size is not None:
            raise ValueError("give servers (independent servers) or data_parallel_size (one server's DP ranks), not both")
        return self


class SearchSpec(Section):
    """A search spec (the README's Capacity planning); deployment and faults are checked by their own schemas."""

    name: str | None = None
    description: str | None = None
    model: Annotated[str, Field(min_length=1)]  # a model aiconfigurator ships or a config.json path
    dtype: str | None = None
    version: str | None = None
    gpu_memory_utilization: OpenFraction = GPU_MEMORY_UTILIZATION
    workload: dict
    base: dict | None = None
    slo: SearchSLO
    space: SearchSpace
    cost_per_gpu_hour: dict[str, Positive] | None = None  # USD
    faults: dict | None = None
    deployment: dict | None = None


def load_search(path: str) -> dict:
    """A search spec from YAML, checked: a one-line ConfigError names the field and the value."""
    return check_search(read_mapping_file(path, "search spec", ConfigError), path)


def check_search(spec, source: str = "<search spec>") -> dict:
    gmu = checked(SearchSpec, spec, source, ConfigError).gpu_memory_utilization
    base = spec.get("base") or {}
    if "workload" in base:
        raise ConfigError(f"{source}: base.workload: give the workload once, as the top-level 'workload'")
    space = spec["space"]
    prices = {**DEFAULT_PRICES, **(spec.get("cost_per_gpu_hour") or {})}
    for system in space["system"]:
        if system not in prices:
            raise ConfigError(f"{source}: cost_per_gpu_hour.{system} is missing (no default price for {system!r}; "
                              f"defaults: {', '.join(DEFAULT_PRICES)})")
    topology = "data_parallel_size" if "data_parallel_size" in space else "servers"
    dep = spec.get("deployment") or {}
    if topology in dep or "slo" in dep:
        key = topology if topology in dep else "slo"
        raise ConfigError(f"{source}: deployment.{key}: set by the search ({'space.' + key if key == topology else 'slo'})"
                          f", got {dep[key]!r}")
    try:
        deployment_from_dict({**dep, topology: 1}, "deployment")
        if spec.get("faults"):
            rates_from_dict(spec["faults"], "faults")
    except ValueError as exc:  # ConfigError, PlanError: one line naming the field
        raise ConfigError(f"{source}: {exc}") from None
    spec = {**spec, "source": source, "topology": topology, "prices": prices, "gpu_memory_utilization": gmu}
    # the base run config and the workload: checked once here (a bad one is named before anything runs)
    try:
        cfg = config_from_dict({**copy.deepcopy(base), "workload": spec["workload"]})
    except ValueError as exc:
        raise type(exc)(f"{source}: base/workload: {exc}") from None
    spec["shape"] = WorkloadShape.of(iter_workload(cfg), cfg.scheduler.max_model_len)
    if not spec["shape"].requests:
        raise ConfigError(f"{source}: workload: no requests")
    return spec


# ---- points -----------------------------------------------------------------------------------

def _num_gpu_blocks(spec: dict, system: str, tp: int, mns: int, mnbt: int, block_size: int) -> int:
    """vLLM's KV cache in blocks at this point, from aiconfigurator-core's memory model (raises
    ValueError when the model does not fit)."""
    import logging

    from aiconfigurator_core.sdk.memory import estimate_num_gpu_blocks
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return estimate_num_gpu_blocks(spec["model"], system, "vllm", spec.get("version", "0.24.0"),
                                       scheduler_block_size=block_size, max_num_tokens=mnbt, max_batch_size=mns,
                                       memory_fraction_kind="of_total",
                                       memory_fraction_value=float(spec["gpu_memory_utilization"]), tp_size=tp)
    finally:
        logging.disable(previous)


@dataclass(frozen=True)
class WorkloadShape:
    """What the search's bounds need of the workload (:func:`offered_rate`, :func:`capacity_bound`,
    the largest request), from one streamed pass: the workload is never held whole."""

    requests: int
    first: float  # arrival
    last: float
    decode_tokens: int  # sum of output_len - 1
    min_prompt: int
    largest: int  # the most KV tokens of a request (prompt + output - 1, at most max_model_len)
    prefill_tokens: tuple[int, int]  # prompt tokens to compute without, with prefix caching
    least_uncached: tuple[int, int]  # the fewest of one request (at least 1), without, with

    @classmethod
    def of(cls, specs, max_model_len: int) -> "WorkloadShape":
        n, first, last, decode, min_prompt, largest = 0, math.inf, -math.inf, 0, math.inf, 0
        prefill, least = [0, 0], [math.inf, math.inf]
        for s in specs:
            n += 1
            first, last = min(first, s.arrival), max(last, s.arrival)
            decode += max(0, s.output_len - 1)
            min_prompt = min(min_prompt, s.prompt_len)
            largest = max(largest, min(s.prompt_len + s.output_len - 1, max_model_len))
            shared = s.prefix[1] if s.prefix else min(s.prompt_len, len(s.hash_ids) * s.chunk_hash_size)
            for caching, uncached in enumerate((s.prompt_len, max(1, s.prompt_len - shared))):
                prefill[caching] += uncached
                least[caching] = min(least[caching], uncached)
        return cls(n, first, last, decode, min_prompt, largest, tuple(prefill), tuple(least))


def offered_rate(shape: WorkloadShape) -> float | None:
    """Requests per second of the workload (None: a single instant)."""
    t0, t1 = shape.first, shape.last
    return (shape.requests - 1) / (t1 - t0) if t1 > t0 and shape.requests > 1 else None


def capacity_bound(step_time, shape: WorkloadShape, max_num_seqs: int, max_num_batched_tokens: int,
                   enable_prefix_caching: bool) -> float:
    """An upper bound on one engine's request rate (req/s) from its step-time backend. The GPU runs
    one forward at a time, so the run takes at least the sum of its forwards; a step holding b decode
    requests (any prefill besides only adds time) costs at least ``t_decode(b)``, so every decode token
    costs at least ``min_b t_decode(b) / b`` (b up to ``max_num_seqs``, each at its prompt's KV: the
    least it attends to); likewise every prompt token that must be computed costs at least
    ``min_c t_prefill(c) / c`` (c up to ``max_num_batched_tokens``). With prefix caching only the
    tokens past a request's shared prefix or hash ids count, and at least one. Rate <= requests /
    max(decode tokens x their least cost, prefill tokens x theirs)."""
    n, decode_tokens, min_prompt = shape.requests, shape.decode_tokens, shape.min_prompt
    sizes = sorted({1 << k for k in range(max_num_seqs.bit_length()) if 1 << k <= max_num_seqs} | {max_num_seqs})
    per_decode = min(step_time.batch_seconds((0, 0, 0, b, b * min_prompt)) / b for b in sizes)
    prefill_tokens = shape.prefill_tokens[enable_prefix_caching]
    least = max(1, shape.least_uncached[enable_prefix_caching])
    chunks = sorted({1 << k for k in range(max_num_batched_tokens.bit_length()) if 1 << k <= max_num_batched_tokens}
                    | {max_num_batched_tokens})
    per_prefill = min(step_time.batch_seconds((max(1, c // least), c, 0, 0, 0)) / c for c in chunks)
    busy = max(decode_tokens * per_decode, prefill_tokens * per_prefill)
    return n / busy if busy > 0 else math.inf


def enumerate_points(spec: dict) -> list[dict]:
    """Every point of the space with its cost, run config (dict) and, where it cannot win, why."""
    from ...models import step_time as step_time_backends

    space, topo = spec["space"], spec["topology"]
    base = copy.deepcopy(spec.get("base") or {})
    sched = base.get("scheduler") or {}
    cfg0 = config_from_dict({**base, "workload": spec["workload"]})
    block_size = cfg0.scheduler.block_size
    shape = spec["shape"]
    rate = offered_rate(shape)
    largest = shape.largest
    axes = [space["system"], space.get("tensor_parallel_size", [1]), space.get(topo, [1]),
            space.get("max_num_seqs", [cfg0.scheduler.max_num_seqs]),
            space.get("max_num_batched_tokens", [cfg0.scheduler.max_num_batched_tokens])]
    out = []
    other = "servers" if topo == "data_parallel_size" else "data_parallel_size"
    cores_per = (spec.get("deployment") or {}).get(other, 1)  # the deployment's fixed size on the other axis
    for system, tp, n, mns, mnbt in itertools.product(*axes):
        gpus = tp * n * cores_per
        step_time = {"backend": "aic", "model": spec["model"], "system": system, "tp": tp,
                     **{k: spec[k] for k in ("dtype", "version") if k in spec}}
        pt = {"system": system, "tensor_parallel_size": tp, topo: n, "max_num_seqs": mns,
              "max_num_batched_tokens": mnbt, "gpus": gpus,
              "cost_per_hour": round(gpus * spec["prices"][system], 4), "pruned": None}
        blocks = sched.get("num_gpu_blocks")
        if blocks is None:
            try:
                blocks = _num_gpu_blocks(spec, system, tp, mns, mnbt, block_size)
            except ValueError as exc:
                pt["pruned"] = f"memory: does not fit at tp {tp} ({str(exc).split(':')[0]})"
            except ImportError:
                raise ConfigError("search needs aiconfigurator-core (pip install 'aiconfigurator-core==0.12.0') "
                                  "for the GPU memory model, or base.scheduler.num_gpu_blocks") from None
        pt["num_gpu_blocks"] = blocks
        if pt["pruned"] is None and -(-largest // block_size) > blocks:
            pt["pruned"] = f"memory: a {largest}-token request needs more than the {blocks} KV blocks"
        if pt["pruned"] is None:
            run = {**base, "workload": spec["workload"], "step_time": {**base.get("step_time", {}), **step_time},
                   "scheduler": {**sched, "max_num_seqs": mns, "max_num_batched_tokens": mnbt,
                                 "num_gpu_blocks": blocks}}
            run["step_time"] = {k: v for k, v in run["step_time"].items() if k != "profile"}
            try:
                cfg = config_from_dict(run)
            except ValueError as exc:
                raise type(exc)(f"{spec['source']}: point {_label(pt, topo)}: {exc}") from None
            pt["config"] = cfg.to_dict()
            if rate is not None:
                bound = n * cores_per * capacity_bound(step_time_backends.from_config(cfg.step_time), shape, mns, mnbt,
                                           cfg.scheduler.enable_prefix_caching)
                pt["capacity_bound_rps"] = round(bound, 3)
                if bound * (1 + CAPACITY_MARGIN) < rate:
                    pt["pruned"] = f"capacity: at most {bound:.1f} req/s < offered {rate:.1f}"
        out.append(pt)
    out.sort(key=lambda p: (p["cost_per_hour"], p["gpus"], p["system"], p["tensor_parallel_size"], p[topo],
                            p["max_num_seqs"], p["max_num_batched_tokens"]))
    return out


def _label(pt: dict, topo: str) -> str:
    return (f"{pt['system']} tp{pt['tensor_parallel_size']} {'x' if topo == 'servers' else 'dp'}{pt[topo]} "
            f"seqs{pt['max_num_seqs']} mnbt{pt['max_num_batched_tokens']}")


# ---- one point: simulate and judge --------------------------------------------------------------

def slo_metrics(req_events, slo: dict, span: float) -> dict:
    """The SLO figures of a run's ``req`` events: TTFT/TPOT at the SLOs' percentiles (ms), attainment
    (requests with TTFT and TPOT within the SLOs' maxima; failed and lost ones miss), throughput
    and goodput (finished and attaining requests per second of ``span``), availability (finished /
    requests)."""
    reqs = list(req_events)
    ok = [e for e in reqs if e["status"] == "finished"]
    ttft = [1000 * (e["first_token"] - e["arrival"]) for e in ok]
    tpot = [1000 * (e["finish"] - e["first_token"]) / (e["num_output"] - 1) for e in ok if e["num_output"] > 1]
    out = {"requests": len(reqs), "finished": len(ok)}
    for key, values in (("ttft_ms", ttft), ("tpot_ms", tpot)):
        if key in slo:
            v = percentile(values, slo[key]["percentile"])
            out[_metric(key, slo)] = None if v is None else round(v, 3)
    t_max = slo.get("ttft_ms", {}).get("max", math.inf)
    p_max = slo.get("tpot_ms", {}).get("max", math.inf)
    good = sum(1 for e in ok if 1000 * (e["first_token"] - e["arrival"]) <= t_max and
               (e["num_output"] <= 1 or 1000 * (e["finish"] - e["first_token"]) / (e["num_output"] - 1) <= p_max))
    out["attainment"] = round(good / len(reqs), 6) if reqs else 0.0
    out["throughput_rps"] = round(len(ok) / span, 4) if span > 0 else 0.0
    out["goodput_rps"] = round(good / span, 4) if span > 0 else 0.0
    out["availability"] = round(len(ok) / len(reqs), 6) if reqs else 0.0
    return out


def _metric(key: str, slo: dict) -> str:
    """The column of an SLO's percentile: ttft_ms at p99 -> ttft_p99_ms."""
    return f"{key[:4]}_p{slo[key]['percentile']:g}_ms"


def meets(m: dict, slo: dict) -> bool:
    for key in ("ttft_ms", "tpot_ms"):
        if key in slo and (m.get(_metric(key, slo)) is None or m[_metric(key, slo)] > slo[key]["max"]):
            return False
    return m["attainment"] >= slo.get("goodput", 0) and m["availability"] >= slo.get("availability", 0)


def search_point(point: dict) -> dict:
    """One search point (a sweep point): ``config`` (run config dict), ``deployment`` (a
    DeploymentConfig dict), ``faults`` (fault rates or None), ``slo`` -> its SLO figures, from what
    the client saw (``client`` events: a retried request counts from its first arrival), and
    whether it meets them."""
    cfg = config_from_dict(point["config"])
    rates = rates_from_dict(point["faults"]) if point["faults"] else None
    s = simulate_deployment(deployment_from_dict(point["deployment"]), cfg, seed=cfg.seed, fault_rates=rates,
                            summary_only=False, keep=frozenset({"client"}))
    ends = s["events"]
    m = slo_metrics(ends, point["slo"], s["sim_time_s"] - min((e["arrival"] for e in ends), default=0.0))
    return {**m, "engine_deaths": s["engine_deaths"], "retried": s["retried"], "meets": meets(m, point["slo"])}


# ---- the search ---------------------------------------------------------------------------------

SCENARIOS = ("no faults", "faults")


def run_search(spec: dict, out_dir: Path, *, progress: bool = True, workers: int | None = 1,
               ray_address: str | None = None) -> dict:
    """Search the space (both scenarios when the spec has a fault profile); write search.csv and
    pareto.png into ``out_dir``. Returns {points, best, pruned, simulated, ran}."""
    from ..progress import progress_bar
    from ..sweep import Sweep

    pts = enumerate_points(spec)
    topo = spec["topology"]
    scenarios = SCENARIOS if spec.get("faults") else SCENARIOS[:1]
    rows: list[dict] = []
    best: dict[str, dict | None] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(total=len(pts) * len(scenarios), desc="search", unit="point", disable=not progress)
    try:
        with Sweep(out_dir, workers=workers, ray_address=ray_address, progress=progress,
                   points=sum(p["pruned"] is None for p in pts) * len(scenarios)) as sweep:
            failed_clean: set[int] = set()
            for scenario in scenarios:
                faults = spec.get("faults") if scenario == "faults" else None
                todo = []
                for i, p in enumerate(pts):
                    reason = p["pruned"]
                    if reason is None and scenario == "faults" and i in failed_clean:
                        reason = "faults: fails without faults"
                    if reason is None:
                        todo.append(i)
                    else:
                        rows.append({**_row(p, topo, scenario), "pruned": reason})
                        bar.update(1)
                found = None
                while todo:
                    wave = _wave(pts, todo)
                    todo = todo[len(wave):]
                    results = sweep.map(search_point, [_payload(pts[i], spec, faults) for i in wave], bar=bar)
                    for i, r in zip(wave, results):
                        rows.append({**_row(pts[i], topo, scenario), **r, "pruned": None})
                        if not r["meets"] and scenario == "no faults":
                            failed_clean.add(i)
                    met = [rows[-len(wave) + k] for k, r in enumerate(results) if r["meets"]]
                    if met:
                        found = min(met, key=lambda r: (r["cost_per_hour"], -r["attainment"], r["gpus"]))
                        for i in todo:
                            rows.append({**_row(pts[i], topo, scenario),
                                         "pruned": f"cost: costlier than {found['cost_per_hour']} $/h, which meets"})
                            bar.update(1)
                        break
                best[scenario] = found
            ran = sweep.ran
    finally:
        bar.close()
    write_csv(out_dir / "search.csv", rows, spec)
    plotted = plot(rows, spec, out_dir / "pareto.png")
    return {"rows": rows, "best": best, "scenarios": scenarios, "ran": ran, "plotted": plotted,
            "pruned": sum(1 for r in rows if r["pruned"]), "simulated": sum(1 for r in rows if not r["pruned"])}


def _wave(pts: list[dict], todo: list[int]) -> list[int]:
    """The next wave: whole equal-cost tiers from the cheapest, at least WAVE points."""
    wave: list[int] = []
    for k, i in enumerate(todo):
        if len(wave) >= WAVE and pts[i]["cost_per_hour"] != pts[wave[-1]]["cost_per_hour"]:
            break
        wave.append(i)
    return wave


def _payload(pt: dict, spec: dict, faults) -> dict:
    topo = spec["topology"]
    slo = {k: spec["slo"][k]["max"] for k in ("ttft_ms", "tpot_ms") if k in spec["slo"]}
    dep = {**(spec.get("deployment") or {}), topo: pt[topo], "slo": slo}
    return {"config": pt["config"], "deployment": dep, "faults": faults, "slo": spec["slo"]}


def _row(pt: dict, topo: str, scenario: str) -> dict:
    return {"scenario": scenario, **{k: pt[k] for k in ("system", "tensor_parallel_size", topo, "max_num_seqs",
                                                         "max_num_batched_tokens", "gpus", "cost_per_hour",
                                                         "num_gpu_blocks")},
            "capacity_bound_rps": pt.get("capacity_bound_rps")}


def _columns(spec: dict) -> list[str]:
    topo = spec["topology"]
    slo = spec["slo"]
    return (["scenario", "system", "tensor_parallel_size", topo, "max_num_seqs", "max_num_batched_tokens", "gpus",
             "cost_per_hour", "num_gpu_blocks", "capacity_bound_rps"] + [_metric(k, slo) for k in ("ttft_ms", "tpot_ms")
                                                                    if k in slo]
            + ["attainment", "throughput_rps", "goodput_rps", "availability", "engine_deaths", "retried", "meets",
               "pruned"])


def write_csv(path: Path, rows: list[dict], spec: dict) -> None:
    cols = _columns(spec)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _slo_text(spec: dict) -> str:
    slo = spec["slo"]
    parts = [f"{k[:4].upper()} p{slo[k]['percentile']:g} <= {slo[k]['max']:g} ms" for k in ("ttft_ms", "tpot_ms")
             if k in slo]
    parts += [f"{k} >= {slo[k]:g}" for k in ("goodput", "availability") if k in slo]
    return ", ".join(parts)


def report(result: dict, out_dir: Path) -> str:
    """The table a planner reads: the simulated points, then the answer for each scenario."""
    from .study import format_table

    rows = [r for r in result["rows"] if not r["pruned"]]
    lines = []
    if rows:
        cols = [c for c in rows[0] if c not in ("pruned", "requests", "finished")]
        lines.append(format_table([{c: r.get(c) for c in cols} for r in rows]))
    else:
        lines.append("no point left to simulate")
    lines.append("")
    for scenario in result["scenarios"]:
        b = result["best"].get(scenario)
        if b is None:
            lines.append(f"{scenario}: no configuration of the space meets the SLOs")
        else:
            topo = "servers" if "servers" in b else "data_parallel_size"
            lines.append(f"{scenario}: cheapest meeting the SLOs: {b['system']} tp {b['tensor_parallel_size']} "
                         f"{topo} {b[topo]} max_num_seqs {b['max_num_seqs']} max_num_batched_tokens "
                         f"{b['max_num_batched_tokens']}: {b['gpus']} GPUs, {b['cost_per_hour']} $/h "
                         f"(attainment {b['attainment']})")
    reasons: dict[str, int] = {}
    for r in result["rows"]:
        if r["pruned"]:
            reasons[r["pruned"].split(":")[0]] = reasons.get(r["pruned"].split(":")[0], 0) + 1
    lines.append(f"points: {len(result['rows'])} ({len(result['scenarios'])} scenario(s)); simulated "
                 f"{result['simulated']} ({result['ran']} run now, {result['simulated'] - result['ran']} from the "
                 f"cache); pruned {result['pruned']}"
                 + (f" ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))})" if reasons else ""))
    lines.append(f"csv: {out_dir / 'search.csv'}")
    lines.append(f"plot: {out_dir / 'pareto.png'}" if result["plotted"]
                 else "plot: skipped (matplotlib not installed: pip install 'vllm-faultsim[plot]')")
    return "\n".join(lines)


def plot(rows: list[dict], spec: dict, path: Path) -> bool:
    """Cost per hour against SLO attainment for every simulated point, a Pareto front (cheapest
    for its attainment) per scenario, the cheapest meeting the SLOs starred."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for scenario, color in zip(SCENARIOS, ("tab:blue", "tab:red")):
        rs = [r for r in rows if r["scenario"] == scenario and not r["pruned"]]
        if not rs:
            continue
        ax.scatter([r["cost_per_hour"] for r in rs], [r["attainment"] for r in rs], color=color, alpha=0.6,
                   label=f"{scenario} ({len(rs)} simulated)")
        front, top = [], -1.0
        for r in sorted(rs, key=lambda r: (r["cost_per_hour"], -r["attainment"])):
            if r["attainment"] > top:
                front.append(r)
                top = r["attainment"]
        ax.step([r["cost_per_hour"] for r in front], [r["attainment"] for r in front], where="post", color=color)
        met = [r for r in rs if r["meets"]]
        if met:
            b = min(met, key=lambda r: (r["cost_per_hour"], -r["attainment"]))
            ax.scatter([b["cost_per_hour"]], [b["attainment"]], marker="*", s=250, color=color, edgecolor="k",
                       zorder=5, label=f"cheapest meeting ({scenario}): {_label(b, spec['topology'])}, "
                                       f"{b['gpus']} GPUs")
        for r in rs:
            ax.annotate(_label(r, spec["topology"]).rsplit(" seqs", 1)[0], (r["cost_per_hour"],
                        r["attainment"]), fontsize=6, alpha=0.7, xytext=(3, 3), textcoords="offset points")
    if "goodput" in spec["slo"]:
        ax.axhline(spec["slo"]["goodput"], color="gray", ls="--", lw=1, label=f"goodput SLO {spec['slo']['goodput']}")
    ax.set(xlabel="cost (USD per hour)", ylabel="SLO attainment (requests meeting TTFT and TPOT)",
           title=f"vllm-faultsim search: {spec.get('name', 'search')}\n{_slo_text(spec)}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
