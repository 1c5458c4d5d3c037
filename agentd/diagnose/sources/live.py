"""This node, sampled for N seconds by the daemon's own samplers (no HTTP server)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import replace

from agentd.analysis.signals import Signals, from_groups


def sampling_config(config, seconds: float, every: float = 0.0):
    """The configuration to sample with: a window that holds the whole run, or, when rows
    are handed on every `every` seconds, what accumulates between two hand-overs. Raises
    ConfigError when that window would not fit in memory (agentd.daemon.config)."""
    from agentd.daemon.config import check_window_memory

    span = 2 * every + 10 if every else seconds + 5
    cfg = replace(config, window_seconds=max(config.window_seconds, span))
    check_window_memory(cfg, "sampling for --seconds")
    return cfg


def sample_locally(seconds: float, config, stop: threading.Event, progress=None,
                   on_rows=None, every: float = 0.0) -> tuple[dict, dict]:
    """Run the daemon's samplers for `seconds`, or until `stop`; return the window's groups
    since the start and the node's description. `on_rows(groups, meta)`, when given, is
    called every `every` seconds with the rows since its previous call (recordings)."""
    from agentd.daemon.core import Daemon

    d = Daemon(sampling_config(config, seconds, every if on_rows is not None else 0.0))
    d.start(serve_http=False)
    t0 = time.time()
    flushed = t0
    bar = progress is not None and progress.isatty()
    try:
        while not stop.is_set() and time.time() - t0 < seconds:
            if bar:
                done = "#" * int(min((time.time() - t0) / seconds, 1.0) * 30)
                progress.write(f"\rsampling [{done:<30}] {time.time() - t0:5.1f}/{seconds:g} s")
                progress.flush()
            stop.wait(0.25)
            if on_rows is not None and every and time.time() - flushed >= every:
                groups = {k: g for k, g in d.window.export(flushed).items() if k != "topology"}
                on_rows(groups, d.window_meta())
                flushed = max((float(g["t"][-1]) for g in groups.values() if len(g["t"])),
                              default=flushed) + 1e-6
        if bar:
            progress.write("\n")
        meta = d.window_meta()
        groups = {k: g for k, g in d.window.export(flushed if on_rows else t0).items()
                  if k != "topology"}
    finally:
        d.stop()
    return groups, meta


class LiveSource:
    name = "live"

    def __init__(self, seconds: float, config, progress=sys.stderr):
        self.seconds = seconds
        self.config = config
        self.progress = progress

    def read(self) -> Signals:
        """Sample this node (Ctrl-C analyses what was gathered so far)."""
        stop = threading.Event()
        old = signal.signal(signal.SIGINT, lambda *a: stop.set())
        try:
            groups, meta = sample_locally(self.seconds, self.config, stop, self.progress)
        finally:
            signal.signal(signal.SIGINT, old)
        return from_groups(groups, step=self.config.fast_interval, source="live sampling",
                           node=meta.get("node", ""), meta=meta)
