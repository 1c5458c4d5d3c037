"""Hostile inputs for every command, and the exit status and one-line message each must give.

Shared by tests/test_hostile_inputs.py (one test per row) and bench/reliability.py (which
prints the table it got). Each row runs `agentd ARGS` as a process in a scratch directory
holding the files the row names, beside a tiny HTTP server that answers garbage (`{http}`),
and a port held by another socket (`{busy}`).

Exit statuses (agentd/exitcodes.py): 2 usage, 3 source cannot be read, 4 output cannot be
written; never 1 (diagnose's "findings") and never 70 (a bug) for bad input.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import numpy as np

from agentd.diagnose.sources.recording import MAGIC, chunk

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# --- files ------------------------------------------------------------------------------------


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def window_npz(rows: int = 300, t0: float = 1.8e9, gpus: int = 2, meta_doc=None,
               **override) -> bytes:
    """A window in the daemon's npz format: a gpu ring at 10 Hz, busy in bursts."""
    t = t0 + np.arange(rows) * 0.1
    busy = np.tile(np.where(np.arange(rows) % 10 < 6, 1.0, 0.0), (gpus, 1)).T
    arrays = {
        "meta": np.array(json.dumps(meta_doc if meta_doc is not None else
                                    {"node": "hostile", "fast_interval": 0.1})),
        "t:gpu": t, "v:gpu": busy.astype(np.float32),
        "c:gpu": np.array([f"gpu.busy:{i}" for i in range(gpus)]), "i:gpu": np.array([0.1]),
    }
    arrays.update(override)
    return _npz(**arrays)


def recording(chunks: int = 3, rows: int = 300) -> bytes:
    """A recording as `agentd record` writes it: the magic line, then length-prefixed
    windows."""
    return MAGIC + b"".join(chunk(window_npz(rows, t0=1.8e9 + i * rows * 0.1))
                            for i in range(chunks))


def _random(n: int) -> Callable[[], bytes]:
    return lambda: np.random.default_rng(n).bytes(n)


SCENARIO = b"[[gpus]]\ncount = 2\nutilization = 0.5\n"


# --- a server that answers garbage ------------------------------------------------------------

# Path prefix -> (status, body). Prometheus queries go to PREFIX/api/v1/query..., the daemon's
# window to PREFIX/api/v1/window.
PROM_OK = {"status": "success"}
GARBAGE: dict[str, tuple[int, bytes]] = {
    "empty": (200, b""),
    "html": (200, b"<html><body>It works!</body></html>"),
    "notjson": (200, b"{not json"),
    "list": (200, b"[1, 2, 3]"),
    "deep": (200, b"[" * 100_000),
    "nodata": (200, json.dumps(PROM_OK).encode()),
    "badresult": (200, json.dumps({**PROM_OK, "data": {"result": "x"}}).encode()),
    "badseries": (200, json.dumps({**PROM_OK, "data": {"resultType": "matrix", "result": [
        {"metric": {"__name__": "agentd_build_info"}, "value": "x", "values": "abc"}]}}).encode()),
    "badvalues": (200, json.dumps({**PROM_OK, "data": {"resultType": "matrix", "result": [
        {"metric": {"__name__": "agentd_build_info"}, "value": [1, "x"],
         "values": [[None, "NaN"], ["a", "b"], [1e300, "1e999"], [1, 2, 3]]}]}}).encode()),
    "error": (500, json.dumps({"status": "error", "error": "boom"}).encode()),
    "unauth": (401, b"Unauthorized\n"),
    "npzrandom": (200, np.random.default_rng(1).bytes(5000)),
    "npzwrong": (200, _npz(x=np.arange(3))),
    "npzshape": (200, window_npz(**{"v:gpu": np.zeros((5, 2), np.float32)})),
}


class _GarbageHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        prefix = self.path.strip("/").split("/", 1)[0]
        if prefix == "slow":
            time.sleep(5)
        status, body = GARBAGE.get(prefix, (404, b"not found"))
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a deadline passed): what the row is about


class Servers:
    """The garbage HTTP server and a port held busy, for the duration of a `with`."""

    def __enter__(self) -> "Servers":
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _GarbageHandler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.http = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.holder = socket.socket()
        self.holder.bind(("127.0.0.1", 0))
        self.holder.listen()
        self.busy = f"127.0.0.1:{self.holder.getsockname()[1]}"
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.holder.close()


