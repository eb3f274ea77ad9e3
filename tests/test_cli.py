import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_here

from demucs_dist import __version__
from demucs_dist.cli import SUBCOMMANDS, main
from demucs_dist.model import Demucs
from demucs_dist.modelfile import save_model


def test_usage_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


def test_unknown_subcommand_is_one_line_and_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown subcommand" in capsys.readouterr().err


def test_info_prints_parameter_count(tmp_path, capsys):
    model = Demucs(channels=4, depth=3)
    save_model(model, tmp_path / "m.th", epoch=1)
    assert main(["info", str(tmp_path / "m.th")]) == 0
    out = capsys.readouterr().out
    assert str(sum(p.numel() for p in model.parameters())) in out and '"epoch": 1' in out


def test_bad_model_file_is_one_clear_line_without_traceback(tmp_path, capfd):
    """Through the command line's error handling in this process (test_bad_input's launched cases
    and test_debug_shows_the_traceback run the command as a process)."""
    from demucs_dist.errors import UserError

    bad = tmp_path / "bad.th"
    bad.write_bytes(b"\x00" * 10)
    result = cli_here(["info", bad], capfd)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError):  # --debug: the exception goes on, with its traceback
        main(["info", str(bad), "--debug"])


def test_console_script_is_installed():
    exe = shutil.which("demucs-dist", path=str(Path(sys.executable).parent))
    assert exe is not None
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == __version__


def test_config_options_round_trip():
    from demucs_dist.config import ApplyConfig, ModelConfig, parse

    model, apply = parse(["--channels", "8", "--no-glu", "--shifts", "2"], "x", "y", ModelConfig, ApplyConfig)
    assert model == ModelConfig(channels=8, glu=False) and apply == ApplyConfig(shifts=2)
    assert parse([], "x", "y", ModelConfig)[0] == ModelConfig()  # defaults are the dataclass's
