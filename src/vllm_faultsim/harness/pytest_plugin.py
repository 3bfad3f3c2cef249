"""The pytest plugin (entry point ``pytest11``): markers sim/diff/gpu and fixtures to run the simulator.

Installed with the package, pytest loads it for every test suite (as it loads Hypothesis's);
with ``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` set, ask for it: ``pytest -p vllm_faultsim.harness.pytest_plugin``.

Fixtures (function-scoped factories; safe to call many times in one test, Hypothesis examples included):

``faultsim_plan(*faults) -> FaultPlan``
    A validated plan from fault mappings (``faultsim_plan({"kind": "kill_engine", "at": 5})``), a list
    of them, a plan mapping, a plan file or a ``FaultPlan``. A bad plan raises ``PlanError`` naming
    the test, the fault and the field.
``faultsim_run(config=None, plan=None, *, specs=None, seed=None, trace=True, validate=True) -> FaultsimRun``
    One simulator run of ``config`` (a mapping as in ``run.yaml``, a ``RunConfig`` or a config file)
    under ``plan`` (anything ``faultsim_plan`` takes). ``specs`` (``RequestSpec``\\ s or JSONL-form
    mappings) replaces the config's workload. The config, plan and workload are written under
    ``tmp_path``, with the trace when ``trace`` is true, which ``validate`` then reads back and checks.
    When the test fails, its report shows each run's seed, config, plan and the command that
    replays it byte for byte.
``faultsim_diff(left, right, *, sides=None, fields=None) -> None``
    Asserts two traces (``FaultsimRun``\\ s, ``RunResult``\\ s, event lists or trace files) agree step
    by step and request by request; else raises ``FaultsimDivergence`` (an ``AssertionError``) with
    the first divergence explained and how to replay both sides. ``faultsim_diff.first(...)``
    returns the ``Divergence`` (or None) instead.

The plugin imports nothing heavy when pytest loads it; the simulator is imported by the fixtures.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import pytest

if TYPE_CHECKING:
    from ..faults.plan import FaultPlan
    from .checkers.divergence import Divergence
    from .runs.simulate import RunConfig

MARKERS = {
    "sim": "simulator only (no torch, no vllm)",
    "diff": "simulator vs the real vLLM code on CPU (needs vllm)",
    "gpu": "simulator vs the real vLLM engine on a CUDA GPU",
}
SHOWN_RUNS = 4  # a failing test's report shows its last runs (Hypothesis replays the failing example last)

_RUNS = pytest.StashKey[list]()


# ---- markers ------------------------------------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    """Register the tier markers a suite has not declared itself (no duplicates in ``--markers``)."""
    declared = {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}
    for name, text in MARKERS.items():
        if name not in declared:
            config.addinivalue_line("markers", f"{name}: {text}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    runs = item.stash.get(_RUNS, None)
    if report.failed and runs:
        report.sections.append(("vllm-faultsim: how to replay", replay_report(runs)))


def replay_report(runs: list["ReplayInfo"]) -> str:
    """The runs a failing test made, as its report shows them: in a Hypothesis test, those of the
    last example (Hypothesis replays the failing example last), else the last ``SHOWN_RUNS``."""
    if runs[-1].example is not None:
        shown = [r for r in runs if r.example == runs[-1].example]
        head = "the runs of Hypothesis's last example (the failing one)"
        if len(runs) > len(shown):
            head += f"; {len(runs) - len(shown)} run(s) of earlier examples not shown"
    else:
        shown = runs[-SHOWN_RUNS:]
        head = f"{len(runs) - len(shown)} earlier run(s) not shown" if len(runs) > len(shown) else ""
    return "\n".join(([head] if head else []) + [r.describe() for r in shown])


def _hypothesis_example() -> object | None:
    """The Hypothesis example being run (its build context), or None outside one."""
    if "hypothesis" not in sys.modules:  # never import Hypothesis for a suite that does not use it
        return None
    try:
        from hypothesis.control import current_build_context
        return current_build_context()
    except Exception:
        return None


# ---- runs -----------------------------------------------------------------------------------------

def _non_default(cfg_dict: dict) -> dict:
    """The fields of a run config that differ from ``RunConfig()``'s (the seed always)."""
    from .runs.simulate import RunConfig

    default = RunConfig().to_dict()
    out: dict = {}
    for key, value in cfg_dict.items():
        if key == "scheduler":
            sched = {k: v for k, v in value.items() if default["scheduler"].get(k) != v}
            if sched:
                out[key] = sched
        elif key == "seed" or default.get(key) != value:
            out[key] = value
    return out