# --- the table --------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    args: list[str]  # "{tmp}", "{http}", "{busy}" are filled in
    code: int
    message: str  # a part of the one line on stderr
    files: dict[str, bytes | Callable[[], bytes]] = field(default_factory=dict)


LISTEN = ["--web.listen-address", "127.0.0.1:0"]
RUN = ["run", *LISTEN]

CASES = [
    # --- the command line itself
    Case("no-command", [], 2, "required: COMMAND"),
    Case("unknown-command", ["frobnicate"], 2, "invalid choice"),
    Case("unknown-flag", ["run", "--bogus"], 2, "unrecognized arguments: --bogus"),
    # --- run: flags
    Case("port-out-of-range", ["run", "--web.listen-address", ":70000"], 2, "is not HOST:PORT"),
    Case("port-negative", ["run", "--web.listen-address", ":-1"], 2, "is not HOST:PORT"),
    Case("port-not-a-number", ["run", "--web.listen-address", "localhost"], 2,
         "is not HOST:PORT"),
    Case("port-in-use", ["run", "--web.listen-address", "{busy}", "--fake-nvml",
                         "{tmp}/gpus.toml"], 2, "cannot listen on", {"gpus.toml": SCENARIO}),
    Case("host-unknown", ["run", "--web.listen-address", "no.such.host.invalid:9445",
                          "--no-collector.gpu"], 2, "cannot listen on"),
    Case("fast-interval-negative", [*RUN, "--sampling.fast-interval", "-1"], 2,
         "--sampling.fast-interval"),
    Case("fast-interval-nan", [*RUN, "--sampling.fast-interval", "nan"], 2, "not a duration"),
    Case("fast-interval-tiny", [*RUN, "--sampling.fast-interval", "0.0001ms"], 2,
         "must be between 10ms and 10s"),
    Case("window-1..5s", [*RUN, "--sampling.window", "1..5s"], 2, "'1..5s' is not a duration"),
    Case("window-huge", [*RUN, "--sampling.window", "1000000h"], 2, "of memory"),
    Case("window-inf", [*RUN, "--sampling.window", "inf"], 2, "not a duration"),
    Case("idle-threshold-nan", [*RUN, "--sampling.idle-threshold", "nan"], 2,
         "must be in [0, 1)"),
    Case("analysis-interval-0", [*RUN, "--analysis.interval", "0"], 2, "positive duration"),
    Case("analysis-max-interval-2h", [*RUN, "--analysis.max-interval", "2h"], 2, "between 1s and 1h"),
    Case("collector-interval-huge", [*RUN, "--collector.cpu.interval", "1y"], 2,
         "must be between 10ms and 1d"),
    Case("max-trees-negative", [*RUN, "--collector.process.max-trees", "-5"], 2,
         "must be between 1 and 4096"),
    Case("max-trees-inf", [*RUN, "--collector.process.max-trees", "inf"], 2,
         "expected an integer"),
    Case("gpm-interval-negative", [*RUN, "--collector.gpu.gpm-interval", "-1"], 2,
         "must be a positive duration"),
    Case("bad-regex", [*RUN, "--collector.storage.device-exclude", "("], 2,
         "not a regular expression"),
    Case("procfs-missing", [*RUN, "--path.procfs", "/nonexistent"], 2, "--path.procfs"),
    Case("procfs-a-file", [*RUN, "--path.procfs", "/etc/hostname"], 2, "is not a directory"),
    Case("seed-negative", [*RUN, "--simulate", "input-cpu", "--simulate.seed", "-1"], 2,
         "--simulate.seed: must be between 0"),
    Case("seed-not-a-number", [*RUN, "--simulate", "input-cpu", "--simulate.seed", "x"], 2,
         "expected an integer"),
    Case("simulate-unknown", [*RUN, "--simulate", "no-such-scenario"], 2,
         "no scenario 'no-such-scenario'"),
    Case("simulate-binary", [*RUN, "--simulate", "{tmp}/s.toml"], 2, "not UTF-8 text",
         {"s.toml": b"\xff\xfe\x00binary"}),
    Case("simulate-bad-types", [*RUN, "--simulate", "{tmp}/s.toml"], 2,
         "s.job: expected a table",
         {"s.toml": b"class = 'input_cpu'\njob = 5\n"}),
    Case("simulate-bad-event", [*RUN, "--simulate", "{tmp}/s.toml"], 2,
         "s.events[0].gpu: expected int",
         {"s.toml": b"[[events]]\ngpu = 'x'\n"}),
    Case("fake-nvml-missing", [*RUN, "--fake-nvml", "/nonexistent.toml"], 2, "does not exist"),
    Case("fake-nvml-directory", [*RUN, "--fake-nvml", "{tmp}"], 2, "does not exist"),
    Case("fake-nvml-garbage", [*RUN, "--fake-nvml", "{tmp}/g.toml"], 2, "g.toml",
         {"g.toml": b"[[gpus]]\ncount = 'many'\n"}),
    Case("fake-nvml-random", [*RUN, "--fake-nvml", "{tmp}/g.toml"], 2, "g.toml",
         {"g.toml": _random(3000)}),
    Case("fake-nvml-throttle-number", [*RUN, "--fake-nvml", "{tmp}/g.toml"], 2,
         "throttle: expected an array of tables", {"g.toml": b"[[gpus]]\nthrottle = 5\n"}),
    Case("fake-nvml-clock-text", [*RUN, "--fake-nvml", "{tmp}/g.toml"], 2,
         "sm_clock_hz: expected a number",
         {"g.toml": b"[[gpus]]\nthrottle = [{sm_clock_hz = 'x'}]\n"}),
    Case("fake-nvml-latency-number", [*RUN, "--fake-nvml", "{tmp}/g.toml"], 2,
         "latency: expected a table", {"g.toml": b"latency = 5\n"}),
    Case("fake-nvml-missing-functions", [*RUN, "--fake-nvml", "{tmp}/g.toml"], 2,
         "missing_functions: expected an array of strings",
         {"g.toml": b"missing_functions = 5\n"}),
    # --- run: the config file
    Case("config-missing", [*RUN, "--config.file", "/nonexistent.toml"], 2,
         "cannot read config file"),
    Case("config-directory", [*RUN, "--config.file", "{tmp}"], 2, "Is a directory"),
    Case("config-not-a-dir", [*RUN, "--config.file", "/etc/hostname/x.toml"], 2,
         "Not a directory"),
    Case("config-empty-ok-but-port-busy", ["run", "--config.file", "{tmp}/c.toml",
                                           "--web.listen-address", "{busy}",
                                           "--no-collector.gpu"], 2, "cannot listen on",
         {"c.toml": b""}),
    Case("config-binary", [*RUN, "--config.file", "{tmp}/c.toml"], 2, "not UTF-8 text",
         {"c.toml": _random(2000)}),
    Case("config-huge", [*RUN, "--config.file", "{tmp}/c.toml"], 2, "larger than 4 MiB",
         {"c.toml": lambda: b"# " + b"x" * (5 << 20)}),
    Case("config-deep", [*RUN, "--config.file", "{tmp}/c.toml"], 2, "nested too deeply",
         {"c.toml": b"x = " + b"[" * 100_000}),
    Case("config-window-huge", [*RUN, "--config.file", "{tmp}/c.toml"], 2, "of memory",
         {"c.toml": b'[sampling]\nwindow = "1000000h"\n'}),
    Case("config-window-nan", [*RUN, "--config.file", "{tmp}/c.toml"], 2,
         "must be a positive duration", {"c.toml": b"[sampling]\nwindow = nan\n"}),
    Case("config-interval-bool", [*RUN, "--config.file", "{tmp}/c.toml"], 2,
         "expected a duration", {"c.toml": b"[sampling]\nfast_interval = true\n"}),
    Case("config-section-not-table", [*RUN, "--config.file", "{tmp}/c.toml"], 2,
         "unknown section", {"c.toml": b"web = 5\n"}),
    Case("config-collectors-list", [*RUN, "--config.file", "{tmp}/c.toml"], 2,
         "must be a table", {"c.toml": b"collectors = [1]\n"}),
    Case("config-gpm-negative", [*RUN, "--config.file", "{tmp}/c.toml"], 2,
         "collectors.gpu.gpm_interval", {"c.toml": b"[collectors.gpu]\ngpm_interval = -1\n"}),
    Case("config-procfs-nul", [*RUN, "--config.file", "{tmp}/c.toml"], 2, "--path.procfs",
         {"c.toml": b'[paths]\nprocfs = "/pro\\u0000c"\n'}),
    # --- run: the web config
    Case("web-missing", [*RUN, "--web.config.file", "/nonexistent.yml"], 2,
         "cannot read web config"),
    Case("web-binary", [*RUN, "--web.config.file", "{tmp}/w.yml"], 2, "not UTF-8 text",
         {"w.yml": _random(2000)}),
    Case("web-not-mapping", [*RUN, "--web.config.file", "{tmp}/w.yml"], 2,
         "expected a mapping", {"w.yml": b"- a\n- b\n"}),
    Case("web-deep", [*RUN, "--web.config.file", "{tmp}/w.yml"], 2, "w.yml",
         {"w.yml": b"[" * 100_000}),
    Case("web-plaintext-password", [*RUN, "--web.config.file", "{tmp}/w.yml"], 2,
         "not a bcrypt hash", {"w.yml": b"basic_auth_users:\n  alice: s3cret\n"}),
    Case("web-truncated-hash", [*RUN, "--web.config.file", "{tmp}/w.yml"], 2,
         "was it copied whole?", {"w.yml": b"basic_auth_users:\n  alice: "
                                  b"'$2y$10$Kf8r2tJm2M0y2kQZ6L3f0eJ5Q8tqvJ3dJb1x4m0H4sWl0l1n6x3m'\n"}),
    Case("web-hash-cost-31", [*RUN, "--web.config.file", "{tmp}/w.yml"], 2,
         "bcrypt cost 31", {"w.yml": b"basic_auth_users:\n  alice: "
                            b"'$2y$31$Kf8r2tJm2M0y2kQZ6L3f0eJ5Q8tqvJ3dJb1x4m0H4sWl0l1n6x3mK'\n"}),
    Case("web-header-crlf", [*RUN, "--web.config.file", "{tmp}/w.yml"], 2,
         "expected one line of text", {"w.yml": b'http_server_config:\n  headers:\n'
                                       b'    Content-Security-Policy: "a\\r\\nSet-Cookie: x=1"\n'}),
    Case("web-header-not-allowed", [*RUN, "--web.config.file", "{tmp}/w.yml"], 2,
         "cannot be set", {"w.yml": b"http_server_config:\n  headers:\n    Content-Type: foo\n"}),
    Case("web-header-bad-value", [*RUN, "--web.config.file", "{tmp}/w.yml"], 2,
         "expected one of deny, sameorigin",
         {"w.yml": b"http_server_config:\n  headers:\n    X-Frame-Options: allow\n"}),
    Case("web-cert-missing", [*RUN, "--web.config.file", "{tmp}/w.yml"], 2,
         "cannot load cert_file", {"w.yml": b"tls_server_config:\n  cert_file: /nonexistent\n"
                                   b"  key_file: /nonexistent\n"}),
    # --- diagnose: flags
    Case("seconds-0", ["diagnose", "--seconds", "0"], 2, "--seconds: must be a positive"),
    Case("seconds-nan", ["diagnose", "--seconds", "nan"], 2, "not a duration"),
    Case("seconds-1..5s", ["diagnose", "--seconds", "1..5s"], 2, "not a duration"),
    Case("seconds-too-long-live", ["diagnose", "--seconds", "100d"], 2, "of memory"),
    Case("samples-per-step-nan", ["diagnose", "--samples-per-step", "nan"], 2,
         "positive finite number"),
    Case("tokens-per-step-negative", ["diagnose", "--tokens-per-step", "-1"], 2,
         "positive finite number"),
    Case("price-inf", ["diagnose", "--price-per-gpu-hour", "inf"], 2, "finite number"),
    Case("fail-on-bad", ["diagnose", "--fail-on", "sometimes"], 2, "invalid choice"),
    Case("two-sources", ["diagnose", "--daemon", "{http}", "--recording", "x"], 2,
         "not allowed with argument"),
    Case("plot-bad-type", ["diagnose", "--recording", "{tmp}/r", "--plot", "{tmp}/x.doc"], 2,
         "the name must end in one of", {"r": recording}),
    Case("plot-no-directory", ["diagnose", "--recording", "{tmp}/r", "--plot",
                               "/nonexistent/x.png"], 4, "does not exist", {"r": recording}),
    Case("plot-is-directory", ["diagnose", "--recording", "{tmp}/r", "--plot", "{tmp}"], 4,
         "is a directory", {"r": recording}),
    Case("daemon-not-http", ["diagnose", "--daemon", "ftp://x"], 2,
         "is not an http:// or https:// URL"),
    Case("daemon-no-host", ["diagnose", "--daemon", "http://"], 2, "is not an http://"),
    Case("daemon-bad-port", ["diagnose", "--daemon", "http://127.0.0.1:99999"], 2,
         "valid port"),
    Case("daemon-password-not-echoed", ["diagnose", "--daemon", "http://u:hunter2@h:99999"], 2,
         "'http://h:99999'"),
    Case("timeout-nan", ["diagnose", "--daemon", "{http}", "--timeout", "nan"], 2,
         "--timeout"),
    Case("auth-file-missing", ["diagnose", "--daemon", "{http}", "--auth-file",
                               "/nonexistent"], 2, "--auth-file /nonexistent"),
    Case("ca-file-directory", ["diagnose", "--daemon", "{http}", "--ca-file", "{tmp}"], 2,
         "--ca-file"),
    Case("node-empty", ["diagnose", "--prometheus", "{http}", "--node", " "], 2,
         "--node is empty"),
    Case("start-nan", ["diagnose", "--prometheus", "{http}", "--node", "n", "--start", "nan"],
         2, "--start"),
    Case("end-before-start", ["diagnose", "--prometheus", "{http}", "--node", "n", "--start",
                              "2000", "--end", "1000"], 2, "--end must be after --start"),
    Case("last-0", ["diagnose", "--prometheus", "{http}", "--node", "n", "--last", "0"], 2,
         "--last"),
    Case("step-garbage", ["diagnose", "--prometheus", "{http}", "--node", "n", "--step",
                          "fast"], 2, "--step"),
    # --- diagnose: recordings
    Case("recording-missing", ["diagnose", "--recording", "/nonexistent.npz"], 3,
         "cannot read recording"),
    Case("recording-directory", ["diagnose", "--recording", "{tmp}"], 3, "is a directory"),
    Case("recording-not-a-dir", ["diagnose", "--recording", "/etc/hostname/r"], 3,
         "cannot read recording"),
    Case("recording-empty", ["diagnose", "--recording", "{tmp}/r"], 3, "recording r",
         {"r": b""}),
    Case("recording-random", ["diagnose", "--recording", "{tmp}/r"], 3,
         "not an agentd window or recording", {"r": _random(100_000)}),
    Case("recording-magic-only", ["diagnose", "--recording", "{tmp}/r"], 3, "holds no samples",
         {"r": MAGIC}),
    Case("recording-cut-in-first-chunk", ["diagnose", "--recording", "{tmp}/r"], 3,
         "recording r", {"r": lambda: recording(1)[:len(MAGIC) + 500]}),
    Case("recording-huge-chunk-length", ["diagnose", "--recording", "{tmp}/r"], 3,
         "holds no samples", {"r": MAGIC + (2**62).to_bytes(8, "little") + b"x" * 100}),
    Case("npz-wrong-arrays", ["diagnose", "--recording", "{tmp}/r"], 3, "recording r",
         {"r": lambda: _npz(x=np.arange(3))}),
    Case("npz-values-missing", ["diagnose", "--recording", "{tmp}/r"], 3, "recording r",
         {"r": lambda: _npz(**{"t:gpu": np.arange(3.0)})}),
    Case("npz-rows-mismatch", ["diagnose", "--recording", "{tmp}/r"], 3, "recording r",
         {"r": lambda: window_npz(**{"v:gpu": np.zeros((5, 2), np.float32)})}),
    Case("npz-columns-mismatch", ["diagnose", "--recording", "{tmp}/r"], 3, "recording r",
         {"r": lambda: window_npz(**{"c:gpu": np.array(["gpu.busy:0"])})}),
    Case("npz-values-1d", ["diagnose", "--recording", "{tmp}/r"], 3, "recording r",
         {"r": lambda: window_npz(**{"v:gpu": np.zeros(300, np.float32)})}),
    Case("npz-values-text", ["diagnose", "--recording", "{tmp}/r"], 3, "recording r",
         {"r": lambda: window_npz(**{"v:gpu": np.full((300, 2), "x")})}),
    Case("npz-times-text", ["diagnose", "--recording", "{tmp}/r"], 3, "recording r",
         {"r": lambda: window_npz(**{"t:gpu": np.full(300, "x")})}),
    Case("npz-interval-nan", ["diagnose", "--recording", "{tmp}/r"], 3, "recording r",
         {"r": lambda: window_npz(**{"i:gpu": np.array([np.nan])})}),
    Case("npz-meta-not-json", ["diagnose", "--recording", "{tmp}/r"], 3, "recording r",
         {"r": lambda: window_npz(**{"meta": np.array("{oops")})}),
    Case("npz-meta-a-list", ["diagnose", "--recording", "{tmp}/r"], 3, "recording r",
         {"r": lambda: window_npz(meta_doc=[1, 2])}),
    Case("npz-meta-interval-text", ["diagnose", "--recording", "{tmp}/r"], 3, "recording r",
         {"r": lambda: window_npz(meta_doc={"fast_interval": "fast"})}),
    Case("npz-too-few-rows", ["diagnose", "--recording", "{tmp}/r"], 3, "too few to analyse",
         {"r": lambda: window_npz(rows=3)}),
    # --- diagnose: servers that answer garbage
    Case("daemon-unreachable", ["diagnose", "--daemon", "http://127.0.0.1:9"], 3,
         "cannot reach agentd"),
    Case("daemon-html", ["diagnose", "--daemon", "{http}/html"], 3, "not an agentd window"),
    Case("daemon-empty", ["diagnose", "--daemon", "{http}/empty"], 3, "daemon"),
    Case("daemon-random", ["diagnose", "--daemon", "{http}/npzrandom"], 3,
         "not an agentd window"),
    Case("daemon-npz-wrong", ["diagnose", "--daemon", "{http}/npzwrong"], 3,
         "holds no samples"),
    Case("daemon-npz-shape", ["diagnose", "--daemon", "{http}/npzshape"], 3, "daemon"),
    Case("daemon-500", ["diagnose", "--daemon", "{http}/error"], 3, "answered 500"),
    Case("daemon-401", ["diagnose", "--daemon", "{http}/unauth"], 3, "wants credentials"),
    Case("daemon-slow", ["diagnose", "--daemon", "{http}/slow", "--timeout", "1s"], 3,
         "did not answer within 1 s"),
    Case("prometheus-unreachable", ["diagnose", "--prometheus", "http://127.0.0.1:9",
                                    "--node", "x"], 3, "cannot reach Prometheus"),
    Case("prometheus-html", ["diagnose", "--prometheus", "{http}/html", "--node", "n"], 3,
         "not JSON"),
    Case("prometheus-empty", ["diagnose", "--prometheus", "{http}/empty", "--node", "n"], 3,
         "not JSON"),
    Case("prometheus-list", ["diagnose", "--prometheus", "{http}/list", "--node", "n"], 3,
         "unexpected JSON"),
    Case("prometheus-deep", ["diagnose", "--prometheus", "{http}/deep", "--node", "n"], 3,
         "Prometheus"),
    Case("prometheus-no-data", ["diagnose", "--prometheus", "{http}/nodata", "--node", "n"], 3,
         "without a result"),
    Case("prometheus-bad-result", ["diagnose", "--prometheus", "{http}/badresult", "--node",
                                   "n"], 3, "without a result"),
    Case("prometheus-bad-series", ["diagnose", "--prometheus", "{http}/badseries", "--node",
                                   "n"], 3, "Prometheus"),
    Case("prometheus-bad-values", ["diagnose", "--prometheus", "{http}/badvalues", "--node",
                                   "n"], 3, "Prometheus"),
    Case("prometheus-bad-series-agentd", ["diagnose", "--prometheus", "{http}/badseries",
                                          "--node", "n", "--flavour", "agentd"], 3,
         "Prometheus"),
    Case("prometheus-bad-values-exporters", ["diagnose", "--prometheus", "{http}/badvalues",
                                             "--node", "n", "--flavour", "exporters"], 3,
         "Prometheus"),
    Case("prometheus-500", ["diagnose", "--prometheus", "{http}/error", "--node", "n"], 3,
         "answered 500: boom"),
    # --- record
    Case("record-out-missing-dir", ["record", "--simulate", "input-cpu", "--duration", "1h",
                                    "--out", "/nonexistent/r.rec"], 4, "does not exist"),
    Case("record-out-directory", ["record", "--simulate", "input-cpu", "--out", "{tmp}"], 4,
         "is a directory"),
    Case("record-out-under-file", ["record", "--simulate", "input-cpu", "--out",
                                   "/etc/hostname/r.rec"], 4, "does not exist"),
    Case("record-out-proc", ["record", "--simulate", "input-cpu", "--out", "/proc/r.rec"], 4,
         "cannot write /proc/r.rec"),
    Case("record-duration-nan", ["record", "--out", "{tmp}/r", "--duration", "nan"], 2,
         "--duration"),
    Case("record-duration-0", ["record", "--out", "{tmp}/r", "--duration", "0"], 2,
         "--duration"),
    Case("record-flush-garbage", ["record", "--out", "{tmp}/r", "--flush-interval", "often"],
         2, "--flush-interval"),
    Case("record-daemon-not-http", ["record", "--out", "{tmp}/r", "--daemon", "ftp://x"], 2,
         "is not an http://"),
    Case("record-daemon-unreachable", ["record", "--out", "{tmp}/r", "--daemon",
                                       "http://127.0.0.1:9", "--duration", "1s"], 3,
         "cannot reach agentd"),
    Case("record-daemon-garbage", ["record", "--out", "{tmp}/r", "--daemon", "{http}/html",
                                   "--duration", "1s"], 3, "cannot be read"),
    # --- demo, dashboards
    Case("demo-unknown-scenario", ["demo", "--scenario", "nope"], 2, "no scenario 'nope'"),
    Case("demo-seconds-nan", ["demo", "--seconds", "nan"], 2, "--seconds"),
    Case("demo-seed-negative", ["demo", "--seed", "-3"], 2, "--seed"),
    Case("demo-bad-listen", ["demo", "--web.listen-address", "nowhere"], 2, "is not HOST:PORT"),
    Case("demo-port-in-use", ["demo", "--web.listen-address", "{busy}", "--seconds", "5s"], 2,
         "cannot listen on"),
    Case("dashboards-out-a-file", ["dashboards", "--out", "/etc/hostname"], 4, "cannot write"),
    Case("dashboards-out-proc", ["dashboards", "--out", "/proc/x"], 4, "cannot write"),
    Case("dashboards-currency", ["dashboards", "--currency", "usd"], 2,
         "is not a currency code"),
    # --- rules
    Case("rules-config-missing", ["rules", "--config", "/nonexistent"], 2,
         "cannot read rules config"),
    Case("rules-config-binary", ["rules", "--config", "{tmp}/r.toml"], 2, "not UTF-8 text",
         {"r.toml": _random(1000)}),
    Case("rules-config-deep", ["rules", "--config", "{tmp}/r.toml"], 2, "nested too deeply",
         {"r.toml": b"x = " + b"[" * 100_000}),
    Case("rules-bad-selector", ["rules", "--selector", "bad{{", "--out", "-"], 2,
         "is not a list of label matchers"),
    Case("rules-bad-runbook-url", ["rules", "--runbook-url", "notaurl", "--out", "-"], 2,
         "is not an absolute http(s) URL"),
    Case("rules-out-proc", ["rules", "--out", "/proc/x/r.yml"], 4, "cannot write"),
]


