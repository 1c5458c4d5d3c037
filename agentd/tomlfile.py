"""Reading TOML files (configuration, scenarios) with one-line errors."""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

MAX_BYTES = 4 * 2**20  # a configuration or scenario is a few KiB; more is not one


def read_text(path: str, what: str, error: type[Exception], max_bytes: int = MAX_BYTES) -> str:
    """The UTF-8 text of a small file; one that cannot be read, is larger than `max_bytes`
    or is not text raises `error` with one line naming it (`what` says what it is)."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > max_bytes:
        raise error(f"{what} {path} is larger than {max_bytes >> 20} MiB: not a {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte {e.start})") from None


def read_toml(path: str, what: str, error: type[Exception]) -> dict:
    """The document at `path`; an unreadable or malformed file raises `error` with one line
    naming it (`what` says what the file is, e.g. "config file")."""
    text = read_text(path, what, error)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: {e}") from None
    except RecursionError:
        raise error(f"{path}: nested too deeply") from None
