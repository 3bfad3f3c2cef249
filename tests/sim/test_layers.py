"""The layers point one way (models <- faults <- harness; checkers run nothing; drivers run no
checker): pyproject.toml's import-linter contracts, checked on the installed tree."""

from __future__ import annotations

from pathlib import Path

import pytest

importlinter_cli = pytest.importorskip("importlinter.cli", reason="needs import-linter (the test extra)")

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def lint(config: Path) -> int:
    return importlinter_cli.lint_imports(config_filenames=(str(config),), no_cache=True, no_logo=True)


def test_the_contracts_hold():
    assert lint(PYPROJECT) == 0


def test_a_reversed_layer_contract_is_broken(tmp_path):
    """The linter really reads the imports: the same layers upside down must fail."""
    text = PYPROJECT.read_text().replace(
        'layers = ["vllm_faultsim.harness", "vllm_faultsim.faults", "vllm_faultsim.models"]',
        'layers = ["vllm_faultsim.models", "vllm_faultsim.faults", "vllm_faultsim.harness"]')
    assert "vllm_faultsim.models\", \"vllm_faultsim.faults\", \"vllm_faultsim.harness" in text
    (tmp_path / "pyproject.toml").write_text(text)
    assert lint(tmp_path / "pyproject.toml") != 0
