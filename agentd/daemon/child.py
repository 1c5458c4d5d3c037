"""The daemon's helper processes: how they are started, talked to and kept alive.

The sampling process keeps its interpreter for sampling: the HTTP server (httpd.py) and the
rolling analysis (analyst.py) each run in a child process of their own, so that neither
serving under load nor the analysis' imports (scipy) compete with the sampling threads for
CPython's GIL or inflate their memory. Parent and child talk over a Unix socket pair in
frames:

    <request id u32> <header length u32> <payload length u64> <JSON header> <payload bytes>

Request id 0 is a one-way message (no answer). A child dies with its parent twice over: by
prctl(PR_SET_PDEATHSIG), and by exiting when its end of the socket pair reads end of file.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

log = logging.getLogger("agentd.child")

FRAME = struct.Struct("<IIQ")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 30

# glibc: never grow the heap for large buffers (they are returned at once on free), and keep
# one malloc arena per pair of threads. Without these a burst of large responses leaves the
# resident size at its peak for good.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}


def tune_malloc() -> None:
    """MALLOC_ENV's settings for this (already running) process, through mallopt(3)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 131072)  # M_MMAP_THRESHOLD (fixed: no longer adjusts upwards)
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc


PR_SET_NAME = 15


def name_os_thread() -> None:
    """Give the calling thread its Python name at the OS level too (prctl PR_SET_NAME, 15
    bytes), so that `top -H`, `ps -L` and /proc/PID/task/TID/comm tell agentd's threads
    apart (CPython names its threads for Python only). Never call it from the main thread:
    its name is the process'."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.prctl(PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux


class ChildGone(ConnectionError):
    """The other end closed the socket (the process exited) or broke the framing."""


def encode(rid: int, header: dict, payload: bytes | memoryview = b"") -> list:
    head = json.dumps(header, separators=(",", ":"), default=str).encode()
    return [FRAME.pack(rid, len(head), len(payload)) + head, payload]


def decode_frame(prefix: bytes, max_payload: int = MAX_PAYLOAD) -> tuple[int, int, int]:
    rid, hlen, plen = FRAME.unpack(prefix)
    if hlen > MAX_HEADER or plen > max_payload:
        raise ChildGone(f"bad frame (header {hlen} B, payload {plen} B)")
    return rid, hlen, plen


class Channel:
    """One end of a socket pair, framed; send() may be called from several threads.

    `max_payload` bounds what one frame may carry: the sampling process reads its children's
    frames with a bound near what they really send, so a child that writes garbage (a frame
    that claims a gigabyte) costs it an error, not its memory."""

    def __init__(self, sock: socket.socket, max_payload: int = MAX_PAYLOAD):
        self.sock = sock
        self.max_payload = max_payload
        self._send_lock = threading.Lock()

    def send(self, rid: int, header: dict, payload: bytes | memoryview = b"",
             timeout: float | None = None) -> None:
        """Send one frame; with `timeout`, ChildGone when the other end has not taken it all
        within that many seconds (a child that stopped reading)."""
        head, body = encode(rid, header, payload)
        try:
            with self._send_lock:
                self.sock.settimeout(timeout)
                self.sock.sendall(head)
                if len(body):
                    self.sock.sendall(body)
        except OSError as e:
            raise ChildGone(str(e)) from None

    def _read(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except socket.timeout:
                raise
            except OSError as e:
                raise ChildGone(str(e)) from None
            if k == 0:
                raise ChildGone("end of file")
            got += k
        return bytes(buf)

    def recv(self, timeout: float | None = None) -> tuple[int, dict, bytes]:
        """The next frame; socket.timeout when none began within `timeout` (a frame that has
        begun is read to its end under the same limit per read)."""
        self.sock.settimeout(timeout)
        rid, hlen, plen = decode_frame(self._read(FRAME.size), self.max_payload)
        try:
            header = json.loads(self._read(hlen)) if hlen else {}
        except ValueError:
            raise ChildGone("bad frame header") from None
        return rid, header, self._read(plen) if plen else b""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Backoff:
    """Restart delays: 0.5 s doubling to 30 s; back to 0.5 s once a child ran for a minute."""

    def __init__(self, first: float = 0.5, most: float = 30.0, stable: float = 60.0):
        self.first, self.most, self.stable = first, most, stable
        self.delay = first

    def next_delay(self, ran_for: float) -> float:
        if ran_for >= self.stable:
            self.delay = self.first
        delay = self.delay
        self.delay = min(self.delay * 2, self.most)
        return delay


def _package_root() -> str:
    import agentd

    return os.path.dirname(os.path.dirname(os.path.abspath(agentd.__file__)))


class Child:
    """A helper process running `python -m MODULE`, with a Channel to it."""

    def __init__(self, role: str, module: str, args: list[str] | None = None,
                 pass_fds: tuple[int, ...] = (), max_payload: int = MAX_PAYLOAD):
        self.role = role
        self.module = module
        self.max_payload = max_payload  # the most one frame from the child may carry
        self.args = args or []
        self.pass_fds = pass_fds
        self.proc: subprocess.Popen | None = None
        self.channel: Channel | None = None
        self.started = 0.0  # monotonic
        self.ready = False  # it said hello: its imports are done
        self.last_heard = 0.0  # monotonic time of its last frame (set by who reads them)
        self.broken = False  # its channel failed while it lived: to be killed
        self.replaces: Child | None = None  # a server process to drain once this one serves

    def start(self) -> Channel:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env.update(MALLOC_ENV)
        root = _package_root()
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"]
                                    if env.get("PYTHONPATH") else "")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "--channel-fd", str(theirs.fileno()),
                 "--parent-pid", str(os.getpid()), *self.args],
                pass_fds=(theirs.fileno(), *self.pass_fds), env=env, stdin=subprocess.DEVNULL,
                close_fds=True)
        finally:
            theirs.close()
        self.channel = Channel(ours, self.max_payload)
        self.started = time.monotonic()
        return self.channel

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ran_for(self) -> float:
        return time.monotonic() - self.started

    def terminate(self) -> None:
        """Close the channel and send SIGTERM (a child keeps no state worth a grace period)."""
        if self.channel is not None:
            self.channel.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def reap(self, timeout: float) -> None:
        """Wait for a terminated child; SIGKILL it after `timeout`."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 1.0) -> None:
        self.terminate()
        self.reap(timeout)

    def drain(self, timeout: float) -> None:
        """Wait up to `timeout` for a child told to finish its work to exit; then stop it."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.stop(timeout=0.5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.channel is not None:
            self.channel.close()


# --- the child's side -------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1
CHILD_NICE = 10  # helper processes run this much nicer than the sampling process


def child_setup(parent_pid: int) -> None:
    """In a child, first thing: die with the parent, and leave Ctrl-C to the parent (a
    terminal sends SIGINT to the whole process group; the parent stops its children)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the socket's end of file still ends the child
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Yield the CPU to the sampling process when the node is busy: a scrape or an analysis
    # run may wait some milliseconds, a 10 Hz tick should not. (Raising one's own nice value
    # needs no privilege; the systemd unit allows setpriority for it.)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(os.getpriority(os.PRIO_PROCESS, 0) + CHILD_NICE,
                                                19))
    except OSError:
        pass


def child_args(argv: list[str] | None = None, extra=None):
    """The arguments every child takes, plus its own (extra(parser) adds them)."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--channel-fd", type=int, required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--log-level", default="info")
    if extra is not None:
        extra(p)
    return p.parse_args(argv)


def resident_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def child_series(role: str, pid: int) -> list:
    """agentd_child_* series of one helper process, read from /proc at scrape time."""
    out = []
    rss = resident_bytes(pid)
    if rss is not None:
        out.append(("agentd_child_resident_memory_bytes", (role,), float(rss)))
    cpu = cpu_seconds(pid)
    if cpu is not None:
        out.append(("agentd_child_cpu_seconds_total", (role,), cpu))
    return out
