"""Datasets of real JPEG files on the real disk, and control over whether the page cache holds
them.

Images are made with Pillow from smoothed noise (photographs' size and decode cost, not
noise's); a pool of distinct images is written again and again under different names, since
the page cache and the disk see files, not pixels. A dataset is made once per spec and kept
(a marker file records the spec). Evicting is per file (posix_fadvise DONTNEED), which drops
exactly these files' cached pages without root and without disturbing anyone else's cache, as
`echo 3 > /proc/sys/vm/drop_caches` would.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass

POOL = 24


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: int
    width: int
    height: int
    quality: int = 88


def _image(rng, width: int, height: int):
    import numpy as np
    from PIL import Image, ImageFilter

    coarse = rng.integers(0, 256, size=(max(height // 16, 2), max(width // 16, 2), 3),
                          dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    fine = rng.normal(0, 18, size=(height, width, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + fine, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).filter(ImageFilter.SMOOTH)


def make(root: str, spec: DatasetSpec) -> list[str]:
    """The dataset's files, written if they are not there yet."""
    import numpy as np

    directory = os.path.join(root, spec.name)
    marker = os.path.join(directory, "dataset.json")
    names = [os.path.join(directory, f"img_{i:06d}.jpg") for i in range(spec.files)]
    try:
        with open(marker) as f:
            if json.load(f) == asdict(spec) and all(os.path.exists(p) for p in names[-3:]):
                return names
    except (OSError, ValueError):
        pass
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(7)
    pool = []
    for _ in range(min(POOL, spec.files)):
        buf = io.BytesIO()
        _image(rng, spec.width, spec.height).save(buf, "JPEG", quality=spec.quality)
        pool.append(buf.getvalue())
    for i, path in enumerate(names):
        # Renamed into place: a run reading the dataset meanwhile never sees half a file.
        with open(path + ".tmp", "wb") as f:
            f.write(pool[i % len(pool)])
        os.replace(path + ".tmp", path)
    fd = os.open(directory, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    os.sync()
    with open(marker, "w") as f:
        json.dump(asdict(spec), f)
    return names


def size_bytes(files: list[str]) -> int:
    return sum(os.path.getsize(p) for p in files)


def evict(files: list[str]) -> None:
    """Drop these files' pages from the page cache (written back first, so none is dirty)."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[str]) -> None:
    """Read every file once, so the page cache holds them."""
    for p in files:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def cached_fraction(files: list[str], sample: int = 200) -> float:
    """Share of a sample of the files' pages in the page cache (mincore(2) on a mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    resident = total = 0
    for p in files[::max(len(files) // sample, 1)]:
        size = os.path.getsize(p)
        if size == 0:
            continue
        with open(p, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # maps, reads nothing
        pages = (size + page - 1) // page
        vec = (ctypes.c_ubyte * pages)()
        buf = (ctypes.c_char * size).from_buffer(mm)
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec)
        del buf
        mm.close()
        if rc == 0:
            resident += sum(v & 1 for v in vec)
            total += pages
    return resident / total if total else 0.0
