"""The `segmentation` command: its subcommands."""

from __future__ import annotations

from segmentation.cli import main


def test_help_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "data", "summary", "evaluate"):
        assert f"    {command}" in out
