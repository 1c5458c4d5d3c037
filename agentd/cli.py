"""The `agentd` command line.

Every failure is one line on stderr and an exit status from agentd/exitcodes.py (each
command's --help lists its own): 2 for a problem with what was given, found before anything
starts; 3 a source that cannot be read; 4 an output that cannot be written; 70 a bug.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import traceback
import warnings

from agentd import __version__
from agentd.exitcodes import INTERRUPTED, OUTPUT, SOFTWARE, SOURCE, USAGE, OutputError, \
    epilog, write_stdout


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line and exits 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(USAGE, f"{self.prog}: error: {message}\n")


def _fail(message: str, code: int = USAGE, prefix: str = "agentd: error") -> int:
    print(f"{prefix}: {message}", file=sys.stderr)
    return code


def _duration(value, flag: str) -> float:
    from agentd.daemon.config import parse_duration

    return parse_duration(value, flag)


def _number(value, flag: str, positive: bool = True) -> float:
    """A finite number from a flag: > 0, or >= 0 when not `positive`."""
    from agentd.daemon.config import ConfigError

    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag}: expected a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ConfigError(f"{flag}: must be a {'positive' if positive else 'non-negative'} "
                          f"finite number, got {value!r}")
    return v


def _url(value: str, flag: str) -> str:
    from agentd.daemon.config import ConfigError
    from agentd.diagnose.sources.http import url_problem

    problem = url_problem(value)
    if problem:
        raise ConfigError(f"{flag}: {problem}")
    return value


def cmd_run(args: argparse.Namespace) -> int:
    from agentd.daemon import config as configmod
    from agentd import logs
    from agentd.daemon.core import Daemon
    from agentd.gpu.fake import ScenarioError
    from agentd.daemon.webconfig import WebConfigError

    if getattr(args, "simulate_cluster", None):
        from agentd.sim.serve import run_cluster

        return run_cluster(args)
    if getattr(args, "simulate_nodes", None) is not None or \
            getattr(args, "simulate_gpus", None) is not None:
        return _fail("--simulate.nodes and --simulate.gpus go with --simulate-cluster")
    try:
        cfg = configmod.build(args)
    except configmod.ConfigError as e:
        return _fail(str(e))
    logs.setup(cfg.log_level)
    daemon = Daemon(cfg, reload_config=lambda: configmod.build(args))
    try:
        daemon.serve()
    except (configmod.ConfigError, WebConfigError, ScenarioError) as e:
        daemon.stop()
        return _fail(str(e))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from agentd import logs
    from agentd.daemon.config import ConfigError, parse_listen, parse_seed
    from agentd.sim.demo import run_demo
    from agentd.sim.scenario import ScenarioError, load

    if args.cluster:
        return _cluster_demo(args)
    if args.nodes is not None or args.gpus is not None or args.onset is not None:
        return _fail("--nodes, --gpus and --onset go with --cluster")
    args.scenario = args.scenario or "input-storage"
    try:
        parse_listen(args.listen_address, "--web.listen-address")
        seed = None if args.seed is None else parse_seed(args.seed, "--seed")
        seconds = _duration(args.seconds, "--seconds") if args.seconds else None
        load(args.scenario, seed)
    except (ConfigError, ScenarioError) as e:
        return _fail(str(e))
    logs.setup("warning")
    try:
        return run_demo(args.scenario, seed, args.listen_address, seconds)
    except ConfigError as e:
        return _fail(str(e))


def _cluster_demo(args: argparse.Namespace) -> int:
    from agentd import logs
    from agentd.daemon.config import ConfigError, parse_listen, parse_seed
    from agentd.daemon.webconfig import WebConfigError
    from agentd.sim.cluster_demo import run_cluster_demo
    from agentd.sim.cluster_scenario import ScenarioError, load

    from agentd.cluster.causes import MIN_PEERS

    scenario = args.scenario or "throttled"
    nodes = 4 if args.nodes is None else args.nodes
    if nodes < MIN_PEERS:
        return _fail(f"--nodes: the cluster analysis compares each node with its peers' "
                     f"median, which takes at least {MIN_PEERS} nodes, got {nodes}")
    try:
        parse_listen(args.listen_address, "--web.listen-address")
        seed = None if args.seed is None else parse_seed(args.seed, "--seed")
        seconds = _duration(args.seconds, "--seconds") if args.seconds else None
        onset = 45.0 if args.onset is None else (
            0.0 if str(args.onset).strip() in ("0", "0s") else _duration(args.onset, "--onset"))
        load(scenario, seed, nodes, args.gpus)
    except (ConfigError, ScenarioError) as e:
        return _fail(str(e))
    logs.setup("warning")
    try:
        return run_cluster_demo(scenario, seed, args.listen_address, seconds, nodes,
                                args.gpus, onset)
    except (ConfigError, WebConfigError) as e:
        return _fail(str(e))


def _live_config(args: argparse.Namespace):
    from agentd.daemon import config as configmod

    ns = argparse.Namespace(**{k: getattr(args, k, None) for k in (
        "config_file", "procfs", "sysfs", "fake_nvml", "simulate", "simulate_seed",
        "fast_interval", "slow_interval", "log_level")})
    return configmod.build(ns)


def _parse_time(value: str, now: float, flag: str) -> float:
    import datetime

    from agentd.daemon.config import ConfigError

    v = value.strip()
    if v == "now":
        return now
    try:
        t = float(v)
    except ValueError:
        try:
            t = datetime.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError, OSError):
            raise ConfigError(f"{flag}: {value!r} is neither Unix seconds nor an RFC 3339 "
                              "time") from None
    if not (math.isfinite(t) and 0 <= t < 1e11):
        raise ConfigError(f"{flag}: {value!r} is not a time after 1970 and before 5000")
    return t


def _http_options(args: argparse.Namespace):
    """Deadline, credentials and CA for the daemon and Prometheus sources; the files are
    checked here, so that a missing one is a usage error, not an unreachable source."""
    from agentd.daemon.config import ConfigError
    from agentd.diagnose.sources.http import env_options

    deadline = _duration(args.timeout, "--timeout") if getattr(args, "timeout", None) \
        else None
    opts = env_options(deadline, getattr(args, "auth_file", None),
                       getattr(args, "ca_file", None), getattr(args, "insecure", False))
    for path, flag in ((opts.auth_file, "--auth-file"), (opts.ca_file, "--ca-file")):
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise ConfigError(f"{flag} {path}: {e.strerror}") from None
    return opts


def _check_diagnose_flags(args: argparse.Namespace) -> None:
    """Turn the numeric flags into numbers, or raise ConfigError (before any sampling)."""
    from agentd.daemon.config import ConfigError

    if args.seconds is not None:
        args.seconds = _duration(args.seconds, "--seconds")
    for flag in ("samples_per_step", "tokens_per_step"):
        if getattr(args, flag) is not None:
            setattr(args, flag, _number(getattr(args, flag), "--" + flag.replace("_", "-")))
    if args.price_per_gpu_hour is not None:
        args.price_per_gpu_hour = _number(args.price_per_gpu_hour, "--price-per-gpu-hour",
                                          positive=False)
    for flag in ("daemon", "prometheus"):
        if getattr(args, flag) is not None:
            _url(getattr(args, flag), "--" + flag)
    if args.node is not None and not args.node.strip():
        raise ConfigError("--node is empty")


def _source(args: argparse.Namespace):
    """The source the flags name (a usage problem raises ConfigError)."""
    import time

    from agentd.daemon import config as configmod

    if args.daemon:
        from agentd.diagnose.sources.daemon import DaemonSource

        return DaemonSource(args.daemon, args.seconds or 600, _http_options(args))
    if args.recording:
        from agentd.diagnose.sources.recording import RecordingSource

        return RecordingSource(args.recording, args.seconds)
    if args.prometheus:
        from agentd.diagnose.sources.prometheus_agentd import AgentdPrometheusSource, detect
        from agentd.diagnose.sources.prometheus_exporters import ExportersPrometheusSource
        from agentd.diagnose.sources.promclient import PromClient

        if not args.node and not args.cluster:
            raise configmod.ConfigError("--prometheus needs --node HOST (or a label matcher), "
                                        "or --cluster")
        now = time.time()
        end = _parse_time(args.end, now, "--end")
        start = _parse_time(args.start, now, "--start") if args.start else \
            end - _duration(args.last, "--last")
        step = None if args.step in (None, "auto") else _duration(args.step, "--step")
        if end <= start:
            raise configmod.ConfigError("--end must be after --start")
        client = PromClient(args.prometheus, _http_options(args))
        if args.cluster:
            from agentd.cluster.source import ClusterSource

            return ClusterSource(client, start, end, step, selector=args.selector or "",
                                 group_by=args.group_by, node_label=args.node_label,
                                 flavour=args.flavour)
        flavour = args.flavour if args.flavour != "auto" else detect(client, args.node, end)
        cls = AgentdPrometheusSource if flavour == "agentd" else ExportersPrometheusSource
        src = cls(args.prometheus, args.node, start, end, step, client=client)
        src.auto = args.flavour == "auto"
        return src
    from agentd.diagnose.sources.live import LiveSource, sampling_config

    seconds = args.seconds or 60.0
    cfg = _live_config(args)
    sampling_config(cfg, seconds)  # a window too large for memory is a usage error, now
    return LiveSource(seconds, cfg)


def _cluster_flags(args: argparse.Namespace) -> float:
    """Checks the --cluster flags; the analysis window in seconds."""
    from agentd.daemon import config as configmod
    from agentd.rules import _SELECTOR

    if not args.prometheus:
        raise configmod.ConfigError("--cluster reads a Prometheus server: give --prometheus "
                                    "URL")
    if args.node:
        raise configmod.ConfigError("--cluster compares the nodes of each job: use --selector "
                                    "to narrow the nodes, not --node")
    if args.selector and not _SELECTOR.match(args.selector.strip().strip("{}")):
        raise configmod.ConfigError(f"--selector: {args.selector!r} is not a list of label "
                                    "matchers (e.g. '{cluster=\"eu1\",rack=~\"r1.*\"}')")
    for flag, label in (("--group-by", args.group_by), ("--node-label", args.node_label)):
        if label is not None and not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", label):
            raise configmod.ConfigError(f"{flag}: {label!r} is not a label name")
    window = _duration(args.window, "--window")
    if window < 60:
        raise configmod.ConfigError("--window must be at least 1m")
    return window


def _state_file(args: argparse.Namespace) -> dict | None:
    """--state-file's ceilings (ConfigError when it cannot be used)."""
    from agentd.daemon.config import ConfigError
    from agentd.probe import state

    if not args.state_file:
        return None
    if args.cluster:
        raise ConfigError("--state-file holds one node's ceilings: not with --cluster")
    try:
        return state.load(args.state_file)
    except FileNotFoundError:
        raise ConfigError(f"--state-file {args.state_file}: no such file") from None
    except state.StateError as e:
        raise ConfigError(f"--state-file: {e}") from None


