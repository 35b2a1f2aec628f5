"""The `cellavie` entry point: every subcommand is registered and has real help text."""
import subprocess
import sys

import pytest

from cellavie_hpc.cli import SUBCOMMANDS, main


def test_top_level_help_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: cellavie {name}" in capsys.readouterr().out


def test_python_dash_m_is_the_same_command():
    result = subprocess.run([sys.executable, "-m", "cellavie_hpc", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith("cellavie-hpc ")
