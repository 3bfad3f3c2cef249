"""vllm-faultsim: a SimPy model of vLLM's engine, fault plans, traces and checkers (the public API).

    import vllm_faultsim as vfs

    cfg = vfs.config_from_dict({"seed": 1, "workload": {"kind": "poisson", "rate": 20, "duration": 10,
                                                        "prompt": 512, "output": 128}})
    plan = vfs.validate_plan([{"kind": "kill_engine", "at": 5.0, "signal": "SIGKILL"}])
    res = vfs.simulate(cfg, plan, trace_path="trace.jsonl")   # RunResult: .summary, .events
    assert vfs.first_divergence(res.events, vfs.read_trace("trace.jsonl")) is None

Names resolve on first use, so ``import vllm_faultsim`` stays light: it imports neither torch nor
vllm (nor simpy until a name needs it). The Hypothesis strategies (``request_specs``,
``workloads``, ``scheduler_configs``, ``fault_plans``) are exported when Hypothesis is installed
(``pip install 'vllm-faultsim[test]'``). The pytest plugin (fixtures ``faultsim_run``,
``faultsim_plan``, ``faultsim_diff``; markers ``sim``, ``diff``, ``gpu``) is
``vllm_faultsim.harness.pytest_plugin``, loaded by pytest through the ``pytest11`` entry point.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

# public name -> module (relative to this package) that holds it
_EXPORTS: dict[str, str] = {
    # one run: config (+ config files) and plan -> summary + events (+ a trace file)
    "simulate": "harness.runs.simulate",
    "RunConfig": "harness.runs.simulate",
    "RunResult": "harness.runs.simulate",
    "config_from_dict": "harness.runs.simulate",
    "ConfigError": "harness.runs.simulate",
    "load_config": "harness.config_file",
    "SchedulerConfig": "models.scheduler",
    # fault plans: data, validated once
    "FaultPlan": "faults.plan",
    "Fault": "faults.plan",
    "validate_plan": "faults.plan",
    "load_plan": "faults.plan",
    "PlanError": "faults.plan",
    # workloads
    "RequestSpec": "harness.workload",
    "MMItem": "harness.workload",
    "WorkloadError": "harness.workload",
    # traces and the checker that reads them
    "read_trace": "harness.trace",
    "first_divergence": "harness.checkers.divergence",
    "Divergence": "harness.checkers.divergence",
    "InvariantViolation": "harness.invariants",
}

# Hypothesis strategies: only where Hypothesis is installed (the ``test`` extra)
_STRATEGIES = ("request_specs", "workloads", "scheduler_configs", "fault_plans")
_HAVE_HYPOTHESIS = importlib.util.find_spec("hypothesis") is not None
if _HAVE_HYPOTHESIS:
    _EXPORTS.update(dict.fromkeys(_STRATEGIES, "harness.strategies"))

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if name in _STRATEGIES:
            raise AttributeError(f"vllm_faultsim.{name} is a Hypothesis strategy and Hypothesis is not installed: "
                                 "pip install 'vllm-faultsim[test]'")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
