"""One deployment run: servers of DP ranks behind a router, a client with retries, faults from rates.

The Python entry point (the SLO search calls it for one configuration; its signature is stable)::

    simulate_deployment(dep: DeploymentConfig, run_cfg: RunConfig, *, seed: int,
                        fault_rates: FaultRates | None = None, plans: Sequence[FaultPlan] | None = None,
                        trace_path: str | Path | None = None, summary_only: bool = True,
                        progress: Callable[[float], None] | None = None) -> dict

It returns the summary (:func:`deployment_summary`); ``summary_only=False`` adds ``per_server``
(deaths, seconds down, requests finished there) and ``events`` (the trace; ``keep``: only events of
these kinds). The workload is streamed: generated (or read) as the client reaches each request, and
the summary takes each client event as it is emitted, so a run holds what is in flight. ``run_cfg`` gives
each engine core's scheduler, step time, async scheduling, liveness profile and the workload
(its seed replaced by `seed`); ``fault_rates`` are expanded into one plan per server
(faults/rates.py), or ``plans`` gives them (a replay). The trace header holds the deployment, the
run config, the rates and the plans, so ``vllm-faultsim deploy --replay TRACE`` replays it exactly.

The spec file of ``vllm-faultsim deploy --spec deploy.yaml``::

    deployment:
      servers: 4                 # vLLM servers behind the router
      data_parallel_size: 1      # engine cores (DP ranks) per server
      router: least_outstanding  # round_robin | least_outstanding | prefix_aware (models/router.py)
      restart_s: 60              # a dead server's model load + warm-up
      is_moe: true               # DP ranks send their counts to the DP coordinator (false: a dense model's don't)
      retry: {attempts: 3, backoff_s: 1, backoff_multiplier: 2, timeout_s: 60}   # models/client.py
      slo: {ttft_ms: 500, tpot_ms: 50}   # goodput: finished requests meeting both, per second
    fault_rates: {engine_mtbf_s: 600, kill_signal: SIGKILL}                      # faults/rates.py
    run:                         # a run config, as `vllm-faultsim run --config` takes it
      workload: {kind: poisson, rate: 40, duration: 300, prompt: 512, output: 128}
      seed: 1
"""

from __future__ import annotations

from array import array
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import simpy

from ...faults.plan import FaultPlan, PlanError, validate_plan
from ...faults.rates import FaultRates, expand, rates_from_dict
from ...faults.sim_injector import SimInjector
from ...inputs import NonNegative, Positive, PositiveInt, Section, checked, read_mapping_file
from ...models import events
from ...models import step_time as step_time_backends
from ...models.client import Client, RetryPolicy
from ...models.cluster import Cluster, Server
from ...models.ec_connector import ECConnector, PrefetchSchedule
from ...models.engine import EngineCore
from ...models.router import ROUTERS
from ...models.scheduler import Scheduler
from ..invariants import Invariants
from ..metrics import percentile
from ..trace import Trace, header
from .simulate import (ConfigError, RunConfig, admitted, config_from_dict, detection, iter_workload,
                       last_arrival, plan_applicability_errors, step_time_model)


@dataclass(frozen=True)
class SLO:
    ttft_ms: Positive = 500.0
    tpot_ms: Positive = 50.0


@dataclass(frozen=True)
class DeploymentConfig:
    servers: PositiveInt = 1
    data_parallel_size: PositiveInt = 1
    router: Literal[tuple(ROUTERS)] = "round_robin"
    restart_s: NonNegative = 60.0
    is_moe: bool = True  # a DP server's ranks publish their counts (MoE: DPEngineCoreProc) or not (dense)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    slo: SLO = field(default_factory=SLO)

    def to_dict(self) -> dict:
        return asdict(self)


def deployment_from_dict(d: Any, source: str = "deployment") -> DeploymentConfig:
    """A checked DeploymentConfig (its fields' annotations, retry's and slo's, are the schema); a
    bad key or value is a one-line ConfigError naming ``source.field`` and the value."""
    return checked(DeploymentConfig, d, "", ConfigError, at=source)


