"""One run: a config (engine limits, workload, step-time profile) + a fault plan -> trace + summary.

``run_engine`` drives any scheduler core (simulated or real) through the SimPy engine loop;
``simulate`` is the simulator's entry point: it builds the simulated core from the config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import random

import simpy

from ...faults.plan import FaultPlan
from ...faults.sim_injector import SimInjector
from ...inputs import NonNegative, Positive, PositiveInt, Section, checked
from ...models import eplb as eplb_model
from ...models import kv_offload as ko
from ...models.ec_connector import EC_POLICIES, ECConnector, PrefetchSchedule
from ...models.engine import CAUSES, EngineCore
from ...models.engine_procs import LatencyModel
from ...models.offload_scheduler import OffloadScheduler
from ...models.scheduler import Scheduler, SchedulerConfig
from ...models import step_time as step_time_backends
from .. import trace_formats
from .. import workload as wl
from ..invariants import Invariants, InvariantViolation
from ..metrics import Summary
from ..named_setup import SetupError, apply_setup
from ..trace import Trace, header

WORKLOAD_KINDS = ("poisson", "bursty", "jsonl") + tuple(trace_formats.WORKLOADS)


class ConfigError(ValueError):
    """An invalid run configuration; the message is one line."""


@dataclass(frozen=True)
class RunConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    workload: dict = field(default_factory=lambda: {"kind": "poisson", "rate": 20.0, "duration": 60.0,
                                                    "prompt": 512, "output": 128})
    seed: int = 0
    profile: str = "default"
    ec_policy: Literal[EC_POLICIES] = "future-only"
    liveness: str = "liveness_h100"  # detection-latency profile: a packaged name or a JSON path
    kv_offload: dict | None = None  # KV offloading to CPU (kv_offload_config); None: off
    eplb: dict | None = None  # async EPLB (models/eplb.py EplbConfig); None: off
    step_time: dict | None = None  # step-time backend (models/step_time.py); None: linear `profile`
    serving: dict | None = None  # CPU time per step around the forward (step_time.ServingCosts); None: none
    setup: str | None = None  # the named setup the sections came from (harness/named_setup.py); None: none

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scheduler"] = {k: v for k, v in d["scheduler"].items() if v is not None}
        if d["kv_offload"] is None:
            del d["kv_offload"]
        if d["eplb"] is None:
            del d["eplb"]
        if d["step_time"] is None:
            del d["step_time"]
        if d["serving"] is None:
            del d["serving"]
        if d["setup"] is None:
            del d["setup"]
        return d


class KVOffloadSection(Section):
    """The ``kv_offload`` section: ``policy`` and the ``kv_offload.OffloadConfig`` fields but
    ``block_size`` (the scheduler's); a field left out keeps OffloadConfig's default."""

    policy: Literal[("auto",) + ko.VERSIONS] = "auto"
    blocks_per_chunk: PositiveInt | None = None
    num_cpu_chunks: PositiveInt | None = None
    offload_prompt_only: bool | None = None
    bytes_per_block: PositiveInt | None = None
    bandwidth: Positive | None = None  # bytes/s
    latency: NonNegative | None = None  # seconds


def kv_offload_config(section: Any, scheduler: SchedulerConfig) -> dict:
    """The ``kv_offload`` section, checked and completed: ``policy`` (``auto``: the installed
    vLLM's release, or $VLLM_FAULTSIM_OFFLOAD_POLICY, resolved here so the trace header names it;
    ``0.23``; ``0.24+``) and the ``kv_offload.OffloadConfig`` fields but ``block_size`` (the
    scheduler's)."""
    section = checked(KVOffloadSection, section, "", ConfigError, at="kv_offload")
    if not scheduler.enable_prefix_caching:
        raise ConfigError("kv_offload needs scheduler.enable_prefix_caching: true (offload keys are block hashes)")
    d = section.model_dump(exclude={"policy"}, exclude_none=True)
    policy = section.policy
    try:
        offload = ko.OffloadConfig(block_size=scheduler.block_size, **d).validate()
        policy = ko.policy_for(None if policy == "auto" else policy).version
    except ValueError as exc:
        raise ConfigError(f"kv_offload: {exc}") from None
    out = asdict(offload)
    del out["block_size"]
    return {"policy": policy, **out}


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a parsed YAML/JSON mapping; unknown keys are errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"a run config must be a mapping, got {type(d).__name__}")
    try:
        d = apply_setup(d)  # a named setup's sections, with the config's own merged over them
    except SetupError as exc:
        raise ConfigError(str(exc)) from None
    cfg = checked(RunConfig, d, "", ConfigError)  # every field's type, scheduler's too; each section below
    rest = {f.name: getattr(cfg, f.name) for f in fields(RunConfig) if f.name != "scheduler"}
    sched = cfg.scheduler
    if cfg.eplb is not None:  # modelled with synchronous scheduling only: the default follows, an explicit true is refused
        if sched.async_scheduling and "async_scheduling" in (d.get("scheduler") or {}):
            raise ConfigError("scheduler.async_scheduling: true is not modelled with eplb yet (set it false)")
        sched = replace(sched, async_scheduling=False)
    try:
        scfg = sched.validate()
    except ValueError as exc:
        raise ConfigError(f"scheduler: {exc}") from None
    if rest.get("kv_offload") is not None:
        rest["kv_offload"] = kv_offload_config(rest["kv_offload"], scfg)
    if rest.get("eplb") is not None:
        try:
            rest["eplb"] = eplb_model.config_from_dict(rest["eplb"]).to_dict()
        except eplb_model.EplbConfigError as exc:
            raise ConfigError(str(exc)) from None
    if rest.get("step_time") is not None:
        rest["step_time"] = step_time_backends.check_section(rest["step_time"])
    if rest.get("serving") is not None:
        step_time_backends.check_serving(rest["serving"])
        if not scfg.async_scheduling:
            raise ConfigError("serving (CPU costs per step) is modelled with async scheduling only (the batch queue)")
    cfg = RunConfig(scheduler=scfg, **rest)
    specs = iter_workload(cfg)  # validates the workload description (a replay's file is read)
    mm = next((s.req_id for s in specs if s.mm), None) if cfg.kv_offload else None
    if mm is not None:
        raise ConfigError(f"kv_offload models text-only requests; workload request {mm} has multimodal items")
    liveness_model(cfg)
    return cfg


def admitted(specs, scfg: SchedulerConfig, source: str | None = None):
    """`specs`, each checked (:func:`admission_error`) as it is pulled: a streamed workload's bad
    request fails the run when the run reaches it (ConfigError, prefixed with `source`)."""
    for s in specs:
        try:
            admission_error(s, scfg)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None
        yield s


def admission_error(s: wl.RequestSpec, scfg: SchedulerConfig) -> None:
    """What vLLM refuses before a request reaches the scheduler, with vLLM 0.26.0's wording
    (``InputProcessor._validate_model_input``), and a request the whole KV cache cannot hold
    (vLLM refuses to start an engine whose max seq len does not fit the KV cache; the simulator,
    given the pool as data, refuses the request that would stall it)."""
    if s.prompt_len > scfg.max_model_len:
        raise ConfigError(f"request {s.req_id}: The decoder prompt (length {s.prompt_len}) is longer than the "
                          f"maximum model length of {scfg.max_model_len}. Make sure that `max_model_len` is "
                          "no smaller than the number of text tokens.")
    if s.prompt_len == scfg.max_model_len:
        raise ConfigError(f"request {s.req_id}: The decoder prompt (length {s.prompt_len}) plus the number of "
                          f"requested output tokens (at least 1) is longer than the maximum model length of "
                          f"{scfg.max_model_len}. Make sure that `max_model_len` is no smaller than the number "
                          "of text tokens (prompt + requested output tokens).")
    tokens = min(s.prompt_len + s.output_len - 1, scfg.max_model_len)
    blocks = -(-tokens // scfg.block_size)
    if blocks > scfg.num_gpu_blocks:
        raise ConfigError(f"request {s.req_id} (prompt {s.prompt_len} + output {s.output_len} tokens) needs "
                          f"{blocks} KV blocks of {scfg.block_size} tokens, larger than the whole KV cache "
                          f"(num_gpu_blocks {scfg.num_gpu_blocks}): it could never be scheduled")


def plan_applicability_errors(plan: FaultPlan, cfg: RunConfig, specs) -> None:
    """A fault that cannot apply to this run is refused (it would be silently ignored): KV
    transfer faults need ``kv_offload``; EC prefetch faults need multimodal requests (one that
    names an item, an item of the workload); EPLB faults need ``eplb``. `specs` is read in one
    pass, only for EC faults, and only as far as it takes to find their items."""
    items = _items_found(specs, {f.params.get("item", "*") for f in plan.of_kind("ec_prefetch_stall", "ec_prefetch_fail")})
    for i, f in enumerate(plan.faults):
        where = f"{plan.source or 'plan'}: faults[{i}] ({f.kind})"
        if f.kind.startswith("kv_transfer_") and cfg.kv_offload is None:
            raise ConfigError(f"{where}: the run has no kv_offload section, so there are no KV transfers to "
                              "fault (add kv_offload to the run config)")
        if f.kind.startswith("ec_prefetch_"):
            item = f.params.get("item", "*")
            if not items:
                raise ConfigError(f"{where}: the workload is text-only, no encoder inputs to prefetch "
                                  "(add mm to the workload)")
            if item != "*" and item not in items:
                every = {m.identifier for s in specs for m in s.mm}
                raise ConfigError(f"{where}: item {item!r} is in no request of the workload "
                                  f"(items: {', '.join(sorted(every)[:5])}{', ...' if len(every) > 5 else ''})")
        if f.kind in ("slow_link", "eplb_rank_death") and cfg.eplb is None:
            raise ConfigError(f"{where}: the run has no eplb section (add eplb to the run config)")


def step_time_model(cfg: RunConfig):
    """The step-time backend of `cfg`: its ``step_time`` section, or the linear ``profile``."""
    return step_time_backends.from_config(cfg.step_time, cfg.profile)


def liveness_model(cfg: RunConfig) -> LatencyModel:
    try:
        return LatencyModel.load(cfg.liveness)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"liveness profile {cfg.liveness!r}: {exc}") from None


def detection(cfg: RunConfig, injector: SimInjector) -> Callable[[str], float]:
    """Engine-death latencies drawn from the liveness profile (MP engine cores), seeded by the run."""
    model = liveness_model(cfg)
    for signal in injector.signals():
        if not model.has("mp", CAUSES[signal]):
            raise ConfigError(f"liveness profile {cfg.liveness!r} has no mp/{CAUSES[signal]} latencies "
                              f"for a {signal} fault (measured profiles: liveness_h100 has all)")
    rng = random.Random(f"liveness:{cfg.seed}")
    return lambda cause: model.sample(rng, "mp", cause)


class JsonlWorkload(Section):
    """A JSONL replay (harness/workload.py ``jsonl_workload``)."""

    kind: Literal["jsonl"]
    path: str


WORKLOADS = {"poisson": wl.Poisson, "bursty": wl.Bursty, "jsonl": JsonlWorkload, **trace_formats.WORKLOADS}  # kind -> schema


def _items_found(specs, wanted: set[str]) -> set[str]:
    """Which of the `wanted` items (``"*"``: any item) some request of `specs` carries."""
    found: set[str] = set()
    if not wanted:
        return found
    for s in specs:
        for m in s.mm:
            found.add("*")
            if m.identifier in wanted:
                found.add(m.identifier)
        if found >= wanted | {"*"}:
            break
    return found


def build_workload(cfg: RunConfig) -> tuple[wl.RequestSpec, ...]:
    """The requests of `cfg`'s workload, all at once (:func:`iter_workload`)."""
    return tuple(iter_workload(cfg))


def iter_workload(cfg: RunConfig) -> Iterable[wl.RequestSpec]:
    """The requests of `cfg`'s workload in arrival order, checked: a generated workload lazily
    (wl.Generated: each pass generates it again), a JSONL replay in arrival order and a public
    trace file lazily too (wl.JsonlReplay, trace_formats.read: checked here in one streamed pass,
    read again as the run pulls it), a JSONL replay out of order as read and sorted."""
    if not isinstance(cfg.workload, dict):
        raise ConfigError(f"workload must be a mapping with a kind ({', '.join(WORKLOAD_KINDS)}), got {cfg.workload!r}")
    # YAML 1.1 reads a bare on/off key as a boolean: the bursty workload written naturally
    w = {("on" if k is True else "off" if k is False else k): v for k, v in cfg.workload.items()}
    kind = w.pop("kind", None)
    if kind not in WORKLOAD_KINDS:
        raise ConfigError(f"workload.kind must be one of {', '.join(WORKLOAD_KINDS)}, got {kind!r}")
    spec = checked(WORKLOADS[kind], {"kind": kind, **w}, f"workload ({kind})", wl.WorkloadError)
    if kind == "jsonl":
        return wl.jsonl_workload(spec.path)
    if kind in trace_formats.WORKLOADS:
        try:
            return trace_formats.read(spec, seed=cfg.seed, max_model_len=cfg.scheduler.max_model_len)
        except wl.WorkloadError as exc:
            raise wl.WorkloadError(f"workload ({kind}): {exc}") from None
    return wl.Generated(spec, cfg.seed)


def last_arrival(specs: Iterable[wl.RequestSpec]) -> float:
    """When the last request of `specs` (:func:`iter_workload`'s) arrives, as its description tells
    it without a pass over it (what a progress bar covers): a generated workload's end (`start` +
    `duration`, or `num_requests` at `rate`: about), a replay's last arrival (its check pass's)."""
    if isinstance(specs, wl.Generated):
        w = specs.w
        if isinstance(w, wl.Poisson):
            return w.start + (w.duration if w.duration is not None else w.num_requests / w.rate)
        return w.duration
    if isinstance(specs, tuple):
        return specs[-1].arrival if specs else 0.0
    return specs.last_arrival


@dataclass
class RunResult:
    summary: dict
    events: list[dict]
    overloaded: bool = False  # metrics.overloaded of the run's requests (kept or not)


def prefetch_schedule(specs, plan: FaultPlan) -> PrefetchSchedule:
    """The EC prefetch schedule of `specs`, with the plan's EC faults armed."""
    prefetch = PrefetchSchedule(specs)
    SimInjector(plan).arm_prefetch(prefetch)
    return prefetch


def run_engine(core, specs, cfg: RunConfig, plan: FaultPlan, *, side: str, trace_path: str | Path | None = None,
               keep: bool | frozenset[str] = True, full_trace: bool = True, prefetch: PrefetchSchedule | None = None,
               wakeups: tuple = (), progress: Callable[[float], None] | None = None,
               engine_cls: type[EngineCore] = EngineCore, macro_steps: bool = True) -> RunResult:
    """Drive `core` through the engine loop over `specs` under `plan` (its faults armed by the
    simulator's injector); write the trace; return summary + events."""
    step_time = step_time_model(cfg)
    injector = SimInjector(plan)
    # False keeps the req events (what callers report on); a set keeps those kinds only, frozenset()
    # none: the summary streams (metrics.Summary), so a summary-only run holds what is in flight
    kinds = True if keep is True else frozenset({"req"}) if keep is False else frozenset(keep)
    requests = Summary()
    with Trace(trace_path, keep=kinds) as trace:
        emit_trace = trace.emit

        def emit(event: dict) -> None:
            if event["kind"] == "req":
                requests.add(event)
                if prefetch is not None:
                    prefetch.finished(event["req"])  # the schedule holds what is in flight
            emit_trace(event)

        trace.emit(header(side, cfg.seed, {**cfg.to_dict(), "plan": plan.to_dict()},
                          clock=step_time_backends.describe(step_time)))
        env = simpy.Environment()
        eplb = None
        if cfg.eplb is not None:
            ecfg = eplb_model.config_from_dict(cfg.eplb)
            eplb = eplb_model.EplbState(env, ecfg, eplb_model.shuffle_policy(ecfg, random.Random(f"eplb:{cfg.seed}")),
                                        trace.emit)
            injector.arm_eplb(eplb)
        elif injector.eplb_faults():
            raise ConfigError(f"fault {injector.eplb_faults()[0].kind} needs an eplb section in the run config")
        engine = engine_cls(env, core, specs, step_time, emit, eplb=eplb,
                            wakeups=((prefetch,) if prefetch else ()) + tuple(wakeups),
                            detection=detection(cfg, injector),
                            invariants=Invariants(cfg.scheduler.max_num_batched_tokens, cfg.scheduler.max_num_seqs),
                            full_trace=full_trace, progress=progress, macro_steps=macro_steps,
                            max_concurrent_batches=2 if cfg.scheduler.async_scheduling else 1,
                            **({"cpu_costs": step_time_backends.serving_costs(cfg.serving, cfg.scheduler)} if cfg.serving else {}))
        injector.arm_engine(engine)
        try:
            env.run()
        finally:
            core.shutdown()
        if engine.stats.records:
            lost = sorted(engine.stats.records)
            raise RuntimeError(f"{len(lost)} requests neither finished nor failed (first: {lost[0]})")
        pending = core.pending_jobs() if engine.kv_connector and engine.alive else ()
        if pending:
            raise InvariantViolation(engine.stats.steps, env.now, f"{len(pending)} KV offload jobs never retired "
                                                                  f"at the end of the run: {pending[:5]}")
        summary = requests.result(steps=engine.stats.steps, end=env.now)
        if engine.kv_connector:
            summary.update(engine.kv_summary())
        trace.emit({"kind": "end", "t": round(env.now, 9), "summary": summary})
    return RunResult(summary, trace.events, requests.overloaded())


def simulate(cfg: RunConfig, plan: FaultPlan | None = None, *, trace_path: str | Path | None = None,
             keep: bool | frozenset[str] = True, full_trace: bool = True, specs=None,
             progress: Callable[[float], None] | None = None, macro_steps: bool = True) -> RunResult:
    """Run the simulator on `cfg` (or on explicit `specs`) under `plan`. ``macro_steps=False``
    steps the engine one step at a time (the same decisions and trace: models/engine.py)."""
    plan = plan or FaultPlan()
    injector = SimInjector(plan)
    specs = iter_workload(cfg) if specs is None else specs
    prefetch = prefetch_schedule((), plan)  # each request's items are added as the engine pulls it (staged)
    if cfg.kv_offload:
        kv = dict(cfg.kv_offload)
        policy = ko.OffloadPolicy(kv.pop("policy"))
        core = OffloadScheduler(cfg.scheduler, ko.OffloadConfig(block_size=cfg.scheduler.block_size, **kv), policy)
        injector.arm_transfers(core.transfers)
    else:
        core = Scheduler(cfg.scheduler, ECConnector(prefetch, cfg.ec_policy))
    return run_engine(core, staged(specs, prefetch), cfg, plan, side="sim", trace_path=trace_path, keep=keep,
                      full_trace=full_trace, prefetch=prefetch, progress=progress, macro_steps=macro_steps)


def staged(specs, prefetch: PrefetchSchedule):
    """`specs`, each added to the EC prefetch schedule as it is pulled (before it arrives)."""
    for s in specs:
        prefetch.add(s)
        yield s


def with_scheduler(cfg: RunConfig, **changes) -> RunConfig:
    return replace(cfg, scheduler=replace(cfg.scheduler, **changes))
