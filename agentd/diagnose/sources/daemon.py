"""A running agentd's high-rate window, fetched as npz from /api/v1/window."""

from __future__ import annotations

from agentd.analysis.signals import Signals
from agentd.diagnose.sources import SourceError
from agentd.diagnose.sources.http import HttpOptions, get, redact
from agentd.diagnose.sources.recording import signals_from_npz_chunks


def fetch_window(url: str, seconds: float, opts: HttpOptions | None = None) -> bytes:
    """A running agentd's last `seconds` of window, as npz bytes."""
    base = url.rstrip("/")
    status, body = get(f"{base}/api/v1/window?seconds={seconds:g}&format=npz", "agentd", opts,
                       accept="application/octet-stream")
    if status == 401:
        raise SourceError(f"agentd at {redact(base)} wants credentials: give them with "
                          "--auth-file FILE (user:password)")
    if status != 200:
        raise SourceError(f"agentd at {redact(base)} answered {status}")
    return body


class DaemonSource:
    name = "daemon"

    def __init__(self, url: str, seconds: float, opts: HttpOptions | None = None):
        self.url = url.rstrip("/")
        self.seconds = seconds
        self.opts = opts

    def read(self) -> Signals:
        data = fetch_window(self.url, self.seconds, self.opts)
        return signals_from_npz_chunks([data], f"daemon {redact(self.url)}")
