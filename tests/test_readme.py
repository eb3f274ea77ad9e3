"""The README documents the options the CLI actually has."""

from __future__ import annotations

import contextlib
import io
import re
from functools import cache
from pathlib import Path

import pytest

from demucs_dist.cli import SUBCOMMANDS, main

README = Path(__file__).parents[1] / "README.md"
# How a README line names a subcommand: directly, through a launcher, or in the subcommands table.
LAUNCHERS = {
    "launch/train.sh": "train",
    "launch/multinode.sh": "train",
    "launch/slurm.sbatch": "train",
    "launch/evaluate.sh": "evaluate",
    "launch/separate.sh": "separate",
}


@cache
def help_text(subcommand: str) -> str:
    """`demucs-dist <subcommand> --help`, run in this process (argparse prints it, then exits 0)."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit) as exit:
        main([subcommand, "--help"])
    assert exit.value.code in (0, None)
    return text.getvalue()


def subcommand_of(line: str) -> str | None:
    if match := re.search(r"demucs-dist (\w+)", line):
        return match.group(1)
    for launcher, subcommand in LAUNCHERS.items():
        if launcher in line:
            return subcommand
    if match := re.match(r"\| `(\w+)` \|", line):  # the subcommands table
        return match.group(1)
    if match := re.search(r"\(`(\w+)`\)", line):  # "Model options (`train`): ..."
        return match.group(1)
    return None


def documented_options() -> list[tuple[int, str, str]]:
    """(line number, subcommand, option) for every --option on a line that names a subcommand."""
    found = []
    for number, line in enumerate(README.read_text().splitlines(), start=1):
        subcommand = subcommand_of(line)
        if subcommand is None:
            continue
        # Options followed by "_" are accelerate's (--config_file, --num_processes), not ours.
        for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?!\w)", line):
            found.append((number, subcommand, option))
    return found


def test_readme_names_the_two_commands_at_the_top():
    top = README.read_text()[:1500]
    assert "make demo" in top and "make test" in top


def test_every_documented_option_exists():
    options = documented_options()
    assert len(options) > 40  # the README really documents the CLI
    missing = []
    for number, subcommand, option in options:
        assert subcommand in SUBCOMMANDS, f"README line {number}: unknown subcommand {subcommand}"
        if re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text(subcommand)) is None:
            missing.append(f"line {number}: {subcommand} {option}")
    assert not missing, "README options the CLI does not have:\n" + "\n".join(missing)


def test_every_subcommand_is_documented():
    text = README.read_text()
    for subcommand in SUBCOMMANDS:
        assert f"| `{subcommand}` |" in text, subcommand
