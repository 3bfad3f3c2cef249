"""Run-config files: a YAML or JSON mapping read and validated into a ``RunConfig`` (``load_config``).

    from vllm_faultsim import load_config
    cfg = load_config("run.yaml")        # the same file as ``vllm-faultsim run --config run.yaml``

Every problem is a ``ConfigError`` whose message is one line naming the file and the problem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .runs.simulate import ConfigError, RunConfig, config_from_dict


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The parsed mapping of a run-config file (.json as JSON, anything else as YAML); empty: {}."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}): "
                         "a config is a UTF-8 YAML or JSON file") from None
    try:
        if p.suffix == ".json":
            data = json.loads(text) if text.strip() else {}
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as exc:  # any parse error becomes one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({first})") from None
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
