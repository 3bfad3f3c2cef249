"""What-if studies: a grid of run configs x fault plans, simulated point by point.

A study spec (YAML) has ``base`` (a run config), ``grid`` (dotted config paths -> values) and
``plans`` (name -> list of faults). Results: a table on stdout, a CSV and a PNG plot.
"""

from __future__ import annotations

import copy
import csv
import itertools
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field

from ...faults.plan import validate_plan
from ...inputs import Section, checked, read_mapping_file
from ...models.step_time import describe
from .simulate import ConfigError, config_from_dict, simulate, step_time_model

COLUMNS = ("throughput_rps", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "preemptions", "failed")


class StudySpec(Section):
    """A study spec: each grid value list non-empty; base (a run config) and plans (fault plans)
    are checked by their own schemas, point by point."""

    name: str | None = None
    description: str | None = None
    base: dict | None = None
    grid: dict[str, Annotated[list, Field(min_length=1)]] | None = None  # dotted config path -> values
    plans: dict[str, Any] | None = None  # name -> a fault plan


def load_study(path: str | None) -> dict:
    if path is None:
        spec = yaml.safe_load((resources.files("vllm_faultsim.studies") / "default.yaml").read_text(encoding="utf-8"))
        source = "<embedded default study>"
    else:
        spec = read_mapping_file(path, "study spec", ConfigError)
        source = path
    checked(StudySpec, spec, str(source), ConfigError)
    spec["source"] = source
    return spec


def _set(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def points(spec: dict):
    """Yield (params, config, plan_name, plan) for every grid point x plan; everything validated first."""
    grid = spec.get("grid", {}) or {}
    plans = {name: validate_plan(faults, f"{spec['source']}: plans.{name}")
             for name, faults in (spec.get("plans") or {"none": []}).items()}
    keys = list(grid)
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        d = copy.deepcopy(spec.get("base", {}))
        for k, v in zip(keys, combo):
            _set(d, k, v)
        try:
            cfg = config_from_dict(d)
        except ValueError as exc:  # ConfigError, WorkloadError: name the point
            point = ", ".join(f"{k}={v!r}" for k, v in zip(keys, combo))
            raise type(exc)(f"{spec['source']}: {'grid point ' + point + ': ' if point else 'base: '}{exc}") from None
        for name, plan in plans.items():
            out.append((dict(zip(keys, combo)), cfg, name, plan))
    return out


def study_point(point: dict) -> dict:
    """One study point (a sweep point: run config and fault plan as dicts) -> its table columns."""
    cfg = config_from_dict(point["config"])
    res = simulate(cfg, validate_plan(point["plan"], "study point"), keep=frozenset(), full_trace=False)
    return {**{c: res.summary[c] for c in COLUMNS},
            "overloaded": res.overloaded,
            "requests": res.summary["requests"]}


def run_study(spec: dict, out_dir: Path, progress: bool = True, *, workers: int | None = 1,
              ray_address: str | None = None) -> list[dict]:
    """Every point of the study, through a sweep (harness/sweep.py: on Ray with ``workers`` > 1 or
    ``ray_address``, cached by config in ``out_dir``): study.csv is rewritten as each point
    finishes, and an interrupted study run again with the same ``--out`` continues."""
    from ..sweep import Sweep

    pts = points(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict | None] = [None] * len(pts)

    def finished(i: int, result: dict) -> None:
        params, _, plan_name, _ = pts[i]
        rows[i] = {**{k.split(".")[-1]: v for k, v in params.items()}, "plan": plan_name, **result}
        write_csv(out_dir / "study.csv", [r for r in rows if r is not None])

    with Sweep(out_dir, workers=workers, ray_address=ray_address, progress=progress) as sweep:
        sweep.map(study_point, [{"config": cfg.to_dict(), "plan": plan.to_dict()} for _, cfg, _, plan in pts],
                  desc="study", on_result=finished)
    return rows  # type: ignore[return-value]


def setup_line(spec: dict) -> str:
    """What the study's points run on: each distinct named setup and step time (the placeholder
    profile says it is one), for the table and the plot's title."""
    seen = dict.fromkeys(f"setup {cfg.setup or 'none'}; step time {describe(step_time_model(cfg))}"
                         for _, cfg, _, _ in points(spec))
    return " | ".join(seen)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def format_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    cells = [[("-" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def plot(rows: list[dict], spec: dict, path: Path) -> bool:
    """TTFT p99 and throughput against the first grid axis, one line per other setting x plan."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = [k.split(".")[-1] for k in (spec.get("grid") or {})]
    x = keys[0] if keys else "plan"
    series: dict[str, list[dict]] = {}
    for r in rows:
        label = ", ".join([f"{k}={r[k]}" for k in keys[1:]] + [f"plan={r['plan']}"])
        series.setdefault(label, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rs in series.items():
        xs = [r[x] for r in rs]
        axes[0].plot(xs, [r["ttft_p99_ms"] or float("nan") for r in rs], marker="o", label=label)
        axes[1].plot(xs, [r["throughput_rps"] for r in rs], marker="o", label=label)
    axes[0].set(xlabel=x, ylabel="TTFT p99 (ms)", yscale="log", title="Time to first token, p99")
    axes[1].set(xlabel=x, ylabel="finished requests / s", title="Throughput")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"vllm-faultsim study: {spec.get('name', 'study')}\n{setup_line(spec)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
