"""Host memory and page-cache behaviour from /proc/meminfo and /proc/vmstat.

Refaults (file pages read again soon after the page cache evicted them) are what tells a
training set that no longer fits in the cache from one that simply was never cached.
"""

from __future__ import annotations

from agentd.paths import read_optional, read_text
from agentd.samplers.base import Malformed, Row, Sampler, Unavailable, complete, ints




def parse_meminfo(text: str, path: str = "/proc/meminfo") -> dict[str, int]:
    """Field -> bytes (the kernel prints kB, meaning KiB). Malformed when the read was cut
    short, a line is not `Key: number [kB]`, or a field every kernel prints is missing."""
    out = {}
    for n, line in enumerate(complete(text, path).splitlines(), 1):
        key, colon, rest = line.partition(":")
        parts = rest.split()
        if not line.strip():
            continue
        if not colon or not 1 <= len(parts) <= 2 or parts[1:] not in ([], ["kB"]):
            raise Malformed(f"{path} line {n}: {line!r}")
        value = ints(parts[:1], path, n)[0]
        out[key] = value * 1024 if parts[1:] == ["kB"] else value
    if "MemTotal" not in out or not ("MemAvailable" in out or "MemFree" in out):
        raise Malformed(f"{path}: no MemTotal or no MemAvailable/MemFree (truncated?)")
    return out


def parse_vmstat(text: str, path: str = "/proc/vmstat") -> dict[str, int]:
    out = {}
    for n, line in enumerate(complete(text, path).splitlines(), 1):
        parts = line.split()
        if len(parts) != 2:
            raise Malformed(f"{path} line {n}: {line!r}")
        out[parts[0]] = ints(parts[1:], path, n)[0]
    return out


def _sum_prefixed(vm: dict[str, int], *prefixes: str) -> int:
    # pgscan_direct_throttle counts throttling events, not pages.
    return sum(
        v for k, v in vm.items() if k.startswith(prefixes) and not k.endswith("_throttle")
    )


class MemorySampler(Sampler):
    name = "memory"
    help = "memory, page cache, reclaim and refaults (/proc/meminfo, /proc/vmstat)"
    default_rate = "slow"

    def open(self) -> None:
        self._meminfo = self.ctx.paths.proc("meminfo")
        self._vmstat = self.ctx.paths.proc("vmstat")
        try:
            read_text(self._meminfo)
        except OSError as e:
            raise Unavailable(f"cannot read {self._meminfo}: {e.strerror}") from None
        self._last_refaults: tuple[float, int] | None = None

    def sample(self, now: float, slow: bool) -> Row:
        mem = parse_meminfo(read_text(self._meminfo), self._meminfo)
        vmtext = read_optional(self._vmstat)
        vm = parse_vmstat(vmtext, self._vmstat) if vmtext is not None else None
        row: Row = {}
        gauges = [
            ("agentd_memory_total_bytes", (), mem.get("MemTotal", 0)),
            ("agentd_memory_available_bytes", (), mem.get("MemAvailable", mem.get("MemFree", 0))),
            ("agentd_memory_cached_bytes", (), mem.get("Cached", 0)),
            ("agentd_memory_dirty_bytes", (), mem.get("Dirty", 0)),
            ("agentd_memory_writeback_bytes", (), mem.get("Writeback", 0)),
            ("agentd_memory_swap_used_bytes", (),
             mem.get("SwapTotal", 0) - mem.get("SwapFree", 0)),
        ]
        self.out.replace_gauges("meminfo", gauges)
        row["mem.available:"] = float(gauges[1][2])
        row["mem.cached:"] = float(gauges[2][2])

        if vm is not None:
            # workingset_refault split into _anon/_file in 5.9; older kernels count file only.
            refaults = vm.get("workingset_refault_file", vm.get("workingset_refault", 0))
            self.out.set_counter("agentd_memory_major_faults_total", (), vm.get("pgmajfault", 0))
            self.out.set_counter("agentd_memory_pages_scanned_total", (),
                                 _sum_prefixed(vm, "pgscan_kswapd", "pgscan_direct"))
            self.out.set_counter("agentd_memory_pages_reclaimed_total", (),
                                 _sum_prefixed(vm, "pgsteal_kswapd", "pgsteal_direct"))
            self.out.set_counter("agentd_memory_file_refaults_total", (), refaults)
            if self._last_refaults is not None:
                t0, r0 = self._last_refaults
                if now > t0 and refaults >= r0:  # a decrease is a reset: no rate this tick
                    row["mem.refault:"] = (refaults - r0) / (now - t0)
            self._last_refaults = (now, refaults)
        return row
