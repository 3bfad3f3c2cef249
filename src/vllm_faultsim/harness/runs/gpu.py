"""The GPU tier's runs beside the simulator: the real engine through the simulator's engine loop
(:func:`run_virtual`), the latency metrics of either side's requests and their error (MAPE), and
results written as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..metrics import percentile
from .simulate import run_engine


def run_virtual(llm, cfg, plan, specs, *, prefetch=None, trace_path=None, side: str = "gpu"):
    """The real in-process engine (``llm``, see ``drivers.real_engine.open_llm``) through the
    simulator's engine loop on the virtual clock: (RunResult, RealEngineCore)."""
    from ..drivers.real_engine import RealEngineCore
    core = RealEngineCore(llm, prefetch=prefetch)
    result = run_engine(core, specs, cfg, plan, side=side, trace_path=trace_path, prefetch=prefetch)
    return result, core


def latency_metrics(requests: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per request: ttft, tpot, e2e (s), from records with arrival/first_token/finish/num_output."""
    out = {}
    for rid, r in requests.items():
        if r.get("finish") is None or r.get("first_token") is None:
            continue
        m = {"ttft": r["first_token"] - r["arrival"], "e2e": r["finish"] - r["arrival"]}
        if r["num_output"] > 1:
            m["tpot"] = (r["finish"] - r["first_token"]) / (r["num_output"] - 1)
        out[rid] = m
    return out


def records_from_trace(events: list[dict]) -> dict[str, dict]:
    return {e["req"]: {"arrival": e["arrival"], "first_token": e["first_token"], "finish": e["finish"],
                       "num_output": e["num_output"] or 0}
            for e in events if e["kind"] == "req" and e["status"] != "failed"}


def percentiles(values, qs=(50, 90, 99)) -> dict[str, float]:
    return {f"p{q}": percentile(list(values), q) for q in qs}


def mape(pred: dict[str, float], real: dict[str, float]) -> float | None:
    """Mean absolute percentage error of pred vs real over their common keys (in %)."""
    keys = [k for k in real if k in pred and real[k]]
    if not keys:
        return None
    return 100.0 * sum(abs(pred[k] - real[k]) / abs(real[k]) for k in keys) / len(keys)


def write_json(path: str | Path, data: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
