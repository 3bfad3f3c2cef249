"""Scratch folders for Unix sockets. An AF_UNIX path stops at 107 bytes, and the tools the real
drivers run put sockets well below their folder (Ray ~64 characters, vLLM's ZMQ IPC paths a
36-character UUID): under a long TMPDIR (CI points it into the clone) the folder goes to /tmp."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def socket_dir(prefix: str, room: int) -> Iterator[str]:
    """A fresh folder with ``room`` bytes of socket path to spare below it; removed on exit."""
    base = tempfile.gettempdir()
    if len(base) + len(prefix) + 9 + room > 107:
        base = "/tmp"
    path = tempfile.mkdtemp(prefix=prefix, dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
