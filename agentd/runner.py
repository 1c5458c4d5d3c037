"""Runs one sampler in its own thread at its own interval.

Ticks sit on a grid (multiples of the interval on the monotonic clock), so samplers with the
same interval sample together and their window rows line up. A run that overruns its slot
skips the ticks it missed and counts them; it never lets the schedule drift silently. A
failing run is counted and retried with exponential back-off; an absent source (Unavailable)
is logged once and looked for again every `retry_seconds`.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from agentd.samplers.base import Sampler, Unavailable
from agentd.window import Ring

MAX_BACKOFF = 30.0


class Runner:
    def __init__(self, sampler: Sampler, interval: float, slow_interval: float,
                 ring: Ring | None, retry_seconds: float = 60.0):
        self.sampler = sampler
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
        self.heartbeat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"sampler-{sampler.name}",
                                        daemon=True)

    @property
    def name(self) -> str:
        return self.sampler.name

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _open(self) -> bool:
        try:
            self.sampler.open()
        except Unavailable as e:
            if str(e) != self.unavailable_reason:
                self.log.warning("%s: no data: %s", self.name, e)
            self.unavailable_reason = str(e)
            return False
        except Exception as e:
            self.errors += 1
            self.log.error("%s: cannot start: %s", self.name, e)
            self.unavailable_reason = f"error: {e}"
            return False
        if self.unavailable_reason:
            self.log.info("%s: source found", self.name)
        self.unavailable_reason = ""
        self.available = True
        return True

    def _main(self) -> None:
        while not self._stop.is_set():
            if self._open():
                break
            self._stop.wait(self.retry_seconds)
        if self._stop.is_set():
            return
        try:
            self._loop()
        finally:
            try:
                self.sampler.close()
            except Exception as e:
                self.log.debug("%s: close: %s", self.name, e)

    def _loop(self) -> None:
        interval = self.interval
        tick = math.floor(time.monotonic() / interval)  # the first run happens at once
        failures = 0
        while True:
            delay = tick * interval - time.monotonic()
            if self._stop.wait(max(delay, 0)):
                return
            slow = tick % self.slow_every == 0
            wall = time.time()
            t0 = time.perf_counter()
            try:
                row = self.sampler.sample(wall, slow)
            except Exception as e:
                self.errors += 1
                self.success = False
                failures += 1
                message = str(e) or type(e).__name__
                if message != self.last_error:
                    self.log.error("%s: %s", self.name, message)
                    self.last_error = message
                row = None
            else:
                if failures:
                    self.log.info("%s: recovered", self.name)
                failures = 0
                self.last_error = ""
                self.success = True
                self.last_success = wall
            self.runs += 1
            self.last_duration = time.perf_counter() - t0
            self.heartbeat = time.monotonic()
            if row and self.ring is not None:
                self.ring.append(wall, row)
            # Next slot; after failures back off exponentially (whole ticks, on the grid).
            skip = 1
            if failures:
                skip = max(1, int(min(interval * 2 ** (failures - 1), MAX_BACKOFF) / interval))
            next_tick = tick + skip
            now_tick = time.monotonic() / interval
            if now_tick >= next_tick:
                missed = math.floor(now_tick) - next_tick + 1
                self.overruns += missed
                next_tick += missed
            tick = next_tick
