"""The HTTP server's process (started by web.py, never by hand).

    python -m agentd.daemon.httpd --channel-fd N --parent-pid P --listen-fd L [options]

Serves /metrics, the window, status and findings on the listening socket the daemon opened,
asking the daemon (the sampling process) over its channel for what it does not hold. It runs
apart from the sampling process so that serving, however loaded, never makes the sampling
threads wait for CPython's GIL; what it costs the sampling process is bounded by caching:

- Answers from the daemon are cached for CACHE_SECONDS (0.25 s) per route and query, and
  shared by every request that arrives while one is being fetched: 100 scrapers cost the
  daemon four /metrics renderings a second, 20 window clients four window exports a second
  per size. A Prometheus scraping every second never gets a cached answer (its samples are
  stamped with the scrape's time, so a second-old body would skew rate()); two of an HA
  pair scraping together share one.
- One event loop serves every connection; CPU work (bcrypt, deflating or JSON-encoding the
  window) runs in small thread pools with bounded queues. Beyond a bound the answer is 503
  (429 for authentication) at once, with Retry-After.
- Connections are bounded (`max_connections`; an idle keep-alive connection is closed to
  make room for a new one, else the new one is refused). The TLS handshake and the request
  line with its headers must each complete within `header_timeout`, however slowly bytes
  trickle in; a keep-alive connection idle for `idle_timeout` is closed; a client that stops
  reading is dropped after WRITE_TIMEOUT. Requests with a body are refused (GET/HEAD only).
- Failed basic-auth attempts are rate limited per client address (AUTH_FAILURE_BURST, then one
  every AUTH_FAILURE_REFILL seconds), and at most BCRYPT_SLOTS bcrypt checks run at once;
  verified credentials are cached (webconfig.WebConfig), so a good client pays bcrypt once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import gzip
import json
import logging
import math
import os
import socket
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from agentd.daemon import npzfmt
from agentd.daemon.child import FRAME, ChildGone, child_args, child_setup, decode_frame, encode
from agentd.daemon.webconfig import WebConfig, load_web_config

log = logging.getLogger("agentd.web")

CACHE_SECONDS = 0.25  # below half of any sane scrape interval
UPSTREAM_TIMEOUT = 30.0  # the daemon's answer
WRITE_TIMEOUT = 30.0  # per chunk of a response
CHUNK = 256 * 1024
MAX_HEADER_BYTES = 16 * 1024
WINDOW_SLOTS = 4  # window responses being built or sent at once (each holds one body)
WINDOW_QUEUE = 32  # window requests waiting for a slot; beyond: 503
BCRYPT_SLOTS = 1  # bcrypt checks at once (each ~50-100 ms of a core at cost 10)
BCRYPT_QUEUE = 8  # checks waiting for a slot; beyond: 429
AUTH_FAILURE_BURST = 10  # failed logins an address may make at once ...
AUTH_FAILURE_REFILL = 6.0  # ... then one per this many seconds
AUTH_ADDRESSES = 4096  # addresses whose failures are remembered
STATS_INTERVAL = 2.0  # seconds between the counters sent to the daemon
DRAIN_SECONDS = 5.0  # a replaced server finishes its requests within this
ACCEPT_GRACE = 0.05  # seconds a draining server lets connections it accepted start

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
           429: "Too Many Requests", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}

LANDING = b"""<!doctype html><html><head><title>agentd</title></head><body>
<h1>agentd</h1><p>Is this node's GPU input pipeline starved, and why?</p><ul>
<li><a href="/metrics">/metrics</a>: Prometheus metrics</li>
<li><a href="/api/v1/window?seconds=60">/api/v1/window</a>: the high-rate window
(<code>?seconds=N&amp;format=json|npz</code>), read by <code>agentd diagnose --daemon</code></li>
<li><a href="/api/v1/findings">/api/v1/findings</a>: the rolling analysis' findings</li>
<li><a href="/api/v1/status">/api/v1/status</a>: samplers and configuration</li>
</ul></body></html>
"""
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Limits:
    max_connections: int = 256
    header_timeout: float = 10.0
    idle_timeout: float = 120.0


class Response:
    __slots__ = ("code", "ctype", "body", "headers", "info", "_gzipped")

    def __init__(self, code: int, ctype: str, body: bytes | list[bytes],
                 headers: dict | None = None, info: dict | None = None):
        self.code, self.ctype, self.body = code, ctype, body  # bytes, or pieces to send
        self.headers = headers or {}  # sent with the body
        self.info = info or {}  # what the daemon said about the body (not sent)
        self._gzipped: bytes | None = None

    def gzipped(self) -> bytes:
        if self._gzipped is None:
            self._gzipped = gzip.compress(self.bytes(), compresslevel=1)
        return self._gzipped

    def bytes(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else b"".join(self.body)

    def size(self) -> int:
        return len(self.body) if isinstance(self.body, bytes) else sum(map(len, self.body))


def text(code: int, message: str, headers: dict | None = None) -> Response:
    return Response(code, TEXT, (message + "\n").encode(), headers)


class Refused(Exception):
    """Answer now with this response (a bound was reached)."""

    def __init__(self, response: Response):
        self.response = response


class Upstream:
    """The channel to the daemon, asynchronous: requests by id, answers to their futures."""

    def __init__(self, sock: socket.socket, on_message):
        self.sock = sock
        self.on_message = on_message  # one-way messages from the daemon (drain)
        self._pending: dict[int, asyncio.Future] = {}
        self._rid = 0
        self.closed = asyncio.Event()

    async def start(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(sock=self.sock,
                                                                 limit=2**20)
        asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                rid, hlen, plen = decode_frame(await self.reader.readexactly(FRAME.size))
                header = json.loads(await self.reader.readexactly(hlen)) if hlen else {}
                payload = await self.reader.readexactly(plen) if plen else b""
                if rid == 0:
                    try:
                        self.on_message(header)
                    except Exception:
                        log.exception("bad message from the daemon: %s", header)
                    continue
                fut = self._pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result((header, payload))
        except (asyncio.IncompleteReadError, OSError, ChildGone, ValueError) as e:
            log.debug("channel to the daemon closed: %s", e)
        finally:
            self.closed.set()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ChildGone("the daemon closed the channel"))

    def send(self, header: dict, rid: int = 0) -> None:
        for part in encode(rid, header):
            if len(part):
                self.writer.write(part)

    async def request(self, header: dict) -> tuple[dict, bytes]:
        if self.closed.is_set():
            raise ChildGone("the daemon closed the channel")
        self._rid = rid = self._rid % 0xFFFFFFFF + 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self.send(header, rid)
        try:
            return await asyncio.wait_for(fut, UPSTREAM_TIMEOUT)
        finally:
            # This request's id: others may have been sent meanwhile (self._rid moved on).
            self._pending.pop(rid, None)


class Cache:
    """Answers by key for CACHE_SECONDS; concurrent misses of one key share one fetch."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()
        self._inflight: dict = {}

    async def get(self, key, build) -> Response:
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(build())
            self._inflight[key] = fut
            fut.add_done_callback(lambda f: self._done(key, f))
        return await asyncio.shield(fut)

    def purge(self) -> float:
        """Drop expired answers (they hold memory for nothing); the time now."""
        now = time.monotonic()
        for k in [k for k, (expires, _) in self._entries.items() if expires <= now]:
            del self._entries[k]
        return now

    def _done(self, key, fut) -> None:
        self._inflight.pop(key, None)
        if fut.cancelled() or fut.exception() is not None:
            return
        response = fut.result()
        if response.code != 200:
            return
        now = self.purge()
        self._entries[key] = (now + CACHE_SECONDS, response)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class Gate:
    """At most `slots` holders; at most `queue` waiting; beyond that Refused at once."""

    def __init__(self, slots: int, queue: int, refusal: Response, reason: str, stats):
        self._sem = asyncio.Semaphore(slots)
        self.queue = queue
        self.waiting = 0
        self.refusal = refusal
        self.reason = reason
        self.stats = stats

    async def __aenter__(self):
        if self._sem.locked():
            if self.waiting >= self.queue:
                self.stats.refuse(self.reason)
                raise Refused(self.refusal)
            self.waiting += 1
            try:
                await self._sem.acquire()
            finally:
                self.waiting -= 1
        else:
            await self._sem.acquire()
        return self

    async def __aexit__(self, *exc):
        self._sem.release()


