"""Network interfaces (/proc/net/dev, link speed from sysfs) and RDMA ports
(/sys/class/infiniband/DEV/ports/N/counters).

RDMA traffic bypasses the kernel's network stack, so it never shows in /proc/net/dev: a node
whose collectives run over InfiniBand or RoCE looks idle there. Its port counters say otherwise.
A bad link shows in its port's error counters (symbol errors, packets received in error, link
error recoveries, link down events, discarded sends) and rate, and in the transmit wait of the
port that sends into it: in a ring all-reduce every rank moves the same bytes, so bytes per
second alone do not single it out.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from agentd.paths import read_optional, read_text
from agentd.samplers.base import (Malformed, Option, Row, Sampler, Series, Unavailable, complete,
                                  ints, regex)


@dataclass(frozen=True)
class NetDev:
    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_drop: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int


def parse_net_dev(text: str, path: str = "/proc/net/dev") -> dict[str, NetDev]:
    """Interfaces after the two header lines; Malformed when the read was cut short or an
    interface line lacks its 16 counters."""
    out = {}
    for n, line in enumerate(complete(text, path).splitlines()[2:], 3):
        name, colon, rest = line.partition(":")
        f = rest.split()
        if not line.strip():
            continue
        if not colon or len(f) < 16:
            raise Malformed(f"{path} line {n}: {len(f)} counters, expected 16")
        v = ints(f[:11], path, n)
        out[name.strip()] = NetDev(v[0], v[1], v[2], v[3], v[8], v[9], v[10])
    return out


# The port's error counters (type label: node_exporter's names for them) and their files
# under counters/: link errors, and the link's recoveries and downs.
PORT_ERRORS = {
    "symbol_error": "symbol_error",
    "port_errors_received": "port_rcv_errors",
    "local_link_integrity_errors": "local_link_integrity_errors",
    "excessive_buffer_overrun_errors": "excessive_buffer_overrun_errors",
    "port_discards_transmitted": "port_xmit_discards",
    "link_error_recovery": "link_error_recovery",
    "link_downed": "link_downed",
}


@dataclass(frozen=True)
class RdmaPort:
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    xmit_wait: int
    rate_bytes: float | None
    # Error counters by type (PORT_ERRORS), those the adapter has (absent, not 0).
    errors: dict[str, int] = field(default_factory=dict)


def parse_rdma_rate(text: str) -> float | None:
    """'100 Gb/sec (4X EDR)' -> bytes per second."""
    m = re.match(r"\s*([\d.]+)\s*Gb/sec", text)
    return float(m.group(1)) * 1e9 / 8 if m else None


def read_rdma_port(port_dir: str) -> RdmaPort | None:
    """The port's counters; None when a byte counter cannot be read (a port going away),
    rather than a 0 that would read as a reset and then as a burst."""
    def counter(name: str) -> int | None:
        v = read_optional(os.path.join(port_dir, "counters", name))
        return int(v) if v and v.strip().isdigit() else None

    rx, tx = counter("port_rcv_data"), counter("port_xmit_data")
    if rx is None or tx is None:
        return None

    rate = read_optional(os.path.join(port_dir, "rate"))
    # port_xmit_data / port_rcv_data count octets divided by 4 (IBA spec, PortCounters).
    return RdmaPort(
        rx_bytes=rx * 4,
        tx_bytes=tx * 4,
        rx_packets=counter("port_rcv_packets") or 0,
        tx_packets=counter("port_xmit_packets") or 0,
        xmit_wait=counter("port_xmit_wait") or 0,
        rate_bytes=parse_rdma_rate(rate) if rate else None,
        errors={kind: v for kind, name in PORT_ERRORS.items()
                if (v := counter(name)) is not None},
    )


class NetworkSampler(Sampler):
    name = "network"
    help = "network interfaces and RDMA (InfiniBand/RoCE) port counters"
    default_rate = "slow"
    options = {
        "device_exclude": Option(str, r"^(lo|veth.*|docker\d*|cali.*|virbr\d*)$",
                                 "regular expression of interface names to leave out", check=regex),
        "rdma": Option(bool, True, "read RDMA port counters under /sys/class/infiniband"),
    }

    def open(self) -> None:
        self._net_dev = self.ctx.paths.proc("net", "dev")
        try:
            read_text(self._net_dev)
        except OSError as e:
            raise Unavailable(f"cannot read {self._net_dev}: {e.strerror}") from None
        self._exclude = re.compile(self.opts["device_exclude"])
        self._ib = self.ctx.paths.sys("class", "infiniband")
        self._last: dict[str, tuple[float, int, int]] = {}
        self._devs: dict[str, NetDev] = {}
        self._ports: dict[tuple[str, str], RdmaPort] = {}
        self._speeds: dict[str, float] = {}

    def _rdma_ports(self) -> dict[tuple[str, str], RdmaPort]:
        if not self.opts["rdma"] or not os.path.isdir(self._ib):
            return {}
        ports = {}
        for dev in sorted(os.listdir(self._ib)):
            pdir = os.path.join(self._ib, dev, "ports")
            try:
                names = os.listdir(pdir)
            except OSError:
                continue
            for port in sorted(names):
                p = read_rdma_port(os.path.join(pdir, port))
                if p is not None:
                    ports[(dev, port)] = p
        return ports

    def sample(self, now: float, slow: bool) -> Row:
        devs = {
            n: d for n, d in parse_net_dev(read_text(self._net_dev), self._net_dev).items()
            if not self._exclude.match(n)
        }
        speeds = {}
        for n in devs:
            v = read_optional(self.ctx.paths.sys("class", "net", n, "speed"))
            # Mb/s; -1 or unreadable when the link is down or the driver does not say.
            if v and v.strip().lstrip("-").isdigit() and int(v) > 0:
                speeds[n] = int(v) * 1e6 / 8
        ports = self._rdma_ports()
        row: Row = {}
        for key, rx, tx in [(f"{n}", d.rx_bytes, d.tx_bytes) for n, d in devs.items()] + [
            (f"{dev}/{port}", p.rx_bytes, p.tx_bytes) for (dev, port), p in ports.items()
        ]:
            prefix = "rdma" if "/" in key else "net"
            last = self._last.get(key)
            # A counter that went backwards (driver reload, a new device of that name) is a
            # reset: no rate this tick, counting resumes from the new value.
            if last is not None and now > last[0] and rx >= last[1] and tx >= last[2]:
                row[f"{prefix}.rx:{key}"] = (rx - last[1]) / (now - last[0])
                row[f"{prefix}.tx:{key}"] = (tx - last[2]) / (now - last[0])
            self._last[key] = (now, rx, tx)
        self._devs, self._ports, self._speeds = devs, ports, speeds
        return row

    def series(self) -> list[Series]:
        out: list[Series] = []
        for n, d in self._devs.items():
            lab = (n,)
            out += [
                ("agentd_network_receive_bytes_total", lab, d.rx_bytes),
                ("agentd_network_transmit_bytes_total", lab, d.tx_bytes),
                ("agentd_network_receive_packets_total", lab, d.rx_packets),
                ("agentd_network_transmit_packets_total", lab, d.tx_packets),
                ("agentd_network_receive_drop_total", lab, d.rx_drop),
                ("agentd_network_receive_errors_total", lab, d.rx_errors),
                ("agentd_network_transmit_errors_total", lab, d.tx_errors),
            ]
            if n in self._speeds:
                out.append(("agentd_network_speed_bytes", lab, self._speeds[n]))
        for (dev, port), p in self._ports.items():
            lab = (dev, port)
            out += [
                ("agentd_rdma_receive_bytes_total", lab, p.rx_bytes),
                ("agentd_rdma_transmit_bytes_total", lab, p.tx_bytes),
                ("agentd_rdma_receive_packets_total", lab, p.rx_packets),
                ("agentd_rdma_transmit_packets_total", lab, p.tx_packets),
                ("agentd_rdma_transmit_wait_total", lab, p.xmit_wait),
            ]
            out += [("agentd_rdma_port_errors_total", lab + (kind,), v)
                    for kind, v in p.errors.items()]
            if p.rate_bytes is not None:
                out.append(("agentd_rdma_port_speed_bytes", lab, p.rate_bytes))
        return out
