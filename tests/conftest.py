"""Tiers by folder: tests/sim -> sim, tests/diff -> diff, tests/gpu -> gpu (see pyproject markers)."""

from pathlib import Path

import pytest

TIERS = {"sim", "diff", "gpu"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