class FailureLimiter:
    """Token bucket of failed logins per client address."""

    def __init__(self, burst: int = AUTH_FAILURE_BURST, refill: float = AUTH_FAILURE_REFILL):
        self.burst, self.refill = burst, refill
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, addr: str, now: float) -> float:
        tokens, since = self._buckets.get(addr, (self.burst, now))
        return min(self.burst, tokens + (now - since) / self.refill)

    def allowed(self, addr: str) -> bool:
        return self._tokens(addr, time.monotonic()) >= 1

    def failed(self, addr: str) -> None:
        now = time.monotonic()
        self._buckets[addr] = (max(self._tokens(addr, now) - 1, 0.0), now)
        self._buckets.move_to_end(addr)
        while len(self._buckets) > AUTH_ADDRESSES:
            self._buckets.popitem(last=False)

    def retry_after(self, addr: str) -> int:
        return max(int(math.ceil((1 - self._tokens(addr, time.monotonic())) * self.refill)), 1)


class Stats:
    def __init__(self):
        self.requests: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.connections = 0

    def answered(self, code: int) -> None:
        key = str(code)
        self.requests[key] = self.requests.get(key, 0) + 1

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def snapshot(self) -> dict:
        return {"requests": dict(self.requests), "refused": dict(self.refused),
                "connections": self.connections}


