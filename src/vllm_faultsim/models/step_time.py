"""Step-time models (backends): how long one engine step's forward takes, from the batch's shape.

One interface: a backend has ``of_step(res: StepResult) -> seconds`` (what the engine loop calls
every step) and ``batch_seconds(shape) -> seconds`` on a batch shape ``(num_prefill_requests,
sum_prefill_tokens, sum_prefill_kv_tokens, num_decode_requests, sum_decode_kv_tokens)``
(``StepResult.batch_shape()``; the shape Dynamo's ForwardPassMetrics and aiconfigurator take).
Chosen by the run config's ``step_time`` section (:func:`from_config`):

- ``{backend: linear, profile: NAME}`` (and, without a section, the top-level ``profile: NAME``):
  linear in (prefill tokens, decode requests, context tokens) with coefficients read from a named
  profile, a JSON file in ``vllm_faultsim/profiles`` (or any path). ``vllm-faultsim calibrate``
  fits and writes such a profile from measurements of the real engine on a GPU.
- ``{backend: aic, model, system, tp, dtype, version}``: NVIDIA's aiconfigurator-core
  (``RustForwardPassPerfModel``, measured per-operation data; forward pass only): ``model`` the
  name of a config it ships (e.g. ``meta-llama/Meta-Llama-3.1-8B``) or a Hugging Face model folder
  or ``config.json`` path, ``system`` its GPU system name (``h200_sxm``, ``h100_sxm``,
  ``b200_sxm``, ...), ``tp`` tensor-parallel size, ``dtype`` (weights: ``bfloat16``, ``fp8``, ...),
  ``version`` of vLLM's data (``0.24.0``). Memoised by shape, with the KV sums bucketed to
  1/``KV_BUCKETS`` of their power of two (``kv_bucket``). Where aiconfigurator-core is missing or
  has no data for the model/GPU, one line names the fallback (the linear ``fallback`` profile).
- ``scale`` and ``decode_scale`` (either backend, default 1 and ``scale``): multiplicative
  corrections of batches with prefill work and of decode-only batches, fitted on recorded steps;
  ``decode_scale`` may be a list, one correction per ``DECODE_BIN`` decode requests (the last for
  any larger batch: aiconfigurator's error on a MoE model's decode shrinks as the batch grows).

Any callable ``(prefill_tokens, decode_reqs, context_tokens) -> seconds`` can still stand in
(:func:`step_seconds_of`).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from ..inputs import SECTION, NonNegative, NonNegativeInt, Positive, PositiveInt, Section, checked, read_mapping_file

PLACEHOLDER_PROFILE = "default"  # profiles/default.json: uncalibrated, no GPU measured it


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

    def of_step(self, res) -> float:
        return self(*res.shape())

    def batch_seconds(self, shape: tuple[int, int, int, int, int]) -> float:
        """The step time of a batch shape (num_prefill_requests, sum_prefill_tokens,
        sum_prefill_kv_tokens, num_decode_requests, sum_decode_kv_tokens)."""
        _, prefill_tokens, prefill_kv, decode_reqs, decode_kv = shape
        return self(prefill_tokens, decode_reqs, prefill_kv + decode_kv)


def available_profiles() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("vllm_faultsim.profiles").iterdir()
                  if p.name.endswith(".json"))


class Coefficients(Section):
    """A linear profile's seconds: per step, per prefill token, per decode request, per context token."""

    base: Positive
    prefill_token: NonNegative
    decode_req: NonNegative
    context_token: NonNegative


class ProfileFile(Section):
    """A step-time profile file: its coefficients, with where they were measured (any other keys)."""

    model_config = ConfigDict(SECTION, extra="allow")
    name: str | None = None
    coeffs: Coefficients