def cmd_diagnose(args: argparse.Namespace) -> int:
    from agentd import diagnose as D
    from agentd import logs
    from agentd.daemon import config as configmod
    from agentd.diagnose.plot import PlotUnavailable, check_target

    logs.setup(args.log_level or "error")  # what matters ends in the report or its error
    try:
        try:
            _check_diagnose_flags(args)
            if args.plot:
                check_target(args.plot)  # before sampling: matplotlib, file type, directory
            if args.cluster:
                window = _cluster_flags(args)
            ceilings = _state_file(args)
            source = _source(args)
        except configmod.ConfigError as e:
            return _fail(str(e))
        if args.cluster:
            from agentd.cluster.run import report_and_exit

            return report_and_exit(source, args, window)
        sig = source.read()
        if ceilings is not None:
            sig.meta["ceilings"] = ceilings  # judged against these, not the source's
        return D.report_and_exit(sig, args)
    except PlotUnavailable as e:
        return _fail(str(e))
    except D.SourceError as e:
        return _fail(str(e), D.EXIT_SOURCE, "agentd diagnose")
    except D.OutputError as e:
        return _fail(str(e), OUTPUT, "agentd diagnose")


def cmd_record(args: argparse.Namespace) -> int:
    from agentd import diagnose as D
    from agentd import logs
    from agentd.daemon import config as configmod
    from agentd.diagnose.record import record
    from agentd.diagnose.sources.live import sampling_config

    logs.setup(args.log_level or "error")  # what matters ends in the report or its error
    try:
        seconds = _duration(args.duration, "--duration")
        flush = _duration(args.flush_interval, "--flush-interval")
        if args.daemon:
            _url(args.daemon, "--daemon")
        cfg = None if args.daemon else _live_config(args)
        if cfg is not None:
            sampling_config(cfg, seconds, flush)
        http = _http_options(args)
    except configmod.ConfigError as e:
        return _fail(str(e))
    try:
        return record(args.out, seconds, args.daemon, cfg, flush=flush, http=http)
    except D.OutputError as e:
        return _fail(str(e), OUTPUT, "agentd record")
    except D.SourceError as e:
        return _fail(str(e), SOURCE, "agentd record")


