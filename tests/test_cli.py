import subprocess
import sys

import pytest

from alibi_lm import __version__
from alibi_lm.cli import build_parser, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    assert "info" in subparsers.choices
    for name in subparsers.choices:
        assert f"    {name}" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: alibi-lm" in capsys.readouterr().out


def test_info_reports_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"alibi-lm            {__version__}" in out
    assert "torch" in out and "triton" in out
    assert "attention backends  reference, sdpa" in out


def test_console_script_entry_point_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "alibi_lm", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "attention backends" in result.stdout


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trane"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
