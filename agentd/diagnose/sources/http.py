"""HTTP GETs for the daemon and Prometheus sources: an overall deadline per request (a server
that trickles one byte a second cannot hold `diagnose` forever), basic-auth credentials from a
file or the URL, a CA file for TLS, and error messages that never carry a secret.
"""

from __future__ import annotations

import base64
import http.client
import os
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

from agentd.diagnose.sources import SourceError

DEFAULT_DEADLINE = 60.0
MAX_BODY = 4 * 2**30  # a reply larger than this is not a window or a query result


@dataclass(frozen=True)
class HttpOptions:
    deadline: float = DEFAULT_DEADLINE  # seconds for the whole request, body included
    auth_file: str | None = None  # "user:password" on its first line
    ca_file: str | None = None  # CA bundle to verify the server's certificate
    insecure: bool = False  # skip certificate verification (tests, self-signed labs)


def redact(url: str) -> str:
    """The URL without user:password@."""
    p = urllib.parse.urlsplit(url)
    if p.username is None and p.password is None:
        return url
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{p.port}" if p.port else "")
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment))


def url_problem(url: str) -> str | None:
    """What makes `url` unusable as a server's address (shown without credentials), or None."""
    try:
        p = urllib.parse.urlsplit(url)
        p.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        return f"{redact_loosely(url)!r} is not a URL with a valid port"
    if p.scheme not in ("http", "https") or not p.hostname:
        return f"{redact_loosely(url)!r} is not an http:// or https:// URL"
    return None


def redact_loosely(url: str) -> str:
    """The URL without anything between '//' and '@' (for URLs urlsplit cannot parse)."""
    head, sep, tail = url.partition("//")
    return head + sep + tail.rpartition("@")[2] if sep else url


def _credentials(url: str, opts: HttpOptions) -> str | None:
    if opts.auth_file:
        try:
            with open(opts.auth_file, encoding="utf-8") as f:
                line = f.readline().rstrip("\r\n")
        except OSError as e:
            raise SourceError(f"cannot read credentials file {opts.auth_file}: "
                              f"{e.strerror}") from None
        except UnicodeDecodeError:
            raise SourceError(f"credentials file {opts.auth_file} is not text") from None
        if ":" not in line:
            raise SourceError(f"credentials file {opts.auth_file}: expected user:password "
                              "on its first line")
        return base64.b64encode(line.encode()).decode()
    p = urllib.parse.urlsplit(url)
    if p.username is not None:
        user = urllib.parse.unquote(p.username)
        password = urllib.parse.unquote(p.password or "")
        return base64.b64encode(f"{user}:{password}".encode()).decode()
    return None


def _tls_context(opts: HttpOptions) -> ssl.SSLContext:
    if opts.insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=opts.ca_file)
    except (OSError, ssl.SSLError) as e:
        raise SourceError(f"cannot load CA file {opts.ca_file}: "
                          f"{getattr(e, 'strerror', None) or e}") from None


def get(url: str, what: str, opts: HttpOptions | None = None,
        accept: str = "*/*") -> tuple[int, bytes]:
    """(status, body) of a GET. Raises SourceError when the server cannot be reached, the
    deadline passes or the body exceeds MAX_BODY; `what` names the server in messages."""
    opts = opts or HttpOptions()
    problem = url_problem(url)
    if problem:
        raise SourceError(f"{what}: {problem}")
    p = urllib.parse.urlsplit(url)
    shown = redact(urllib.parse.urlunsplit((p.scheme, p.netloc, "", "", "")))
    port = p.port
    path = (p.path or "/") + (f"?{p.query}" if p.query else "")
    headers = {"Accept": accept, "User-Agent": "agentd-diagnose"}
    auth = _credentials(url, opts)
    if auth:
        headers["Authorization"] = f"Basic {auth}"
    deadline = time.monotonic() + opts.deadline
    if p.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            p.hostname, port, timeout=opts.deadline, context=_tls_context(opts))
    else:
        conn = http.client.HTTPConnection(p.hostname, port, timeout=opts.deadline)
    expired = threading.Event()

    def cut() -> None:
        # Past the deadline: shut the socket so a read blocked on a trickling server returns.
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(opts.deadline, cut)
    timer.daemon = True
    timer.start()
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        chunks, size = [], 0
        while True:
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_BODY:
                raise SourceError(f"{what} at {shown} sent more than {MAX_BODY >> 30} GiB")
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError
        return resp.status, b"".join(chunks)
    except SourceError:
        raise
    except ssl.SSLCertVerificationError as e:
        raise SourceError(f"{what} at {shown}: certificate not trusted ({e.verify_message}); "
                          "give its CA with --ca-file") from None
    except (TimeoutError, socket.timeout):
        raise SourceError(f"{what} at {shown} did not answer within {opts.deadline:g} s") \
            from None
    except (OSError, http.client.HTTPException) as e:
        if expired.is_set():
            raise SourceError(f"{what} at {shown} did not answer within {opts.deadline:g} s") \
                from None
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise SourceError(f"cannot reach {what} at {shown}: {reason}") from None
    finally:
        timer.cancel()
        conn.close()


def env_options(deadline: float | None = None, auth_file: str | None = None,
                ca_file: str | None = None, insecure: bool = False) -> HttpOptions:
    """Options from flags, with AGENTD_AUTH_FILE / AGENTD_CA_FILE as defaults."""
    return HttpOptions(deadline=deadline or DEFAULT_DEADLINE,
                       auth_file=auth_file or os.environ.get("AGENTD_AUTH_FILE") or None,
                       ca_file=ca_file or os.environ.get("AGENTD_CA_FILE") or None,
                       insecure=insecure)
