"""Differential runs: one case (workload + engine config + fault plan) through the simulator and
through the real vLLM ``Scheduler`` on CPU, both driven by the same engine loop, then checked.

The case's ``scheduler.async_scheduling`` picks the mode on both sides: on (vLLM 0.26.0's default),
the real side is vLLM's ``AsyncScheduler`` and the loop is the twin of
``EngineCore.step_with_batch_queue`` (two batches in flight, outputs one step late); off, vLLM's
``Scheduler`` and the synchronous ``EngineCore.step()`` loop.

A failing case is written as JSON and can be replayed with ``vllm-faultsim diff --replay FILE``.
Mutants (deliberately wrong simulator policies) show the checker catches what it claims to.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ...faults.plan import FaultPlan, validate_plan
from ...inputs import Section, checked
from ...models.ec_connector import ECConnector
from ...models.kv_offload import installed_vllm_version
from ...models.scheduler import SchedulerConfig, for_release
from ..checkers.divergence import Divergence, first_divergence
from ..mutants import SCHEDULER_MUTANTS, Mutant
from .simulate import RunConfig, prefetch_schedule, run_engine
from ..workload import WorkloadError, spec_from_dict, spec_to_dict, validate


class CaseFile(Section):
    """A saved case (``DiffCase.to_json``); its scheduler, plan and requests are checked by their schemas."""

    seed: int = 0
    scheduler: dict
    plan: dict | list | None = None
    requests: list

@dataclass(frozen=True)
class DiffCase:
    specs: tuple
    scheduler: SchedulerConfig
    plan: FaultPlan = FaultPlan()
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps({"seed": self.seed, "scheduler": asdict(self.scheduler), "plan": self.plan.to_dict(),
                           "requests": [spec_to_dict(s) for s in self.specs]}, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "<case>") -> "DiffCase":
        try:
            d = checked(CaseFile, json.loads(text), source, ValueError)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc.msg})") from None
        specs = []
        for i, r in enumerate(d.requests):
            try:
                specs.append(spec_from_dict(r, f"r{i}"))
            except WorkloadError as exc:
                raise WorkloadError(f"{source}: requests[{i}]: {exc}") from None
        # cases saved before async scheduling was modelled ran synchronously: replay them so
        sched = checked(SchedulerConfig, {"async_scheduling": False, **d.scheduler}, source, ValueError, at="scheduler")
        return cls(validate(specs), sched.validate(), validate_plan(d.plan, source), d.seed)


def run_side(case: DiffCase, side: str, mutant: str | None = None) -> list[dict]:
    """Events of one side. side: "sim" or "real"; a mutant (harness/mutants.py) only changes the
    simulator."""
    m = SCHEDULER_MUTANTS[mutant] if mutant and side == "sim" else Mutant()
    cfg = RunConfig(scheduler=case.scheduler, seed=case.seed)
    prefetch = prefetch_schedule(case.specs, case.plan)
    if side == "sim":  # the twin of the installed release (none installed: 0.26.0's)
        cls = for_release(m.scheduler_cls, installed_vllm_version())
        core = cls(case.scheduler, ECConnector(prefetch, m.ec_policy))
    else:
        from ..drivers.real_scheduler import RealSchedulerCore
        core = RealSchedulerCore(case.scheduler, ec=prefetch)
    return run_engine(core, case.specs, cfg, case.plan, side=side, prefetch=prefetch, engine_cls=m.engine_cls).events


def check_case(case: DiffCase, mutant: str | None = None) -> Divergence | None:
    return first_divergence(run_side(case, "sim", mutant), run_side(case, "real"))


def save_case(case: DiffCase, directory: str | Path, name: str = "divergence") -> Path:
    path = Path(directory) / f"{name}-seed{case.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(case.to_json())
    return path


def report(case: DiffCase, div: Divergence, path: Path, mutant: str | None) -> str:
    m = f" --mutant {mutant}" if mutant else ""
    return (f"{div.explain()}\n  seed: {case.seed}; case written to {path}\n"
            f"  replay: vllm-faultsim diff --replay {path}{m}")

class DivergenceFound(AssertionError):
    def __init__(self, case: DiffCase, div: Divergence):
        super().__init__(div.explain())
        self.case, self.div = case, div


def search(examples: int, seed: int, *, mutant: str | None = None, mm: bool = True,
           kv_pressure: bool | None = None, async_scheduling: bool = True, prefix_caching: bool | None = None,
           shrink: bool = True, progress=None) -> tuple[int, DiffCase | None, Divergence | None]:
    """Generate `examples` cases with Hypothesis in one scheduling mode (``async_scheduling``);
    ``prefix_caching`` True/False forces it on/off (None: drawn); on a divergence, shrink it to a
    minimal case (``shrink=False``: stop at the first). Returns (cases run, minimal failing case or
    None, its divergence)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    from ..strategies import fault_plans, scheduler_configs, workloads

    count = 0
    scheds = scheduler_configs(kv_pressure=kv_pressure, async_scheduling=async_scheduling)
    if prefix_caching is not None:
        scheds = scheds.map(lambda s: replace(s, enable_prefix_caching=prefix_caching))
    no_shrink = {} if shrink else {"phases": tuple(p for p in settings.default.phases
                                                   if p not in (Phase.shrink, Phase.explain))}

    @hseed(seed)
    @settings(max_examples=examples, deadline=None, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck), **no_shrink)
    @given(specs=workloads(mm=mm), sched=scheds, plan=fault_plans())
    def prop(specs, sched, plan):
        nonlocal count
        count += 1
        if progress is not None:
            progress(1)
        case = DiffCase(specs, sched, plan, seed)
        div = check_case(case, mutant)
        if div is not None:
            raise DivergenceFound(case, div)

    try:
        prop()
    except DivergenceFound as exc:
        return count, exc.case, exc.div
    return count, None, None
