"""A real data loader: worker processes (children of the trainer, as PyTorch's are) read JPEG
files, decode and augment them with real CPU work, and hand batches back through queues,
keeping `prefetch` batches per worker in flight and delivering them in order.

PyTorch's DataLoader is used when torch is importable; otherwise `Loader` does the same on
multiprocessing (fork, an index queue per worker, one result queue, in-order delivery).
`workers = 0` loads in the trainer itself, one batch when asked: no overlap at all.
"""

from __future__ import annotations

import io
import os
import random
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Transform:
    crop: int = 112  # output side in pixels
    blur: float = 0.0  # Gaussian blur radius: extra CPU per image ("heavy decode")
    passes: int = 1  # augmentation passes (each: crop, resize, flip, colour jitter)
    float32: bool = False  # normalise to float32 (4x the bytes to copy to the device)
    frames: int = 1  # a clip of this many frames per sample (video-like, large to copy)
    drop_after_read: bool = False  # drop the file from the page cache once read (streaming)


def load_sample(path: str, t: Transform, rng: random.Random):
    """Read one file, decode it and augment it: the work of one sample."""
    import numpy as np
    from PIL import Image, ImageEnhance, ImageFilter

    with open(path, "rb") as f:
        data = f.read()
        if t.drop_after_read:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    for _ in range(max(t.passes, 1)):
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.6, 1.0))
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        out = img.crop((x, y, x + side, y + side)).resize((t.crop, t.crop), Image.BILINEAR)
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if t.blur:
            out = out.filter(ImageFilter.GaussianBlur(t.blur))
        out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.2))
    arr = np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)
    if t.float32:
        arr = (arr.astype(np.float32) - 127.5) / 64.0
    if t.frames > 1:
        arr = np.repeat(arr[None], t.frames, axis=0)
    return arr


def _collate(samples):
    import numpy as np

    return np.stack(samples)


class WorkerError(RuntimeError):
    """A worker failed on a batch; the trainer stops instead of waiting for it forever."""


def _worker(files, t: Transform, index_q, result_q, seed: int) -> None:
    import signal

    # The trainer decides when to stop (Ctrl-C reaches the whole process group); a plain
    # SIGTERM ends a worker, and an exiting worker never waits to flush batches no one reads.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    result_q.cancel_join_thread()
    rng = random.Random(seed)
    while True:
        task = index_q.get()
        if task is None:
            return
        batch_index, indices = task
        try:
            batch = _collate([load_sample(files[i], t, rng) for i in indices])
        except Exception as e:  # as PyTorch does: the error goes to the trainer
            result_q.put((batch_index, WorkerError(f"loader worker: {type(e).__name__}: {e}")))
            return
        result_q.put((batch_index, batch))


class Loader:
    """Batches forever (epoch after epoch, reshuffled), `workers` processes, `prefetch`
    batches in flight per worker."""

    def __init__(self, files: list[str], batch: int, workers: int, prefetch: int,
                 t: Transform, seed: int = 0):
        import multiprocessing as mp

        self.files, self.batch, self.t = files, batch, t
        self.workers, self.prefetch = workers, max(prefetch, 1)
        self.rng = random.Random(seed)
        self._order: list[int] = []
        self._procs = []
        if workers:
            ctx = mp.get_context("fork")  # workers are the trainer's children, as in PyTorch
            self._result_q = ctx.Queue()
            self._index_qs = [ctx.Queue() for _ in range(workers)]
            for k in range(workers):
                p = ctx.Process(target=_worker, args=(files, t, self._index_qs[k],
                                                      self._result_q, seed * 1000 + k),
                                daemon=True, name=f"loader-{k}")
                p.start()
                self._procs.append(p)

    def _next_indices(self) -> list[int]:
        out = []
        while len(out) < self.batch:
            if not self._order:
                self._order = list(range(len(self.files)))
                self.rng.shuffle(self._order)
            out.append(self._order.pop())
        return out

    def __iter__(self):
        if not self.workers:
            rng = random.Random(self.rng.random())
            while True:
                yield _collate([load_sample(self.files[i], self.t, rng)
                                for i in self._next_indices()])
        sent = received = 0
        pending: dict[int, object] = {}
        for _ in range(self.workers * self.prefetch):
            self._index_qs[sent % self.workers].put((sent, self._next_indices()))
            sent += 1
        while True:
            while received not in pending:
                index, batch = self._result_q.get()
                pending[index] = batch
            batch = pending.pop(received)
            if isinstance(batch, WorkerError):
                raise batch
            received += 1
            self._index_qs[sent % self.workers].put((sent, self._next_indices()))
            sent += 1
            yield batch

    def close(self) -> None:
        for q in getattr(self, "_index_qs", []):
            q.put(None)
        deadline = time.monotonic() + 2.0
        for p in self._procs:
            p.join(max(deadline - time.monotonic(), 0.01))
            if p.is_alive():
                p.terminate()
                p.join()


def make(files: list[str], batch: int, workers: int, prefetch: int, t: Transform,
         seed: int = 0, pin_memory: bool = False):
    """(an iterable of batches, a close function): torch's DataLoader when importable."""
    try:
        import torch
        from torch.utils.data import DataLoader, Dataset, RandomSampler
    except ImportError:
        loader = Loader(files, batch, workers, prefetch, t, seed)
        return loader, loader.close

    class Images(Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            rng = random.Random(hash((seed, i, os.getpid(), random.random())))
            return torch.from_numpy(load_sample(files[i], t, rng))

    kwargs = {"prefetch_factor": prefetch, "persistent_workers": True} if workers else {}
    dl = DataLoader(Images(), batch_size=batch, num_workers=workers, drop_last=True,
                    sampler=RandomSampler(range(len(files)), replacement=True,
                                          num_samples=10**9),
                    pin_memory=pin_memory, **kwargs)
    return iter(dl), (lambda: None)
