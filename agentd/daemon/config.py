"""Configuration: defaults, then the TOML file, then command-line flags.

Every problem is a ConfigError with a one-line message naming the key or flag; the CLI prints
it and exits 2. Sampler flags are generated from the sampler registry, like node_exporter's:
--collector.NAME, --no-collector.NAME, --collector.NAME.OPTION=VALUE.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

from agentd.logs import LEVELS
from agentd.probe.state import DEFAULT_STATE_FILE
from agentd.samplers import registry
from agentd.samplers.base import Duration
from agentd.tomlfile import read_toml


DEFAULT_PORT = 9445
DEFAULT_LISTEN = f":{DEFAULT_PORT}"
FAKE_NVML_ENV = "AGENTD_FAKE_NVML"


class ConfigError(ValueError):
    pass


# Prometheus' duration grammar (units in this order, each at most once: 1y2w3d4h5m6s7ms;
# y = 365d, w = 7d), plus a plain number of seconds. Like Go's time.ParseDuration, each
# part may carry a fraction ("1.5h"), which Prometheus itself refuses.
_NUM = r"(\d+(?:\.\d+)?|\.\d+)"
_DURATION = re.compile(
    rf"^(?:{_NUM}y)?(?:{_NUM}w)?(?:{_NUM}d)?(?:{_NUM}h)?(?:{_NUM}m(?!s))?(?:{_NUM}s)?"
    rf"(?:{_NUM}ms)?$")
_UNITS = (365 * 86400.0, 7 * 86400.0, 86400.0, 3600.0, 60.0, 1.0, 1e-3)
_PLAIN = re.compile(rf"^{_NUM}$")


def parse_duration(value: Any, where: str, low: float | None = None,
                   high: float | None = None) -> float:
    """Seconds from a number or a Prometheus duration ('100ms', '1h30m', '1d', '1w', '1y');
    positive and finite, and within [low, high] when given."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        m = _DURATION.match(text) if text else None
        if _PLAIN.match(text):
            seconds = float(text)
        elif m and any(m.groups()):
            seconds = sum(float(g) * u for g, u in zip(m.groups(), _UNITS) if g is not None)
        elif text.startswith("-"):
            raise ConfigError(f"{where}: must be a positive duration, got {value!r}")
        else:
            raise ConfigError(f"{where}: {value!r} is not a duration (e.g. 100ms, 30s, 1h30m, "
                              "1d)")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{where}: must be a positive duration, got {value!r}")
    check_range(seconds, where, low, high, format_duration)
    return seconds


def format_duration(seconds: float, digits: int = 6) -> str:
    """'100ms', '10s', '1.5h', '7d': the largest unit that keeps the number >= 1."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size:
            return f"{seconds / size:.{digits}g}{unit}"
    return f"{seconds * 1e3:.{digits}g}ms"


def check_range(value: float, where: str, low: float | None, high: float | None,
                show=lambda v: f"{v:g}") -> None:
    """ConfigError unless low <= value <= high (either bound may be None: open)."""
    if (low is not None and not value >= low) or (high is not None and not value <= high):
        lo = "" if low is None else show(low)
        hi = "" if high is None else show(high)
        span = f"between {lo} and {hi}" if lo and hi else (f"at least {lo}" if lo else
                                                         f"at most {hi}")
        raise ConfigError(f"{where}: must be {span}, got {show(value)}")


def parse_seed(value: Any, where: str) -> int:
    """A simulation seed: an integer numpy's generators take (0 .. 2**63 - 1)."""
    seed = _typed(value, int, where)
    check_range(seed, where, 0, MAX_SEED, str)
    return seed


def parse_listen(value: str, where: str) -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: {value!r} is not HOST:PORT (e.g. :{DEFAULT_PORT})")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


@dataclass(frozen=True)
class CollectorConfig:
    enabled: bool
    interval: float | None  # None: the fast or slow loop's interval
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    listen_address: str = DEFAULT_LISTEN
    web_config_file: str = ""
    web_max_connections: int = 256  # open connections at once, idle keep-alive ones included
    web_header_timeout: float = 10.0  # TLS handshake, then request line and headers
    web_idle_timeout: float = 120.0  # a keep-alive connection between requests
    procfs: str = "/proc"
    sysfs: str = "/sys"
    varlog: str = "/var/log"
    fast_interval: float = 0.1
    slow_interval: float = 1.0
    window_seconds: float = 600.0
    stats_seconds: float = 60.0
    idle_threshold: float = 0.05
    analysis_interval: float = 10.0
    analysis_max_interval: float = 30.0
    analysis_window: float = 60.0
    fake_nvml: str = ""
    simulate: str = ""  # a simulation scenario: fake GPUs, /proc and /sys from the simulator
    simulate_seed: int | None = None
    log_level: str = "info"
    probe_state_file: str = DEFAULT_STATE_FILE  # `agentd probe`'s ceilings ("" for none)
    collectors: dict[str, CollectorConfig] = field(default_factory=dict)
    source: str = ""  # the config file read, if any

    def collector(self, name: str) -> CollectorConfig:
        return self.collectors[name]

    def sampler_interval(self, name: str) -> float:
        """The interval a sampler runs at: its own, else its loop's."""
        own = self.collector(name).interval
        if own is not None:
            return own
        return self.fast_interval if registry()[name].default_rate == "fast" else \
            self.slow_interval


