"""Real async EPLB (PR #40730) on N processes: vLLM 0.26.0's own worker, state and transfer code.

One process per rank (torch.distributed: ``nccl`` world group on CUDA, ``gloo`` on CPU; vLLM's
``init_distributed_environment`` + ``ensure_model_parallel_initialized`` make the EP and EPLB
groups). Each rank builds a real :class:`EplbState` (``add_model`` on a stand-in MoE model whose
expert weights are coded by (logical expert, layer, weight index), as upstream's
tests/distributed/test_eplb_execute.py does), starts the async worker and runs the engine's
part of the loop: per step a "forward" (sleep ``forward_s``, after filling ``expert_load_pass``
with a fixed load), then ``EplbState.step()``. So the whole PR #40730 path runs unmodified:
``step()`` -> ``rearrange()`` every ``step_interval`` steps -> ``rearrange_event`` -> the worker's
``transfer_run_periodically`` (snapshot of the map and load window, ``DefaultEplbPolicy``, per
layer: the coordinated-stop all_reduce, ``transfer_layer`` on its stream, ``cuda_stream.synchronize()``,
``pending_result``, ``consumed_event.wait``) -> ``step()``'s ``_all_ranks_result_ready`` +
``_move_to_workspace`` (``move_from_buffer``, per-layer map commit).

Observed (never changed) by wrapping names the worker looks up at call time: ``transfer_layer``
(start/return, send/recv counts from the communicator), ``AsyncEplbLayerResult`` (publication:
time and whether the worker's stream had finished, ``stream.query()``), ``_move_to_workspace``
(which layer a step consumed) and ``rearrange``. Faults come from each run's plan (``slow_link``,
``eplb_rank_death``) and are applied in the rank processes by the real-side injector
(``faults.real_injector.EplbInjector``): a slow link drops the link to ``link_bandwidth / factor``
for the layer transfers that start in its window (after ``communicator.execute()`` the worker
waits ``(factor - 1)`` times the bytes this rank moved, its counted sends and receives, over
``link_bandwidth``); a rank death SIGKILLs that EP rank as it starts transferring the layer.

On CPU (``device="cpu"``, gloo) there are no CUDA streams or events. The narrowest stand-in:
:class:`CpuStream` (``synchronize()`` / ``query()`` over a "work enqueued" flag set when
``transfer_layer`` returns) and a no-op ``torch.cuda.Event`` inside the rank processes, so
``CpuGpuEvent``'s threading handshake is vLLM's own while its CUDA half is empty (CPU tensor ops
are already complete when they return). The worker thread is started as upstream's async test
starts it (``transfer_run_periodically`` in a thread) because ``start_async_worker`` needs a CUDA
device index; ``ParallelConfig.enable_eplb`` is set after validation (it refuses non-CUDA
platforms). Exercised on CPU: every line of vLLM's EPLB Python path above with real gloo
collectives and P2P; not exercised: CUDA streams/events, NCCL, device copies.

vLLM and torch are imported only inside the rank processes (and lazily by ``skip_reason``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ...faults.plan import FaultPlan, validate_plan
from ...faults.real_injector import EplbInjector
from . import scratch


@dataclass(frozen=True)
class Shape:
    """An MoE shape: ``layers`` MoE layers of ``logical`` + ``redundant`` physical experts,
    each expert holding one row in each weight tensor of ``hidden`` floats."""
    layers: int
    logical: int
    redundant: int
    hidden: tuple[int, ...] = (256, 512)

    @property
    def physical(self) -> int:
        return self.logical + self.redundant

    @property
    def expert_bytes(self) -> int:
        return 4 * sum(self.hidden)


@dataclass(frozen=True)
class RealEplbRun:
    shape: Shape
    device: str = "cpu"                  # "cpu" (gloo) or "cuda" (nccl world group, one GPU a rank)
    communicator: str = "torch_gloo"     # vLLM's EPLB communicator backend
    world: int = 2
    step_interval: int = 8
    forward_s: float = 0.02
    cycles: int = 2                      # rearrangements to run (the load changes after each)
    extra_steps: int = 3
    seed: int = 0
    plan: FaultPlan = field(default_factory=FaultPlan)  # slow_link, eplb_rank_death (the run's clock)
    link_bandwidth: float = 0.0          # the link's calibrated bandwidth (B/s), for slow_link
    timeout_s: float = 180.0             # the driver's bound; a rank still running then is killed ("hung")

    def __post_init__(self):
        EplbInjector(self.plan, 0, link_bandwidth=self.link_bandwidth)  # the plan is checked before anything runs

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "plan"}
        d["shape"]["expert_bytes"] = self.shape.expert_bytes
        d["plan"] = self.plan.to_dict()
        return d


def skip_reason(device: str = "cpu", world: int = 2) -> str | None:
    """Why the real EPLB check cannot run here (None: it can)."""
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError as exc:
        return f"needs torch and vllm==0.26.0 ({exc})"
    if device == "cuda" and torch.cuda.device_count() < world:
        return f"needs {world} CUDA GPUs (torch.cuda.device_count() is {torch.cuda.device_count()})"
    return None


def rearrange_step(step_interval: int) -> int:
    """The 0-based index of the ``EplbState.step()`` call that first rearranges: ``add_model``
    starts the counter at ``interval - interval // 4`` and ``step()`` rearranges once it reaches
    the interval."""
    return step_interval // 4 - 1 if step_interval >= 4 else 0


def layer_load(shape: Shape, seed: int) -> list[list[int]]:
    """The fixed per-step load of each (layer, logical expert): distinct integers, seeded."""
    import random
    rng = random.Random(seed)
    return [rng.sample(range(1, 100 * shape.logical), shape.logical) for _ in range(shape.layers)]


def weight_code(logical: int, layer: int, widx: int, shape: Shape) -> int:
    """The code a weight row carries: row = code * 4096 + (arange(hidden) % 4096), exact in float32."""
    return 1 + widx + len(shape.hidden) * (layer + shape.layers * logical)


def _check_launch(cfgs: list[RealEplbRun], ends: bool = True) -> None:
    """Runs of one launch (that ``ends`` with the last of them) share device and world, and only
    the last run of all may have a rank death."""
    if any((c.device, c.world) != (cfgs[0].device, cfgs[0].world) for c in cfgs):
        raise ValueError("runs of one launch share device and world")
    if any(c.plan.of_kind("eplb_rank_death") for c in (cfgs[:-1] if ends else cfgs)):
        raise ValueError("only the last run may have an eplb_rank_death")


def run(cfgs: list[RealEplbRun], out_dir: str | Path | None = None,
        then: Callable[[list[dict]], list[RealEplbRun]] | None = None) -> list[dict]:
    """Run the configurations one after another in one set of ``world`` rank processes (one
    vLLM import); return, per configuration, what each rank observed. ``then``: more
    configurations made from the results of ``cfgs`` (a calibration's), run after them by the same
    processes (a second launch cost 60-90 s of imports on the loaded 2-core host). They share
    ``device`` and ``world``; a rank death ends the processes, so only the last run of all may
    have one."""
    cfg0 = cfgs[0]
    _check_launch(cfgs, ends=then is None)
    out = Path(out_dir or tempfile.mkdtemp(prefix="eplb-real-"))
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = json.dumps([c.to_dict() for c in cfgs])
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1", "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    exit_codes: list[int | str] = []
    more: list[RealEplbRun] = []
    # the model-parallel groups' message queues bind ZMQ IPC sockets; a rank that dies leaves its own
    with scratch.socket_dir("vfs-ipc-", room=38) as ipc:
        env["VLLM_RPC_BASE_PATH"] = ipc
        procs = []
        for rank in range(cfg0.world):
            log = open(out / f"rank{rank}.log", "w")
            procs.append((subprocess.Popen([sys.executable, "-m", __name__, spec, str(rank), str(port), str(out)],
                                           stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           text=True), log))
        deadline = time.monotonic() + sum(c.timeout_s for c in cfgs)
        if then is not None:
            done = [out / f"rank{rank}.done{len(cfgs)}" for rank in range(cfg0.world)]
            while not all(d.exists() for d in done):
                if any(p.poll() is not None for p, _ in procs) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                more = then(collect(cfgs, out, []))
                _check_launch(cfgs + more)
                deadline += sum(c.timeout_s for c in more)
        for p, _ in procs:   # the next batch (none: the ranks exit)
            with contextlib.suppress(BrokenPipeError, OSError):
                p.stdin.write(json.dumps([c.to_dict() for c in more]) + "\n")
                p.stdin.close()
        for p, log in procs:
            try:
                exit_codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                p.kill()  # our own child, by its handle
                p.wait()
                exit_codes.append("hung")
            log.close()
    if then is not None and not more:
        raise RuntimeError(f"the rank processes ended before their first {len(cfgs)} runs were done "
                           f"(exit codes {exit_codes}; logs in {out})")
    return collect(cfgs + more, out, exit_codes)


def collect(cfgs: list[RealEplbRun], out: Path, exit_codes: list) -> list[dict]:
    """The results of a launch from its folder (also offline, on a saved folder)."""
    results = []
    for i, cfg in enumerate(cfgs):
        ranks = []
        for rank in range(cfg.world):
            f = out / f"rank{rank}-{i}.json"
            ranks.append(json.loads(f.read_text()) if f.exists() else None)
        death = out / "death.json"
        results.append({"config": cfg.to_dict(), "exit_codes": exit_codes, "ranks": ranks, "out": str(out),
                        "death": json.loads(death.read_text()) if cfg.plan.of_kind("eplb_rank_death")
                        and death.exists() else None})
    return results


# ---- inside one rank process ----------------------------------------------------------------

def _of(rec: "_Recorder", kind: str) -> list[dict]:
    return [e for e in rec.events if e["kind"] == kind]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# ---- inside one rank process ----------------------------------------------------------------

class CpuStream:
    """CPU stand-in for the worker's CUDA stream: work is 'enqueued' when ``transfer_layer``
    returns and done once ``synchronize()`` ran (CPU ops are complete when they return)."""

    def __init__(self):
        self.pending = False
        self.syncs = 0

    def synchronize(self) -> None:
        self.pending = False
        self.syncs += 1

    def query(self) -> bool:
        return not self.pending


class _CpuEvent:
    """No-op ``torch.cuda.Event`` for CPU ranks (see the module docstring)."""

    def __init__(self, *a, **k):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True


@dataclass
class _Recorder:
    t0: float
    events: list = field(default_factory=list)
    step: int = -1

    def now(self) -> float:
        return round(time.time() - self.t0, 6)

    def emit(self, **ev) -> None:
        self.events.append(ev)


def _rank_main(specs: list[dict], rank: int, port: int, out: Path) -> None:
    import torch

    world, cuda = specs[0]["world"], specs[0]["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.cuda.Event = _CpuEvent  # CpuGpuEvent's CUDA half (this process only)

    from vllm.config import DeviceConfig, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps
    from vllm.distributed.eplb import async_worker as aw
    from vllm.distributed.eplb import eplb_state as es

    pc = ParallelConfig(tensor_parallel_size=world, enable_expert_parallel=True)
    vc = VllmConfig(parallel_config=pc, device_config=DeviceConfig("cuda" if cuda else "cpu"))
    vc.parallel_config.enable_eplb = True  # after validation: it refuses non-CUDA platforms
    with set_current_vllm_config(vc):
        ps.init_distributed_environment(world, rank, f"tcp://127.0.0.1:{port}", rank,
                                        "nccl" if cuda else "gloo")
        ps.ensure_model_parallel_initialized(world, 1)
    real = {"transfer_layer": aw.transfer_layer, "result": aw.AsyncEplbLayerResult,
            "move": es._move_to_workspace, "run": aw.transfer_run_periodically}
    i = 0
    while specs:   # a batch, then the next one the driver sends on stdin (none: exit)
        for spec in specs:
            injector = EplbInjector(validate_plan(spec["plan"], f"eplb-run-{i}"), rank,
                                    link_bandwidth=spec["link_bandwidth"])
            _one_run(spec, rank, out / f"rank{rank}-{i}.json", out, vc, real, injector)
            i += 1
        (out / f"rank{rank}.done{i}").touch()
        specs = json.loads(sys.stdin.readline() or "[]")
    os._exit(0)  # the workers are daemon threads blocked on their rearrange_event


def _one_run(spec: dict, rank: int, path: Path, out: Path, vc, real: dict, injector: EplbInjector) -> None:
    import threading
    from types import SimpleNamespace

    import torch
    from vllm.config import EPLBConfig
    from vllm.distributed import parallel_state as ps
    from vllm.distributed.eplb import async_worker as aw
    from vllm.distributed.eplb import eplb_state as es
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    sh = spec["shape"]
    shape = Shape(sh["layers"], sh["logical"], sh["redundant"], tuple(sh["hidden"]))
    world, cuda = spec["world"], spec["device"] == "cuda"
    vc.parallel_config.eplb_config = EPLBConfig(
        window_size=spec["step_interval"], step_interval=spec["step_interval"],
        num_redundant_experts=shape.redundant, communicator=spec["communicator"])
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    n_local = shape.physical // world
    L, W = shape.layers, len(shape.hidden)
    init_map = es.EplbState.build_initial_global_physical_to_logical_map(shape.logical, shape.redundant)
    cols = torch.arange(max(shape.hidden), dtype=torch.float32) % 4096

    def row(logical: int, layer: int, widx: int) -> torch.Tensor:
        return weight_code(logical, layer, widx, shape) * 4096.0 + cols[:shape.hidden[widx]]

    expert_weights = [[torch.stack([row(init_map[rank * n_local + j], layer, w) for j in range(n_local)]).to(device)
                       for w in range(W)] for layer in range(L)]
    model = SimpleNamespace(
        num_moe_layers=L, num_logical_experts=shape.logical, num_physical_experts=shape.physical,
        num_routed_experts=shape.logical, num_redundant_experts=shape.redundant, num_expert_groups=1,
        expert_weights=expert_weights, moe_layers=[], set_eplb_state=lambda *a: None)
    state = es.EplbState(vc.parallel_config, device)
    state.add_model(model, SimpleNamespace(model="faultsim-moe", compute_hash=lambda: "faultsim-moe"))
    ms = next(iter(state.model_states.values()))

    torch.distributed.barrier()
    rec = _Recorder(time.time())
    comm = ms.communicator
    counts = {"send": 0, "recv": 0, "start": 0.0}  # the layer transfer in progress
    real_send, real_recv, real_exec = comm.add_send, comm.add_recv, comm.execute

    def add_send(tensors, dst_rank, expert_id):
        counts["send"] += 1
        real_send(tensors, dst_rank, expert_id)

    def add_recv(tensors, src_rank, expert_id):
        counts["recv"] += 1
        real_recv(tensors, src_rank, expert_id)

    def execute():
        real_exec()
        injector.slow_link(counts["start"], (counts["send"] + counts["recv"]) * shape.expert_bytes)

    comm.add_send, comm.add_recv, comm.execute = add_send, add_recv, execute
    streams = {}
    real_transfer, real_result, real_move = real["transfer_layer"], real["result"], real["move"]
    def transfer_layer(**kw):
        layer = kw["layer_idx"]
        streams["s"] = kw["cuda_stream"]
        injector.rank_death(layer, len(_of(rec, "rearrange")) - 1, lambda: (out / "death.json").write_text(
            json.dumps({"rank": rank, "layer": layer, "t": time.time()})))
        counts["send"] = counts["recv"] = 0
        counts["start"] = start = rec.now()
        meta = real_transfer(**kw)
        if isinstance(streams["s"], CpuStream):
            streams["s"].pending = True
        rec.emit(kind="transfer", layer=layer, t=start, returned=rec.now(), sent=counts["send"], recv=counts["recv"])
        return meta

    def result(**kw):
        rec.emit(kind="publish", layer=kw["layer_idx"], t=rec.now(), stream_idle=bool(streams["s"].query()),
                 new_map=kw["new_physical_to_logical_map"].tolist())
        return real_result(**kw)

    def move_to_workspace(model_state, ep_rank):
        rec.emit(kind="consume", layer=model_state.pending_result.layer_idx, step=rec.step, t=rec.now())
        real_move(model_state=model_state, ep_rank=ep_rank)

    real_rearrange = state.rearrange

    def rearrange(*a, **k):
        rec.emit(kind="rearrange", step=rec.step, t=rec.now())
        return real_rearrange(*a, **k)

    aw.transfer_layer, aw.AsyncEplbLayerResult, es._move_to_workspace = transfer_layer, result, move_to_workspace
    state.rearrange = rearrange
    real_run = real["run"]
    worker_error: list[str] = []

    def transfer_run_periodically(**kw):
        try:
            real_run(**kw)
        except BaseException as exc:
            worker_error.append(_one_line(exc))
            rec.emit(kind="worker_error", t=rec.now(), error=worker_error[-1])
            raise

    def cpu_thread_target():  # as start_async_worker's thread_target: log and end the thread
        try:
            transfer_run_periodically(state=state, cuda_stream=CpuStream())
        except Exception:
            pass

    aw.transfer_run_periodically = transfer_run_periodically
    if cuda:
        state.start_async_loop()  # vLLM's start_async_worker: its own thread and CUDA stream
        worker = state.async_worker
    else:
        worker = threading.Thread(target=cpu_thread_target, daemon=True)
        worker.start()

    cycles = spec["cycles"]
    loads = [layer_load(shape, spec["seed"] + c) for c in range(cycles)]

    def load_pass(load: list[list[int]]) -> torch.Tensor:
        """A step's expert_load_pass: each logical expert's load on its first current replica."""
        p2l = ms.physical_to_logical_map.cpu().tolist()
        out = torch.zeros(L, shape.physical, dtype=torch.int32)
        for layer in range(L):
            for e in range(shape.logical):
                out[layer, p2l[layer].index(e)] = load[layer][e]
        return out.to(device)

    max_steps = rearrange_step(spec["step_interval"]) + cycles * (spec["step_interval"] + 4 * L) + 10
    result_doc: dict = {"rank": rank, "n_local": n_local}
    done_at = None
    try:
        for s in range(max_steps):
            if done_at is not None and state.expert_rearrangement_step + 1 >= state.expert_rearrangement_step_interval:
                break  # the next step() would start one rearrangement more
            rec.step = s
            ms.expert_load_pass.copy_(load_pass(loads[min(len(_of(rec, "rearrange")), cycles - 1)]))
            start = rec.now()
            time.sleep(spec["forward_s"])
            mid = rec.now()
            state.step()
            rec.emit(kind="step", step=s, t=start, forward_end=mid, end=rec.now())
            if done_at is None and sum(e["layer"] == L - 1 for e in _of(rec, "consume")) == cycles:
                done_at = s
            if done_at is not None and s >= done_at + spec["extra_steps"]:
                break
    except BaseException as exc:
        rec.emit(kind="main_error", t=rec.now(), step=rec.step, error=_one_line(exc))
        worker.join(timeout=2.0)  # let the worker meet the failure too, then say where it is
        result_doc.update(events=rec.events, t0=rec.t0, worker_alive=worker.is_alive(), worker_error=worker_error)
        path.write_text(json.dumps(result_doc))
        os._exit(3)

    if cuda:
        torch.cuda.synchronize()
    # the maps the worker published, per completed rearrangement; the first must be the policy's
    # answer to the fixed load (later windows mix loads recorded under older maps, as in vLLM)
    pub = [e["new_map"] for e in _of(rec, "publish")]
    published = [pub[i:i + L] for i in range(0, len(pub) - len(pub) % L, L)]
    expected = [list(m) for m in [init_map] * L]  # each layer's map as of its last consumed layer
    for e, new_row in zip(_of(rec, "consume"), pub):
        expected[e["layer"]] = new_row
    policy_first = DefaultEplbPolicy.rebalance_experts(torch.tensor(loads[0], dtype=torch.float64) * world,
                                                       shape.physical, 1, 1, world,
                                                       torch.tensor([init_map] * L)).tolist()
    final = ms.physical_to_logical_map.cpu().tolist()
    bad = []
    for layer in range(L):
        for w in range(W):
            got = expert_weights[layer][w].cpu()
            for j in range(n_local):
                want = row(expected[layer][rank * n_local + j], layer, w)
                if not torch.equal(got[j], want):
                    bad.append({"layer": layer, "w": w, "slot": rank * n_local + j,
                                "want_logical": expected[layer][rank * n_local + j],
                                "got_code": int(got[j][0].item()) // 4096})
    result_doc.update(events=rec.events, t0=rec.t0, initial_map=[init_map] * L, published_maps=published,
                      policy_first=policy_first,
                      expected_map=expected, done_at=done_at,
                      final_map=final, bad_rows=bad[:20], num_bad_rows=len(bad), worker_error=worker_error)
    path.write_text(json.dumps(result_doc))
    torch.distributed.barrier(group=ps.get_world_group().cpu_group)


if __name__ == "__main__":
    _rank_main(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
