"""The user's inputs: reading YAML/JSON files (plans, run configs, study specs) and checking a
section's typed fields, every problem one line naming the file or field and the value.

Below every layer (models, faults and the harness all may use it); it imports nothing of the package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_mapping_file(path: str | Path, what: str, error: type[Exception]) -> Any:
    """The parsed content of `path` (``.json`` as JSON, anything else as YAML; empty: ``None``).
    Unreadable, non-UTF-8 or unparsable files raise `error` with one line naming `path` and the
    problem; `what` names the file's role ("fault plan", "config", "study spec")."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}): "
                    f"a {what} is a UTF-8 YAML or JSON file") from None
    try:
        if p.suffix == ".json":
            return json.loads(text) if text.strip() else None
        import yaml
        return yaml.safe_load(text)
    except Exception as exc:  # any parse error becomes one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{path}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({first})") from None


def check_fields(section: dict, spec: dict[str, Any], where: str, error: type[Exception]) -> None:
    """Every key of `section` is a field of `spec` (name -> type or tuple of types; a bool is
    never a number), else `error` names ``where.key`` and the value."""
    for key, value in section.items():
        kind = spec.get(key)
        if kind is None:
            raise error(f"unknown {where} field {key!r} (fields: {', '.join(spec)})")
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise error(f"{where}.{key} must be {getattr(kind, '__name__', 'a number')}, "
                        f"got {type(value).__name__} {value!r}")
