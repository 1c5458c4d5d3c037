"""Sampling loops: each runs one or more samplers at one interval, in its own thread.

Samplers that can hang on a device (the GPU driver) get a loop of their own, so a wedged
call never delays the others; host samplers that read in-memory kernel files share one loop
per interval, which saves a thread wake-up per sampler per tick (measurably the largest cost
at 10 Hz in CPython).

Ticks sit on a grid (multiples of the interval on the monotonic clock), so loops with the
same interval sample together and their window rows line up. A run that overruns its slot
skips the ticks it missed and counts them; it never lets the schedule drift silently. A
failing sampler is counted and retried with exponential back-off; an absent source
(Unavailable) is logged once and looked for again every `retry_seconds`. One sampler's
failure never stops the others in its loop. Samplers get monotonic time as `now`, so their
rates never see a wall-clock step; rows are stamped with the wall clock for people.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable

from agentd.daemon.child import name_os_thread
from agentd.samplers.base import Sampler, Unavailable
from agentd.daemon.window import Ring

MAX_BACKOFF = 30.0


class SamplerState:
    """One sampler with its bookkeeping (what agentd_sampler_* report)."""

    def __init__(self, sampler: Sampler, interval: float, slow_interval: float,
                 ring: Ring | None, retry_seconds: float = 60.0,
                 wall_clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.sampler = sampler
        # Intervals (rates, back-off) come from the monotonic clock; the wall clock only
        # stamps rows and success times for people.
        self.wall_clock = wall_clock
        self.monotonic = monotonic
        self.interval = interval
        self.slow_every = max(int(round(slow_interval / interval)), 1)
        self.ring = ring
        self.retry_seconds = retry_seconds
        self.log = logging.getLogger(f"agentd.runner.{sampler.name}")
        self.available = False
        self.unavailable_reason = ""
        self.success = False
        self.runs = 0
        self.errors = 0
        self.overruns = 0
        self.last_duration = 0.0
        self.last_success = 0.0
        self.last_error = ""
        self.failures = 0
        self.next_try = 0.0  # monotonic time of the next open() or run after failures

    @property
    def name(self) -> str:
        return self.sampler.name

    def try_open(self, now: float) -> bool:
        if now < self.next_try:
            return False
        try:
            self.sampler.open()
        except Unavailable as e:
            if str(e) != self.unavailable_reason:
                self.log.warning("%s: no data: %s", self.name, e)
            self.unavailable_reason = str(e)
            self.next_try = now + self.retry_seconds
            return False
        except Exception as e:
            self.errors += 1
            self.log.error("%s: cannot start: %s", self.name, e)
            self.unavailable_reason = f"error: {e}"
            self.next_try = now + self.retry_seconds
            return False
        if self.unavailable_reason:
            self.log.info("%s: source found", self.name)
        self.unavailable_reason = ""
        self.available = True
        return True

    def run(self, tick: int, interval: float) -> None:
        now = self.monotonic()
        if not self.available:
            self.try_open(now)
            if not self.available:
                return
        if now < self.next_try:
            return  # backing off after failures
        slow = tick % self.slow_every == 0
        wall = self.wall_clock()
        t0 = time.perf_counter()
        try:
            row = self.sampler.sample(now, slow)
        except Exception as e:
            self.errors += 1
            self.success = False
            self.failures += 1
            message = str(e) or type(e).__name__
            if message != self.last_error:
                self.log.error("%s: %s", self.name, message)
                self.last_error = message
            backoff = min(interval * 2 ** (self.failures - 1), MAX_BACKOFF)
            self.next_try = now + backoff - interval / 2
            row = None
        else:
            if self.failures:
                self.log.info("%s: recovered", self.name)
            self.failures = 0
            self.last_error = ""
            self.success = True
            self.last_success = wall
        self.runs += 1
        self.last_duration = time.perf_counter() - t0
        if row and self.ring is not None:
            self.ring.append(wall, row, now)

    def close(self) -> None:
        if self.available:
            try:
                self.sampler.close()
            except Exception as e:
                self.log.debug("%s: close: %s", self.name, e)


class Loop:
    """A thread running its samplers in turn at one interval."""

    def __init__(self, name: str, interval: float, states: list[SamplerState]):
        self.name = name
        self.interval = interval
        self.states = states
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"loop-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        name_os_thread()
        now = time.monotonic()
        for s in self.states:
            s.try_open(now)
        try:
            self._loop()
        finally:
            for s in self.states:
                s.close()

    def _sleep_until(self, deadline: float) -> bool:
        """Sleep to a monotonic deadline; False if asked to stop meanwhile. Plain sleeps in
        slices of at most 0.25 s: cheaper per wake-up than Event.wait (a lock and a condition
        per call), which matters at 10 Hz, and still prompt to stop."""
        while True:
            if self._stop.is_set():
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            time.sleep(min(remaining, 0.25))

    def _loop(self) -> None:
        interval = self.interval
        tick = math.floor(time.monotonic() / interval)  # the first run happens at once
        while True:
            if not self._sleep_until(tick * interval):
                return
            for s in self.states:
                s.run(tick, interval)
                if self._stop.is_set():
                    return
            next_tick = tick + 1
            now_tick = time.monotonic() / interval
            if now_tick >= next_tick:
                missed = math.floor(now_tick) - next_tick + 1
                for s in self.states:
                    s.overruns += missed
                next_tick += missed
            tick = next_tick