class DeploymentSpec(Section):
    """A deployment spec's top level; each section is checked by its own schema."""

    deployment: dict | None = None
    fault_rates: dict | None = None
    run: dict | None = None


def spec_from_dict(d: Any, source: str) -> tuple[DeploymentConfig, RunConfig, FaultRates | None]:
    d = checked(DeploymentSpec, d, source, ConfigError).model_dump()
    try:
        dep = deployment_from_dict(d.get("deployment") or {})
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    try:
        rates = rates_from_dict(d["fault_rates"]) if d.get("fault_rates") else None
    except PlanError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    try:
        run_cfg = config_from_dict(d.get("run") or {})
    except ConfigError as exc:
        raise ConfigError(f"{source}: run: {exc}") from None
    if run_cfg.kv_offload is not None or run_cfg.eplb is not None:
        raise ConfigError(f"{source}: run: {'kv_offload' if run_cfg.kv_offload else 'eplb'} is not modelled "
                          "in deployments yet")
    return dep, run_cfg, rates


def load_spec(path: str | Path) -> tuple[DeploymentConfig, RunConfig, FaultRates | None]:
    return spec_from_dict(read_mapping_file(path, "deployment spec", ConfigError), str(path))


def simulate_deployment(dep: DeploymentConfig, run_cfg: RunConfig, *, seed: int,
                        fault_rates: FaultRates | None = None, plans: Sequence[FaultPlan] | None = None,
                        trace_path: str | Path | None = None, summary_only: bool = True,
                        progress: Callable[[float], None] | None = None,
                        server_cls: type[Server] = Server, keep: bool | frozenset[str] = True) -> dict:
    """Run one deployment (see the module docstring); ``server_cls`` is for the checks' mutants."""
    cfg = replace(run_cfg, seed=seed)
    specs = iter_workload(cfg)
    items: set[str] = set()
    last = 0.0
    for s in admitted(specs, cfg.scheduler):  # one streamed pass: admission, the horizon, the items
        last = max(last, s.arrival)
        if plans is None and fault_rates:
            items.update(m.identifier for m in s.mm)
    horizon = last + dep.retry.timeout_s
    if plans is None:
        plans = expand(fault_rates, servers=dep.servers, data_parallel_size=dep.data_parallel_size,
                       horizon=horizon, seed=seed, items=items) if fault_rates else (FaultPlan(),) * dep.servers
    plans = tuple(plans)
    if len(plans) != dep.servers:
        raise ConfigError(f"{len(plans)} fault plans for {dep.servers} servers")
    for s, plan in enumerate(plans):
        plan_applicability_errors(plan, cfg, specs)
        for f in plan.of_kind("kill_engine"):
            if f.rank >= dep.data_parallel_size:
                raise ConfigError(f"server {s}'s plan: kill_engine rank {f.rank} is not a rank of a server of "
                                  f"data_parallel_size {dep.data_parallel_size}")
        bad = [f.kind for f in plan.faults if f.kind not in ("kill_engine", "slow_steps") and
               not f.kind.startswith("ec_prefetch_")]
        if bad:
            raise ConfigError(f"server {s}'s plan: {bad[0]} faults are not modelled in deployments")
    step_time = step_time_model(cfg)
    draw = detection(cfg, SimInjector(FaultPlan(tuple(f for p in plans for f in p.faults))))
    cpu = {"cpu_costs": step_time_backends.serving_costs(cfg.serving, cfg.scheduler)} if cfg.serving else {}
    sched = cfg.scheduler
    ends = ClientEnds(dep.slo)
    with Trace(trace_path, keep=False if summary_only else keep) as trace:
        emit_trace = trace.emit

        def emit(event: dict) -> None:
            if event["kind"] == "client":
                ends.add(event)
            emit_trace(event)

        trace.emit(header("sim", seed, {"deployment": dep.to_dict(), "run": cfg.to_dict(),
                                        "fault_rates": fault_rates.to_dict() if fault_rates else None,
                                        "plans": [p.to_dict() for p in plans]}))
        env = simpy.Environment()

        def build_rank(server: int, rank: int, emit, detect, after_step):
            prefetch = PrefetchSchedule()  # the server adds each request it sends to the rank
            SimInjector(plans[server]).arm_prefetch(prefetch)
            core = Scheduler(sched, ECConnector(prefetch, cfg.ec_policy))

            def emit_done(event: dict) -> None:
                if event["kind"] == "req":
                    prefetch.finished(event["req"])  # the schedule holds what is in flight
                emit(event)

            engine = EngineCore(env, core, (), step_time, emit_done, wakeups=(prefetch,), detection=detect,
                                invariants=Invariants(sched.max_num_batched_tokens, sched.max_num_seqs),
                                full_trace=False, progress=after_step if progress is None else
                                (lambda now: (after_step(now), progress(now))),
                                max_concurrent_batches=2 if sched.async_scheduling else 1, open_workload=True, **cpu)
            return engine, prefetch

        servers = [server_cls(env, i, dep.data_parallel_size, build_rank, draw, dep.restart_s, emit,
                              is_moe=dep.is_moe) for i in range(dep.servers)]
        for server, plan in zip(servers, plans):
            SimInjector(plan).arm_server(server)
        cluster = Cluster(servers, ROUTERS[dep.router]())
        client = Client(env, specs, cluster.send, dep.retry, emit)
        env.run(until=client.done)
        summary = deployment_summary(ends, servers, client, env.now)
        trace.emit(events.end(env.now, summary=summary))
    if not summary_only:
        summary = {**summary, "per_server": [
            {"server": s.index, "deaths": s.deaths, "down_s": round(s.downtime(env.now), 3),
             "finished": ends.finished_on.get(s.index, 0)} for s in servers], "events": trace.events}
    return summary


