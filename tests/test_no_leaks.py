"""After the whole suite, nothing is left behind: no child process, no thread but the main one,
no Ray cluster, no temp file. pytest collects tests/ in name order, so this file runs after
tests/diff, tests/gpu and tests/sim (run alone it checks an empty run).

Temp files: entries of the temp dir created since this pytest process started, named as the
suite's tools name theirs (vLLM's ZMQ IPC sockets are UUIDs, multiprocessing's ``pymp-``, this
package's ``vfs-``, ``tempfile``'s ``tmp``, Ray's ``ray``), less the caches meant to stay (the
tiny model folders, torch's inductor cache, pytest's own tmp_path root). CI points TMPDIR at a
folder of its own; on a shared machine another program's files could match these names.
"""

from __future__ import annotations

import getpass
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

NAMES = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|pymp-.*|vfs-.*|tmp.*|ray.*)$")


def _settled(check, timeout: float = 30.0):
    """Processes and threads that are ending get a moment to finish: up to 30 s, as long as a Ray
    worker's teardown can take with both cores loaded (it returns as soon as nothing is left, and a
    leak is still one after 30 s)."""
    deadline = time.monotonic() + timeout
    while True:
        left = check()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_no_stray_child_processes():
    me = psutil.Process()

    def children():
        return [(p.pid, p.name(), p.status()) for p in me.children(recursive=True) if p.is_running()]
    assert _settled(children) == []


def test_no_threads_but_the_main_one():
    def threads():
        return [(t.name, t.daemon) for t in threading.enumerate()
                if t is not threading.main_thread() and t.is_alive()]
    assert _settled(threads) == []


def test_no_ray_cluster_left_running():
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_no_temp_files_left_behind():
    from vllm_faultsim.harness.drivers import model_dirs
    started = psutil.Process().create_time()
    user = getpass.getuser()
    keep = {model_dirs.default_cache_dir().name, f"torchinductor_{user}", f"pytest-of-{user}"}
    tmp = Path(tempfile.gettempdir())
    left = []
    for entry in tmp.iterdir():
        try:
            created = entry.lstat().st_ctime
        except FileNotFoundError:
            continue
        if created >= started and entry.name not in keep and NAMES.match(entry.name):
            left.append(entry.name)
    assert left == [], f"left in {tmp}: {sorted(left)}"
