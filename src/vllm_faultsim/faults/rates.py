"""Faults from rates: an MTBF, episodes per hour, failure fractions, drawn from the seed and expanded
into one concrete fault plan (faults/plan.py kinds) per server, which the run writes into its
trace header, so the run replays exactly from the trace.

```yaml
fault_rates:
  engine_mtbf_s: 3600          # mean time between deaths of one engine core (each DP rank)
  kill_signal: SIGKILL         # how it dies (faults/plan.py SIGNALS)
  slow_episodes_per_hour: 2    # per server: steps slowed by slow_factor for slow_duration_s
  slow_duration_s: 30
  slow_factor: 3
  ec_prefetch_fail_rate: 0.01  # per server, the fraction of multimodal items whose prefetch fails
  ec_prefetch_stall_rate: 0.05 # ... whose prefetch stalls ec_prefetch_stall_s more
  ec_prefetch_stall_s: 0.5
```

Deaths are a Poisson process per engine core over ``[0, horizon)`` (exponential gaps of mean
``engine_mtbf_s``); a kill that falls while its server is down does not apply, which leaves a
Poisson process of the same rate over the time up (memorylessness). Engine core ``g = server *
data_parallel_size + rank`` draws its deaths from ``random.Random(f"kills:{seed}:{g}")``, so one DP
server of N ranks and N servers of one rank see the same deaths at the same times (a paired
comparison of the topologies). Slow-step episodes are a Poisson process per server
(``slow:{seed}:{server}``), EC prefetch faults a draw per server and item (``ec:{seed}:{server}``).
A plan is bounded: expansions expected to pass ``MAX_FAULTS`` faults per server are refused before
anything is drawn.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Literal

from ..inputs import Fraction, NonNegative, Positive, checked
from .plan import SIGNALS, FaultPlan, PlanError, validate_plan

MAX_FAULTS = 100_000  # per server


@dataclass(frozen=True)
class FaultRates:
    engine_mtbf_s: Positive | None = None
    kill_signal: Literal[SIGNALS] = "SIGKILL"
    slow_episodes_per_hour: NonNegative = 0.0
    slow_duration_s: Positive = 30.0
    slow_factor: Positive = 2.0
    ec_prefetch_fail_rate: Fraction = 0.0
    ec_prefetch_stall_rate: Fraction = 0.0
    ec_prefetch_stall_s: Positive = 0.5

    def to_dict(self) -> dict:
        return asdict(self)


def rates_from_dict(d: Any, source: str = "fault_rates") -> FaultRates:
    """A checked :class:`FaultRates` (its fields' annotations are the schema); a bad key or value is
    a one-line PlanError naming ``source.field`` and the value."""
    return checked(FaultRates, d, "", PlanError, at=source)


def expand(rates: FaultRates, *, servers: int, data_parallel_size: int, horizon: float, seed: int,
           items: Iterable[str] = ()) -> tuple[FaultPlan, ...]:
    """One validated plan per server: kills per rank, slow-step episodes, EC prefetch faults per
    item of `items` (the workload's multimodal identifiers), over ``[0, horizon)``."""
    expected = (data_parallel_size * horizon / rates.engine_mtbf_s if rates.engine_mtbf_s else 0.0) \
        + rates.slow_episodes_per_hour * horizon / 3600
    if expected > MAX_FAULTS:
        raise PlanError(f"fault_rates: about {expected:.3g} faults per server over {horizon:g} s "
                        f"(at most {MAX_FAULTS:,}): raise engine_mtbf_s or lower slow_episodes_per_hour")
    items = sorted(set(items))
    plans = []
    for s in range(servers):
        faults: list[dict] = []
        if rates.engine_mtbf_s:
            for rank in range(data_parallel_size):
                rng = random.Random(f"kills:{seed}:{s * data_parallel_size + rank}")
                for at in _poisson_times(rng, 1 / rates.engine_mtbf_s, horizon):
                    faults.append({"kind": "kill_engine", "at": at, "rank": rank, "signal": rates.kill_signal})
        if rates.slow_episodes_per_hour:
            rng = random.Random(f"slow:{seed}:{s}")
            for at in _poisson_times(rng, rates.slow_episodes_per_hour / 3600, horizon):
                faults.append({"kind": "slow_steps", "start": at, "end": round(at + rates.slow_duration_s, 6),
                               "factor": rates.slow_factor})
        faults.sort(key=lambda f: (f.get("at", f.get("start")), f.get("rank", -1)))
        rng = random.Random(f"ec:{seed}:{s}")
        for item in items:
            if rates.ec_prefetch_fail_rate and rng.random() < rates.ec_prefetch_fail_rate:
                faults.append({"kind": "ec_prefetch_fail", "item": item})
            if rates.ec_prefetch_stall_rate and rng.random() < rates.ec_prefetch_stall_rate:
                faults.append({"kind": "ec_prefetch_stall", "item": item, "delay": rates.ec_prefetch_stall_s})
        plans.append(validate_plan({"version": 1, "faults": faults}, f"fault_rates (server {s})"))
    return tuple(plans)


def _poisson_times(rng: random.Random, rate: float, horizon: float) -> list[float]:
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= horizon:
            return out
        out.append(round(t, 6))
