"""Where `agentd diagnose` reads from. One module per source, each mapping what it reads into
the canonical signals of agentd/catalog.py once, behind one interface:

    source.read() -> Signals      (raises SourceError when it cannot be reached or read)

    live.py                  this node's samplers, run for N seconds (no HTTP server)
    daemon.py                a running agentd's high-rate window (/api/v1/window)
    recording.py             a file written by `agentd record` (the window's format)
    prometheus_agentd.py     agentd's own metrics in a Prometheus server
    prometheus_exporters.py  dcgm-exporter + node_exporter series only
    promclient.py            the Prometheus HTTP API client and node selection
    http.py                  GETs with an overall deadline, credentials from files, a CA

A signal a source lacks is absent, never zero; `Signals.meta["missing"]` names what the
source cannot provide, so the analysis can say which classes it could not judge.
"""

from __future__ import annotations

from typing import Protocol

from agentd.analysis.signals import Signals


class SourceError(Exception):
    """The source cannot be reached or read (exit status 3)."""


class Source(Protocol):
    name: str

    def read(self) -> Signals: ...
