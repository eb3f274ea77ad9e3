"""Starting Accelerate the same way for training, evaluation and separation.

On a machine without a GPU, processes are started CPU-only with gloo (TOOLCHAIN.md: `--cpu` alone
starts one process, and `--multi_gpu` without the CPU switch starts independent processes with no
DDP and no error). Either way, the world size we run with is checked against the one we were
launched for.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from .errors import UserError


def make_accelerator(mixed_precision: str | None = None, timeout_s: float = 1800, **kwargs) -> Accelerator:
    """An Accelerator on every GPU it was launched with, or CPU processes (gloo) without GPUs.

    mixed_precision: 'no', 'bf16' or 'fp16' (refused on CPU, where torch silently ignores it);
        None takes the launcher's setting (accelerate config or --mixed_precision).
    timeout_s: how long a collective waits for a missing rank before the job fails.
    """
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    wanted = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if cpu and wanted == "fp16":
        raise UserError("fp16 mixed precision needs a GPU (on CPU it would silently run in fp32); use bf16 or no")
    join_restarted_group(cpu, timeout_s)
    handlers = [InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s))]
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=handlers, **kwargs)
    check_world_size(accelerator)
    return accelerator


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
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, processes_on_node))
