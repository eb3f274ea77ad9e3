"""The launch scripts (launch/*.sh) and the GPU checks of make_accelerator, without a GPU.

The scripts run for real in bash; only the cluster's tools are stand-ins: an `nvidia-smi` that
prints a 4-GPU listing, SLURM's `srun`/`scontrol`, and (where only the command line matters) an
`accelerate` that records how it was called. One test launches real training through
launch/train.sh from another folder.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, output, run

from demucs_dist import distributed
from demucs_dist.errors import UserError

ROOT = Path(__file__).parents[1]
UUIDS = [f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd" for i in range(4)]
LISTING = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: {uuid})\n" for i, uuid in enumerate(UUIDS))


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    """A folder put first on PATH: nvidia-smi listing 4 GPUs, and SLURM's srun / scontrol."""
    folder = tmp_path / "bin"
    listing = tmp_path / "listing.txt"
    listing.write_text(LISTING)
    executable(folder / "nvidia-smi", f'#!/usr/bin/env bash\n[ "$1" = -L ] && cat "{listing}"\n')
    executable(folder / "srun", '#!/usr/bin/env bash\nexport SLURM_NODEID=1\nexec "$@"\n')
    executable(folder / "scontrol", '#!/usr/bin/env bash\nprintf "node-a\\nnode-b\\n"\n')
    return folder


@pytest.fixture
def fake_venv(tmp_path) -> tuple[Path, Path]:
    """(VENV, record): a virtualenv whose `accelerate` writes its argv, folder and environment to record."""
    record = tmp_path / "accelerate.json"
    executable(
        tmp_path / "venv" / "bin" / "accelerate",
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"keys = ['DEMUCS_DIST_NPROC', 'ACCELERATE_USE_CPU', 'PYTHONPATH', 'MACHINE_RANK']\n"
        f"json.dump(dict(argv=sys.argv[1:], cwd=os.getcwd(), env={{k: os.environ.get(k) for k in keys}}),"
        f" open({str(record)!r}, 'w'))\n",
    )
    return tmp_path / "venv", record


