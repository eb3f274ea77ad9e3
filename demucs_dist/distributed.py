"""Starting Accelerate the same way for training, evaluation and separation.

On a machine without a GPU, processes are started CPU-only with gloo (TOOLCHAIN.md: `--cpu` alone
starts one process, and `--multi_gpu` without the CPU switch starts independent processes with no
DDP and no error). Either way, the world size we run with is checked against the one we were
launched for.
"""

from __future__ import annotations

import datetime
import os

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from .errors import UserError


def make_accelerator(mixed_precision: str = "no", timeout_s: float = 1800, **kwargs) -> Accelerator:
    """An Accelerator on every GPU it was launched with, or CPU processes (gloo) without GPUs.

    mixed_precision: 'no', 'bf16' or 'fp16' (refused on CPU, where torch silently ignores it).
    timeout_s: how long a collective waits for a missing rank before the job fails.
    """
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if cpu and mixed_precision == "fp16":
        raise UserError("fp16 mixed precision needs a GPU (on CPU it would silently run in fp32); use bf16 or no")
    handlers = [InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s))]
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=handlers, **kwargs)
    check_world_size(accelerator)
    return accelerator


def check_world_size(accelerator: Accelerator) -> None:
    """Fail loudly when the launcher started more processes than joined the process group."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise UserError(
            f"launched as {launched} processes but running as {accelerator.num_processes}: the processes did "
            "not join one process group (on a machine without GPUs, launch with ACCELERATE_USE_CPU=1 and "
            "--multi_gpu, or use launch/train.sh)"
        )
