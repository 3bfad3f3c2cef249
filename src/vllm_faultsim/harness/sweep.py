"""Sweeps: independent points (study and search points) fanned out over Ray or run serially, each
cached by a hash of its config in the output folder, so that an interrupted sweep continues.

``with Sweep(out_dir, workers=None, ray_address=None) as sweep: sweep.map(fn, configs)`` calls
``fn(config) -> dict`` (a module-level function, so Ray ships it by reference) once for every
config the cache does not already hold and returns the results in the configs' order. Where the
points run:

- by default a local Ray cluster on all cores (``workers`` of them; default ``os.cpu_count()``),
  started at the first point that needs running and shut down when the sweep ends, Ctrl-C included;
  with fewer than ``RAY_MIN_POINTS_PER_CORE`` points a core to run and no ``workers`` asked for,
  serially instead (Ray's start costs more than it saves: benchmarks/sweep_speedup.py measured the
  12-point default study 0.62x serial on 2 cores, a 48-point grid 1.5x), said in one line;
- ``ray_address``: an existing cluster (``ray.init(address=...)``; the package must be importable
  on its workers), disconnected when the sweep ends; ``workers`` then caps the points in flight;
- ``workers=1``, or Ray not installed: serially in this process, said in one line on stderr.
A Ray this process has already initialised is used as it is, and left running.

A point's result depends on its config alone (each point carries its own seed, never one drawn
from its position), and every result passes through JSON (as the cached ones do), so a sweep's
results are identical serial, on Ray, or resumed.

The cache is ``.sweep-cache.jsonl`` in the output folder: one ``{"key", "result"}`` line per
finished point, ``key`` = sha256 of the function's name and the config, appended and flushed as
each point finishes; a line cut by an interruption is ignored. A sweep that ends without an
exception removes it (a finished sweep's outputs are its CSV and plots).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

CACHE = ".sweep-cache.jsonl"
RAY_MIN_POINTS_PER_CORE = 8


def point_key(fn: Callable, config: dict) -> str:
    """The cache key of ``fn(config)``: a hash of the function's qualified name and the config."""
    text = json.dumps([f"{fn.__module__}.{fn.__qualname__}", config], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class SweepCache:
    """Finished points of an output folder, by key (read once; appended as points finish)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / CACHE
        self.done: dict[str, dict] = {}
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            lines = []
        for line in lines:
            try:
                d = json.loads(line)
                self.done[d["key"]] = d["result"]
            except (ValueError, KeyError, TypeError):  # the line being written when it stopped
                continue
        self._fh = None

    def put(self, key: str, result: dict) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(json.dumps({"key": key, "result": result}) + "\n")
        self._fh.flush()
        self.done[key] = result

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def clear(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _json(result: dict) -> dict:
    return json.loads(json.dumps(result))


def ray_importable() -> bool:
    import importlib.util
    return importlib.util.find_spec("ray") is not None


class Sweep:
    """One sweep's executor and cache; see the module docstring."""

    def __init__(self, out_dir: Path, *, workers: int | None = None, ray_address: str | None = None,
                 progress: bool = True, note: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                 points: int | None = None):
        """``points``: how many points the whole sweep may run, where it maps them in waves (the
        search): the serial-or-Ray choice counts them, not one wave's."""
        self.points = points
        self.cache = SweepCache(out_dir)
        self.workers, self.ray_address, self.progress, self.note = workers, ray_address, progress, note
        self.ran = 0  # points computed by this sweep (not taken from the cache)
        self._ray = None
        self._scratch = None
        self._said_serial = False
        self._sigterm = None  # the caller's SIGTERM handler, held against Ray's (_ray_up, __exit__)

    # -- where points run ----------------------------------------------------------------------

    def serial(self, n: int) -> bool:
        """Whether `n` points to run go serially (see the module docstring)."""
        return self.workers == 1 or not ray_importable() or self._few(n)

    def _few(self, n: int) -> bool:
        if self.workers is not None or self.ray_address:
            return False
        ray = sys.modules.get("ray")  # a Ray the caller initialised is used whatever the count
        return (not (ray is not None and ray.is_initialized())
                and max(n, self.points or 0) < RAY_MIN_POINTS_PER_CORE * (os.cpu_count() or 1))

    def _say_serial(self, n: int) -> None:
        if not self._said_serial:
            why = ("--workers 1" if self.workers == 1 else
                   "ray is not installed (pip install 'vllm-faultsim[ray]')" if not ray_importable() else
                   f"{n} points, fewer than {RAY_MIN_POINTS_PER_CORE} a core (starting Ray would cost more than "
                   "it saves; --workers N runs them on Ray)")
            self.note(f"vllm-faultsim: sweep: {why}: running the points serially in this process")
            self._said_serial = True

    def _ray_up(self):
        if self._ray is None:
            import ray
            if ray.is_initialized():  # the caller's cluster: used, not shut down
                return ray
            kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
            on_sigterm = signal.getsignal(signal.SIGTERM)
            if self.ray_address:
                ray.init(address=self.ray_address, **kw)
            else:
                from .drivers.scratch import socket_dir  # a short temp dir, removed with the cluster
                self._scratch = socket_dir("vfs-ray-", room=66)
                ray.init(num_cpus=self.workers or os.cpu_count() or 1, _temp_dir=self._scratch.__enter__(), **kw)
            if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
                # ray.init sets its own (sys.exit): a caller's own handler (the command line's, which
                # raises KeyboardInterrupt) is put back; both unwind through __exit__, which shuts the
                # cluster down and keeps the finished points. The default (SIG_DFL) is not: it would
                # end the process with no unwinding at all
                self._sigterm = on_sigterm
                signal.signal(signal.SIGTERM, on_sigterm)
            self._ray = ray
        return self._ray

    def __enter__(self) -> "Sweep":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._ray is not None:
                self._ray.shutdown()
                self._ray = None
                if self._sigterm is not None:  # ray.shutdown leaves the OS-level handler at the default it
                    signal.signal(signal.SIGTERM, self._sigterm)  # found at init (Python's still names ours)
                    self._sigterm = None
        finally:
            if self._scratch is not None:
                self._scratch.__exit__(None, None, None)
                self._scratch = None
            if exc_type is None:
                self.cache.clear()
            else:
                self.cache.close()

    # -- running points ------------------------------------------------------------------------

    def map(self, fn: Callable[[dict], dict], configs: Sequence[dict], *, bar=None, desc: str = "sweep",
            on_result: Callable[[int, dict], None] | None = None) -> list[dict]:
        """``fn(config)`` for each config (cached ones taken from the cache), in order. ``bar``: a
        progress bar to advance (else one of its own); ``on_result(i, result)`` as each finishes."""
        from .progress import progress_bar

        keys = [point_key(fn, c) for c in configs]
        results: list[dict | None] = [None] * len(configs)
        todo: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            if k in self.cache.done:
                results[i] = self.cache.done[k]
            else:
                todo.setdefault(k, []).append(i)
        own_bar = bar is None
        if own_bar:
            bar = progress_bar(total=len(configs), desc=desc, unit="point", disable=not self.progress)
        try:
            for i, r in enumerate(results):
                if r is not None:
                    bar.update(1)
                    if on_result:
                        on_result(i, r)

            def finished(key: str, result: dict) -> None:
                self.cache.put(key, result)
                self.ran += 1
                for i in todo[key]:
                    results[i] = result
                    bar.update(1)
                    if on_result:
                        on_result(i, result)

            if todo and self.serial(len(todo)):
                self._say_serial(len(todo))
                for key, idx in todo.items():
                    finished(key, _json(fn(configs[idx[0]])))
            elif todo:
                self._map_ray(fn, configs, todo, finished)
        finally:
            if own_bar:
                bar.close()
        return results  # type: ignore[return-value]

    def _map_ray(self, fn, configs, todo: dict[str, list[int]], finished) -> None:
        ray = self._ray_up()
        remote = ray.remote(num_cpus=1, max_retries=0)(fn)
        queue = list(todo.items())
        cap = self.workers if (self.ray_address and self.workers) else len(queue)
        pending: dict = {}
        try:
            while queue or pending:
                while queue and len(pending) < cap:
                    key, idx = queue.pop(0)
                    pending[remote.remote(configs[idx[0]])] = key
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    key = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:  # the point's own exception, re-raised here
                        cause = getattr(exc, "cause", None)
                        raise (cause if isinstance(cause, BaseException) else exc) from None
                    finished(key, _json(result))
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