def cmd_probe(args: argparse.Namespace) -> int:
    from agentd.probe.run import main as probe

    return probe(args)


def _add_http_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reaching a daemon or Prometheus")
    g.add_argument("--auth-file", metavar="FILE",
                   help="basic-auth credentials, user:password on the first line "
                   "(default $AGENTD_AUTH_FILE)")
    g.add_argument("--ca-file", metavar="FILE",
                   help="CA certificates to verify the server (default $AGENTD_CA_FILE)")
    g.add_argument("--insecure-skip-verify", dest="insecure", action="store_true",
                   help="do not verify the server's TLS certificate")
    g.add_argument("--timeout", default="60s", metavar="DURATION",
                   help="deadline for each request, body included (default 60s)")


def _add_live_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling this node (when no other source is given)")
    g.add_argument("--config.file", dest="config_file", metavar="FILE")
    g.add_argument("--path.procfs", dest="procfs", metavar="DIR")
    g.add_argument("--path.sysfs", dest="sysfs", metavar="DIR")
    g.add_argument("--fake-nvml", dest="fake_nvml", metavar="SCENARIO")
    g.add_argument("--simulate", dest="simulate", metavar="SCENARIO",
                   help="sample a simulated node instead of this one")
    g.add_argument("--simulate.seed", dest="simulate_seed", type=int, metavar="N")
    g.add_argument("--sampling.fast-interval", dest="fast_interval", metavar="DURATION")
    g.add_argument("--sampling.slow-interval", dest="slow_interval", metavar="DURATION")
    g.add_argument("--log.level", dest="log_level", choices=("debug", "info", "warning",
                                                             "error"))


