"""What agentd survives, in figures: time to exit on SIGTERM, faults injected into a running
daemon (a /proc file that vanishes, a GPU that falls off the bus, reloads that fail), and
every hostile input of tests/hostile.py with the exit status it got.

    python bench/reliability.py [--runs 10] [--skip-inputs] [--root DIR]

--root runs another checkout's agentd (e.g. a worktree of an older commit) against the same
faults and inputs, for a before/after comparison. Everything runs here, with fake GPUs
(agentd/gpu/fake) and real processes, sockets and files. Figures and their latest values
are in docs/reliability.md; loop rate and memory under HTTP load are bench/load.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import hostile  # noqa: E402  (tests/hostile.py: the table the tests run)

GPUS = """
[[gpus]]
count = {healthy}
step_period_s = 0.4
step_busy_s = 0.3
pcie_rx_bytes_per_second = 3.0e9
"""
LOST = """
[[gpus]]
count = 1
utilization = 0.9
lost_at_s = {lost_at}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """`agentd run` as a child process, on a port of its own, its log in a file. With `port`
    given, the address comes from the configuration file (a flag would override it)."""

    def __init__(self, root: str, workdir: str, *args: str, port: int | None = None):
        self.port = port or free_port()
        listen = [] if port else ["--web.listen-address", f"127.0.0.1:{self.port}"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, f"agentd-{self.port}.log")
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM",
                                                                   "AGENTD_FAKE_NVML")}
        env["PYTHONPATH"] = root
        with open(self.log_path, "w") as log:
            self.p = subprocess.Popen(
                [sys.executable, "-m", "agentd", "run", *listen, *args], stdout=log,
                stderr=subprocess.STDOUT,
                env=env, cwd=workdir)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"agentd exited with {self.p.returncode}: {self.log()}")
            try:
                self.get("/-/ready")
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"agentd did not answer within {timeout:g} s: {self.log()}")

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return r.read()

    def metric(self, prefix: str) -> float | None:
        for line in self.get("/metrics").decode().splitlines():
            if line.startswith(prefix):
                return float(line.rsplit(" ", 1)[1])
        return None

    def gpu_rows(self, seconds: float = 2.0) -> dict[str, int]:
        """Rows with a value per GPU over the last `seconds` of the window."""
        doc = json.loads(self.get(f"/api/v1/window?seconds={seconds:g}"))
        cols = doc["groups"].get("gpu", {}).get("columns", {})
        return {k.split(":", 1)[1]: sum(v is not None for v in vals)
                for k, vals in cols.items() if k.startswith("gpu.busy:")}

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return self.p.returncode

    def alive(self) -> bool:
        return self.p.poll() is None


