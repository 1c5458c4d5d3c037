"""The `agentd` command line.

Exit codes: 0 success; 2 usage or configuration error (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys

from agentd import __version__

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line and exits 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _fail(message: str) -> int:
    print(f"agentd: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_run(args: argparse.Namespace) -> int:
    from agentd import config as configmod
    from agentd import logs
    from agentd.daemon import Daemon
    from agentd.gpu.fake import ScenarioError
    from agentd.webconfig import WebConfigError

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
    from agentd.config import ConfigError, parse_listen
    from agentd.demo import run_demo
    from agentd.sim.scenario import ScenarioError, load

    try:
        parse_listen(args.listen_address, "--web.listen-address")
        load(args.scenario, args.seed)
    except (ConfigError, ScenarioError) as e:
        return _fail(str(e))
    logs.setup("warning")
    try:
        return run_demo(args.scenario, args.seed, args.listen_address, args.seconds)
    except ConfigError as e:
        return _fail(str(e))


def cmd_catalog(args: argparse.Namespace) -> int:
    from agentd.catalog import METRICS, render_markdown

    if args.markdown:
        sys.stdout.write(render_markdown())
    else:
        for m in METRICS:
            print(f"{m.name}\t{m.type}\t{','.join(m.labels)}\t{m.help}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from agentd.config import add_run_flags

    p = _Parser(prog="agentd", description="Is this node's GPU input pipeline starved, and why?")
    p.add_argument("--version", action="version", version=f"agentd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser("run", help="run the node daemon (samplers, window, /metrics)",
                         description="Run the node daemon.")
    add_run_flags(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="a simulated starved 8-GPU node, live",
                          description="Run a simulated 8-GPU node whose input pipeline is "
                          "starved, serve its metrics, and show what agentd sees.")
    demo.add_argument("--scenario", default="input-storage",
                      help="scenario name (agentd/scenarios/sim) or file (default input-storage)")
    demo.add_argument("--seed", type=int, default=None, help="randomize the scenario")
    demo.add_argument("--web.listen-address", dest="listen_address", default="127.0.0.1:9445",
                      help="where to serve /metrics (default 127.0.0.1:9445)")
    demo.add_argument("--seconds", type=float, default=0,
                      help="stop after this long (default: until Ctrl-C)")
    demo.set_defaults(func=cmd_demo)

    cat = sub.add_parser("catalog", help="print the metric table",
                         description="Print the metric and signal table.")
    cat.add_argument("--markdown", action="store_true", help="as docs/metrics.md")
    cat.set_defaults(func=cmd_catalog)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # the last line of defence: one line, not a traceback
        logging.getLogger("agentd").debug("unhandled error", exc_info=True)
        print(f"agentd: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