# Bounds of the durations (seconds), documented in docs/daemon.md; None: set by another
# option (a window at most the window) or by memory (the window itself, WINDOW_MEMORY_CAP).
BOUNDS = {
    "fast_interval": (0.01, 10.0),
    "slow_interval": (0.1, 600.0),
    "window_seconds": (10.0, None),
    "stats_seconds": (1.0, None),
    "analysis_interval": (1.0, 3600.0),
    "analysis_max_interval": (1.0, 3600.0),
    "analysis_window": (10.0, None),
    "web_header_timeout": (0.1, 600.0),
    "web_idle_timeout": (0.1, 86400.0),
}
COLLECTOR_INTERVAL = (0.01, 86400.0)
WINDOW_MEMORY_CAP = 2 * 2**30  # bytes the high-rate window may reserve at most
MAX_SEED = 2**63 - 1


def window_bytes(cfg: Config) -> int:
    """The most memory the window can take under `cfg`: every enabled sampler's ring full,
    at its maximum number of columns (agentd.daemon.window.ring_bytes)."""
    from agentd.daemon.window import ring_bytes, ring_rows

    return sum(ring_bytes(ring_rows(cfg.window_seconds, cfg.sampler_interval(name)),
                          cls.window_columns)
               for name, cls in registry().items()
               if cls.window_columns and cfg.collector(name).enabled)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError


def longest_window(cfg: Config) -> float:
    """About the longest window (seconds) that fits in WINDOW_MEMORY_CAP at cfg's intervals."""
    hour = window_bytes(replace(cfg, window_seconds=3600.0))
    return 3600.0 * WINDOW_MEMORY_CAP / hour if hour else math.inf


def check_window_memory(cfg: Config, what: str) -> None:
    """ConfigError when the window `what` names would need more than WINDOW_MEMORY_CAP."""
    need = window_bytes(cfg)
    if need > WINDOW_MEMORY_CAP:
        raise ConfigError(
            f"{what} of {format_duration(cfg.window_seconds)} would take up to "
            f"{format_bytes(need)} of memory at a {format_duration(cfg.fast_interval)} fast "
            f"interval; at most {format_bytes(WINDOW_MEMORY_CAP)} is allowed, about "
            f"{format_duration(longest_window(cfg), 3)}: shorten it or lengthen the intervals")


def _default_collectors() -> dict[str, CollectorConfig]:
    return {
        name: CollectorConfig(cls.default_enabled, cls.default_interval,
                              {k: o.default for k, o in cls.options.items()})
        for name, cls in registry().items()
    }


def _typed(value: Any, typ: type, where: str):
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ is Duration:
        return parse_duration(value, where)
    if typ in (int, float):
        if isinstance(value, bool) or typ is int and isinstance(value, float) and \
                not value.is_integer():
            raise ConfigError(f"{where}: expected {'an integer' if typ is int else 'a number'}"
                              f", got {value!r}")
        try:
            return typ(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected {'an integer' if typ is int else 'a number'}"
                              f", got {value!r}") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


_SECTIONS = {
    "web": {"listen_address": "listen_address", "config_file": "web_config_file",
            "max_connections": "web_max_connections", "header_timeout": "web_header_timeout",
            "idle_timeout": "web_idle_timeout"},
    "paths": {"procfs": "procfs", "sysfs": "sysfs", "varlog": "varlog"},
    "sampling": {"fast_interval": "fast_interval", "slow_interval": "slow_interval",
                 "window": "window_seconds", "stats_window": "stats_seconds",
                 "idle_threshold": "idle_threshold"},
    "gpu": {"fake_nvml": "fake_nvml"},
    "analysis": {"interval": "analysis_interval", "max_interval": "analysis_max_interval",
                 "window": "analysis_window"},
    "log": {"level": "log_level"},
    "probe": {"state_file": "probe_state_file"},
}


