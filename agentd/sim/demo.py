"""`agentd demo`: a simulated 8-GPU node whose input pipeline is starved, served on /metrics,
with a live terminal view of what agentd sees (and, once analysed, why)."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace

import numpy as np

from agentd.daemon.config import Config, _default_collectors
from agentd.daemon.core import Daemon


def _mean(ring, key: str, since: float) -> float | None:
    if ring is None:
        return None
    t, v = ring.column(key, since)
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else None


def _fmt_rate(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "    -    "
    return f"{v / 1e9:6.2f} GB/s"


def render(daemon: Daemon, now: float, span: float = 2.0) -> str:
    node = daemon.sim_node
    since = now - span
    rings = daemon.window.rings()
    gpu, storage, cpu = rings.get("gpu"), rings.get("storage"), rings.get("cpu")
    lines = [
        f"agentd demo: simulated node, scenario '{node.scenario.name}': "
        f"{node.scenario.description}",
        f"serving http://{daemon.config.listen_address}/metrics  (Ctrl-C to stop)",
        "",
        f"GPU   busy    SM    PCIe RX      (mean of the last {span:.0f} s, from the 10 Hz window)",
    ]
    for i in range(node.scenario.job.gpus):
        busy = _mean(gpu, f"gpu.busy:{i}", since)
        sm = _mean(gpu, f"gpu.sm_active:{i}", since)
        rx = _mean(gpu, f"gpu.pcie_rx:{i}", since)
        bar = "#" * int(round((busy or 0) * 20))
        lines.append(f"{i:>3}  {_pct(busy)}  {_pct(sm)}  {_fmt_rate(rx)}  |{bar:<20}|")
    lines.append("")
    for dev in node.devices:
        rd = _mean(storage, f"disk.read:{dev}", since)
        busy = _mean(storage, f"disk.busy:{dev}", since)
        q = _mean(storage, f"disk.queue:{dev}", since)
        lines.append(f"storage {dev}: read {_fmt_rate(rd)}, busy {_pct(busy)}, "
                     f"queue {q if q is not None else float('nan'):.1f}")
    cores = _mean(cpu, "cpu.busy:", since)
    count = _mean(cpu, "cpu.count:", since)
    iowait = _mean(cpu, "cpu.iowait:", since)
    lines.append(f"CPU: {cores or 0:.1f} of {count or 0:.0f} cores busy, "
                 f"iowait {iowait or 0:.2f} cores")
    lines.append("")
    report = daemon.analysis.current()  # Report.to_json() of the latest run
    if report is None:
        lines.append("Diagnosis: the first analysis runs after 30 s of data.")
    elif not report["findings"]:
        lines.append("Diagnosis: no finding: the GPUs are not starved.")
    else:
        lines.append("Diagnosis (rolling analysis of the last 60 s):")
        for f in report["findings"][:3]:
            advice = f.get("advice") or [""]
            speedup = (f.get("gain") or {}).get("speedup") or 1.0
            lines.append(f"  {f['kind']}: {f.get('summary', '')}")
            lines.append(f"    expected gain {speedup:.2f}x steps per second; {advice[0]}")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "  -  " if v is None else f"{v * 100:4.0f}%"


def run_demo(scenario: str, seed: int | None, listen: str, seconds: float | None,
             out=sys.stdout) -> int:
    """Serve and show the simulated node for `seconds` (None: until Ctrl-C)."""
    cfg = replace(Config(collectors=_default_collectors()), listen_address=listen,
                  simulate=scenario, simulate_seed=seed, log_level="warning")
    daemon = Daemon(cfg)
    try:
        daemon.start()
    except BaseException:
        daemon.stop()  # the address may be in use: stop the samplers and the simulation
        raise
    try:
        return live(lambda: render(daemon, time.time()), seconds, out)
    finally:
        daemon.stop()


def live(frame, seconds: float | None, out=sys.stdout) -> int:
    """Show frame() every second on a terminal (redrawn), every 5 s otherwise, for
    `seconds` (None or 0: until Ctrl-C)."""
    tty = out.isatty()
    deadline = time.time() + seconds if seconds else math.inf
    try:
        time.sleep(2.5)
        while time.time() < deadline:
            text = frame()
            out.write(("\x1b[H\x1b[2J" + text + "\n") if tty else text + "\n\n\n")
            out.flush()
            time.sleep(1.0 if tty else 5.0)
    except KeyboardInterrupt:
        pass
    return 0
