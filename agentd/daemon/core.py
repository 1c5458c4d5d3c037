"""`agentd run`: the samplers, the window, the exporter and the HTTP endpoint, with signals.

SIGTERM/SIGINT stop within 2 s; SIGHUP re-reads the config file (a file, scenario or web
config that does not load, or a new address that cannot be bound, is logged and the running
configuration kept, still serving where it was); under systemd, READY=1 is sent once serving, and WATCHDOG=1
while the main loop and the HTTP server are alive. A sampler stuck in a read (a hung NFS
mount, a wedged driver) does not stop the watchdog: restarting cannot unstick it, and it
shows in agentd_sampler_last_success_timestamp_seconds for an alert to catch.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import replace
from typing import Callable

from agentd import __version__
from agentd.daemon.child import tune_malloc
from agentd.daemon.config import Config, ConfigError, parse_listen
from agentd.daemon.exporter import Exporter
from agentd.paths import Paths
from agentd.probe.state import Reader as CeilingsReader
from agentd.daemon.rolling import RollingAnalysis
from agentd.daemon.runner import Loop, SamplerState
from agentd.samplers import registry
from agentd.samplers.base import Context, SharedState
from agentd.daemon.systemd import Notifier
from agentd.daemon.web import WebServer, json_response
from agentd.daemon.webconfig import WebConfig, WebConfigError, load_web_config
from agentd.daemon.window import Window

log = logging.getLogger("agentd")

STOP_DEADLINE = 1.5  # seconds to wait for sampler threads on stop (the budget is 2 s)


class ServingLost(ConfigError):
    """A reload moved the listen address and neither the new nor the old one could be bound
    again: the daemon cannot serve (it exits with status 2)."""


def install_fake_nvml(path: str) -> None:
    from agentd.gpu.fake import install, load_scenario

    install(load_scenario(path))


class Daemon:
    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None,
                 notifier: Notifier | None = None, sim_node=None):
        # sim_node: a SimulatedNode to serve (a node of a simulated job, agentd/sim/serve.py)
        self.sim_node = sim_node
        if sim_node is None and config.simulate:
            from agentd.sim.node import SimulatedNode
            from agentd.sim.scenario import load

            self.sim_node = SimulatedNode(load(config.simulate, config.simulate_seed))
        if self.sim_node is not None:
            config = self._simulated(config)
        self.config = config
        self._reload_config = reload_config
        self.notifier = notifier or Notifier()
        self.window = Window(config.window_seconds)
        self.shared = SharedState()
        self._loops: dict[tuple, Loop] = {}
        self._states: dict[str, SamplerState] = {}
        self._lock = threading.Lock()
        self.server: WebServer | None = None
        self.gpu_backend = "simulated" if self.sim_node else (
            "fake" if config.fake_nvml else "nvml")
        self.last_reload_ok = True
        self.last_reload_time = time.time()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.exporter = Exporter(self)
        self.analysis = RollingAnalysis(self)
        self.extra_routes: dict = {}
        self.ceilings: dict | None = None  # `agentd probe`'s state file, read at start/SIGHUP
        self._ceilings_reader = CeilingsReader(log)
        # The wall clock that stamps window rows and places "the last N seconds" in them;
        # every interval is measured on the monotonic clock. Tests pin or step it.
        self.clock = time.time

    # --- parts --------------------------------------------------------------------------------

    def runners(self) -> list[SamplerState]:
        """Every configured sampler with its bookkeeping, in registry order."""
        with self._lock:
            states = dict(self._states)
        return [states[n] for n in registry() if n in states]

    def runner(self, name: str) -> SamplerState | None:
        with self._lock:
            return self._states.get(name)

    def _context(self, cfg: Config) -> Context:
        ctx = Context(paths=Paths(cfg.procfs, cfg.sysfs, cfg.varlog),
                      fast_interval=cfg.fast_interval,
                      slow_interval=cfg.slow_interval, shared=self.shared)
        if self.sim_node is not None and self.sim_node.hostname:
            ctx.hostname = self.sim_node.hostname
            ctx.nvml = self.sim_node.pynvml
        return ctx

    def _plan(self, cfg: Config) -> dict[tuple, list[str]]:
        """Which loop runs which samplers: one per isolated sampler, one per interval else."""
        plan: dict[tuple, list[str]] = {}
        for name, cls in registry().items():
            if cfg.collector(name).enabled:
                interval = cfg.sampler_interval(name)
                key = (name, interval) if cls.isolated else ("host", interval)
                plan.setdefault(key, []).append(name)
        return plan

    @staticmethod
    def _sampler_key(cfg: Config, name: str) -> tuple:
        """What a sampler's configuration is; a change restarts its loop."""
        c = cfg.collector(name)
        return (c.enabled, c.interval, tuple(sorted(c.options.items())), cfg.procfs, cfg.sysfs,
                cfg.varlog, cfg.fast_interval, cfg.slow_interval, cfg.fake_nvml)

    def _start_loop(self, cfg: Config, key: tuple, names: list[str]) -> Loop:
        interval = key[1]
        states = []
        for name in names:
            cls = registry()[name]
            sampler = cls(self._context(cfg), cfg.collector(name).options)
            ring = None if cls.window_columns == 0 else self.window.ring(
                name, interval, max_columns=cls.window_columns)
            states.append(SamplerState(sampler, interval, cfg.slow_interval, ring,
                                       wall_clock=lambda: self.clock()))
        loop = Loop("-".join(map(str, key)), interval, states)
        with self._lock:
            for st in states:
                self._states[st.name] = st
        loop.start()
        return loop

    def _stop_loops(self, keys: list[tuple]) -> None:
        deadline = time.monotonic() + STOP_DEADLINE
        loops = [self._loops.pop(k) for k in keys]
        for loop in loops:
            loop.stop()
        for loop in loops:
            if not loop.join(max(deadline - time.monotonic(), 0.01)):
                log.warning("loop %s did not stop in time; leaving it", loop.name)
            with self._lock:
                for st in loop.states:
                    if self._states.get(st.name) is st:
                        del self._states[st.name]

    def _apply_samplers(self, old: Config | None, cfg: Config) -> None:
        if old is None or old.fake_nvml != cfg.fake_nvml:
            self._select_gpu_backend(cfg)
        plan = self._plan(cfg)
        stale = [
            key for key, loop in self._loops.items()
            if plan.get(key) != [st.name for st in loop.states] or old is None or any(
                self._sampler_key(old, st.name) != self._sampler_key(cfg, st.name)
                for st in loop.states)
        ]
        self._stop_loops(stale)
        for key, names in plan.items():
            if key not in self._loops:
                self._loops[key] = self._start_loop(cfg, key, names)
        for name in registry():
            if not cfg.collector(name).enabled:
                self.window.drop(name)

    def _simulated(self, cfg: Config) -> Config:
        """The configuration pointed at the simulated node's trees."""
        return replace(cfg, procfs=self.sim_node.procfs, sysfs=self.sim_node.sysfs,
                       varlog=self.sim_node.varlog)

    def _select_gpu_backend(self, cfg: Config) -> None:
        from agentd.gpu import fake

        if self.sim_node is not None:
            self.sim_node.install_nvml()
            self.gpu_backend = "simulated"
            log.warning("serving a SIMULATED node (scenario %s): no real hardware is read",
                        self.sim_node.scenario.name)
        elif cfg.fake_nvml:
            install_fake_nvml(cfg.fake_nvml)
            self.gpu_backend = "fake"
            log.warning("using FAKE GPUs from %s: no real GPU is read", cfg.fake_nvml)
        else:
            if fake.installed() is not None:
                fake.uninstall()
            self.gpu_backend = "nvml"

    def _read_ceilings(self, cfg: Config) -> dict | None:
        """`agentd probe`'s ceilings for this node (a simulated node has its own)."""
        if self.sim_node is not None:
            return None
        return self._ceilings_reader.read(cfg.probe_state_file)

    @staticmethod
    def _tls(cfg: Config) -> bool:
        """Whether the web configuration serves TLS (validated here, in this process, so that
        a bad file is a one-line error at start and a kept configuration on reload)."""
        return bool(cfg.web_config_file and load_web_config(cfg.web_config_file).tls)

    def _start_server(self, cfg: Config, serve: bool = True) -> None:
        """Listen on cfg's address (ConfigError when it cannot be had) and, with `serve`,
        start the server process on it; without, start() does once the samplers run."""
        host, port = parse_listen(cfg.listen_address, "--web.listen-address")
        tls = self._tls(cfg)
        routes = {
            "/api/v1/status": lambda q: json_response(self.status()),
            "/api/v1/findings": lambda q: json_response(self.analysis.findings_document()),
            **self.extra_routes,
        }
        limits = {"max_connections": cfg.web_max_connections,
                  "header_timeout": cfg.web_header_timeout,
                  "idle_timeout": cfg.web_idle_timeout}
        try:
            self.server = WebServer(host, port, cfg.web_config_file, routes,
                                    self.exporter.render, self.window_payload, tls,
                                    cfg.log_level, limits)
        except OSError as e:
            raise ConfigError(f"cannot listen on {cfg.listen_address}: {e.strerror}") from None
        if serve:
            self._serve_http()

    def _serve_http(self) -> None:
        assert self.server is not None
        self.server.start()
        log.info("serving %s://%s:%d/metrics", self.server.scheme, self.server.host,
                 self.server.port)

    # --- HTTP routes ----------------------------------------------------------------------------

    def window_meta(self) -> dict:
        """The node's description for the analysis: GPU identities, which processes use which
        GPU, and which switches GPUs share with NVMe drives (by GPU index)."""
        host = self.sim_node.hostname if self.sim_node is not None else None
        meta: dict = {"node": host or socket.gethostname(),
                      "fast_interval": self.config.fast_interval,
                      "samplers": {st.name: {"available": st.available,
                                             "reason": st.unavailable_reason}
                                   for st in self.runners()}}
        for st in self.runners():
            if st.available:
                try:
                    meta.update(st.sampler.meta())
                except Exception as e:  # a sampler's meta must not cost the window
                    log.debug("%s: meta: %s", st.name, e)
        by_address = {}
        for index, g in meta.get("gpus", {}).items():
            bus = g.get("pci_bus_id", "").lower()
            by_address[bus[-12:]] = int(index)  # "00000000:18:00.0" -> "0000:18:00.0"
        meta["shared_uplinks"] = [
            {"switch": s["switch"], "uplink_bytes_per_second": s["uplink_bytes_per_second"],
             "gpus": [by_address[a] for a in s["gpu_addresses"] if a in by_address],
             "disks": s["disks"]}
            for s in meta.pop("pcie_switches", []) if s.get("uplink_bytes_per_second")]
        links = meta.pop("pcie_links", {})
        for info in (meta.get("disks") or {}).values():
            link = links.get(info.get("pci_address", ""))
            if link:
                info["link_bytes_per_second"] = link
        if self.sim_node is not None and self.sim_node.ceilings() is not None:
            meta.setdefault("ceilings", self.sim_node.ceilings())
        elif self.ceilings:
            meta["ceilings"] = self.ceilings  # `agentd probe`'s, for this (real) node
        return meta

    def window_payload(self, seconds: float) -> tuple[bytes, dict]:
        """The window's last `seconds` (all of it for 0) as uncompressed npz bytes, for the
        server process to cache and encode as each client asks (httpd.py, npzfmt.py)."""
        since = self.clock() - seconds if seconds > 0 else None
        body = self.window.to_npz(since, self.window_meta(), compress=False)
        return body, {"window_seconds": self.config.window_seconds}

    def status(self) -> dict:
        return {
            "version": __version__,
            "gpu_backend": self.gpu_backend,
            "config_file": self.config.source,
            "fast_interval_seconds": self.config.fast_interval,
            "slow_interval_seconds": self.config.slow_interval,
            "window_seconds": self.config.window_seconds,
            "analysis": {
                "interval_seconds": self.config.analysis_interval,
                "max_interval_seconds": max(self.config.analysis_max_interval,
                                            self.config.analysis_interval),
                "window_seconds": self.config.analysis_window,
                "runs": self.analysis.runs,
                "skipped": self.analysis.skipped,
                "errors": self.analysis.errors,
                "last_run_timestamp_seconds": self.analysis.last_run or None,
            },
            "samplers": {
                r.name: {
                    "available": r.available,
                    "unavailable_reason": r.unavailable_reason,
                    "success": r.success,
                    "interval_seconds": r.interval,
                    "runs": r.runs,
                    "errors": r.errors,
                    "overruns": r.overruns,
                    "last_error": r.last_error,
                }
                for r in self.runners()
            },
        }

    # --- life cycle -------------------------------------------------------------------------------

    def start(self, serve_http: bool = True) -> None:
        # The address first: when it cannot be listened on, nothing else has started. The
        # server process answers once the samplers run (connections wait in the backlog
        # meanwhile), so that no scrape sees a daemon without its samplers.
        if serve_http:
            self._start_server(self.config, serve=False)
        try:
            if self.sim_node is not None:
                self.sim_node.start()
            self._apply_samplers(None, self.config)
            self.ceilings = self._read_ceilings(self.config)
        except BaseException:
            if self.server is not None:
                self.server.stop()
                self.server = None
            raise
        if serve_http:
            self._serve_http()
            self.analysis.start()
            self.notifier.ready(f"serving on {self.config.listen_address}")

    def reload(self) -> bool:
        """Re-read the configuration and apply it. Whatever fails (a bad file, a bad scenario,
        an address that cannot be listened on) leaves the daemon serving as before: the
        reason is logged and agentd_config_last_reload_successful drops to 0."""
        if self._reload_config is None:
            return False
        self.notifier.reloading()
        try:
            cfg = self._reload_config()
        except ConfigError as e:
            # A new probe's figures are read even while the file waits to be fixed.
            self.ceilings = self._read_ceilings(self.config)
            return self._reload_failed(str(e))
        self.ceilings = self._read_ceilings(cfg)
        try:
            # Validate before touching anything.
            web = load_web_config(cfg.web_config_file) if cfg.web_config_file else WebConfig()
            cfg = self._kept_on_reload(self.config, cfg)
            if cfg.listen_address != self.config.listen_address:
                self._move_server(self.config, cfg)
        except ServingLost:
            raise
        except (ConfigError, WebConfigError) as e:
            return self._reload_failed(str(e))
        old = self.config
        self.config = cfg
        logging.getLogger("agentd").setLevel(cfg.log_level.upper())
        try:
            self._apply_samplers(old, cfg)
        except Exception as e:  # validated above; a file changed since, or a bug
            log.debug("applying the samplers' configuration failed", exc_info=True)
            return self._reload_failed(f"applying it failed ({type(e).__name__}: {e}); the "
                                       "samplers run with what could be applied")
        assert self.server is not None
        if cfg.listen_address == old.listen_address:
            # Same socket; a new server process with the new certificates, users and headers
            # takes it over, the old one finishes its requests. (A new address got a new
            # server process with them already.)
            self.server.replace(cfg.web_config_file, web.tls is not None)
        self.last_reload_ok = True
        self.last_reload_time = time.time()
        log.info("configuration reloaded")
        self.notifier.ready("reloaded")
        return True

    def _reload_failed(self, reason: str) -> bool:
        log.error("reload failed, keeping the running configuration: %s", reason)
        self.last_reload_ok = False
        self.notifier.ready("reload failed")
        return False

    def _kept_on_reload(self, old: Config, cfg: Config) -> Config:
        """`cfg` with what changes only on restart (the simulated scenario, the window's
        length) kept as it runs."""
        if self.sim_node is not None:
            if (cfg.simulate, cfg.simulate_seed) != (old.simulate, old.simulate_seed):
                log.warning("the simulated scenario changes only on restart")
            cfg = self._simulated(replace(cfg, simulate=old.simulate,
                                          simulate_seed=old.simulate_seed))
        if cfg.window_seconds != old.window_seconds:
            log.warning("the window length changes only on restart; keeping %gs",
                        old.window_seconds)
            cfg = replace(cfg, window_seconds=old.window_seconds)
        return cfg

    def _move_server(self, old: Config, cfg: Config) -> None:
        """Serve on cfg's address instead of old's, or raise ConfigError still serving on
        old's. The new socket is bound while the old one serves; only when both share a port
        (a host that changes) is the old one closed first, and reopened if the new fails."""
        previous = self.server
        assert previous is not None
        try:
            self._start_server(cfg)
        except ConfigError:
            if parse_listen(cfg.listen_address, "")[1] != parse_listen(old.listen_address,
                                                                        "")[1]:
                raise
            previous.stop()
            try:
                self._start_server(cfg)
            except ConfigError:
                try:
                    self._start_server(old)  # the port was ours a moment ago
                except ConfigError as e:
                    raise ServingLost(f"cannot serve on {cfg.listen_address}, nor again on "
                                      f"{old.listen_address}: {e}") from None
                raise
            return
        previous.stop()

    def request_stop(self, *_args) -> None:
        self._stop.set()

    def request_reload(self, *_args) -> None:
        self._reload.set()

    def serve(self, install_signals: bool = True) -> None:
        """Run until SIGTERM/SIGINT (or request_stop)."""
        tune_malloc()  # window exports for the server and the analysis: give memory back
        if install_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
            signal.signal(signal.SIGHUP, self.request_reload)
        self.start()
        ping = self.notifier.watchdog_seconds
        period = min(ping / 2, 1.0) if ping else 1.0
        while not self._stop.wait(period):
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if self.server is not None:
                self.server.supervise()
            if ping and self.server is not None and self.server.is_alive():
                self.notifier.watchdog()
        self.stop()

    def stop(self) -> None:
        started = bool(self._loops) or self.server is not None
        self.notifier.stopping()
        if self.server is not None:
            self.server.stop()
            self.analysis.stop()
        self._stop_loops(list(self._loops))
        if self.sim_node is not None:
            self.sim_node.stop()
        if started:
            log.info("stopped")