def _dump_yaml(path: Path, data: Any) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None), encoding="utf-8")
    return path


@dataclass
class ReplayInfo:
    """What a failing test's report prints about one run: seed, config, plan, the replay command."""

    label: str
    seed: int | None
    config: dict | None           # the fields that differ from the defaults
    plan: list | None
    command: str | None           # replays the run (the simulator's side of a real trace)
    files: dict[str, Path] = field(default_factory=dict)
    note: str = ""
    example: int | None = None    # the Hypothesis example it ran in (a counter), None outside one

    def describe(self) -> str:
        lines = [f"{self.label} (seed {self.seed}):"]
        if self.config is not None:
            lines.append(f"  config: {json.dumps(self.config)}")
        if self.plan is not None:
            lines.append(f"  plan:   {json.dumps(self.plan)}")
        if self.command:
            lines.append(f"  replay: {self.command}")
        if "trace" in self.files:
            lines.append(f"  trace:  {self.files['trace']}")
        if self.note:
            lines.append(f"  {self.note}")
        return "\n".join(lines)


def _write_replay(folder: Path, label: str, cfg_dict: dict, plan_dict: dict, trace: Path | None) -> ReplayInfo:
    """run.yaml + plan.yaml in `folder`, and the ``vllm-faultsim run`` command that replays them."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"config": _dump_yaml(folder / "run.yaml", cfg_dict), "plan": _dump_yaml(folder / "plan.yaml", plan_dict)}
    if trace is not None:
        files["trace"] = trace
    command = " ".join(shlex.quote(a) for a in (
        "vllm-faultsim", "run", "--config", str(files["config"]), "--plan", str(files["plan"]),
        "--trace", str(folder / "replay.jsonl")))
    return ReplayInfo(label, cfg_dict.get("seed"), _non_default(cfg_dict), plan_dict["faults"], command, files)


@dataclass
class FaultsimRun:
    """One run: its config and plan, the summary and every trace event, and how to replay it."""

    config: "RunConfig"
    plan: "FaultPlan"
    summary: dict
    events: list[dict]
    dir: Path                      # run.yaml, plan.yaml, workload.jsonl (with specs), trace.jsonl
    trace_path: Path | None
    replay: ReplayInfo

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def command(self) -> str:
        """The command line that replays this run (``vllm-faultsim run ...``)."""
        return self.replay.command or ""

    def of_kind(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["kind"] == kind]

    def find(self, kind: str, **fields: Any) -> list[dict]:
        """Events of `kind` whose fields equal `fields`: ``run.find("proc", event="engine_dead")``."""
        return [e for e in self.events if e["kind"] == kind and all(e.get(k) == v for k, v in fields.items())]

    @property
    def steps(self) -> list[dict]:
        return self.of_kind("step")

    @cached_property
    def requests(self) -> dict[str, dict]:
        """Each request's ``req`` event (its fate) by request id, in the order they left the engine."""
        return {e["req"]: e for e in self.events if e["kind"] == "req"}

    @cached_property
    def specs(self) -> tuple:
        """The workload the run served (``RequestSpec``\\ s, by arrival)."""
        from .runs.simulate import build_workload
        return build_workload(self.config)

    def describe(self) -> str:
        return self.replay.describe()


def check_trace(path: str | Path, events: list[dict] | None = None) -> list[dict]:
    """Read a trace file back and check it against the schema (harness/trace.py ``validate_trace``:
    header first, known event kinds and fields, steps in order, one ``req`` event per request), an
    ``end`` last whose summary ends the run, and the same events as `events` when given. Returns
    the events."""
    from . import trace as trace_mod

    try:
        read = trace_mod.read_trace(path)
    except ValueError as exc:  # TraceError included
        raise AssertionError(f"invalid trace: {exc}") from None
    problems = []
    if read[-1].get("kind") != "end" or "summary" not in read[-1]:
        problems.append(f"the last event is {read[-1].get('kind')!r}, not the run's end with its summary")
    if events is not None and json.loads(json.dumps(events)) != read:
        problems.append("the file's events differ from the run's")
    if problems:
        raise AssertionError(f"{path}: invalid trace: {'; '.join(problems)}")
    return read


