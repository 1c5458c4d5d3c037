"""The HTTP endpoint, from the sampling process' side: the listening socket, the server process
that serves it (httpd.py), and the answers to that process' requests.

The daemon binds the socket itself (so a bad address is an error at start, and the socket
outlives any server process: connections wait in its backlog while one restarts) and hands
it to the server process. A server process that exits is restarted with back-off; on reload
a new one takes over the same socket and the old one finishes its requests (drain), so no
connection is refused. The daemon answers its requests one at a time on one thread per
server process: /metrics text, the window as npz bytes, the JSON routes.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import threading
import time
from typing import Callable
from urllib.parse import parse_qs

from agentd.daemon.child import (Backoff, Channel, Child, ChildGone, child_series,
                                 name_os_thread)
from agentd.daemon.exposition import CONTENT_TYPE

log = logging.getLogger("agentd.web")

START_TIMEOUT = 20.0  # seconds to wait for a new server process to listen
# A server process reports its counters every 2 s (httpd.STATS_INTERVAL) from its event loop:
# one silent this long is hung (stopped, or its loop blocked) and is killed and replaced.
HANG_SECONDS = 30.0
MAX_FRAME = 2**20  # a server process' frames carry headers only: more is garbage
# Window exports (the costliest answer: a copy of the rings) per second, at most, whatever
# the clients ask: the server process caches each length for 0.25 s, but clients asking for
# many different lengths would each cost one. Beyond this the answer is 503.
WINDOW_EXPORTS_PER_SECOND = 4.0

Route = Callable[[dict], tuple[int, str, bytes]]


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class WebServer:
    module = "agentd.daemon.httpd"  # what a server process runs (tests put a faulty one here)

    def __init__(self, host: str, port: int, web_config_file: str, routes: dict[str, Route],
                 metrics: Callable[[], bytes], window: Callable[[float], tuple[bytes, dict]],
                 tls: bool, log_level: str = "info", limits: dict | None = None):
        self.sock = listen(host, port)  # OSError: the caller says which address failed
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.scheme = "https" if tls else "http"
        self.web_config_file = web_config_file
        self.routes = routes
        self.metrics = metrics
        self.window = window
        self.log_level = log_level
        self.limits = limits or {}
        self.stats: dict[Child, dict] = {}  # live server processes' counters, as last reported
        self._past = {"requests": {}, "refused": {}}  # counters of those that exited
        self.hang_seconds = HANG_SECONDS
        self._exports = (WINDOW_EXPORTS_PER_SECOND, time.monotonic())  # token bucket
        self.restarts = 0
        self._child: Child | None = None
        self._backoff = Backoff()
        self._next_start = 0.0
        self._lock = threading.Lock()
        self._stopped = False

    # --- the server process ---------------------------------------------------------------------

    def _spawn(self, wait: bool = True) -> Child:
        """A new server process on the socket; with `wait`, once it serves (or START_TIMEOUT
        passed). Without, supervise() judges it later."""
        args = ["--listen-fd", str(self.sock.fileno()), "--log-level", self.log_level,
                "--web-config", self.web_config_file, "--routes", ",".join(self.routes)]
        for key, value in self.limits.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        child = Child("web", self.module, args, pass_fds=(self.sock.fileno(),),
                      max_payload=MAX_FRAME)
        channel = child.start()
        child.last_heard = time.monotonic()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(child, channel, ready), name="web-channel",
                         daemon=True).start()
        if wait and not ready.wait(START_TIMEOUT):
            log.error("the HTTP server process did not start within %g s", START_TIMEOUT)
        return child

    def start(self) -> None:
        child = self._spawn()
        with self._lock:
            self._child = child

    def replace(self, web_config_file: str, tls: bool) -> None:
        """A new server process with this web configuration takes the socket; once it
        serves, the old one finishes its requests and exits (until then both accept). Does
        not wait: the caller's loop also handles signals and the watchdog."""
        self.web_config_file = web_config_file
        self.scheme = "https" if tls else "http"
        new = self._spawn(wait=False)
        with self._lock:
            old, self._child = self._child, new
            if old is not None and not old.ready:
                # Replaced before it ever served: it has nothing to finish; the one it was
                # to replace still serves, and is drained once the new one does.
                older, old.replaces = old.replaces, None
                _stopped(old)
                old = older
            new.replaces = old

    def _drain(self, child: Child) -> None:
        try:
            assert child.channel is not None
            child.channel.send(0, {"op": "drain"})
        except (ChildGone, AssertionError):
            pass
        threading.Thread(target=child.drain, args=(10.0,), name="web-drain",
                         daemon=True).start()

    def supervise(self) -> None:
        """Called about once a second: a server process that exited, broke its channel or
        went silent (hung) is killed and, after a back-off, replaced. Never blocks: the
        caller's loop also handles signals and the watchdog."""
        with self._lock:
            child = self._child
        if self._stopped or child is None:
            return
        now = time.monotonic()
        if child.alive():
            silent = now - child.last_heard
            limit = self.hang_seconds if child.ready else max(self.hang_seconds, START_TIMEOUT)
            if silent <= limit and not child.broken:
                return
            why = ("its channel carried garbage" if child.broken else
                   f"it said nothing for {silent:.0f} s" if child.ready else
                   f"it did not start within {silent:.0f} s")
            log.error("the HTTP server process is unresponsive (%s); killing it", why)
            child.kill()
        if self._next_start == 0.0:
            delay = self._backoff.next_delay(child.ran_for())
            self._next_start = now + delay
            log.error("the HTTP server process exited with status %s; restarting it in %.1f s",
                      child.proc.poll() if child.proc else None, delay)
        if now < self._next_start:
            return
        self._next_start = 0.0
        self.restarts += 1
        new = self._spawn(wait=False)
        with self._lock:
            self._child = new
            # A replacement that failed before serving: the one it was to replace still
            # serves, and is drained once this one does.
            new.replaces, child.replaces = child.replaces, None

    def is_alive(self) -> bool:
        with self._lock:
            child = self._child
        return child is not None and (child.alive() or self._next_start > 0)

    def pid(self) -> int | None:
        with self._lock:
            child = self._child
        return child.pid if child is not None and child.alive() else None

    def stop(self, timeout: float = 0.5) -> None:
        """SIGTERM the server process, close the socket, and reap the process (SIGKILL after
        `timeout`); its in-flight requests are cut off."""
        self._stopped = True
        with self._lock:
            child, self._child = self._child, None
            old = child.replaces if child is not None else None
        self.sock.close()
        if old is not None:  # a reload's predecessor, still serving
            _stopped(old)
        if child is not None:
            child.stop(timeout)

    # --- answering it -----------------------------------------------------------------------------

    def _serve(self, child: Child, channel: Channel, ready: threading.Event) -> None:
        name_os_thread()
        try:
            self._serve_channel(child, channel, ready)
        finally:
            ready.set()
            with self._lock:
                # Its counters live on in the totals (agentd_http_*_total never go back).
                last = self.stats.pop(child, {})
                for key in ("requests", "refused"):
                    for k, n in (last.get(key) or {}).items():
                        self._past[key][k] = self._past[key].get(k, 0) + n
            if child.alive() and not _exits(child, 1.0):
                # The channel broke (garbage, or a frame too large) while the process lives:
                # it can serve nobody. supervise() kills and replaces it.
                child.broken = True

    def _serve_channel(self, child: Child, channel: Channel, ready: threading.Event) -> None:
        while True:
            try:
                rid, header, _ = channel.recv()
            except (ChildGone, OSError) as e:
                if child.alive() and not self._stopped:
                    log.debug("channel to the HTTP server process: %s", e)
                return
            child.last_heard = time.monotonic()
            op = header.get("op")
            if rid == 0:
                if op == "hello":
                    child.ready = True
                    ready.set()
                    with self._lock:
                        old, child.replaces = child.replaces, None
                    if old is not None:
                        self._drain(old)
                elif op == "stats":
                    with self._lock:
                        self.stats[child] = {
                            "requests": _counts(header.get("requests")),
                            "refused": _counts(header.get("refused")),
                            "connections": _count(header.get("connections"))}
                continue
            try:
                answer, body = self._answer(header)
            except Exception as e:  # a bug answering one request must not end the channel
                log.exception("error answering the HTTP server's %s request", op)
                answer, body = {"code": 500, "ctype": "text/plain"}, f"{e}\n".encode()
            try:
                channel.send(rid, answer, body)
            except ChildGone:
                return

    def _answer(self, header: dict) -> tuple[dict, bytes]:
        op = header.get("op")
        if op == "metrics":
            return {"code": 200, "ctype": CONTENT_TYPE}, self.metrics()
        if op == "window":
            if not self._export_allowed():
                return {"code": 503, "ctype": "text/plain", "retry_after": 1}, \
                    b"too many window requests; retry later\n"
            body, info = self.window(float(header.get("seconds") or 0))
            return {"code": 200, "ctype": "application/octet-stream", **info}, body
        if op == "route" and header.get("path") in self.routes:
            code, ctype, body = self.routes[header["path"]](parse_qs(header.get("query", "")))
            return {"code": code, "ctype": ctype}, body
        return {"code": 404, "ctype": "text/plain"}, b"not found\n"

    def _export_allowed(self) -> bool:
        tokens, since = self._exports
        now = time.monotonic()
        rate = WINDOW_EXPORTS_PER_SECOND
        tokens = min(rate, tokens + (now - since) * rate)
        if tokens < 1:
            self._exports = (tokens, now)
            return False
        self._exports = (tokens - 1, now)
        return True

    def series(self) -> list:
        """agentd_http_*: the server processes' counters, those of processes that exited
        (killed, or replaced on reload) included, so that a counter never goes back."""
        with self._lock:
            live = list(self.stats.values())
            totals = {key: dict(self._past[key]) for key in ("requests", "refused")}
        for s in live:
            for key in ("requests", "refused"):
                for k, n in s[key].items():
                    totals[key][k] = totals[key].get(k, 0) + n
        out = [("agentd_http_requests_total", (code,), float(n))
               for code, n in sorted(totals["requests"].items())]
        out += [("agentd_http_refused_total", (reason,), float(n))
                for reason, n in sorted(totals["refused"].items())]
        if live:
            out.append(("agentd_http_open_connections", (),
                        float(sum(s["connections"] for s in live))))
        out.append(("agentd_child_restarts_total", ("web",), float(self.restarts)))
        pid = self.pid()
        if pid is not None:
            out += child_series("web", pid)
        return out


def _stopped(child: Child) -> None:
    """Stop a server process without waiting for it."""
    threading.Thread(target=child.stop, name="web-stop", daemon=True).start()


def _exits(child: Child, timeout: float) -> bool:
    """Whether the child exits within `timeout` (its end of file came first)."""
    try:
        child.proc.wait(timeout)  # type: ignore[union-attr]
        return True
    except subprocess.TimeoutExpired:
        return False


def _count(v) -> int:
    return v if isinstance(v, int) and 0 <= v < 2**53 else 0


def _counts(d) -> dict[str, int]:
    """A server process' counters by code or reason, as bounded as its labels must be."""
    if not isinstance(d, dict):
        return {}
    return {str(k)[:32]: _count(v) for k, v in list(d.items())[:64]}


def json_response(obj) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(obj, separators=(",", ":")).encode()
