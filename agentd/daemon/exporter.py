"""What /metrics serves, built from the samplers' latest readings.

No NVML call or file read happens here: a scrape reads state the sampler threads keep, plus
statistics over the window (computed at most once a second). Families and label names come
from the catalog, so a name that is not in agentd/catalog.py is never served.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from typing import TYPE_CHECKING

from agentd import __version__
from agentd.catalog import METRICS, MetricSpec
from agentd.gpu import fake as fake_nvml
from agentd.daemon.exposition import TextWriter
from agentd.daemon.window import gpu_window_stats
from agentd.probe.state import series as ceiling_series

if TYPE_CHECKING:
    from agentd.daemon.core import Daemon

log = logging.getLogger("agentd.exporter")


class Exporter:
    """Builds /metrics from the samplers' state, the window and agentd's own bookkeeping."""

    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self._stats_cache: tuple[float, list] = (-1e18, [])  # (monotonic time, series)
        self._stats_lock = threading.Lock()
        self._unknown_logged: set[str] = set()
        self._writer = TextWriter()
        self._writer_lock = threading.Lock()

    def families(self) -> list[tuple[MetricSpec, list]]:
        """(catalog entry, [(label values, value)]) for every family with data, in catalog
        order; a name that is not in the catalog is logged once and left out."""
        series: dict[str, list] = {}
        for name, labels, value in self._self_series():
            series.setdefault(name, []).append((labels, value))
        for runner in self.daemon.runners():
            if not runner.available:
                continue
            try:
                items = runner.sampler.series()
            except Exception as e:  # a sampler's bad state must not cost the whole scrape
                log.error("%s: series() failed: %s", runner.name, e)
                continue
            for name, labels, value in items:
                if value is not None:
                    series.setdefault(name, []).append((labels, value))
        server = self.daemon.server
        for name, labels, value in (self._window_series() + self.daemon.analysis.series()
                                    + ceiling_series(self.daemon.ceilings)
                                    + (server.series() if server is not None else [])):
            series.setdefault(name, []).append((labels, value))

        out = []
        for spec in METRICS:
            rows = series.pop(spec.name, None)
            if not rows:
                continue
            # Two samplers must not export one series: keep the first (one dict operation
            # per series; the writer converts values to float).
            unique: dict = {}
            setdefault = unique.setdefault
            for labels, value in rows:
                setdefault(labels, value)
            out.append((spec, list(unique.items())))
        for name in series:
            if name not in self._unknown_logged:
                self._unknown_logged.add(name)
                log.error("metric %s is not in the catalog; not served", name)
        return out

    def render(self) -> bytes:
        families = self.families()
        with self._writer_lock:
            parts = self._writer.render(families)
        return "".join(parts).encode()

    def _self_series(self) -> list:
        d = self.daemon
        out = [("agentd_build_info", (__version__, platform.python_version(), d.gpu_backend), 1)]
        for r in d.runners():
            lab = (r.name,)
            out += [
                ("agentd_sampler_available", lab, float(r.available)),
                ("agentd_sampler_success", lab, float(r.available and r.success)),
                ("agentd_sampler_duration_seconds", lab, r.last_duration),
                ("agentd_sampler_interval_seconds", lab, r.interval),
                ("agentd_sampler_runs_total", lab, float(r.runs)),
                ("agentd_sampler_errors_total", lab, float(r.errors)),
                ("agentd_sampler_overruns_total", lab, float(r.overruns)),
            ]
            if r.last_success:
                out.append(("agentd_sampler_last_success_timestamp_seconds", lab,
                            r.last_success))
            if r.ring is not None:
                out.append(("agentd_window_columns_dropped_total", lab,
                            float(r.ring.dropped_columns)))
        fake = fake_nvml.installed()
        if fake is not None:
            out.append(("agentd_fake_nvml_cpu_seconds_total", (), fake.cpu_seconds))
        out += process_series()
        out += [
            ("agentd_config_last_reload_successful", (), float(d.last_reload_ok)),
            ("agentd_config_last_reload_success_timestamp_seconds", (), d.last_reload_time),
            ("agentd_window_capacity_seconds", (), d.config.window_seconds),
            ("agentd_window_memory_bytes", (), float(d.window.used_bytes)),
            ("agentd_window_stats_seconds", (), d.config.stats_seconds),
        ]
        return out

    def _window_series(self) -> list:
        # The cache's age on the monotonic clock: a wall clock stepped back must not pin it.
        mono = time.monotonic()
        with self._stats_lock:
            cached_at, cached = self._stats_cache
            if 0 <= mono - cached_at < 1.0:
                return cached
        now = self.daemon.clock()
        out = []
        gpu = self.daemon.runner("gpu")
        if gpu is not None and gpu.available and gpu.ring is not None:
            since = now - self.daemon.config.stats_seconds
            for g in list(getattr(gpu.sampler, "gpus", {}).values()):
                if g.index in gpu.sampler.lost:
                    continue
                t, busy = gpu.ring.column(f"gpu.busy:{g.index}", since)
                stats = gpu_window_stats(t, busy, self.daemon.config.idle_threshold)
                if stats is None:
                    continue
                lab = (str(g.index), g.uuid)
                out += [
                    ("agentd_gpu_window_idle_ratio", lab, stats["idle_ratio"]),
                    ("agentd_gpu_window_longest_idle_seconds", lab,
                     stats["longest_idle_seconds"]),
                ]
                for q, key in (("0.1", "p10"), ("0.5", "p50"), ("0.9", "p90")):
                    out.append(("agentd_gpu_window_utilization_ratio", lab + (q,), stats[key]))
        with self._stats_lock:
            self._stats_cache = (mono, out)
        return out


_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_BOOT_TIME: list[float] = []


def process_series(proc: str = "/proc") -> list:
    """The standard process_* metrics of this process (what prometheus_client's
    ProcessCollector exports, without importing it: ~10 MiB of resident memory)."""
    out = []
    try:
        with open(f"{proc}/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if not _BOOT_TIME:
            with open(f"{proc}/stat") as f:
                _BOOT_TIME.extend(float(line.split()[1]) for line in f
                                  if line.startswith("btime "))
        out += [
            ("process_cpu_seconds_total", (), (int(fields[11]) + int(fields[12])) / _CLK_TCK),
            ("process_virtual_memory_bytes", (), float(fields[20])),
            ("process_resident_memory_bytes", (), float(int(fields[21]) * _PAGE)),
        ]
        if _BOOT_TIME:
            out.append(("process_start_time_seconds", (),
                        _BOOT_TIME[0] + int(fields[19]) / _CLK_TCK))
    except (OSError, ValueError, IndexError) as e:
        log.debug("process metrics: %s", e)
    try:
        out.append(("process_open_fds", (), float(len(os.listdir(f"{proc}/self/fd")))))
        with open(f"{proc}/self/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    out.append(("process_max_fds", (), float(line.split()[3])))
    except (OSError, ValueError, IndexError) as e:
        log.debug("process metrics: %s", e)
    return out