def _config_dict(config: Any) -> dict:
    from dataclasses import asdict

    from ..models.scheduler import SchedulerConfig
    from .config_file import read_config_file
    from .runs.simulate import RunConfig

    if config is None:
        return {}
    if isinstance(config, RunConfig):
        return config.to_dict()
    if isinstance(config, (str, Path)):
        return read_config_file(config)
    if isinstance(config, dict):
        d = dict(config)
        if isinstance(d.get("scheduler"), SchedulerConfig):  # e.g. drawn from scheduler_configs()
            d["scheduler"] = {k: v for k, v in asdict(d["scheduler"]).items() if v is not None}
        return d
    raise TypeError(f"faultsim_run: config must be a mapping, a RunConfig or a config file, "
                    f"got {type(config).__name__}")


def _make_plan(args: tuple, source: str) -> "FaultPlan":
    from ..faults.plan import FaultPlan, load_plan, validate_plan

    if len(args) == 1 and not (isinstance(args[0], dict) and "kind" in args[0]):
        data = args[0]
    else:
        data = list(args)
    if isinstance(data, FaultPlan):
        return data
    if isinstance(data, (str, Path)):
        return load_plan(data)
    if isinstance(data, tuple):
        data = list(data)
    return validate_plan(data, source)


class RunFactory:
    """The ``faultsim_run`` fixture: ``faultsim_run(config, plan, *, specs, seed, trace, validate)``."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path):
        self._request, self._tmp = request, tmp_path
        self._runs: list = request.node.stash.setdefault(_RUNS, [])
        self._n = 0
        self._example, self._examples = None, 0

    def __call__(self, config: Any = None, plan: Any = None, *, specs: Iterable | None = None,
                 seed: int | None = None, trace: bool = True, validate: bool = True) -> FaultsimRun:
        from .runs.simulate import config_from_dict, simulate
        from .workload import RequestSpec, spec_to_dict

        __tracebackhide__ = True
        self._n += 1
        folder = self._tmp / "faultsim" / f"run{self._n}"
        folder.mkdir(parents=True, exist_ok=True)
        d = _config_dict(config)
        if seed is not None:
            d["seed"] = seed
        if specs is not None:  # the workload goes to a JSONL file, so the run is exactly its replay
            lines = [json.dumps(spec_to_dict(s) if isinstance(s, RequestSpec) else s, separators=(",", ":"))
                     for s in specs]
            workload = folder / "workload.jsonl"
            workload.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
            d["workload"] = {"kind": "jsonl", "path": str(workload)}
        cfg = config_from_dict(d)
        fault_plan = _make_plan((plan,), f"{self._request.node.nodeid}: plan")
        trace_path = folder / "trace.jsonl" if trace else None
        info = _write_replay(folder, f"faultsim_run #{self._n}", cfg.to_dict(), fault_plan.to_dict(), trace_path)
        example = _hypothesis_example()
        if example is not None:
            if example is not self._example:
                self._example, self._examples = example, self._examples + 1
            info.example = self._examples
        self._runs.append(info)  # recorded before the run: a run that raises is replayable too
        res = simulate(cfg, fault_plan, trace_path=trace_path)
        if trace_path is not None and validate:
            check_trace(trace_path, res.events)
        return FaultsimRun(cfg, fault_plan, res.summary, res.events, folder, trace_path, info)


class FaultsimDivergence(AssertionError):
    """Two traces diverge; ``.divergence`` is the first ``Divergence``, the message says how to replay."""

    def __init__(self, message: str, divergence: "Divergence"):
        super().__init__(message)
        self.divergence = divergence


class TraceDiff:
    """The ``faultsim_diff`` fixture: ``faultsim_diff(left, right)`` asserts the traces agree;
    ``faultsim_diff.first(left, right)`` returns the first ``Divergence`` or None."""

    def __init__(self, tmp_path: Path):
        self._tmp = tmp_path
        self._n = 0

    @staticmethod
    def _events(x: Any) -> list[dict]:
        from .runs.simulate import RunResult
        from .trace import read_trace

        if isinstance(x, (FaultsimRun, RunResult)):
            return x.events
        if isinstance(x, (str, Path)):
            return read_trace(x)
        if isinstance(x, (list, tuple)):
            return list(x)
        raise TypeError(f"faultsim_diff: expected a FaultsimRun, RunResult, event list or trace file, "
                        f"got {type(x).__name__}")

    @staticmethod
    def _sides(left: list[dict], right: list[dict]) -> tuple[str, str]:
        a, b = (ev[0].get("side") if ev and ev[0].get("kind") == "header" else None for ev in (left, right))
        return (a, b) if a and b and a != b else ("left", "right")

    def first(self, left: Any, right: Any, *, sides: tuple[str, str] | None = None,
              fields: tuple[str, ...] | None = None) -> "Divergence | None":
        from .checkers.divergence import STEP_FIELDS, first_divergence

        lev, rev = self._events(left), self._events(right)
        return first_divergence(lev, rev, sides or self._sides(lev, rev), fields or STEP_FIELDS)

    def _replay(self, x: Any, events: list[dict], name: str) -> str:
        if isinstance(x, FaultsimRun):
            return x.describe()
        label = f"{name}: {x}" if isinstance(x, (str, Path)) else name
        head = events[0] if events and events[0].get("kind") == "header" else None
        if head is None:
            return f"{label}: no header, nothing to replay it from"
        config = dict(head.get("config") or {})
        plan = config.pop("plan", {"version": 1, "faults": []})
        from .runs.simulate import ConfigError, config_from_dict
        try:
            cfg = config_from_dict(config)
        except (ConfigError, TypeError, ValueError):
            return ReplayInfo(f"{label} (side {head.get('side')})", head.get("seed"), config,
                              plan.get("faults"), None, note="not a run config: re-run its driver with this "
                              "seed, config and plan").describe()
        self._n += 1
        info = _write_replay(self._tmp / "faultsim" / f"diff{self._n}-{name}", label, cfg.to_dict(), plan, None)
        if head.get("side") != "sim":
            info.note = f"(side {head.get('side')!r}: the command replays the simulator on its config and plan)"
        return info.describe()

    def __call__(self, left: Any, right: Any, *, sides: tuple[str, str] | None = None,
                 fields: tuple[str, ...] | None = None) -> None:
        __tracebackhide__ = True
        lev, rev = self._events(left), self._events(right)
        sides = sides or self._sides(lev, rev)
        div = self.first(lev, rev, sides=sides, fields=fields)
        if div is None:
            return
        message = "\n".join([div.explain(), "how to replay:", self._replay(left, lev, sides[0]),
                             self._replay(right, rev, sides[1])])
        raise FaultsimDivergence(message, div)


# ---- fixtures -------------------------------------------------------------------------------------

@pytest.fixture
def faultsim_plan(request: pytest.FixtureRequest):
    """``faultsim_plan(*faults) -> FaultPlan``: a validated fault plan (see the module docstring)."""
    def make(*faults: Any) -> "FaultPlan":
        return _make_plan(faults, f"{request.node.nodeid}: plan")
    return make


@pytest.fixture
def faultsim_run(request: pytest.FixtureRequest, tmp_path: Path) -> RunFactory:
    """``faultsim_run(config, plan, *, specs, seed, trace, validate) -> FaultsimRun``: one simulator run."""
    return RunFactory(request, tmp_path)


@pytest.fixture
def faultsim_diff(tmp_path: Path) -> TraceDiff:
    """``faultsim_diff(left, right)``: assert two traces agree (``.first(...)``: the ``Divergence``)."""
    return TraceDiff(tmp_path)


def pytest_report_header(config: pytest.Config) -> str:
    from .. import __version__
    return f"vllm-faultsim {__version__}: fixtures faultsim_run, faultsim_plan, faultsim_diff"
