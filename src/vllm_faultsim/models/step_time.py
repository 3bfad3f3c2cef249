"""Step-time models: how long one engine step takes, from the batch's shape.

The default is linear in (prefill tokens, decode requests, context tokens) with coefficients read
from a named profile, a JSON file in ``vllm_faultsim/profiles`` (or any path). ``vllm-faultsim
calibrate`` fits and writes such a profile from measurements of the real engine on a GPU.
Any callable ``(prefill_tokens, decode_reqs, context_tokens) -> seconds`` can stand in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

COEFFS = ("base", "prefill_token", "decode_req", "context_token")


class ProfileError(ValueError):
    """A missing or malformed step-time profile; the message is one line."""


@dataclass(frozen=True)
class LinearStepTime:
    base: float
    prefill_token: float
    decode_req: float
    context_token: float
    name: str = "custom"

    def __call__(self, prefill_tokens: int, decode_reqs: int, context_tokens: int) -> float:
        return (self.base + self.prefill_token * prefill_tokens + self.decode_req * decode_reqs
                + self.context_token * context_tokens)

    def batch_seconds(self, shape: tuple[int, int, int, int, int]) -> float:
        """The step time of a batch shape (num_prefill_requests, sum_prefill_tokens,
        sum_prefill_kv_tokens, num_decode_requests, sum_decode_kv_tokens)."""
        _, prefill_tokens, prefill_kv, decode_reqs, decode_kv = shape
        return self(prefill_tokens, decode_reqs, prefill_kv + decode_kv)


def available_profiles() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("vllm_faultsim.profiles").iterdir()
                  if p.name.endswith(".json"))


def load_profile(name_or_path: str = "default") -> LinearStepTime:
    """A packaged profile by name, or a JSON file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        text = path.read_text(encoding="utf-8")
    else:
        res = resources.files("vllm_faultsim.profiles") / f"{name_or_path}.json"
        if not res.is_file():
            raise ProfileError(f"unknown step-time profile {name_or_path!r} "
                               f"(packaged: {', '.join(available_profiles())}; or give a .json path)")
        text = res.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        coeffs = data["coeffs"]
        values = {k: float(coeffs[k]) for k in COEFFS}
    except (ValueError, KeyError, TypeError) as exc:
        raise ProfileError(f"step-time profile {name_or_path!r} is malformed ({type(exc).__name__}: {exc})") from None
    if values["base"] <= 0 or any(v < 0 for v in values.values()):
        raise ProfileError(f"step-time profile {name_or_path!r}: base must be > 0 and all coefficients >= 0")
    return LinearStepTime(**values, name=data.get("name", str(name_or_path)))