class _Conn:
    __slots__ = ("writer", "idle_since")

    def __init__(self, writer):
        self.writer = writer
        self.idle_since: float | None = None  # monotonic, while kept alive between requests


class Server:
    def __init__(self, web: WebConfig, routes: set[str], limits: Limits, upstream_sock):
        self.web = web
        self.routes = routes
        self.limits = limits
        self.stats = Stats()
        self.upstream = Upstream(upstream_sock, self._control)
        self.cache = Cache(max_entries=8)
        self.conns: set[_Conn] = set()
        self.failures = FailureLimiter()
        self.draining = False
        self._cpu = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="encode")
        self._bcrypt = concurrent.futures.ThreadPoolExecutor(BCRYPT_SLOTS,
                                                             thread_name_prefix="bcrypt")
        busy = {"Retry-After": "1"}
        self.window_gate = Gate(WINDOW_SLOTS, WINDOW_QUEUE,
                                text(503, "too many window requests; retry later", busy),
                                "queue_full", self.stats)
        self.bcrypt_gate = Gate(BCRYPT_SLOTS, BCRYPT_QUEUE,
                                text(429, "too many login attempts; retry later", busy),
                                "auth_rate_limited", self.stats)
        self._server: asyncio.AbstractServer | None = None

    # --- life cycle -----------------------------------------------------------------------------

    async def run(self, listen: socket.socket) -> None:
        await self.upstream.start()
        self._server = await asyncio.start_server(self._connection, sock=listen,
                                                  limit=MAX_HEADER_BYTES, backlog=128)
        self.upstream.send({"op": "hello"})
        loop = asyncio.get_running_loop()
        loop.create_task(self._report_stats())
        await self.upstream.closed.wait()  # the daemon is gone or told us to go

    def _control(self, header: dict) -> None:
        if header.get("op") == "drain":
            asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """Stop accepting (a successor serves the socket now), finish what is in flight."""
        self.draining = True
        if self._server is not None:
            # Stop accepting, but do not close the asyncio Server: a socket it accepted in
            # the same loop turn is set up by a task that runs later, and a closed Server
            # makes that task fail and drop the socket with its request unread (the client
            # gets a reset). The process exits once every connection is served.
            loop = asyncio.get_running_loop()
            for sock in self._server.sockets:
                loop.remove_reader(sock.fileno())
        for c in list(self.conns):
            if c.idle_since is not None:
                c.writer.close()
        # Connections accepted just before the close become a _connection task some loop
        # turns later (asyncio's _accept_connection2 task first): wait for those too, or the
        # exit would reset them. On a busy node those turns can take longer than any grace.
        await asyncio.sleep(ACCEPT_GRACE)
        deadline = time.monotonic() + DRAIN_SECONDS
        while (self.conns or _connection_tasks()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.upstream.closed.set()

    async def _report_stats(self) -> None:
        """Every STATS_INTERVAL: the counters to the daemon, and expired answers dropped."""
        while not self.upstream.closed.is_set():
            try:
                self.upstream.send({"op": "stats", **self.stats.snapshot()})
            except (OSError, RuntimeError):
                return
            self.cache.purge()
            await asyncio.sleep(STATS_INTERVAL)

    # --- connections ----------------------------------------------------------------------------

    def _make_room(self) -> bool:
        idle = [c for c in self.conns if c.idle_since is not None]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.idle_since)
        oldest.idle_since = None
        oldest.writer.close()
        self.conns.discard(oldest)
        return True

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if len(self.conns) >= self.limits.max_connections and not self._make_room():
            self.stats.refuse("connection_limit")
            if self.web.tls is None:
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                             b"Retry-After: 1\r\nConnection: close\r\n\r\n")
            writer.close()
            return
        conn = _Conn(writer)
        self.conns.add(conn)
        self.stats.connections = len(self.conns)
        try:
            if self.web.tls is not None:
                try:
                    await writer.start_tls(self.web.tls,
                                           ssl_handshake_timeout=self.limits.header_timeout)
                except (OSError, asyncio.TimeoutError, ConnectionError) as e:
                    log.debug("TLS handshake failed: %s", e)
                    self.stats.refuse("deadline" if isinstance(e, asyncio.TimeoutError)
                                      else "tls_handshake")
                    return
            peer = writer.get_extra_info("peername")
            addr = peer[0] if isinstance(peer, tuple) else "local"
            first = True
            # A connection accepted before a drain gets its request answered (then closed).
            while first or not self.draining:
                if not await self._serve_one(reader, writer, conn, addr, first):
                    return
                first = False
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("error serving a connection")
        finally:
            self.conns.discard(conn)
            self.stats.connections = len(self.conns)
            writer.close()

    async def _serve_one(self, reader, writer, conn: _Conn, addr: str, first: bool) -> bool:
        """One request on the connection; False when the connection is to be closed."""
        # Between requests a keep-alive connection is idle: closed first to make room. A new
        # connection is not (its first request is bounded by the header deadline instead).
        conn.idle_since = None if first else time.monotonic()
        wait = self.limits.header_timeout if first else self.limits.idle_timeout
        # asyncio.timeout, not wait_for: no task per read on the path every request takes.
        try:
            async with asyncio.timeout(wait):
                start = await reader.readexactly(1)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError):
            if first:
                self.stats.refuse("deadline")
            return False
        conn.idle_since = None
        try:
            async with asyncio.timeout(self.limits.header_timeout):
                head = start + await reader.readuntil(b"\r\n\r\n")
        except asyncio.TimeoutError:
            self.stats.refuse("deadline")
            await self._write(writer, text(408, "request headers took too long"), False, True)
            return False
        except asyncio.LimitOverrunError:
            await self._write(writer, text(431, "request headers too large"), False, True)
            return False
        except asyncio.IncompleteReadError:
            return False
        request = _parse(head)
        if isinstance(request, Response):
            await self._write(writer, request, False, True)
            return False
        method, target, version, headers = request
        close = (headers.get("connection", "").lower() == "close"
                 or (version == "HTTP/1.0"
                     and headers.get("connection", "").lower() != "keep-alive"))
        if headers.get("transfer-encoding") or headers.get("content-length", "0") != "0":
            await self._write(writer, text(413, "requests with a body are not served"),
                              False, True)
            return False
        if method not in ("GET", "HEAD"):
            await self._write(writer, text(405, "GET or HEAD only", {"Allow": "GET, HEAD"}),
                              False, close)
            return not close
        url = urlsplit(target)
        response = await self._authorize(headers, addr)
        if response is not None:
            await self._write(writer, response, method == "HEAD", close)
            return not close
        # A window answer holds its slot until sent: the slots bound the bodies alive at once.
        gate = self.window_gate if url.path == "/api/v1/window" else None
        try:
            if gate is not None:
                await gate.__aenter__()
        except Refused as r:
            await self._write(writer, r.response, method == "HEAD", close)
            return not close
        try:
            response = await self._respond(url)
            gz = (response.code == 200 and response.ctype.startswith("text/")
                  and response.size() > 1024
                  and "gzip" in headers.get("accept-encoding", ""))
            await self._write(writer, response, method == "HEAD", close or self.draining, gz)
        finally:
            if gate is not None:
                await gate.__aexit__()
        return not (close or self.draining)

    async def _write(self, writer, r: Response, head_only: bool, close: bool,
                     gz: bool = False) -> None:
        self.stats.answered(r.code)
        body = r.gzipped() if gz else r.body
        size = len(body) if isinstance(body, bytes) else r.size()
        lines = [f"HTTP/1.1 {r.code} {REASONS.get(r.code, 'Unknown')}",
                 "Server: agentd", f"Content-Type: {r.ctype}", f"Content-Length: {size}"]
        if gz:
            lines.append("Content-Encoding: gzip")
        if r.code == 200 and r.ctype.startswith("text/"):
            lines.append("Vary: Accept-Encoding")
        lines += [f"{k}: {v}" for k, v in {**self.web.headers, **r.headers}.items()]
        if close:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if head_only or (isinstance(body, bytes) and size <= CHUNK):
            writer.write(head + body if not head_only else head)
        else:
            writer.write(head)
            pending = 0
            for piece in ([body] if isinstance(body, bytes) else body):
                view = memoryview(piece)
                for i in range(0, len(view), CHUNK):
                    chunk = view[i:i + CHUNK]
                    writer.write(chunk)
                    pending += len(chunk)
                    if pending >= CHUNK:
                        pending = 0
                        await self._flush(writer)
        await self._flush(writer)

    @staticmethod
    async def _flush(writer) -> None:
        """Wait until the client has taken what is buffered (no wait when the socket took
        it all at once, the common case); a client that stops reading is dropped."""
        if writer.transport.get_write_buffer_size():
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()

    # --- requests -------------------------------------------------------------------------------

    async def _respond(self, url) -> Response:
        path = url.path
        if path == "/":
            return Response(200, "text/html; charset=utf-8", LANDING)
        if path in ("/-/healthy", "/-/ready"):
            return text(200, "OK")
        if path == "/metrics":
            return await self.cache.get(("metrics",), lambda: self._upstream({"op": "metrics"}))
        if path == "/api/v1/window":
            return await self._window(parse_qs(url.query))
        if path in self.routes:
            query = url.query
            return await self.cache.get(
                ("route", path, query),
                lambda: self._upstream({"op": "route", "path": path, "query": query}))
        return text(404, "not found")

    async def _upstream(self, header: dict) -> Response:
        try:
            head, body = await self.upstream.request(header)
        except (ChildGone, asyncio.TimeoutError) as e:
            log.warning("the daemon did not answer %s: %s", header.get("op"), e or "timeout")
            return text(503, "the daemon did not answer; retry later", {"Retry-After": "1"})
        headers = {}
        if head.get("retry_after"):
            # The daemon refused (too many window exports): a bound, counted as one.
            self.stats.refuse("queue_full")
            headers["Retry-After"] = str(int(head["retry_after"]))
        return Response(int(head.get("code", 200)), head.get("ctype", TEXT), body, headers,
                        info=head)

    async def _window(self, query: dict) -> Response:
        try:
            seconds = float(query.get("seconds", ["0"])[0])
        except ValueError:
            return text(400, "seconds must be a number")
        if not math.isfinite(seconds) or seconds < 0:
            return text(400, "seconds must be a positive number")
        fmt = query.get("format", ["json"])[0]
        if fmt not in ("json", "npz"):
            return text(400, "format must be json or npz")
        return await self.cache.get(("window", seconds, fmt),
                                    lambda: self._build_window(seconds, fmt))

    async def _build_window(self, seconds: float, fmt: str) -> Response:
        raw = await self.cache.get(("window-raw", seconds), lambda: self._upstream(
            {"op": "window", "seconds": seconds}))
        if raw.code != 200:
            return raw
        window_seconds = float(raw.info.get("window_seconds") or 0)
        loop = asyncio.get_running_loop()
        try:
            if fmt == "npz":
                body = await loop.run_in_executor(self._cpu, npzfmt.compress, raw.body)
                return Response(200, "application/octet-stream", body)
            body = await loop.run_in_executor(self._cpu, npzfmt.to_json_chunks, raw.body,
                                              window_seconds)
        except npzfmt.FormatError as e:
            log.error("the daemon's window is unreadable: %s", e)
            return text(500, "the window could not be encoded")
        return Response(200, "application/json", body)

    async def _authorize(self, headers: dict, addr: str) -> Response | None:
        if not self.web.users:
            return None
        creds = _basic_credentials(headers.get("authorization", ""))
        if creds is not None:
            user, password = creds
            ok = self.web.cached(user, password)
            if ok is None:
                if not self.failures.allowed(addr):
                    self.stats.refuse("auth_rate_limited")
                    return text(429, "too many failed logins; retry later",
                                {"Retry-After": str(self.failures.retry_after(addr))})
                try:
                    async with self.bcrypt_gate:
                        ok = await asyncio.get_running_loop().run_in_executor(
                            self._bcrypt, self.web.verify, user, password)
                except Refused as r:
                    return r.response
            if ok:
                return None
            self.failures.failed(addr)
        return text(401, "Unauthorized", {"WWW-Authenticate": 'Basic realm="agentd"'})


