"""The exit statuses of every agentd command, in one table: each command's `--help` shows its
rows, and docs/reliability.md lists them all (a test keeps the two equal).

A problem with what the user gave (flags, files, URLs) is 2 and is found before any sampling
or recording starts; a source that cannot be reached or read is 3; an output that cannot be
written is 4; anything else is a bug in agentd (70, EX_SOFTWARE from sysexits.h), reported
in one line, with the traceback at --log.level debug.
"""

from __future__ import annotations

OK, FINDINGS, USAGE, SOURCE, OUTPUT, SOFTWARE, INTERRUPTED = 0, 1, 2, 3, 4, 70, 130

_COMMON = {
    USAGE: "usage or configuration error (a flag, a file, a URL); nothing was started",
    SOFTWARE: "internal error: a bug in agentd, please report it (the traceback is logged "
              "at --log.level debug)",
}

BY_COMMAND: dict[str, dict[int, str]] = {
    "run": {
        OK: "stopped by SIGTERM or SIGINT",
        USAGE: "usage or configuration error, or the address cannot be listened on; nothing "
               "was started",
        SOFTWARE: _COMMON[SOFTWARE],
    },
    "diagnose": {
        OK: "no finding at or above --fail-on",
        FINDINGS: "findings at or above --fail-on",
        USAGE: _COMMON[USAGE],
        SOURCE: "the source (daemon, recording, Prometheus) cannot be reached or read, "
                "holds too little to analyse, or holds no GPU",
        OUTPUT: "the report or --plot cannot be written",
        SOFTWARE: _COMMON[SOFTWARE],
        INTERRUPTED: "interrupted (Ctrl-C) before a report",
    },
    "record": {
        OK: "recorded (SIGINT/SIGTERM stop early and keep what was recorded)",
        USAGE: _COMMON[USAGE],
        SOURCE: "the daemon cannot be reached or read, or nothing was recorded",
        OUTPUT: "--out cannot be written (missing directory, permissions, full disk); the "
                "rows recorded before stay readable",
        SOFTWARE: _COMMON[SOFTWARE],
    },
    "demo": {
        OK: "stopped (Ctrl-C or --seconds)",
        USAGE: _COMMON[USAGE],
        SOFTWARE: _COMMON[SOFTWARE],
    },
    "dashboards": {
        OK: "written",
        USAGE: _COMMON[USAGE],
        OUTPUT: "--out cannot be written",
        SOFTWARE: _COMMON[SOFTWARE],
    },
    "rules": {
        OK: "written",
        USAGE: "usage error, or a rules config that is not valid",
        OUTPUT: "--out cannot be written",
        SOFTWARE: _COMMON[SOFTWARE],
    },
    "probe": {
        OK: "every part asked for was measured and written",
        USAGE: _COMMON[USAGE],
        SOURCE: "a part (or one disk or GPU of it) could not be measured; the rest is "
                "written and each failure named",
        OUTPUT: "the state file cannot be written (checked before measuring)",
        SOFTWARE: _COMMON[SOFTWARE],
        INTERRUPTED: "interrupted (Ctrl-C); nothing written",
    },
    "catalog": {
        OK: "printed",
        OUTPUT: "standard output cannot be written",
        SOFTWARE: _COMMON[SOFTWARE],
    },
}


class OutputError(Exception):
    """The report, a plot, a recording or other output cannot be written (status 4)."""


def write_stdout(text: str, what: str = "to standard output") -> None:
    """Write and flush `text`; OutputError when it cannot be (a full disk, a closed file).
    A closed pipe (`| head`) raises BrokenPipeError, which main() treats as no error."""
    import sys

    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write {what}: {e.strerror}") from None


def epilog(command: str) -> str:
    """The exit-status paragraph of `agentd COMMAND --help`."""
    rows = BY_COMMAND[command]
    return "exit status:\n" + "\n".join(f"  {code:<4} {text}" for code, text in rows.items())
