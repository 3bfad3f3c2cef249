"""Tiers by folder: tests/sim -> sim, tests/diff -> diff, tests/gpu -> gpu (see pyproject markers).
Every trace a test writes is validated against the schema (harness/trace.py): each event as it is
emitted, each JSONL file as it is written."""

from pathlib import Path

import pytest

from vllm_faultsim.harness import trace as trace_mod

TIERS = {"sim", "diff", "gpu"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(autouse=True)
def _validated_traces(monkeypatch):
    emit, write_jsonl = trace_mod.Trace.emit, trace_mod.write_jsonl

    def checked_emit(self, event):
        trace_mod.validate_event(event, "emitted event")
        emit(self, event)

    def checked_write(path, events):
        events = list(events)
        trace_mod.validate_trace(events, str(path))
        write_jsonl(path, events)

    monkeypatch.setattr(trace_mod.Trace, "emit", checked_emit)
    monkeypatch.setattr(trace_mod, "write_jsonl", checked_write)