def load_profile(name_or_path: str = "default") -> LinearStepTime:
    """A packaged profile by name, or a JSON file by path."""
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.exists()):
        path = resources.files("vllm_faultsim.profiles") / f"{name_or_path}.json"
        if not path.is_file():
            raise ProfileError(f"unknown step-time profile {name_or_path!r} "
                               f"(packaged: {', '.join(available_profiles())}; or give a .json path)")
    data = checked(ProfileFile, read_mapping_file(path, "step-time profile", ProfileError),
                   f"step-time profile {name_or_path}", ProfileError)
    return LinearStepTime(**data.coeffs.model_dump(), name=data.name or str(name_or_path))


# ---- the backend interface and the run config's step_time section ---------------------------

BACKENDS = ("linear", "aic")
DECODE_BIN = 16  # decode requests per entry of a decode_scale list


def _decode_scale(v: Any) -> Any:
    values = v if isinstance(v, list) else [v]
    if not values or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                             for x in values):
        raise ValueError(f"must be a number > 0 or a non-empty list of them (one per {DECODE_BIN} "
                         f"decode requests), got {v!r}")
    return v


class LinearSection(Section):
    """``step_time: {backend: linear}``: a linear profile (a name or a JSON path), scaled."""

    backend: Literal["linear"] = "linear"
    profile: str | None = None
    scale: Positive | None = None
    decode_scale: Annotated[Any, AfterValidator(_decode_scale)] = None


class AicSection(Section):
    """``step_time: {backend: aic}``: aiconfigurator's per-operation data for `model` on `system`
    (the fields left out: AIC_DEFAULTS)."""

    backend: Literal["aic"]
    model: Annotated[str, Field(min_length=1)] | None = None
    system: str | None = None
    tp: PositiveInt | None = None
    dtype: str | None = None
    version: str | None = None
    fallback: str | None = None  # the linear profile when the backend cannot be built
    scale: Positive | None = None
    decode_scale: Annotated[Any, AfterValidator(_decode_scale)] = None
    kv_bucket: bool | None = None

    @model_validator(mode="after")
    def _model(self):
        if self.model is None:
            raise ValueError("model is missing (a config aiconfigurator ships, e.g. meta-llama/Meta-Llama-3.1-8B, "
                             "or a Hugging Face config.json path)")
        return self


SECTIONS = {"linear": LinearSection, "aic": AicSection}  # backend -> the step_time section's schema
AIC_DEFAULTS = {"system": "h200_sxm", "tp": 1, "dtype": "bfloat16", "version": "0.24.0", "kv_bucket": True}
AIC_PACKAGE = "aiconfigurator-core==0.12.0"
KV_BUCKETS = 64  # the KV sums are memoised in buckets of 1/64 of their power of two (<= 1.6% off)


def describe(step_time) -> str:
    """One line naming the step time a run uses (its trace header's ``clock``); the placeholder
    profile says that it is one."""
    if isinstance(step_time, Scaled):
        per = "/".join(f"{x:g}" for x in step_time.decode_scale)
        bins = f" per {DECODE_BIN} requests" if len(step_time.decode_scale) > 1 else ""
        return f"{describe(step_time.inner)}, x{step_time.scale:g} (decode-only x{per}{bins})"
    if isinstance(step_time, AicStepTime):
        s = step_time.section
        return (f"aic: aiconfigurator-core {s['model']} on {s['system']} (tp {s['tp']}, {s['dtype']}, "
                f"vLLM data {s['version']})")
    name = getattr(step_time, "name", None)
    if name == PLACEHOLDER_PROFILE:
        return f"linear profile {name!r}: PLACEHOLDER (uncalibrated, not a measured GPU)"
    return f"linear profile {name!r}" if isinstance(step_time, LinearStepTime) else "custom"


def step_seconds_of(step_time) -> Callable:
    """``res -> seconds`` for a backend, or for a plain ``(prefill, decode, context)`` callable."""
    of_step = getattr(step_time, "of_step", None)
    return of_step if of_step is not None else (lambda res: step_time(*res.shape()))


