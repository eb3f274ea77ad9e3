"""Starting Accelerate the same way for training, evaluation and separation.

On a machine without a GPU, processes are started CPU-only with gloo (`accelerate launch --cpu`
alone starts one process, and `--multi_gpu` without the CPU switch starts independent processes
with no DDP and no error). Either way, the world size we run with is checked against the one we
were launched for. A machine with an NVIDIA GPU that torch cannot use is refused rather than
silently run on the CPU (`check_gpu_is_usable`).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from . import available_cpus
from .errors import UserError


def make_accelerator(mixed_precision: str | None = None, timeout_s: float = 1800, **kwargs) -> Accelerator:
    """An Accelerator on every GPU it was launched with, or CPU processes (gloo) without GPUs.

    mixed_precision: 'no', 'bf16' or 'fp16' (refused on CPU, where torch silently ignores it);
        None takes the launcher's setting (accelerate config or --mixed_precision).
    timeout_s: how long a collective waits for a missing rank before the job fails.
    """
    cpu = cpu_requested() or not torch.cuda.is_available()
    if cpu and not cpu_requested():
        check_gpu_is_usable()
    wanted = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if cpu and wanted == "fp16":
        raise UserError("fp16 mixed precision needs a GPU (on CPU it would silently run in fp32); use bf16 or no")
    join_restarted_group(cpu, timeout_s)
    handlers = [InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s))]
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=handlers, **kwargs)
    check_world_size(accelerator)
    return accelerator


def cpu_requested() -> bool:
    """Whether the user (or launch/run.sh on a machine without GPUs) asked for CPU processes."""
    return os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "t", "yes", "y", "on")


NVIDIA_DEVICE_FILE = Path("/dev/nvidia0")  # what the NVIDIA driver creates for the first GPU


def nvidia_gpus_present() -> list[str]:
    """The NVIDIA GPUs this machine has, whatever torch can do with them: the `GPU N: ...` lines
    of `nvidia-smi -L`, or ["/dev/nvidia0"] when only the device file tells.

    Asked only when torch sees no GPU, to tell "no GPU here" from "a GPU torch cannot use".
    """
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):  # not installed, not executable, hung driver
        listing = ""
    gpus = [line.strip() for line in listing.splitlines() if line.startswith("GPU ")]
    if not gpus and NVIDIA_DEVICE_FILE.exists():
        gpus = [str(NVIDIA_DEVICE_FILE)]
    return gpus


def check_gpu_is_usable() -> None:
    """Refuse to fall back to CPU when an NVIDIA GPU is here but torch cannot use it.

    A CPU-only torch wheel (a .venv made on a login node without GPUs, say) or a driver older
    than the wheel's CUDA makes `torch.cuda.is_available()` False, and Accelerate would then train
    on the CPU, silently and a thousand times slower. ACCELERATE_USE_CPU=1 asks for CPU on purpose.
    """
    gpus = nvidia_gpus_present()
    if not gpus:
        return
    found = f"{len(gpus)} NVIDIA GPU(s) ({gpus[0]}{', ...' if len(gpus) > 1 else ''})"
    escape = "set ACCELERATE_USE_CPU=1 to run on the CPU on purpose"
    if torch.version.cuda is None:
        build = "a ROCm build" if getattr(torch.version, "hip", None) else "a CPU-only build"
        raise UserError(
            f"this machine has {found} but torch {torch.__version__} is {build}: install torch's CUDA build "
            f"(e.g. `{sys.executable} -m pip install --force-reinstall torch=={torch.__version__.split('+')[0]}` "
            f"from PyPI, whose Linux wheel is the CUDA build), or {escape}"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = "" if visible is None else f"CUDA_VISIBLE_DEVICES={visible!r} may hide them, or "
    raise UserError(
        f"this machine has {found} but torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use them "
        f"({cuda_init_error()}): {hint}the driver may be older than CUDA {torch.version.cuda} needs "
        f"(update it, or install a torch built for an older CUDA), or {escape}"
    )


def cuda_init_error() -> str:
    """The first line of torch's own reason why CUDA does not start (often the driver's version)."""
    try:
        torch.cuda.init()
    except Exception as exc:  # torch raises RuntimeError or AssertionError, depending on the cause
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return "torch.cuda.is_available() is False"


def join_restarted_group(cpu: bool, timeout_s: float) -> None:
    """Join the process group of a round that torchrun restarted (--max_restarts) through a store
    prefixed with the restart count.

    The workers of every round rendezvous in the same TCP store under the same keys, so a restarted
    worker may read a dead peer's address from the previous round and fail ("Gloo connectFullMesh
    failed ... Connection refused"; seen in about half the restarts here). The first round (and
    anything not started by torchrun) is left to Accelerate as before.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if restart == 0 or torch.distributed.is_initialized() or "MASTER_ADDR" not in os.environ:
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts the store
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent_store and rank == 0,
        timeout=timeout,
    )
    torch.distributed.init_process_group(
        "gloo" if cpu else "nccl",
        store=torch.distributed.PrefixStore(f"demucs_dist/restart{restart}", store),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )


# Set by launch/run.sh to the number of processes it starts: `accelerate launch --cpu --num_processes 2`
# starts one process and sets no WORLD_SIZE, so nothing else would tell what was asked for.
EXPECTED_PROCESSES_ENV = "DEMUCS_DIST_NPROC"


def check_world_size(accelerator: Accelerator) -> None:
    """Fail loudly when the number of processes in the group is not the number launched."""
    launched = int(os.environ.get(EXPECTED_PROCESSES_ENV) or os.environ.get("WORLD_SIZE") or 1)
    if accelerator.num_processes != launched:
        raise UserError(
            f"launched as {launched} processes but running as {accelerator.num_processes}: the processes did "
            "not join one process group (on a machine without GPUs, launch with ACCELERATE_USE_CPU=1 and "
            "--multi_gpu, or use launch/train.sh)"
        )


def balance(durations: Mapping[str, float], ranks: int) -> list[list[str]]:
    """Split songs across `ranks` so that all finish together: longest first, each to the rank
    with the least audio so far (ties: lowest rank). Deterministic, so every rank computes the
    same split. Each rank's list keeps the longest-first order."""
    loads = [0.0] * ranks
    shares: list[list[str]] = [[] for _ in range(ranks)]
    for name in sorted(durations, key=lambda n: (-durations[n], n)):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        shares[rank].append(name)
        loads[rank] += durations[name]
    return shares


def processes_on_this_node(accelerator) -> int:
    """How many ranks share this machine's cores (torchrun/accelerate set LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


def cpus_per_process(processes_on_node: int) -> int:
    return max(1, available_cpus() // max(1, processes_on_node))