def _apply(cfg: Config, values: dict[str, Any], label) -> Config:
    """Set Config fields from {field: raw value}, validating each; label(field) names the
    key or flag in error messages."""
    changes: dict[str, Any] = {}
    for name, raw in values.items():
        w = label(name)
        if name in BOUNDS:
            changes[name] = parse_duration(raw, w, *BOUNDS[name])
        elif name == "web_max_connections":
            v = _typed(raw, int, w)
            if not 1 <= v <= 65536:
                raise ConfigError(f"{w}: must be between 1 and 65536")
            changes[name] = v
        elif name == "idle_threshold":
            v = _typed(raw, float, w)
            if not 0 <= v < 1:
                raise ConfigError(f"{w}: must be in [0, 1)")
            changes[name] = v
        elif name == "listen_address":
            parse_listen(_typed(raw, str, w), w)
            changes[name] = raw
        elif name == "log_level":
            if raw not in LEVELS:
                raise ConfigError(f"{w}: expected one of {', '.join(LEVELS)}")
            changes[name] = raw
        else:
            changes[name] = _typed(raw, str, w)
    return replace(cfg, **changes)


def _apply_collector(cfg: Config, name: str, key: str, raw: Any, where: str) -> Config:
    classes = registry()
    if name not in classes:
        raise ConfigError(f"{where}: unknown collector {name!r} (known: {', '.join(classes)})")
    cur = cfg.collectors[name]
    if key == "enabled":
        cur = replace(cur, enabled=_typed(raw, bool, where))
    elif key == "interval":
        cur = replace(cur, interval=parse_duration(raw, where, *COLLECTOR_INTERVAL))
    elif key in classes[name].options:
        opt = classes[name].options[key]
        value = _typed(raw, opt.type, where)
        if opt.bounds is not None:
            check_range(value, where, *opt.bounds,
                        format_duration if opt.type is Duration else lambda v: f"{v:g}")
        if opt.check is not None:
            try:
                opt.check(value)
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
        cur = replace(cur, options={**cur.options, key: value})
    else:
        known = ", ".join(["enabled", "interval", *classes[name].options])
        raise ConfigError(f"{where}: unknown option {key!r} for collector {name} "
                          f"(known: {known})")
    return replace(cfg, collectors={**cfg.collectors, name: cur})