def environment(fake_bin: Path, visible: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NPROC")}
    env["PATH"] = f"{fake_bin}:{env['PATH']}"
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return {**env, **extra}


# ---------------------------------------------------------------------------------------------
# count_gpus (launch/run.sh)


@pytest.mark.parametrize(
    "visible, count",
    [
        (None, 4),  # unset: every GPU nvidia-smi lists
        ("", 0),  # set and empty: none
        ("0,1", 2),
        ("3", 1),
        (" 2, 3 ", 2),
        ("0,7,1", 1),  # CUDA stops at the first index the machine does not have
        ("1,1", 1),  # a repeat stops it too
        ("-1", 0),
        ("NoDevFiles", 0),
        (f"{UUIDS[3]},{UUIDS[0]}", 2),
        (UUIDS[1][:12], 1),  # a unique prefix of a UUID
        ("GPU-ffffffff-0000-0000-0000-000000000000", 0),  # not on this machine
    ],
)
def test_count_gpus_follows_cuda_visible_devices(fake_bin, visible, count):
    result = run(["bash", "-c", f"source {ROOT / 'launch/run.sh'} && count_gpus"], environment(fake_bin, visible))
    assert result.returncode == 0, output(result)
    assert result.stdout == f"{count}\n"


def test_count_gpus_is_zero_without_a_working_nvidia_smi(fake_bin):
    executable(fake_bin / "nvidia-smi", "#!/usr/bin/env bash\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    for visible in (None, "0,1"):
        result = run(["bash", "-c", f"source {ROOT / 'launch/run.sh'} && count_gpus"], environment(fake_bin, visible))
        assert result.stdout == "0\n", output(result)


def test_count_gpus_without_nvidia_smi_counts_the_driver_device_files(tmp_path):
    """A container without nvidia-smi: PATH holds only what count_gpus needs besides bash builtins."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("bash", "grep"):
        (tools / tool).symlink_to(shutil.which(tool))
    devices = len(glob.glob("/dev/nvidia[0-9]*"))  # none on a machine without an NVIDIA driver
    env = {"PATH": str(tools)}
    for visible, count in [(None, devices), ("", 0), ("0", min(devices, 1)), (UUIDS[0], min(devices, 1))]:
        result = run(["bash", "-c", f"source {ROOT / 'launch/run.sh'} && count_gpus"],
                     env if visible is None else {**env, "CUDA_VISIBLE_DEVICES": visible})  # fmt: skip
        assert result.returncode == 0 and result.stdout == f"{count}\n", (visible, output(result))


# ---------------------------------------------------------------------------------------------
# What run.sh, multinode.sh and slurm.sbatch start


def launched(record: Path) -> dict:
    return json.loads(record.read_text())


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# Arguments a shell must not touch: spaces, a command substitution, quotes, a glob, an empty one.
TRICKY = ["--logdir", "runs/a b", "--label", "$(touch pwned)", "it's", "*", ""]


def test_run_sh_starts_one_process_per_visible_gpu_with_arguments_intact(fake_bin, fake_venv, tmp_path):
    venv, record = fake_venv
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    env = environment(fake_bin, "1,3", VENV=str(venv))
    result = run([ROOT / "launch/train.sh", *TRICKY], env)
    assert result.returncode == 0, output(result)
    call = launched(record)
    assert option(call["argv"], "--num_processes") == "2" and call["env"]["DEMUCS_DIST_NPROC"] == "2"
    assert option(call["argv"], "--config_file") == str(ROOT / "accelerate_config.yaml")
    assert call["argv"][-len(TRICKY) - 2 :] == ["-m", "demucs_dist.train", *TRICKY]
    assert call["env"]["ACCELERATE_USE_CPU"] is None
    assert "2 GPU(s)" in result.stderr

    # From another folder: the stage runs there, so relative paths mean what the caller meant.
    result = run(["bash", "-c", f"cd {caller} && {ROOT}/launch/separate.sh 'a song.wav' --out out"], env)
    assert result.returncode == 0, output(result)
    call = launched(record)
    assert call["cwd"] == str(caller) and call["argv"][-3:] == ["a song.wav", "--out", "out"]
    assert call["env"]["PYTHONPATH"].split(":")[0] == str(ROOT)
    assert not (caller / "pwned").exists() and not (ROOT / "pwned").exists()


def test_run_sh_without_visible_gpus_starts_cpu_processes(fake_bin, fake_venv):
    venv, record = fake_venv
    result = run([ROOT / "launch/train.sh", "--x"], environment(fake_bin, "", VENV=str(venv)))
    assert result.returncode == 0, output(result)
    call = launched(record)
    assert "--multi_gpu" in call["argv"] and option(call["argv"], "--num_processes") == "2"
    assert call["env"]["ACCELERATE_USE_CPU"] == "1"
    assert "CUDA_VISIBLE_DEVICES='' leaves no GPU" in result.stderr


def test_run_sh_refuses_more_processes_than_gpus(fake_bin, fake_venv):
    venv, record = fake_venv
    result = run([ROOT / "launch/train.sh"], environment(fake_bin, "0,1", VENV=str(venv), NPROC="3"))
    assert result.returncode == 2 and not record.exists()
    assert result.stderr.startswith("error: NPROC=3 but this job may use 2 GPU(s)")


def test_slurm_passes_arguments_through_intact(fake_bin, fake_venv, tmp_path):
    """sbatch runs the script with the job's environment; srun here runs the node-1 task in place."""
    venv, record = fake_venv
    env = environment(
        fake_bin,
        "0,1,2",
        VENV=str(venv),
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_SUBMIT_DIR=str(ROOT),
    )
    result = run(["bash", "-c", f'cd {tmp_path} && bash {ROOT}/launch/slurm.sbatch "$@"', "_", *TRICKY], env)
    assert result.returncode == 0, output(result)
    call = launched(record)
    argv = call["argv"]
    assert call["cwd"] == str(tmp_path)
    assert option(argv, "--num_machines") == "2" and option(argv, "--machine_rank") == "1"
    assert option(argv, "--main_process_ip") == "node-a" and option(argv, "--num_processes") == "6"
    assert argv[-len(TRICKY) - 2 :] == ["-m", "demucs_dist.train", *TRICKY]
    assert not (tmp_path / "pwned").exists() and not (ROOT / "pwned").exists()


def test_slurm_outside_the_repository_says_where_it_looked(fake_bin, fake_venv, tmp_path):
    env = environment(fake_bin, None, SLURM_NNODES="1", SLURM_JOB_NODELIST="n", SLURM_SUBMIT_DIR=str(tmp_path))
    result = run(["bash", ROOT / "launch/slurm.sbatch"], env)
    assert result.returncode == 2 and "submit from the repository root" in result.stderr


@pytest.mark.slow
def test_train_sh_from_another_folder_with_relative_paths(synth_shards, tmp_path):
    """Real training (one CPU process) launched from another folder, relative paths with spaces."""
    (tmp_path / "my shards").symlink_to(synth_shards)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(NPROC="1", VENV=str(Path(sys.executable).parents[1]), OMP_NUM_THREADS="1")
    options = ["--shards", "my shards", "--logdir", "runs/a b", *TINY, "--epochs", "1", "--epoch-size", "8",
               "--repeat", "1", "--global-batch", "4", "--workers", "0"]  # fmt: skip
    result = run(["bash", "-c", f'cd "{tmp_path}" && "{ROOT}/launch/train.sh" "$@"', "_", *options], env)
    assert result.returncode == 0, output(result)
    assert (tmp_path / "runs" / "a b" / "last.th").is_file()
    assert not (ROOT / "runs" / "a b").exists()


# ---------------------------------------------------------------------------------------------
# A GPU that torch cannot use (demucs_dist.distributed.check_gpu_is_usable)

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="torch can use a GPU here")


def test_nvidia_gpus_present_reads_nvidia_smi(fake_bin, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "NVIDIA_DEVICE_FILE", tmp_path / "no-such-device")
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    assert distributed.nvidia_gpus_present() == LISTING.strip().splitlines()
    executable(fake_bin / "nvidia-smi", "#!/usr/bin/env bash\nexit 9\n")
    assert distributed.nvidia_gpus_present() == []
    (tmp_path / "nvidia0").touch()  # the driver's device file alone also tells
    monkeypatch.setattr(distributed, "NVIDIA_DEVICE_FILE", tmp_path / "nvidia0")
    assert distributed.nvidia_gpus_present() == [str(tmp_path / "nvidia0")]


@needs_no_cuda
def test_cpu_only_torch_on_a_gpu_machine_is_refused(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(distributed, "nvidia_gpus_present", lambda: ["GPU 0: NVIDIA H100 80GB HBM3 (UUID: x)"])
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(UserError, match=r"1 NVIDIA GPU\(s\) \(GPU 0: NVIDIA H100.*CPU-only build.*pip install"):
        distributed.make_accelerator()


@needs_no_cuda
def test_cuda_torch_with_an_old_driver_is_refused_with_torchs_reason(monkeypatch):
    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).\nSecond line")

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(distributed, "nvidia_gpus_present", lambda: ["GPU 0: A", "GPU 1: B"])
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "init", init)
    with pytest.raises(UserError) as error:
        distributed.make_accelerator()
    message = str(error.value)
    assert "2 NVIDIA GPU(s) (GPU 0: A, ...)" in message and "(CUDA 12.8) cannot use them" in message
    assert "(found version 11040)" in message and "Second line" not in message and "\n" not in message
    assert "ACCELERATE_USE_CPU=1" in message


@pytest.mark.slow
@needs_no_cuda
def test_a_gpu_torch_cannot_use_stops_training_in_one_line_unless_cpu_is_asked_for(fake_bin, tmp_path):
    command = [sys.executable, "-m", "demucs_dist.train", "--shards", tmp_path / "none", "--logdir", tmp_path / "run"]
    env = environment(fake_bin, None)
    env.pop("ACCELERATE_USE_CPU", None)
    refused = run(command, env)
    assert refused.returncode == 2, output(refused)
    assert refused.stderr.startswith("error: this machine has 4 NVIDIA GPU(s) (GPU 0: NVIDIA H100 80GB HBM3")
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    asked = run(command, {**env, "ACCELERATE_USE_CPU": "1"})  # past the check: on to the missing shards
    assert asked.returncode == 2 and "NVIDIA" not in asked.stderr, output(asked)