def prepare(case: Case, tmp: str, servers: Servers) -> list[str]:
    """Write the row's files into `tmp`; its arguments with the placeholders filled in."""
    for name, content in case.files.items():
        data = content() if callable(content) else content
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    return [a.format(tmp=tmp, http=servers.http, busy=servers.busy) for a in case.args]


def run(case: Case, tmp: str, servers: Servers, timeout: float = 60.0, root: str = ROOT
        ) -> subprocess.CompletedProcess:
    """`agentd` (the checkout at `root`) run on the row, in `tmp`."""
    args = prepare(case, tmp, servers)
    env = {k: v for k, v in os.environ.items()
           if k not in ("AGENTD_FAKE_NVML", "AGENTD_AUTH_FILE", "AGENTD_CA_FILE",
                        "JOURNAL_STREAM")}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "agentd", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=tmp, env=env)


def verdict(case: Case, r: subprocess.CompletedProcess) -> str | None:
    """What is wrong with the result, or None."""
    lines = r.stderr.strip().splitlines()
    if r.returncode != case.code:
        return f"exit {r.returncode}, expected {case.code}: {r.stderr.strip()[-300:]}"
    if len(lines) != 1:
        return f"{len(lines)} lines on stderr: {r.stderr.strip()[-300:]}"
    if "Traceback" in r.stderr or case.message not in lines[0]:
        return f"expected {case.message!r} in: {lines[0]}"
    return None