@dataclass(frozen=True)
class Scaled:
    """A backend times a constant: ``scale`` for batches with prefill work, for decode-only ones
    ``decode_scale[min(requests // DECODE_BIN, len - 1)]`` (corrections fitted on recorded steps:
    ``vllm-faultsim fidelity --fit``)."""
    inner: Any
    scale: float
    decode_scale: tuple[float, ...]

    def of_step(self, res) -> float:
        return self.batch_seconds(res.batch_shape())

    def batch_seconds(self, shape) -> float:
        ds = self.decode_scale
        k = (self.scale if shape[0] else ds[0] if len(ds) == 1 else ds[min(shape[3] // DECODE_BIN, len(ds) - 1)])
        return k * self.inner.batch_seconds(shape)


def _bucket(x: int) -> int:
    """x rounded to a multiple of 1/KV_BUCKETS of its power of two (exact below 2 * KV_BUCKETS)."""
    if x < 2 * KV_BUCKETS:
        return x
    q = (1 << (x.bit_length() - 1)) // KV_BUCKETS
    return (x + q // 2) // q * q


class AicStepTime:
    """aiconfigurator-core's forward-pass estimate, memoised by batch shape (seconds)."""

    def __init__(self, section: dict):
        import logging

        from aiconfigurator_core.sdk import RustForwardPassPerfModel  # optional dependency
        self.section = section
        model = section["model"]
        path = Path(model)
        if path.name == "config.json" and path.is_file():
            model = str(path.parent)  # aiconfigurator takes the model folder
        config = {"schema_version": 1, "model_name": model, "system_name": section["system"], "backend": "vllm",
                  "backend_version": section["version"], "kv_block_size": None, "tp_size": section["tp"],
                  "pp_size": 1, "moe_tp_size": None, "moe_ep_size": None, "attention_dp_size": 1, "cp_size": None,
                  "weight_dtype": section["dtype"], "moe_dtype": None, "activation_dtype": None,
                  "kv_cache_dtype": None, "nextn": None, "extra": {}}
        self._memo: dict[tuple, float] = {}
        self._bucketed = section.get("kv_bucket", True)
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # "low-fidelity fallback rows" for families a model does not use
        try:
            self._model = RustForwardPassPerfModel.from_native(config)
            self.batch_seconds((1, 16, 0, 1, 16))  # a model the estimator cannot run fails here, not mid-run
        finally:
            logging.disable(previous)

    def batch_seconds(self, shape) -> float:
        npf, spt, spkv, nd, dkv = shape
        if self._bucketed:
            spkv, dkv = _bucket(spkv), _bucket(dkv)
        key = (npf, spt, spkv, nd, dkv)
        t = self._memo.get(key)
        if t is None:
            t = self._memo[key] = 1e-3 * self._model.estimate_forward_pass_time_ms({
                "version": 1, "wall_time": 0.0,
                "scheduled_requests": {"num_prefill_requests": npf, "sum_prefill_tokens": spt,
                                       "sum_prefill_kv_tokens": spkv, "num_decode_requests": nd,
                                       "sum_decode_kv_tokens": dkv}})
        return t

    def of_step(self, res) -> float:
        return self.batch_seconds(res.batch_shape())


def check_section(section: Any) -> dict:
    """The ``step_time`` section, checked by its backend's schema (one-line ProfileError) and
    completed with the defaults."""
    backend = section.get("backend", "linear") if isinstance(section, dict) else "linear"
    if not isinstance(backend, str) or backend not in SECTIONS:
        checked(Literal[BACKENDS], backend, "", ProfileError, at="step_time.backend")
    checked(SECTIONS[backend], section, "", ProfileError, at="step_time")
    out = {"backend": backend, **section}
    return {"backend": "aic", **AIC_DEFAULTS, **out} if backend == "aic" else out


_BUILT: dict[str, Any] = {}


def _placeholder(profile: str) -> str:
    return " (a PLACEHOLDER: uncalibrated, not a measured GPU)" if profile == PLACEHOLDER_PROFILE else ""


def from_config(section: dict | None, profile: str = "default",
                warn: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)):
    """The backend a run config asks for: ``section`` (its ``step_time``) or, without one, the
    linear ``profile``. An aic backend that cannot be built (package missing, no data for the
    model or GPU) falls back to the linear ``fallback`` profile (default: ``profile``), saying so
    in one line through ``warn``. Built backends are shared within the process."""
    if section is None:
        return load_profile(profile)
    section = check_section(section)
    scale = float(section.get("scale", 1.0))
    ds = section.get("decode_scale", scale)
    decode_scale = tuple(map(float, ds)) if isinstance(ds, list) else (float(ds),)
    if section["backend"] == "linear":
        model = load_profile(section.get("profile", profile))
    else:
        key = json.dumps({k: v for k, v in section.items() if k not in ("scale", "decode_scale", "fallback")},
                         sort_keys=True)
        model = _BUILT.get(key)
        if model is None:
            fallback = section.get("fallback", profile)
            try:
                model = _BUILT[key] = AicStepTime(section)
            except ImportError:
                warn(f"vllm-faultsim: step_time aic: aiconfigurator-core is not installed (pip install "
                     f"'{AIC_PACKAGE}'); falling back to the linear profile {fallback!r}{_placeholder(fallback)}")
                model = _BUILT[key] = load_profile(fallback)
            except Exception as exc:  # no data for this model / GPU / version / dtype
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                warn(f"vllm-faultsim: step_time aic: no estimate for model {section['model']!r} on "
                     f"{section['system']!r} (tp {section['tp']}, {section['dtype']}, vLLM data {section['version']}): "
                     f"{first}; falling back to the linear profile {fallback!r}{_placeholder(fallback)}")
                model = _BUILT[key] = load_profile(fallback)
    return model if scale == 1.0 and decode_scale == (1.0,) else Scaled(model, scale, decode_scale)


# ---- serving-mode CPU costs around the forward (the run config's ``serving`` section) ---------

CUDAGRAPH_MODES = ("FULL_AND_PIECEWISE", "NONE")  # CompilationConfig.cudagraph_mode: the default, enforce_eager
MAX_CUDAGRAPH_CAPTURE_SIZE = 512  # VllmConfig._set_cudagraph_sizes: min(max_num_seqs * 2, 512, max_num_batched_tokens)


def max_cudagraph_capture_size(max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """vLLM 0.26.0's default largest CUDA-graph size (vllm/config/vllm.py ``_set_cudagraph_sizes``,
    no speculative decoding): ``min(max_num_seqs * 2, 512, max_num_batched_tokens)``."""
    return min(max_num_seqs * 2, MAX_CUDAGRAPH_CAPTURE_SIZE, max_num_batched_tokens)


OUTPUT_PROC_CHUNK_SIZE = 128  # vLLM's envs.VLLM_V1_OUTPUT_PROC_CHUNK_SIZE default


def output_requests_before(position: int, num_outputs: int) -> int:
    """The requests AsyncLLM's ``output_handler`` (vllm/v1/engine/async_llm.py) has processed when
    the request at `position` of a step's `num_outputs` outputs reaches its client: it runs
    ``OutputProcessor.process_outputs`` on chunks of ``VLLM_V1_OUTPUT_PROC_CHUNK_SIZE`` outputs and
    yields to the event loop (``await asyncio.sleep(0)``: the clients' ``generate()`` tasks of that
    chunk run) between chunks, so a request waits for its own chunk and every one before it."""
    return min(num_outputs, OUTPUT_PROC_CHUNK_SIZE * (position // OUTPUT_PROC_CHUNK_SIZE + 1))


@dataclass(frozen=True)
class ServingCosts:
    """The engine core's CPU time per step around the forward, which async scheduling overlaps
    with the previous batch's forward (models/engine.py ``step_with_batch_queue``):

    - ``Scheduler.schedule()``: ``schedule_base_s + schedule_per_req_s * scheduled requests``;
    - ``execute_model()`` + ``sample_tokens()`` (non-blocking, in the engine core: prepare the inputs
      and launch the batch), by how vLLM runs it (``CudagraphDispatcher.dispatch``): a uniform
      decode batch (every request 1 token) of at most ``max_num_seqs`` requests replays a FULL CUDA
      graph (``execute_base_s + execute_per_req_s * requests``); another batch of at most
      ``max_cudagraph_capture_size`` tokens a PIECEWISE graph, whose attention runs eagerly
      (``+ piecewise_per_layer_s * num_hidden_layers``); a larger batch, or every batch with
      ``cudagraph_mode: NONE`` (``enforce_eager``), runs the compiled model without CUDA graphs,
      launched kernel by kernel (``+ eager_per_layer_s`` per dense decoder layer and
      ``eager_per_moe_layer_s`` per MoE layer (``num_moe_layers`` of ``num_hidden_layers``): a MoE
      layer launches the router, top-k and fused-expert kernels through the ``FusedMoE`` custom op
      instead of a dense MLP). The GPU runs the kernels as they are launched, so a batch's forward
      ends no earlier than its launch; the core blocks on the oldest batch only after launching
      the new one;
    - ``update_from_output()``: ``update_base_s + update_per_req_s * scheduled requests``; a
      request's output reaches the client after it, ``output_base_s + output_per_req_s * requests``
      later, the requests being those of its own chunk of ``OUTPUT_PROC_CHUNK_SIZE`` and every
      chunk before it in the step's outputs (:meth:`output`);
    - before any of it, a request reaches the engine core ``input_s`` after the client sent it.

    Around the core (the request's path through ``AsyncLLM``, vllm/v1/engine/async_llm.py and
    core.py): ``input_s`` is ``AsyncLLM.add_request`` (``InputProcessor.process_inputs``, the
    ``EngineCoreRequest`` sent over ZMQ) to the core's input queue (``EngineCoreProc``'s
    ``process_input_sockets`` thread: ``preprocess_add_request``), which the busy loop drains
    (``_process_input_queue``) before each step; the output path is ``update_from_output()``'s
    ``EngineCoreOutputs`` through the core's ``process_output_sockets`` thread (ZMQ), ``AsyncLLM``'s
    ``output_handler`` (``OutputProcessor.process_outputs`` over every request of the batch, then
    each request's ``RequestOutputCollector``) to the client's ``generate()`` task.

    Measured: the recordings' step lines time schedule() and update_from_output()
    (``schedule_start``/``schedule_end``, ``output_start``/``output_end``) and, between the end of
    step N+1's schedule() and the start of step N's update_from_output(), step N+1's launch; their
    requests' client times against the step lines give ``input_s`` and the output path;
    ``vllm-faultsim fidelity --fit`` fits the costs (harness/runs/fidelity.py ``fit``)."""
    schedule_base_s: float = 0.0
    schedule_per_req_s: float = 0.0
    update_base_s: float = 0.0
    update_per_req_s: float = 0.0
    execute_base_s: float = 0.0
    execute_per_req_s: float = 0.0
    piecewise_per_layer_s: float = 0.0
    eager_per_layer_s: float = 0.0
    eager_per_moe_layer_s: float = 0.0
    input_s: float = 0.0
    output_base_s: float = 0.0
    output_per_req_s: float = 0.0
    num_hidden_layers: int = 0
    num_moe_layers: int = 0
    cudagraph_mode: str = "FULL_AND_PIECEWISE"
    max_cudagraph_capture_size: int = MAX_CUDAGRAPH_CAPTURE_SIZE
    max_num_seqs: int = MAX_CUDAGRAPH_CAPTURE_SIZE

    def schedule(self, res) -> float:
        return self.schedule_base_s + self.schedule_per_req_s * len(res.sched)

    def update(self, res) -> float:
        return self.update_base_s + self.update_per_req_s * len(res.sched)

    def output(self, res, position: int) -> float:
        """From the end of `res`'s update_from_output() to the client's having the tokens of the
        request at `position` in the step's outputs (the scheduled order: running requests, then
        new ones): ``output_base_s + output_per_req_s * output_requests_before(position, n)``."""
        return self.output_base_s + self.output_per_req_s * output_requests_before(position, len(res.sched))

    def runtime_mode(self, num_reqs: int, num_tokens: int) -> str:
        """``CudagraphDispatcher.dispatch``'s CUDAGraphMode for a batch: FULL, PIECEWISE or NONE."""
        if self.cudagraph_mode == "NONE" or num_tokens > self.max_cudagraph_capture_size:
            return "NONE"
        return "FULL" if num_tokens == num_reqs <= self.max_num_seqs else "PIECEWISE"

    def execute(self, res) -> float:
        """execute_model() + sample_tokens() of `res`'s batch: the CPU time to prepare and launch it."""
        return self.execute_seconds(len(res.sched), sum(res.sched.values()))

    def execute_seconds(self, num_reqs: int, num_tokens: int) -> float:
        """:meth:`execute` of a batch of `num_reqs` requests and `num_tokens` tokens."""
        t = self.execute_base_s + self.execute_per_req_s * num_reqs
        mode = self.runtime_mode(num_reqs, num_tokens)
        if mode == "PIECEWISE":
            t += self.piecewise_per_layer_s * self.num_hidden_layers
        elif mode == "NONE":
            t += (self.eager_per_layer_s * (self.num_hidden_layers - self.num_moe_layers)
                  + self.eager_per_moe_layer_s * self.num_moe_layers)
        return t


class ServingSection(Section):
    """The ``serving`` section: :class:`ServingCosts`' costs (seconds) and the model's layers; the
    engine limits come from the scheduler."""

    schedule_base_s: NonNegative = 0.0
    schedule_per_req_s: NonNegative = 0.0
    update_base_s: NonNegative = 0.0
    update_per_req_s: NonNegative = 0.0
    execute_base_s: NonNegative = 0.0
    execute_per_req_s: NonNegative = 0.0
    piecewise_per_layer_s: NonNegative = 0.0
    eager_per_layer_s: NonNegative = 0.0
    eager_per_moe_layer_s: NonNegative = 0.0
    input_s: NonNegative = 0.0
    output_base_s: NonNegative = 0.0
    output_per_req_s: NonNegative = 0.0
    num_hidden_layers: NonNegativeInt = 0
    num_moe_layers: NonNegativeInt = 0
    cudagraph_mode: Literal[CUDAGRAPH_MODES] = "FULL_AND_PIECEWISE"
    max_cudagraph_capture_size: NonNegativeInt | None = None  # None: vLLM's default rule

    @model_validator(mode="after")
    def _layers(self):
        if self.num_moe_layers > self.num_hidden_layers:
            raise ValueError(f"num_moe_layers must be <= num_hidden_layers ({self.num_hidden_layers}), "
                             f"got {self.num_moe_layers}")
        return self


def check_serving(section: Any) -> ServingSection:
    """The ``serving`` section, checked by its schema (one-line ProfileError)."""
    return checked(ServingSection, section, "", ProfileError, at="serving")


def serving_costs(section: dict, scheduler) -> ServingCosts:
    """The ServingCosts of a ``serving`` section for an engine with `scheduler`'s limits
    (``max_num_seqs``, ``max_num_batched_tokens``: vLLM's default ``max_cudagraph_capture_size``
    where the section does not give one)."""
    limits = {"max_num_seqs": scheduler.max_num_seqs,
              "max_cudagraph_capture_size": max_cudagraph_capture_size(scheduler.max_num_seqs,
                                                                       scheduler.max_num_batched_tokens)}
    return ServingCosts(**{**limits, **check_serving(section).model_dump(exclude_none=True)})
