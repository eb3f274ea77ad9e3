"""Fault injection for the reliability tests (tests/test_reliability.py), off unless set.

The trainer asks `Faults.from_env()` once; with none of these variables set it gets None and the
training step does no extra work at all.

    DEMUCS_DIST_FAULT_NAN_STEPS="3,4"      the loss is NaN on every rank in optimizer steps 3 and 4
    DEMUCS_DIST_FAULT_KILL="1:5[:MARKER]"   rank 1 SIGKILLs itself after optimizer step 5 (once: if
                                            MARKER is given, only while that file does not exist; it creates it)
    DEMUCS_DIST_FAULT_KILL_IN_SAVE="0:4"   rank 0 SIGKILLs itself inside the checkpoint save of step 4,
                                            after the state files are written and before the rename
    DEMUCS_DIST_FAULT_HIDE_CHECKPOINT="1:step-00000006"
                                            rank 1 does not see that checkpoint (a stale network file
                                            system cache or a node-local folder)
"""

from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

NAN_STEPS = "DEMUCS_DIST_FAULT_NAN_STEPS"
KILL = "DEMUCS_DIST_FAULT_KILL"
KILL_IN_SAVE = "DEMUCS_DIST_FAULT_KILL_IN_SAVE"
HIDE_CHECKPOINT = "DEMUCS_DIST_FAULT_HIDE_CHECKPOINT"


@dataclass
class Faults:
    rank: int
    nan_steps: set[int]
    kill: str
    kill_in_save: str
    hide_checkpoint: str

    @classmethod
    def from_env(cls, rank: int) -> Faults | None:
        env = os.environ
        if not any(env.get(name) for name in (NAN_STEPS, KILL, KILL_IN_SAVE, HIDE_CHECKPOINT)):
            return None
        nan_steps = {int(step) for step in env.get(NAN_STEPS, "").split(",") if step.strip()}
        return cls(rank, nan_steps, env.get(KILL, ""), env.get(KILL_IN_SAVE, ""), env.get(HIDE_CHECKPOINT, ""))

    def poison(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss of optimizer step `step` (1-based), NaN where asked."""
        return loss * math.nan if step in self.nan_steps else loss

    def after_step(self, step: int) -> None:
        _kill_if(self.kill, self.rank, step)

    def in_save(self, rank: int, step: int) -> None:
        _kill_if(self.kill_in_save, rank, step)

    def hidden_checkpoint(self) -> str | None:
        if not self.hide_checkpoint:
            return None
        rank, name = self.hide_checkpoint.split(":", 1)
        return name if int(rank) == self.rank else None


def _kill_if(spec: str, rank: int, step: int) -> None:
    """SIGKILL this process (no cleanup, like the OOM killer) where `spec` ("rank:step[:marker]") says so."""
    if not spec:
        return
    wanted_rank, wanted_step, *marker = spec.split(":", 2)
    if (int(wanted_rank), int(wanted_step)) != (rank, step):
        return
    if marker:
        if os.path.exists(marker[0]):
            return
        Path(marker[0]).touch()
    print(f"fault injection: rank {rank} kills itself at step {step}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