def load_file(path: str, cfg: Config | None = None) -> Config:
    cfg = cfg or Config(collectors=_default_collectors())
    doc = read_toml(path, "config file", ConfigError)
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for section, table in doc.items():
        if section == "collectors":
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: [collectors] must be a table")
            for name, opts in table.items():
                if not isinstance(opts, dict):
                    raise ConfigError(f"{path}: [collectors.{name}] must be a table")
                for key, raw in opts.items():
                    cfg = _apply_collector(cfg, name, key, raw,
                                           f"{path}: collectors.{name}.{key}")
            continue
        if section not in _SECTIONS or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{section}]")
        for key, raw in table.items():
            if key not in _SECTIONS[section]:
                raise ConfigError(f"{path}: unknown key {section}.{key}")
            values[_SECTIONS[section][key]] = raw
            keys[_SECTIONS[section][key]] = f"{path}: {section}.{key}"
    cfg = _apply(cfg, values, keys.get)
    return replace(cfg, source=path)


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config.file", dest="config_file", metavar="FILE",
                   help="TOML configuration file (reloaded on SIGHUP)")
    p.add_argument("--web.listen-address", dest="listen_address", metavar="HOST:PORT",
                   help=f"address to serve /metrics and the window on (default {DEFAULT_LISTEN})")
    p.add_argument("--web.config.file", dest="web_config_file", metavar="FILE",
                   help="web configuration (TLS, basic auth) in node_exporter's format")
    p.add_argument("--web.max-connections", dest="web_max_connections", metavar="N",
                   help="HTTP connections open at once; an idle one is closed to make room "
                        "(default 256)")
    p.add_argument("--web.header-timeout", dest="web_header_timeout", metavar="DURATION",
                   help="time a client has for the TLS handshake, then for the request line "
                        "and headers (default 10s)")
    p.add_argument("--web.idle-timeout", dest="web_idle_timeout", metavar="DURATION",
                   help="keep-alive connections idle this long are closed (default 2m)")
    p.add_argument("--path.procfs", dest="procfs", metavar="DIR", help="procfs mount point")
    p.add_argument("--path.sysfs", dest="sysfs", metavar="DIR", help="sysfs mount point")
    p.add_argument("--path.varlog", dest="varlog", metavar="DIR",
                   help="/var/log, whose containers/ and pods/ (the kubelet's) name the "
                   "Kubernetes pods of GPU processes (default /var/log)")
    p.add_argument("--sampling.fast-interval", dest="fast_interval", metavar="DURATION",
                   help="fast loop interval (default 100ms; 10ms..10s)")
    p.add_argument("--sampling.slow-interval", dest="slow_interval", metavar="DURATION",
                   help="slow loop interval (default 1s; 100ms..10m, at least the fast one)")
    p.add_argument("--sampling.window", dest="window_seconds", metavar="DURATION",
                   help="high-rate window length (default 10m; at least 10s, at most what "
                   f"fits in {format_bytes(WINDOW_MEMORY_CAP)}: about "
                   f"{format_duration(longest_window(Config(collectors=_default_collectors())), 2)}"
                   " at the default intervals)")
    p.add_argument("--sampling.stats-window", dest="stats_seconds", metavar="DURATION",
                   help="window the agentd_gpu_window_* statistics cover (default 60s; "
                   "1s..the window)")
    p.add_argument("--sampling.idle-threshold", dest="idle_threshold", metavar="RATIO",
                   help="GPU utilization below which a fast tick counts as idle (default 0.05; "
                   "0..1)")
    p.add_argument("--analysis.interval", dest="analysis_interval", metavar="DURATION",
                   help="how often the rolling analysis looks at the window, and runs "
                        "while the GPUs' busy time, SM activity, clocks or power move or a "
                        "finding is held at warning (default 10s; 1s..1h)")
    p.add_argument("--analysis.max-interval", dest="analysis_max_interval",
                   metavar="DURATION",
                   help="the longest time between two runs while the GPUs' levels stay "
                        "where the last run saw them and no finding is held at warning "
                        "(default 30s; 1s..1h; never less than --analysis.interval)")
    p.add_argument("--analysis.window", dest="analysis_window", metavar="DURATION",
                   help="what each analysis run looks back over (default 60s; 10s..the window)")
    p.add_argument("--fake-nvml", dest="fake_nvml", metavar="SCENARIO",
                   help="use fake GPUs described by SCENARIO: a file, or a name from "
                   f"agentd/scenarios (e.g. h100x8-steady; or set {FAKE_NVML_ENV})")
    p.add_argument("--simulate", dest="simulate", metavar="SCENARIO",
                   help="serve a simulated node: a scenario name (agentd/scenarios/sim) or file")
    p.add_argument("--simulate.seed", dest="simulate_seed", metavar="N",
                   help="draw the scenario's randomized parameters with this seed (an integer "
                   ">= 0)")
    p.add_argument("--simulate-cluster", dest="simulate_cluster", metavar="SCENARIO",
                   help="serve every node of a simulated multi-node job, node K on the "
                   "listen port + K: a scenario name (agentd/scenarios/cluster) or file")
    p.add_argument("--simulate.nodes", dest="simulate_nodes", metavar="N", type=int,
                   help="with --simulate-cluster: the job's nodes (default: the scenario's)")
    p.add_argument("--simulate.gpus", dest="simulate_gpus", metavar="N", type=int,
                   help="with --simulate-cluster: GPUs per node (default: the scenario's)")
    p.add_argument("--log.level", dest="log_level", choices=LEVELS, help="log level")
    p.add_argument("--probe.state-file", dest="probe_state_file", metavar="FILE",
                   help="ceilings measured by `agentd probe`, read at start and on SIGHUP "
                   f"(default {DEFAULT_STATE_FILE}; empty: none)")
    for name, cls in registry().items():
        g = p.add_argument_group(f"collector {name}", cls.help)
        state = "enabled" if cls.default_enabled else "disabled"
        g.add_argument(f"--collector.{name}", dest=f"collector:{name}:enabled",
                       action="store_const", const=True, help=f"enable ({state} by default)")
        g.add_argument(f"--no-collector.{name}", dest=f"collector:{name}:enabled",
                       action="store_const", const=False, help="disable")
        g.add_argument(f"--collector.{name}.interval", dest=f"collector:{name}:interval",
                       metavar="DURATION", help="own interval instead of the loop's "
                       f"({format_duration(COLLECTOR_INTERVAL[0])}.."
                       f"{format_duration(COLLECTOR_INTERVAL[1])})")
        for key, opt in cls.options.items():
            # A boolean option alone switches it on: --collector.cpu.per-core
            flag = {"nargs": "?", "const": True} if opt.type is bool else {}
            show = format_duration if opt.type is Duration else repr
            span = "" if opt.bounds is None else \
                f"; {show(opt.bounds[0])}..{show(opt.bounds[1])}"
            g.add_argument(f"--collector.{name}.{key.replace('_', '-')}",
                           dest=f"collector:{name}:{key}", metavar=opt.type.__name__.upper(),
                           help=f"{opt.help} (default {show(opt.default)}{span})", **flag)


