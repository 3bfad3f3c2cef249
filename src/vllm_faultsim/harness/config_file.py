"""Run-config files: a YAML or JSON mapping read and validated into a ``RunConfig`` (``load_config``).

    from vllm_faultsim import load_config
    cfg = load_config("run.yaml")        # the same file as ``vllm-faultsim run --config run.yaml``

Every problem is a ``ConfigError`` whose message is one line naming the file and the problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..inputs import read_mapping_file
from .runs.simulate import ConfigError, RunConfig, config_from_dict


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The parsed mapping of a run-config file (.json as JSON, anything else as YAML); empty: {}."""
    data = read_mapping_file(path, "config", ConfigError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run-config file; fields missing from it take ``RunConfig``'s defaults."""
    try:
        return config_from_dict(read_config_file(path))
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(f"{path}:") else f"{path}: {msg}") from None
