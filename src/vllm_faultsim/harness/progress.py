"""Progress bars for long runs (tqdm), without tqdm's monitor thread: nothing outlives a run."""

from __future__ import annotations


def progress_bar(iterable=None, **kw):
    import tqdm

    tqdm.tqdm.monitor_interval = 0  # no TMonitor thread (tests/test_no_leaks.py)
    return tqdm.tqdm(iterable, **kw)