def cmd_dashboards(args: argparse.Namespace) -> int:
    try:
        import grafanalib  # noqa: F401  (the `dashboards` extra)
    except ImportError:
        return _fail("agentd dashboards needs grafanalib, which is not installed: "
                     "pip install grafanalib (or install agentd from its checkout with "
                     "the extra: pip install './agentd-checkout[dashboards]')")
    from agentd.dashboards import write_all

    if not re.fullmatch(r"[A-Z]{3}", args.currency):
        return _fail(f"--currency: {args.currency!r} is not a currency code (e.g. USD, EUR)")
    try:
        written = write_all(args.out, args.currency)
    except OSError as e:
        return _fail(f"cannot write {e.filename or args.out}: {e.strerror}", OUTPUT)
    for path in written:
        print(path)
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    from agentd.rules import RulesConfig, RulesConfigError, load_config, render
    from agentd.tomlfile import read_toml

    try:
        cfg = load_config(read_toml(args.config, "rules config", RulesConfigError)) \
            if args.config else RulesConfig()
        flags = {k: v for k, v in (("selector", args.selector),
                                   ("runbook_url", args.runbook_url)) if v is not None}
        text = render(load_config(flags, cfg))
    except RulesConfigError as e:
        return _fail(f"rules: {e}")
    if args.out == "-":
        return _print(text)
    try:
        parent = os.path.dirname(args.out)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    except OSError as e:
        return _fail(f"cannot write {args.out}: {e.strerror}", OUTPUT, "agentd rules")
    print(args.out)
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from agentd.catalog import METRICS, render_markdown

    return _print(render_markdown() if args.markdown else "".join(
        f"{m.name}\t{m.type}\t{','.join(m.labels)}\t{m.help}\n" for m in METRICS))


