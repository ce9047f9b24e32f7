"""The first commands a newcomer types print help and exit 0: the bare command, ``--help`` and every command's
``--help``."""

from __future__ import annotations

import contextlib
import io

import pytest
from conftest import run_cli

from tpp_monai.__main__ import COMMANDS, main


def test_the_bare_command_help_and_every_commands_help_print_help_and_exit_0() -> None:
    for args in ((), ("--help",), ("-h",)):
        proc = run_cli("tpp_monai", *args)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        assert proc.stdout.startswith("usage: python -m tpp_monai") and all(name in proc.stdout for name in COMMANDS)
    assert "95 % interval" in run_cli("tpp_monai", "--help").stdout  # the help text with a '%' in it, printed whole
    for name in COMMANDS:  # in this process: one import of torch for all of them
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0, name
        assert out.getvalue().startswith(f"usage: python -m tpp_monai {name}"), (name, out.getvalue()[:300])


def test_an_unknown_command_or_option_is_one_message() -> None:
    proc = run_cli("tpp_monai", "demoo")
    assert proc.returncode == 2 and "unknown command 'demoo'" in proc.stderr and "Traceback" not in proc.stderr
    assert run_cli("tpp_monai", "--bogus").returncode == 2
