"""Reading TOML files (configuration, scenarios) with one-line errors."""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def read_toml(path: str, what: str, error: type[Exception]) -> dict:
    """The document at `path`; an unreadable or malformed file raises `error` with one line
    naming it (`what` says what the file is, e.g. "config file")."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: {e}") from None
