"""Every command fed hostile input (tests/hostile.py): one line on stderr, no traceback, and
the documented exit status: 2 usage, 3 source, 4 output; never 1 or 70."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import hostile


@pytest.fixture(scope="module")
def servers():
    with hostile.Servers() as s:
        yield s


@pytest.mark.parametrize("case", hostile.CASES, ids=[c.id for c in hostile.CASES])
def test_hostile_input(case, servers, tmp_path):
    r = hostile.run(case, str(tmp_path), servers)
    problem = hostile.verdict(case, r)
    assert problem is None, problem


def test_ids_are_unique():
    ids = [c.id for c in hostile.CASES]
    assert len(ids) == len(set(ids))


def test_a_bug_is_exit_70_in_one_line(monkeypatch, capsys):
    from agentd import cli

    def broken(args):
        return 1 / 0

    monkeypatch.setattr(cli, "cmd_catalog", broken)
    monkeypatch.setattr(cli, "cmd_diagnose", broken)
    assert cli.main(["catalog"]) == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("agentd: internal error: ZeroDivisionError: division by zero (agentd ")
    assert "a bug, please report it with the traceback that --log.level debug prints" in err
    # At --log.level debug, the traceback follows.
    assert cli.main(["diagnose", "--log.level", "debug"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "in broken" in err


@pytest.fixture
def no_matplotlib(tmp_path) -> dict:
    """An environment in which `import matplotlib` fails."""
    fake = tmp_path / "shadow" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    return {"PYTHONPATH": f"{fake.parent}:{hostile.ROOT}"}


def test_missing_matplotlib_is_a_usage_error_before_sampling(tmp_path, no_matplotlib):
    env = {**os.environ, **no_matplotlib}
    rec = tmp_path / "r.rec"
    rec.write_bytes(hostile.recording())
    for source in (["--recording", str(rec)], ["--simulate", "input-cpu", "--seconds", "1h"]):
        r = subprocess.run([sys.executable, "-m", "agentd", "diagnose", *source, "--plot",
                            str(tmp_path / "p.png")], capture_output=True, text=True,
                           env=env, timeout=60)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == "agentd: error: --plot needs matplotlib: install it into " \
            "agentd's environment (pip install matplotlib)"


def test_output_that_cannot_be_written_is_exit_4(tmp_path):
    """stdout on a full disk (/dev/full): the report and the catalog say so and exit 4."""
    rec = tmp_path / "r.rec"
    rec.write_bytes(hostile.recording())
    for args in (["catalog"], ["rules", "--out", "-"], ["diagnose", "--recording", str(rec)]):
        with open("/dev/full", "w") as full:
            r = subprocess.run([sys.executable, "-m", "agentd", *args], stdout=full,
                               stderr=subprocess.PIPE, text=True, timeout=60)
        assert r.returncode == 4, r.stderr
        assert r.stderr.strip().endswith("No space left on device"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_closed_pipe_is_not_an_error():
    r = subprocess.run(f"{sys.executable} -m agentd catalog | head -1", shell=True,
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("agentd_") and r.stderr == ""


def test_exit_statuses_are_in_help_and_docs():
    """Each command's --help lists its exit statuses; docs/reliability.md has them all, the
    same as agentd/exitcodes.py."""
    import re

    from agentd.cli import build_parser
    from agentd.exitcodes import BY_COMMAND, epilog

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        assert epilog(name) in parser.format_help(), name
    with open(os.path.join(hostile.ROOT, "docs", "reliability.md")) as f:
        section = f.read().split("\n## Exit statuses\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (\d+) \| (.+) \|$", section, re.M)
    documented: dict[str, dict[int, str]] = {}
    for command, code, text in rows:
        documented.setdefault(command, {})[int(code)] = text
    assert documented == BY_COMMAND
