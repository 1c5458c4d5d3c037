"""The rolling analysis' process (started by rolling.py, never by hand).

    python -m agentd.daemon.analyst --channel-fd N --parent-pid P [--log-level L]

Reads "analyze" requests (the window slice as npz bytes, header {step, node, min_rows}) from
its channel, runs agentd.analysis.core.analyze_rolling on them, and answers with the report
as JSON (Report.to_json()) and each finding's headline for the daemon's log. An error in one
run is answered as {"error": ...}; the process lives on. It exits when the channel closes or
the parent dies.
"""

from __future__ import annotations

import json
import logging
import socket
import sys

from agentd.daemon.child import Channel, ChildGone, child_args, child_setup

log = logging.getLogger("agentd.analysis")


def analyze(header: dict, payload: bytes) -> dict:
    from agentd.analysis.core import analyze_rolling
    from agentd.analysis.signals import from_groups
    from agentd.daemon.window import load_npz_with_meta

    groups, meta = load_npz_with_meta(payload)
    node = header.get("node") or meta.get("node", "")
    sig = from_groups(groups, step=header.get("step"), source="window", node=node, meta=meta)
    if len(sig.t) < int(header.get("min_rows", 10)):
        return {"report": None}
    report = analyze_rolling(sig, node=node)
    return {"report": report.to_json(), "headlines": [f.headline() for f in report.findings]}


def main(argv: list[str] | None = None) -> int:
    args = child_args(argv)
    child_setup(args.parent_pid)
    from agentd import logs

    logs.setup(args.log_level)
    channel = Channel(socket.socket(fileno=args.channel_fd))
    # Import the analysis (and scipy) now, not on the first run's clock.
    import agentd.analysis.core  # noqa: F401
    import agentd.analysis.signals  # noqa: F401

    try:
        serve(channel)
    except ChildGone:
        pass  # the parent closed the channel: it stops, or gave up on this run
    return 0


def serve(channel: Channel) -> None:
    """Answer the parent's requests until it closes the channel (ChildGone, from a receive
    or from a send: it may close while this child imports or runs, and stopping then is no
    error to print)."""
    channel.send(0, {"op": "hello"})
    while True:
        rid, header, payload = channel.recv()
        if header.get("op") != "analyze":
            channel.send(rid, {"error": f"unknown operation {header.get('op')!r}"})
            continue
        try:
            answer = json.dumps(analyze(header, payload), allow_nan=False).encode()
        except Exception as e:  # answered, logged, and the next run tried afresh
            log.debug("analysis failed", exc_info=True)
            channel.send(rid, {"error": f"{type(e).__name__}: {e}"})
            continue
        channel.send(rid, {"ok": True}, answer)


if __name__ == "__main__":
    sys.exit(main())