def _connection_tasks() -> list:
    """Tasks of connections accepted and not yet served to their end: asyncio's own task
    that sets an accepted socket up, and ours that serves it."""
    current = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not current and not t.done()
            and getattr(t.get_coro(), "__qualname__", "").endswith(
                ("._accept_connection2", "Server._connection"))]


def _basic_credentials(header: str) -> tuple[str, str] | None:
    if not header.startswith("Basic "):
        return None
    try:
        user, sep, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError, binascii.Error):
        return None
    return (user, password) if sep else None


def _parse(head: bytes):
    """(method, target, version, headers) of a request head, or the error Response."""
    try:
        lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        return text(400, "bad request line")
    if not version.startswith("HTTP/1."):
        return text(505, "HTTP/1.x only")
    if not target.startswith("/"):
        return text(400, "bad request target")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return text(400, "bad header line")
        name = name.lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return method, target, version, headers


def main(argv: list[str] | None = None) -> int:
    def extra(p):
        p.add_argument("--listen-fd", type=int, required=True)
        p.add_argument("--web-config", default="")
        p.add_argument("--routes", default="", help="comma-separated paths the daemon answers")
        p.add_argument("--max-connections", type=int, default=Limits.max_connections)
        p.add_argument("--header-timeout", type=float, default=Limits.header_timeout)
        p.add_argument("--idle-timeout", type=float, default=Limits.idle_timeout)

    args = child_args(argv, extra)
    child_setup(args.parent_pid)
    from agentd import logs

    logs.setup(args.log_level)
    web = load_web_config(args.web_config) if args.web_config else WebConfig()
    listen = socket.socket(fileno=args.listen_fd)
    listen.setblocking(False)
    upstream = socket.socket(fileno=args.channel_fd)
    upstream.setblocking(False)
    limits = Limits(args.max_connections, args.header_timeout, args.idle_timeout)
    server = Server(web, set(filter(None, args.routes.split(","))), limits, upstream)
    try:
        asyncio.run(server.run(listen))
    except KeyboardInterrupt:
        pass
    # Threads of the pools may be mid-bcrypt: leave without waiting for them.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