class ClientEnds:
    """What the summary needs of the ``client`` events, taken one at a time as they are emitted
    (a few numbers per finished request; no event kept)."""

    def __init__(self, slo: SLO):
        self.slo = slo
        self.n = self.good = self.retried = 0
        self.counts = {"finished": 0, "failed": 0, "lost": 0}
        self.ttft, self.tpot = array("d"), array("d")
        self.first_arrival: float | None = None
        self.finished_on: dict[int, int] = {}  # server -> requests finished there

    def add(self, e: dict) -> None:
        self.n += 1
        self.counts[e["status"]] += 1
        self.retried += e["tries"] > 1
        a = e["arrival"]
        self.first_arrival = a if self.first_arrival is None or a < self.first_arrival else self.first_arrival
        if e["status"] != "finished":
            return
        self.finished_on[e["server"]] = self.finished_on.get(e["server"], 0) + 1
        t1 = e["first_token"] - a
        self.ttft.append(t1)
        t2 = (e["finish"] - e["first_token"]) / (e["num_output"] - 1) if e["num_output"] > 1 else None
        if t2 is not None:
            self.tpot.append(t2)
        self.good += 1000 * t1 <= self.slo.ttft_ms and (t2 is None or 1000 * t2 <= self.slo.tpot_ms)


