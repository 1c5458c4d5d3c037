"""The HTTP endpoint: /metrics, the high-rate window for `agentd diagnose`, status and health.

TLS handshakes happen in the per-connection thread, so a slow or hostile client never holds
up the accept loop; basic-auth results are cached (see webconfig.WebConfig.check_password).
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlparse

from agentd.daemon.exposition import CONTENT_TYPE
from agentd.daemon.webconfig import WebConfig

log = logging.getLogger("agentd.web")

LANDING = b"""<!doctype html><html><head><title>agentd</title></head><body>
<h1>agentd</h1><p>Is this node's GPU input pipeline starved, and why?</p><ul>
<li><a href="/metrics">/metrics</a>: Prometheus metrics</li>
<li><a href="/api/v1/window?seconds=60">/api/v1/window</a>: the high-rate window
(<code>?seconds=N&amp;format=json|npz</code>), read by <code>agentd diagnose --daemon</code></li>
<li><a href="/api/v1/status">/api/v1/status</a>: samplers and configuration</li>
</ul></body></html>
"""

Route = Callable[[dict], tuple[int, str, bytes]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, handler, web: WebConfig, routes: dict[str, Route],
                 metrics: Callable[[], bytes]):
        self.web = web
        self.routes = routes
        self.metrics = metrics
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def finish_request(self, request, client_address):
        if self.web.tls is not None:
            request.settimeout(10)
            try:
                request = self.web.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as e:
                log.debug("TLS handshake with %s failed: %s", client_address[0], e)
                return
        super().finish_request(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 30
    server_version = "agentd"
    sys_version = ""

    def log_message(self, fmt, *args):
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, code: int, ctype: str, body: bytes, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        for k, v in {**self.server.web.headers, **(extra or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorized(self) -> bool:
        users = self.server.web.users
        if not users:
            return True
        header = self.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            return self.server.web.check_password(user, password)
        return False

    def do_GET(self) -> None:
        if not self._authorized():
            self._send(401, "text/plain; charset=utf-8", b"Unauthorized\n",
                       {"WWW-Authenticate": 'Basic realm="agentd"'})
            return
        url = urlparse(self.path)
        try:
            if url.path == "/metrics":
                self._metrics()
                return
            route = self.server.routes.get(url.path)
            if route is None:
                self._send(404, "text/plain; charset=utf-8", b"Not found\n")
                return
            code, ctype, body = route(parse_qs(url.query))
        except BrokenPipeError:
            return
        except Exception as e:
            log.exception("error serving %s", url.path)
            code, ctype, body = 500, "text/plain; charset=utf-8", f"{e}\n".encode()
        self._send(code, ctype, body)

    do_HEAD = do_GET

    def _metrics(self) -> None:
        # Always the 0.0.4 text format: Prometheus accepts it whatever else it offers.
        body = self.server.metrics()
        ctype = CONTENT_TYPE
        extra = {}
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=1)
            extra["Content-Encoding"] = "gzip"
        self._send(200, ctype, body, extra)


class WebServer:
    def __init__(self, host: str, port: int, web: WebConfig, routes: dict[str, Route],
                 metrics: Callable[[], bytes]):
        routes = {"/": lambda q: (200, "text/html; charset=utf-8", LANDING),
                  "/-/healthy": lambda q: (200, "text/plain", b"OK\n"),
                  "/-/ready": lambda q: (200, "text/plain", b"OK\n"), **routes}
        self.httpd = _Server((host, port), _Handler, web, routes, metrics)
        self.scheme = "https" if web.tls else "http"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http",
                                        kwargs={"poll_interval": 0.2}, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=1)


def json_response(obj) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(obj, separators=(",", ":")).encode()