def wait_for(check, timeout: float, step: float = 0.2):
    """The first truthy value of check() within `timeout` seconds, else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = check()
        if v:
            return v
        time.sleep(step)
    return None


# --- time to exit ------------------------------------------------------------------------------


def sigterm_exit(root: str, work: str, runs: int) -> list[tuple[float, int]]:
    scenario = os.path.join(work, "gpus8.toml")
    with open(scenario, "w") as f:
        f.write(GPUS.format(healthy=8))
    out = []
    for _ in range(runs):
        d = Daemon(root, work, "--fake-nvml", scenario)
        d.wait_ready()
        time.sleep(2.0)  # the loops, the analysis thread and a few scrapes running
        d.get("/metrics")
        t0 = time.monotonic()
        d.p.send_signal(signal.SIGTERM)
        try:
            rc = d.p.wait(30)
        except subprocess.TimeoutExpired:
            d.p.kill()
            rc = d.p.wait()
        out.append((time.monotonic() - t0, rc))
    return out


# --- faults ------------------------------------------------------------------------------------


def fault_proc_file_vanishes(root: str, work: str) -> dict:
    """/proc/diskstats disappears under a running daemon, then comes back."""
    procfs = os.path.join(work, "proc")
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "vm-debian12", "proc"), procfs)
    scenario = os.path.join(work, "gpus8.toml")
    with open(scenario, "w") as f:
        f.write(GPUS.format(healthy=8))
    d = Daemon(root, work, "--fake-nvml", scenario, "--path.procfs", procfs)
    try:
        d.wait_ready()
        time.sleep(2.0)
        diskstats = os.path.join(procfs, "diskstats")
        saved = diskstats + ".saved"
        os.rename(diskstats, saved)
        time.sleep(3.0)
        storage_ok = d.metric('agentd_sampler_success{sampler="storage"}')
        errors = d.metric('agentd_sampler_errors_total{sampler="storage"}') or 0
        others = {s: d.metric(f'agentd_sampler_success{{sampler="{s}"}}')
                  for s in ("gpu", "cpu", "memory", "process")}
        rows = d.gpu_rows()
        os.rename(saved, diskstats)
        t0 = time.monotonic()
        back = wait_for(lambda: d.metric('agentd_sampler_success{sampler="storage"}') == 1,
                        60)
        recovered = time.monotonic() - t0 if back else None
        survived = d.alive() and storage_ok == 0 and all(v == 1 for v in others.values()) \
            and min(rows.values(), default=0) >= 15
        return {"fault": "/proc/diskstats vanishes for 3 s", "survived": survived,
                "evidence": f"storage success {storage_ok:g}, {errors:g} errors counted; "
                            f"gpu/cpu/memory/process success "
                            f"{'/'.join(f'{v:g}' for v in others.values())}; GPU rows in the "
                            f"last 2 s: {min(rows.values(), default=0)}-"
                            f"{max(rows.values(), default=0)} per GPU (10 Hz: 20); storage "
                            + (f"back {recovered:.1f} s after the file returned"
                               if recovered is not None else "NOT back within 60 s")}
    finally:
        d.stop()


def fault_gpu_lost(root: str, work: str) -> dict:
    """GPU 7 of 8 falls off the bus (the fake NVML's lost_at_s)."""
    scenario = os.path.join(work, "lost.toml")
    with open(scenario, "w") as f:
        f.write(GPUS.format(healthy=7) + LOST.format(lost_at=4))
    d = Daemon(root, work, "--fake-nvml", scenario)
    try:
        d.wait_ready()
        lost = wait_for(lambda: d.metric('agentd_gpu_lost{gpu="7"'), 30)
        time.sleep(2.5)
        rows = d.gpu_rows()
        healthy = [rows.get(str(i), 0) for i in range(7)]
        gpu_ok = d.metric('agentd_sampler_success{sampler="gpu"}')
        survived = d.alive() and lost == 1 and min(healthy) >= 15 and rows.get("7", 0) == 0
        return {"fault": "GPU 7 of 8 falls off the bus", "survived": survived,
                "evidence": f"agentd_gpu_lost{{gpu=\"7\"}} {lost or 0:g}; GPUs 0-6: "
                            f"{min(healthy)}-{max(healthy)} rows in the last 2 s (10 Hz: 20), "
                            f"GPU 7: {rows.get('7', 0)}; gpu sampler success {gpu_ok:g}"}
    finally:
        d.stop()


def fault_reloads(root: str, work: str) -> list[dict]:
    """SIGHUP with configurations that cannot be applied; then one that can."""
    import bcrypt

    good_scenario = os.path.join(work, "gpus2.toml")
    with open(good_scenario, "w") as f:
        f.write(GPUS.format(healthy=2))
    bad_scenario = os.path.join(work, "bad-gpus.toml")
    with open(bad_scenario, "w") as f:
        f.write("[[gpus]]\ncount = 'many'\n")
    web = os.path.join(work, "web.yml")
    with open(web, "w") as f:
        f.write("basic_auth_users:\n  prometheus: '"
                + bcrypt.hashpw(b"x", bcrypt.gensalt(4)).decode()[:-1] + "'\n")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = free_port()
    cfg = os.path.join(work, "agentd.toml")

    def conf(listen: int = port, scenario: str = good_scenario, web_extra: str = "",
             extra: str = "") -> str:
        return (f'[web]\nlisten_address = "127.0.0.1:{listen}"\n{web_extra}'
                f'[gpu]\nfake_nvml = "{scenario}"\n{extra}')

    good = conf()
    cases = [
        ("the listen address moves to a port in use", conf(listen=busy.getsockname()[1])),
        ("the file is not TOML", good + "this is = = not toml\n"),
        ("the fake-NVML scenario becomes invalid", conf(scenario=bad_scenario)),
        ("the web config holds a truncated bcrypt hash",
         conf(web_extra=f'config_file = "{web}"\n')),
        ("the window becomes 1000000h", conf(extra='[sampling]\nwindow = "1000000h"\n')),
    ]
    with open(cfg, "w") as f:
        f.write(good)
    d = Daemon(root, work, "--config.file", cfg, port=port)
    out = []
    try:
        d.wait_ready()
        for name, text in cases + [("(a good file again)", good)]:
            with open(cfg, "w") as f:
                f.write(text)
            before = d.log().count("reload")
            d.p.send_signal(signal.SIGHUP)
            wait_for(lambda: d.log().count("reload") > before, 10)
            ok = d.metric("agentd_config_last_reload_successful") if d.alive() else None
            line = [ln for ln in d.log().splitlines() if "reload" in ln][-1:]
            expect = 1 if name.startswith("(") else 0
            out.append({"fault": f"reload: {name}", "survived": d.alive() and ok == expect,
                        "evidence": f"alive, serving, last_reload_successful {ok:g}; "
                                    + (line[0].split(": ", 1)[-1][:110] if line else "")
                        if ok is not None else "DAEMON GONE"})
    finally:
        busy.close()
        d.stop()
    return out


# --- bad inputs --------------------------------------------------------------------------------


def bad_inputs(root: str, timeout: float) -> list[tuple[hostile.Case, int | str, str,
                                                        str | None]]:
    """Each row's exit status (or "hung" past `timeout`), last line on stderr and verdict."""
    out = []
    with hostile.Servers() as servers:
        for case in hostile.CASES:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    r = hostile.run(case, tmp, servers, timeout=timeout, root=root)
                except subprocess.TimeoutExpired:
                    out.append((case, "hung", f"still running after {timeout:g} s",
                                "hung"))
                    continue
            last = (r.stderr.strip().splitlines() or [""])[-1]
            out.append((case, r.returncode, last, hostile.verdict(case, r)))
    return out


# --- report ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="SIGTERM runs (default 10)")
    ap.add_argument("--skip-inputs", action="store_true", help="leave out the input table")
    ap.add_argument("--root", default=ROOT, help="the agentd checkout to run (default: this)")
    ap.add_argument("--input-timeout", type=float, default=60.0,
                    help="seconds after which a bad input counts as hung (default 60)")
    args = ap.parse_args()
    root = os.path.abspath(args.root)
    print(f"agentd from {root}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start (a shared machine: wall times vary with it)\n")

    with tempfile.TemporaryDirectory() as work:
        times = sigterm_exit(root, work, args.runs)
    secs = sorted(t for t, _ in times)
    print(f"Time to exit on SIGTERM (8 fake GPUs, every sampler, {args.runs} runs):")
    print(f"  min {secs[0]:.2f} s, median {statistics.median(secs):.2f} s, max {secs[-1]:.2f} s;"
          f" exit statuses {dict(Counter(rc for _, rc in times))}; goal: under 2 s, status 0\n")

    faults = []
    for fn in (fault_proc_file_vanishes, fault_gpu_lost):
        with tempfile.TemporaryDirectory() as work:
            faults.append(fn(root, work))
    with tempfile.TemporaryDirectory() as work:
        faults += fault_reloads(root, work)
    print(f"Faults injected into a running daemon: {sum(f['survived'] for f in faults)} of "
          f"{len(faults)} survived")
    for f in faults:
        print(f"  [{'ok' if f['survived'] else 'FAILED'}] {f['fault']}: {f['evidence']}")
    print()

    if args.skip_inputs:
        return 0
    results = bad_inputs(root, args.input_timeout)
    bad = [r for r in results if r[3]]
    by_command: dict[str, Counter] = {}
    from agentd.exitcodes import BY_COMMAND

    for c, rc, _, _ in results:
        cmd = c.args[0] if c.args and c.args[0] in BY_COMMAND else "(no command)"
        by_command.setdefault(cmd, Counter())[rc] += 1
    print(f"Bad inputs: {len(results)} tried, {len(results) - len(bad)} answered as documented "
          "(one line on stderr, no traceback, the documented exit status)")
    for cmd, codes in by_command.items():
        print(f"  {cmd:<11} {sum(codes.values()):>3} inputs, exit statuses "
              + ", ".join(f"{code}: {n}" for code, n in sorted(codes.items(), key=str)))
    print()
    print(f"  {'input':<34} {'exit':>4}  last line on stderr")
    for c, rc, last, v in results:
        mark = "" if v is None else f"   <- expected {c.code}, {c.message!r}"
        print(f"  {c.id:<34} {rc:>4}  {last[:90]}{mark}")
    return 1 if bad or not all(f["survived"] for f in faults) else 0


if __name__ == "__main__":
    sys.exit(main())