def deployment_summary(ends: ClientEnds, servers: Sequence[Server], client: Client, end: float) -> dict:
    """What the client saw (its ``client`` events, :class:`ClientEnds`), against the SLOs, and how
    long the servers were up."""
    n, counts, good, ttft, tpot = ends.n, ends.counts, ends.good, ends.ttft, ends.tpot
    span = end - (ends.first_arrival if ends.first_arrival is not None else 0.0)
    ms = lambda x: None if x is None else round(1000 * x, 3)  # noqa: E731
    down = sum(s.downtime(end) for s in servers)
    return {
        "requests": n, **counts,
        "retried": ends.retried, "retries": client.retries, "rejected": client.rejected,
        "availability": round(counts["finished"] / n, 6) if n else None,
        "slo_attainment": round(good / n, 6) if n else None,
        "goodput_rps": round(good / span, 4) if span > 0 else 0.0,
        "throughput_rps": round(counts["finished"] / span, 4) if span > 0 else 0.0,
        "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
        "tpot_p50_ms": ms(percentile(tpot, 50)), "tpot_p99_ms": ms(percentile(tpot, 99)),
        "engine_deaths": sum(s.deaths for s in servers),
        "uptime": round(1 - down / (len(servers) * end), 6) if end > 0 else 1.0,
        "sim_time_s": round(end, 6),
    }


def replay_inputs(path: str | Path) -> tuple[DeploymentConfig, RunConfig, int, FaultRates | None, tuple[FaultPlan, ...]]:
    """What a deployment trace's header says was run: its deployment, run config, seed, rates, plans."""
    from ..trace import iter_jsonl
    try:
        head = next(iter_jsonl(path))
        conf = head["config"]
        dep = deployment_from_dict(conf["deployment"], "header deployment")
        run_cfg = config_from_dict(conf["run"])
        rates = rates_from_dict(conf["fault_rates"]) if conf.get("fault_rates") else None
        plans = tuple(validate_plan(p, f"{path}: header plans[{i}]") for i, p in enumerate(conf["plans"]))
        return dep, run_cfg, head["seed"], rates, plans
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as exc:
        raise ConfigError(f"{path}: not a deployment trace ({type(exc).__name__}: {exc})") from None


def format_summary(summary: dict) -> str:
    width = max(len(k) for k in summary if k not in ("per_server", "events"))
    lines = [f"{k.ljust(width)}  {'-' if v is None else v}" for k, v in summary.items()
             if k not in ("per_server", "events")]
    if summary.get("per_server"):
        lines += ["", "server  deaths  down_s  finished"]
        lines += [f"{s['server']:>6}  {s['deaths']:>6}  {s['down_s']:>6g}  {s['finished']:>8}" for s in summary["per_server"]]
    return "\n".join(lines)


def deploy_main(args, output_path) -> int:
    """``vllm-faultsim deploy``: a spec (or a trace to replay) -> progress bar, summary table, trace."""
    import json

    from ..progress import progress_bar
    if (args.spec is None) == (args.replay is None):
        raise ConfigError("deploy needs exactly one of --spec SPEC or --replay TRACE")
    plans = None
    if args.spec:
        dep, run_cfg, rates = load_spec(args.spec)
        seed = run_cfg.seed if args.seed is None else args.seed
    else:
        dep, run_cfg, seed, rates, plans = replay_inputs(args.replay)
        if args.seed is not None and args.seed != seed:
            raise ConfigError(f"--seed {args.seed}: a replay runs with its trace's seed ({seed})")
    final = output_path(args.trace, "--trace")
    partial = final.with_name(f".{final.name}.partial")
    horizon = round(last_arrival(iter_workload(replace(run_cfg, seed=seed))), 1)  # not generated twice
    try:
        with progress_bar(total=horizon, unit="sim-s", desc="deploy", disable=args.no_progress,
                          bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} sim-s [{elapsed}<{remaining}]") as bar:
            summary = simulate_deployment(
                dep, run_cfg, seed=seed, fault_rates=rates, plans=plans, trace_path=partial, summary_only=False,
                keep=frozenset(), progress=lambda now: bar.update(min(now, horizon) - bar.n) if now - bar.n >= 0.1 else None)
        partial.replace(final)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"--trace {args.trace}: cannot write the trace ({exc.strerror or exc}); nothing written") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    summary.pop("events")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        print(f"trace: {args.trace}  (replay: vllm-faultsim deploy --replay {args.trace} --trace OTHER.jsonl)")
    return 0