def _print(text: str) -> int:
    """Write `text` to standard output: 0, or 4 and one line when it cannot be written."""
    try:
        write_stdout(text)
    except OutputError as e:
        return _fail(str(e), OUTPUT)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from agentd.daemon.config import add_run_flags

    p = _Parser(prog="agentd", description="Is this node's GPU input pipeline starved, and why?")
    p.add_argument("--version", action="version", version=f"agentd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, epilog=epilog(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    run = command("run", help="run the node daemon (samplers, window, /metrics)",
                  description="Run the node daemon.")
    add_run_flags(run)
    run.set_defaults(func=cmd_run)

    demo = command("demo", help="a simulated starved 8-GPU node (or a multi-node job), live",
                   description="Run a simulated 8-GPU node whose input pipeline is starved, "
                   "serve its metrics, and show what agentd sees; with --cluster, a "
                   "simulated multi-node job with one slow node, every node served on its "
                   "own port, side by side, and the node that holds the job back.")
    demo.add_argument("--scenario", default=None,
                      help="scenario name (agentd/scenarios/sim, or agentd/scenarios/cluster "
                      "with --cluster) or file (default input-storage; throttled with "
                      "--cluster)")
    demo.add_argument("--cluster", action="store_true",
                      help="a multi-node job: node K served on the listen port + K")
    demo.add_argument("--nodes", type=int, default=None,
                      help="with --cluster: the job's nodes (default 4, at least 3)")
    demo.add_argument("--gpus", type=int, default=None,
                      help="with --cluster: GPUs per node (default: the scenario's)")
    demo.add_argument("--onset", default=None, metavar="DURATION",
                      help="with --cluster: when the planted problem starts (default 45s)")
    demo.add_argument("--seed", default=None, metavar="N",
                      help="randomize the scenario with this seed (an integer >= 0)")
    demo.add_argument("--web.listen-address", dest="listen_address", default="127.0.0.1:9445",
                      help="where to serve /metrics (default 127.0.0.1:9445; with --cluster "
                      "the first node's)")
    demo.add_argument("--seconds", default=None, metavar="DURATION",
                      help="stop after this long (default: until Ctrl-C)")
    demo.set_defaults(func=cmd_demo)

    diag = command(
        "diagnose", help="why are the GPUs idle? (live, a daemon, a recording, Prometheus)",
        description="Diagnose GPU starvation.")
    src = diag.add_mutually_exclusive_group()
    src.add_argument("--daemon", metavar="URL", help="a running agentd (http://host:9445)")
    src.add_argument("--recording", metavar="FILE", help="a file written by agentd record")
    src.add_argument("--prometheus", metavar="URL", help="a Prometheus server")
    diag.add_argument("--seconds", default=None, metavar="DURATION",
                      help="how long to sample live (default 60s), or how much to analyse at "
                      "the end of a window or recording (e.g. 90s, 5m, 1h30m)")
    diag.add_argument("--node", help="the node to diagnose in Prometheus (host name)")
    diag.add_argument("--start", help="Prometheus range start (Unix seconds or RFC 3339)")
    diag.add_argument("--end", default="now", help="Prometheus range end (default now)")
    diag.add_argument("--last", default="1h", metavar="DURATION",
                      help="range length when --start is not given (default 1h)")
    diag.add_argument("--step", default="auto", metavar="DURATION",
                      help="Prometheus resolution (default auto: the scrape interval in the "
                      "data)")
    diag.add_argument("--flavour", choices=("auto", "agentd", "exporters"), default="auto",
                      help="agentd's metrics, or dcgm-exporter + node_exporter (default: auto)")
    clu = diag.add_argument_group("the cluster view (--prometheus URL --cluster)")
    clu.add_argument("--cluster", action="store_true",
                     help="compare the nodes of each job: which node holds it back, and why; "
                     "and the fleet's GPU-hours lost")
    clu.add_argument("--selector", metavar="MATCHERS",
                     help="label matchers the nodes' series must carry "
                     "('{cluster=\"eu1\"}'); without job labels they are one peer group")
    clu.add_argument("--group-by", metavar="LABEL",
                     help="the label that names a job (default: Slurm job, HPC job, pod "
                     "owner, systemd unit)")
    clu.add_argument("--node-label", metavar="LABEL",
                     help="the label that names a node in every exporter's series (default: "
                     "the host of instance, or dcgm-exporter's Hostname)")
    clu.add_argument("--window", default="5m",
                     help="analysis window, slid one step at a time (default 5m)")
    diag.add_argument("--json", action="store_true", help="the report as JSON")
    diag.add_argument("--plot", metavar="FILE.png",
                      help="timeline of GPU busy, PCIe, storage and CPU with stalls shaded")
    diag.add_argument("--fail-on", choices=("info", "warning", "critical"), default="warning",
                      help="exit 1 on findings of this severity or worse (default warning)")
    diag.add_argument("--samples-per-step", metavar="N", help="report samples per second")
    diag.add_argument("--tokens-per-step", metavar="N", help="report tokens per second")
    diag.add_argument("--price-per-gpu-hour", metavar="PRICE", help="cost the GPU time lost")
    diag.add_argument("--state-file", metavar="FILE",
                      help="ceilings written by `agentd probe` to judge against, instead of "
                      "those the source carries")
    _add_live_flags(diag)
    _add_http_flags(diag)
    diag.set_defaults(func=cmd_diagnose)

    rec = command("record", help="record the high-rate window to a file",
                  description="Record this node (or a daemon's window) for later "
                  "`agentd diagnose --recording FILE`. SIGINT/SIGTERM stop early and keep "
                  "what was recorded.")
    rec.add_argument("--out", required=True, metavar="FILE", help="recording to write (.npz)")
    rec.add_argument("--duration", default="10m", metavar="DURATION",
                     help="how long to record (default 10m)")
    rec.add_argument("--flush-interval", default="10s", metavar="DURATION",
                     help="how often the rows gathered are appended to --out: what a crash or "
                     "a full disk can lose at most (default 10s)")
    rec.add_argument("--daemon", metavar="URL", help="record from a running agentd")
    _add_live_flags(rec)
    _add_http_flags(rec)
    rec.set_defaults(func=cmd_record)

    dash = command("dashboards", help="write the Grafana dashboards (grafanalib)",
                   description="Generate the Grafana dashboards as JSON.")
    dash.add_argument("--out", default="grafana/dashboards", help="directory to write into")
    dash.add_argument("--currency", default="USD",
                      help="currency of your agentd_gpu_price_per_hour, for the cost panels' "
                      "unit (default USD)")
    dash.set_defaults(func=cmd_dashboards)

    rules = command(
        "rules", help="write the Prometheus recording and alerting rules (a mixin)",
        description="Generate the Prometheus rules from a small config: the selector of "
        "agentd's series, the runbook's URL, thresholds (agentd/rules.py RulesConfig).")
    rules.add_argument("--config", metavar="FILE",
                       help="TOML file with RulesConfig keys (thresholds, durations, "
                       "xid_severity)")
    rules.add_argument("--selector", metavar="MATCHERS",
                       help='label matchers of agentd\'s series (default job="agentd")')
    rules.add_argument("--runbook-url", metavar="URL",
                       help="where docs/runbook.md is hosted; alerts link to its sections")
    rules.add_argument("--out", default="rules/agentd.rules.yml",
                       help="file to write, - for stdout (default rules/agentd.rules.yml)")
    rules.set_defaults(func=cmd_rules)

    from agentd.probe.run import add_flags as add_probe_flags

    probe = command(
        "probe", help="measure this node's storage, host-to-device and CPU ceilings",
        description="Measure the stage ceilings findings compare with (O_DIRECT storage "
        "reads, host-to-device copies, the trainer's CPU) and write them to the state file "
        "the daemon and `diagnose` read. Loads the node for up to --budget: run it when no "
        "training runs.")
    add_probe_flags(probe)
    probe.set_defaults(func=cmd_probe)

    cat = command("catalog", help="print the metric table",
                  description="Print the metric and signal table.")
    cat.add_argument("--markdown", action="store_true", help="as docs/metrics.md")
    cat.set_defaults(func=cmd_catalog)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "log_level", None) != "debug":
        # numpy's notes on all-NaN slices (a signal a source lacks) are no message for an
        # operator's stderr; --log.level debug shows them.
        warnings.simplefilter("ignore", RuntimeWarning)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`agentd catalog | head`): not an error; keep Python from
        # complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug: one line, the traceback only when asked for
        debug = getattr(args, "log_level", None) == "debug" or \
            logging.getLogger("agentd").isEnabledFor(logging.DEBUG)
        where = traceback.extract_tb(e.__traceback__)[-1]
        print(f"agentd: internal error: {type(e).__name__}: {e} (agentd {__version__}, "
              f"{os.path.basename(where.filename)}:{where.lineno}): a bug, please report it"
              + ("" if debug else " with the traceback that --log.level debug prints"),
              file=sys.stderr)
        if debug:
            traceback.print_exception(e, file=sys.stderr)
        return SOFTWARE


if __name__ == "__main__":
    raise SystemExit(main())
