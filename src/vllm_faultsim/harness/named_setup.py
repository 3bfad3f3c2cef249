"""Named real setups (packaged YAML in ``vllm_faultsim/setups``) and how a run config is laid over one.

A setup names a model on a GPU served by a vLLM release with its engine arguments: the run
config's ``scheduler`` (vLLM's names and defaults), ``step_time`` and ``serving`` sections, each
number with its source in the file. A run config takes one with ``setup: NAME`` (or a YAML path);
its own sections are merged over the setup's (:func:`merge`). ``vllm-faultsim run`` without
``--config`` and the embedded default study use :data:`DEFAULT_SETUP`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from ..inputs import Section, checked, read_mapping_file

DEFAULT_SETUP = "llama-3.1-8b-h200"


class SetupRun(Section):
    """A setup's run-config sections (each checked as a run config's when a config uses it)."""

    scheduler: dict | None = None
    step_time: dict | None = None
    serving: dict | None = None


class SetupFile(Section):
    """A setup: what it is (model, GPU, vLLM release) and its ``run`` sections."""

    name: str | None = None
    description: str | None = None
    model: str | None = None
    gpu: str | None = None
    vllm: str | None = None
    run: SetupRun


class SetupError(ValueError):
    """A missing or malformed named setup; the message is one line."""


def available_setups() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("vllm_faultsim.setups").iterdir() if p.name.endswith(".yaml"))


def load_setup(name_or_path: str) -> dict[str, Any]:
    """A packaged setup by name, or a YAML file by path: its mapping (``name``, ``description``, ``run``)."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = resources.files("vllm_faultsim.setups") / f"{name_or_path}.yaml"
        if not path.is_file():
            raise SetupError(f"unknown setup {name_or_path!r} (packaged: {', '.join(available_setups())}; "
                             "or give a .yaml path)")
    data = read_mapping_file(path, "setup", SetupError)
    setup = checked(SetupFile, data, f"setup {name_or_path}", SetupError)
    return {**data, "run": setup.run.model_dump(exclude_unset=True)}


def merge(base: dict, over: dict) -> dict:
    """`over` merged over `base`, section by section (mapping sections merge, anything else
    replaces; a ``step_time`` with another backend, or a top-level ``profile``, replaces the
    base's step time)."""
    out = dict(base)
    if "profile" in over and "step_time" not in over:
        out.pop("step_time", None)
    if "backend" in (over.get("step_time") or {}) and over["step_time"]["backend"] != out.get("step_time", {}).get("backend"):
        out.pop("step_time", None)
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_setup(d: dict) -> dict:
    """The run-config mapping `d` laid over the setup it names (``setup``; none: `d` unchanged).
    The setup's serving costs were measured with async scheduling: they are left out where `d`
    turns it off (or asks for EPLB, modelled synchronously) and gives none itself."""
    name = d.get("setup")
    if name is None:
        return d
    if not isinstance(name, str):
        raise SetupError(f"setup must be a setup name or a YAML path, got {name!r}")
    out = merge(load_setup(name)["run"], d)
    sync = (out.get("scheduler") or {}).get("async_scheduling") is False or d.get("eplb") is not None
    if sync and "serving" not in d:
        out.pop("serving", None)
    return out
