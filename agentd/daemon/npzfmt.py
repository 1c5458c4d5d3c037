"""The window's npz format (window.groups_to_npz) re-encoded without numpy, for the server
process: deflated for `format=npz`, or as the JSON document of `format=json`.

The server process does not import numpy (it would add ~15 MiB to a process that only moves
bytes); an npz file is a zip of .npy members, and a .npy member is a small header and the raw
array, which memoryview reads as it is. Only what groups_to_npz writes is read: little-endian
float32/float64 arrays and unicode string arrays.
"""

from __future__ import annotations

import ast
import io
import json
import math
import sys
import zipfile

_MAGIC = b"\x93NUMPY"


class FormatError(ValueError):
    pass


def read_npy(data: bytes | memoryview) -> tuple[str, tuple, bool, memoryview]:
    """(dtype descr, shape, Fortran order, raw data) of one .npy member."""
    data = memoryview(data)
    if bytes(data[:6]) != _MAGIC or len(data) < 10:
        raise FormatError("not an .npy array")
    major = data[6]
    if major == 1:
        hlen, start = int.from_bytes(data[8:10], "little"), 10
    else:
        hlen, start = int.from_bytes(data[8:12], "little"), 12
    try:
        header = ast.literal_eval(bytes(data[start:start + hlen]).decode("latin-1"))
    except (ValueError, SyntaxError):
        raise FormatError("bad .npy header") from None
    return (header["descr"], tuple(header["shape"]), bool(header.get("fortran_order")),
            data[start + hlen:])


def _strings(descr: str, shape: tuple, raw: memoryview) -> list[str]:
    if not descr.startswith("<U"):
        raise FormatError(f"expected a unicode array, got {descr}")
    width = int(descr[2:]) * 4
    count = math.prod(shape)
    b = bytes(raw[:count * width])
    return [b[i * width:(i + 1) * width].decode("utf-32-le").rstrip("\0") for i in range(count)]


def _floats(descr: str, raw: memoryview) -> memoryview:
    code = {"<f4": "f", "<f8": "d"}.get(descr)
    if code is None or sys.byteorder != "little":
        raise FormatError(f"unexpected array type {descr}")
    return raw.cast("B").cast(code)


def members(data: bytes) -> dict[str, bytes | memoryview]:
    """The npz's arrays by name; a stored (uncompressed) member is a view into `data`, not
    a copy: the daemon's exports are stored."""
    view = memoryview(data)
    out: dict[str, bytes | memoryview] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for i in z.infolist():
                name = i.filename.removesuffix(".npy")
                if i.compress_type == zipfile.ZIP_STORED:
                    # The local header: 30 bytes, then the name and the extra field.
                    h = i.header_offset
                    start = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") + \
                        int.from_bytes(data[h + 28:h + 30], "little")
                    out[name] = view[start:start + i.file_size]
                else:
                    out[name] = z.read(i)
    except zipfile.BadZipFile as e:
        raise FormatError(f"not an npz file: {e}") from None
    return out


def compress(data: bytes, level: int = 1) -> bytes:
    """The same npz with its members deflated (what np.savez_compressed writes)."""
    out = io.BytesIO()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as src, \
                zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info))
    except zipfile.BadZipFile as e:
        raise FormatError(f"not an npz file: {e}") from None
    return out.getvalue()


def _nulls(values: list) -> list:
    return [None if v != v else v for v in values]  # NaN is the only value unequal to itself


def to_json(data: bytes, window_seconds: float) -> bytes:
    """The window as JSON: {window_seconds, groups: {NAME: {interval_seconds, t, columns:
    {CHANNEL: [values, null where absent]}}}, meta}."""
    return b"".join(to_json_chunks(data, window_seconds))


def to_json_chunks(data: bytes, window_seconds: float) -> list[bytes]:
    """to_json() in chunks of about 256 KiB, never joined: the server sends them one after
    the other, so a response costs its size once, and the Python objects alive at once are
    one column's, not the whole window's."""
    arrays = members(data)
    meta = "{}"
    if "meta" in arrays:
        descr, shape, _, raw = read_npy(arrays.pop("meta"))
        meta = _strings(descr, shape or (1,), raw)[0] or "{}"
    names = [k.split(":", 1)[1] for k in arrays if k.startswith("t:")]
    parts = [f'{{"window_seconds":{json.dumps(window_seconds)},"groups":{{']
    for n, name in enumerate(names):
        _, _, _, traw = read_npy(arrays[f"t:{name}"])
        t = _floats("<f8", traw).tolist()
        descr, shape, fortran, vraw = read_npy(arrays[f"v:{name}"])
        values = _floats(descr, vraw)
        cdescr, cshape, _, craw = read_npy(arrays[f"c:{name}"])
        columns = _strings(cdescr, cshape, craw) if math.prod(cshape) else []
        _, _, _, iraw = read_npy(arrays[f"i:{name}"])
        interval = _floats("<f8", iraw)[0] or None
        parts.append(f'{"," if n else ""}{json.dumps(name)}:{{"interval_seconds":'
                     f'{json.dumps(interval)},"t":{json.dumps([round(x, 6) for x in t])},'
                     f'"columns":{{')
        rows, width = len(t), len(columns)
        for j, col in enumerate(columns):
            column = values[j * rows:(j + 1) * rows] if fortran else values[j::width]
            parts.append(f'{"," if j else ""}{json.dumps(col)}:'
                         f'{json.dumps(_nulls(column.tolist()))}')
        parts.append("}}")
    parts.append(f'}},"meta":{meta}}}')
    return _coalesce(parts)


def _coalesce(parts: list[str], size: int = 256 * 1024) -> list[bytes]:
    """The pieces joined into chunks of at least `size` bytes: allocations that large are
    mapped and unmapped whole (see child.MALLOC_ENV), so a sent response leaves no holes in
    the heap that would keep the server's resident size at its peak."""
    chunks, batch, n = [], [], 0
    for p in parts:
        batch.append(p)
        n += len(p)
        if n >= size:
            chunks.append("".join(batch).encode())
            batch, n = [], 0
    if batch:
        chunks.append("".join(batch).encode())
    return chunks