_FLAG_NAMES = {
    "listen_address": "--web.listen-address", "web_config_file": "--web.config.file",
    "web_max_connections": "--web.max-connections",
    "web_header_timeout": "--web.header-timeout", "web_idle_timeout": "--web.idle-timeout",
    "procfs": "--path.procfs", "sysfs": "--path.sysfs", "varlog": "--path.varlog",
    "fast_interval": "--sampling.fast-interval", "slow_interval": "--sampling.slow-interval",
    "window_seconds": "--sampling.window", "stats_seconds": "--sampling.stats-window",
    "idle_threshold": "--sampling.idle-threshold", "fake_nvml": "--fake-nvml",
    "log_level": "--log.level", "simulate": "--simulate",
    "analysis_interval": "--analysis.interval", "analysis_window": "--analysis.window",
    "analysis_max_interval": "--analysis.max-interval",
    "probe_state_file": "--probe.state-file",
}
_RUN_FIELDS = ("listen_address", "web_config_file", "web_max_connections",
               "web_header_timeout", "web_idle_timeout", "procfs", "sysfs", "varlog",
               "fast_interval", "slow_interval", "window_seconds", "stats_seconds",
               "idle_threshold", "fake_nvml", "log_level", "simulate", "analysis_interval",
               "analysis_max_interval", "analysis_window", "probe_state_file")


def build(args: argparse.Namespace, env: dict[str, str] | None = None) -> Config:
    """Defaults, then the config file (if any), then the environment, then flags."""
    env = os.environ if env is None else env
    cfg = Config(collectors=_default_collectors())
    path = getattr(args, "config_file", None)
    if path:
        cfg = load_file(path, cfg)
    if env.get(FAKE_NVML_ENV):
        cfg = replace(cfg, fake_nvml=env[FAKE_NVML_ENV])
    flags = {f: getattr(args, f) for f in _RUN_FIELDS if getattr(args, f, None) is not None}
    cfg = _apply(cfg, flags, _FLAG_NAMES.get)
    for dest, raw in vars(args).items():
        if dest.startswith("collector:") and raw is not None:
            _, name, key = dest.split(":", 2)
            flag = f"--collector.{name}" + ("" if key == "enabled" else
                                            f".{key.replace('_', '-')}")
            cfg = _apply_collector(cfg, name, key, raw, flag)
    if cfg.slow_interval < cfg.fast_interval:
        raise ConfigError("the slow interval must not be shorter than the fast interval")
    if cfg.window_seconds < cfg.stats_seconds:
        raise ConfigError("the window must be at least as long as the stats window")
    if cfg.window_seconds < cfg.analysis_window:
        raise ConfigError("the window must be at least as long as the analysis window")
    check_window_memory(cfg, "the window (sampling.window, --sampling.window)")
    if getattr(args, "simulate_seed", None) is not None:
        cfg = replace(cfg, simulate_seed=parse_seed(args.simulate_seed, "--simulate.seed"))
    if cfg.simulate:
        from agentd.sim.scenario import ScenarioError, load

        if cfg.fake_nvml:
            raise ConfigError("--simulate and --fake-nvml exclude each other")
        try:
            load(cfg.simulate, cfg.simulate_seed)
        except ScenarioError as e:
            raise ConfigError(str(e)) from None
    if cfg.fake_nvml:
        # Read it now (a file, or a name from the library), so that a bad scenario is a
        # configuration error here and on reload, not a failure once the daemon is serving.
        from agentd.gpu.fake import ScenarioError as FakeScenarioError, load_scenario

        try:
            load_scenario(cfg.fake_nvml)
        except FakeScenarioError as e:
            raise ConfigError(str(e)) from None
    for name in ("procfs", "sysfs"):
        if not os.path.isdir(getattr(cfg, name)):
            raise ConfigError(f"--path.{name}: {getattr(cfg, name)!r} is not a directory")
    if cfg.web_config_file:
        from agentd.daemon.webconfig import WebConfigError, load_web_config

        try:
            load_web_config(cfg.web_config_file)  # certificates, keys, hashes: all checked now
        except WebConfigError as e:
            raise ConfigError(str(e)) from None
    return cfg
