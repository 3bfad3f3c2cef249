"""The schema layer (inputs.py): every problem one line ``WHERE: field.path: problem (got VALUE)``,
strict types, finite numbers, unknown keys listing the section's fields, dataclasses as schemas."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import pytest
from pydantic import model_validator

from vllm_faultsim.inputs import NonNegativeInt, Positive, PositiveInt, Section, checked


class Bad(ValueError):
    pass


class Inner(Section):
    rate: Positive = 1.0
    n: PositiveInt = 1


class Outer(Section):
    inner: Inner = Inner()
    items: list[Inner] = []
    mode: Literal["fast", "slow"] = "fast"
    lo: NonNegativeInt = 0
    hi: NonNegativeInt = 10

    @model_validator(mode="after")
    def _ordered(self):
        if self.hi < self.lo:
            raise ValueError(f"hi must be >= lo ({self.lo}), got {self.hi}")
        return self


@pytest.mark.parametrize("data, line", [
    ({"inner": {"rate": -1}}, "f.yaml: inner.rate: must be > 0 (got -1)"),
    ({"inner": {"rate": math.inf}}, "f.yaml: inner.rate: must be finite (got inf)"),
    ({"inner": {"rate": math.nan}}, "f.yaml: inner.rate: must be finite (got nan)"),
    ({"inner": {"rate": True}}, "f.yaml: inner.rate: must be a number (got bool True)"),  # a bool is no number
    ({"inner": {"rate": "1"}}, "f.yaml: inner.rate: must be a number (got '1')"),
    ({"inner": {"n": 1.0}}, "f.yaml: inner.n: must be an integer (got 1.0)"),
    ({"items": [{}, {"n": 0}]}, "f.yaml: items[1].n: must be >= 1 (got 0)"),
    ({"inner": {"size": 3}}, "f.yaml: inner: unknown field 'size' (fields: rate, n)"),
    ({"colour": 1}, "f.yaml: unknown field 'colour' (fields: inner, items, mode, lo, hi)"),
    ({"mode": "warp"}, "f.yaml: mode: must be one of fast, slow (got 'warp')"),
    ({"lo": 5, "hi": 2}, "f.yaml: hi must be >= lo (5), got 2"),  # a cross-field rule: the validator's sentence
    ([1], "f.yaml: must be a mapping (got list [1])"),
    ({"inner": "x" * 100}, "f.yaml: inner: must be a mapping (got '" + "x" * 56 + "...)"),
])
def test_each_problem_is_one_line_naming_the_field_and_the_value(data, line):
    with pytest.raises(Bad) as err:
        checked(Outer, data, "f.yaml", Bad)
    assert str(err.value) == line


def test_an_int_is_a_float_and_good_input_passes():
    out = checked(Outer, {"inner": {"rate": 2}, "items": [{"n": 3}]}, "f.yaml", Bad)
    assert out.inner.rate == 2.0 and out.items[0].n == 3 and out.mode == "fast"


@dataclass(frozen=True)
class Link:
    bandwidth: Positive = 3.0


@dataclass(frozen=True)
class Engine:
    layers: PositiveInt = 58
    link: Link = Link()
    tags: dict = field(default_factory=dict)


def test_a_dataclass_is_its_own_schema_nested_too():
    """Fields given are checked and built (a nested dataclass too); the others keep the defaults;
    `at` is the section's path in the file."""
    assert checked(Engine, {"link": {"bandwidth": 5}}, "", Bad) == Engine(link=Link(5.0))
    assert checked(Engine, {}, "", Bad) == Engine()
    with pytest.raises(Bad, match=r"^eplb\.link\.bandwidth: must be > 0 \(got 0\)$"):
        checked(Engine, {"link": {"bandwidth": 0}}, "", Bad, at="eplb")
    with pytest.raises(Bad, match=r"^run\.yaml: eplb\.link: unknown field 'speed' \(fields: bandwidth\)$"):
        checked(Engine, {"link": {"speed": 1}}, "run.yaml", Bad, at="eplb")
    with pytest.raises(Bad, match=r"^eplb\.layers: must be an integer \(got bool False\)$"):
        checked(Engine, {"layers": False}, "", Bad, at="eplb")


def test_a_saved_diff_case_is_checked_as_it_is_replayed():
    """``diff --replay case.json``: the case's requests, scheduler and plan go through their schemas."""
    from vllm_faultsim.faults.plan import validate_plan
    from vllm_faultsim.harness.runs.diff import DiffCase
    from vllm_faultsim.models.request import MMItem, RequestSpec
    from vllm_faultsim.models.scheduler import SchedulerConfig

    case = DiffCase((RequestSpec("a", 0.0, 100, 5, (MMItem("ia", 0, 100, 0.05),)), RequestSpec("b", 0.5, 20, 3, stop_at=2)),
                    SchedulerConfig(max_num_seqs=4), validate_plan([{"kind": "ec_prefetch_stall", "item": "ia", "delay": 0.2}]), 3)
    back = DiffCase.from_json(case.to_json(), "case.json")
    assert (back.specs, back.scheduler, back.plan.faults, back.seed) == (case.specs, case.scheduler, case.plan.faults, 3)
    with pytest.raises(ValueError, match=r"^case\.json: scheduler\.max_num_seqs: must be an integer \(got 'x'\)$"):
        DiffCase.from_json('{"scheduler": {"max_num_seqs": "x"}, "requests": []}', "case.json")
    with pytest.raises(ValueError, match=r"^case\.json: requests\[0\]: arrival: must be >= 0 \(got -1\)$"):
        DiffCase.from_json('{"scheduler": {}, "requests": [{"arrival": -1, "prompt_tokens": 3, "output_tokens": 1}]}',
                           "case.json")
