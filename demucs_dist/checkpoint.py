"""Training checkpoints: where a run stands (`Progress`) and the Accelerate states that let a
relaunched job continue exactly where the last one stopped.

Layout of a run folder (`--logdir`):
    checkpoints/step-NNNNNNNN/   one Accelerate state (model, optimizer, every rank's RNG) plus
                                 progress.json; written as .partial-step-NNNNNNNN and renamed when
                                 complete, so a crash mid-save leaves the previous one as newest
    .lock                        held by the run that writes the folder

Decisions every rank must share are taken by rank 0 and broadcast: which checkpoint to resume
from (ranks may see different folder contents on a node-local disk or a stale network file system
cache), and whether a timed checkpoint is due (clocks differ).

The states are written with torch.save, not safetensors: on CUDA the LSTM's weights are views of
one flat cuDNN buffer, and safetensors keeps one tensor of a shared storage, so `load_state`
would fail ("None is covering the entire storage") on every resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from .ema import EMA
from .errors import UserError
from .faults import Faults
from .modelfile import all_finite

PREFIX = "step-"
PARTIAL_PREFIX = ".partial-"
PROGRESS_FILE = "progress.json"
EMA_FILE = "ema.pt"  # our own file, read with weights_only (accelerate's custom objects are unpickled)
OURS = re.compile(rf"^({re.escape(PARTIAL_PREFIX)})?{PREFIX}\d{{8}}$")  # the only names this module writes


@dataclasses.dataclass
class Progress:
    """What a checkpoint records besides model/optimizer/RNG: where training stands."""

    epoch: int = 0  # epochs fully done
    examples: int = 0  # examples (all ranks) trained on in the current epoch: mid-epoch checkpoints
    step: int = 0  # optimizer steps done in all
    best_valid: float = math.inf
    best_epoch: int = -1
    best_weights: str = "raw"  # which weights best.th holds: "raw" or an EMA's name
    skipped_steps: int = 0  # non-finite steps skipped in all
    layout: list[int] = dataclasses.field(default_factory=list)  # [world size, device batch, accumulation, workers]

    @classmethod
    def from_json(cls, text: str) -> Progress:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


def weights_are_finite(model: torch.nn.Module) -> bool:
    """No NaN or infinite parameter: checked before a checkpoint or a model file is written."""
    return all_finite(model.parameters())


class Checkpoints:
    """The checkpoints of one run folder: save, list, resume, and timed cadence."""

    def __init__(self, run_dir: Path, keep: int, minutes: float, faults: Faults | None = None):
        if keep < 1:
            raise UserError(f"--keep-checkpoints {keep}: keep at least 1 (the one a relaunch resumes from)")
        self.folder, self.keep, self.minutes, self.faults = run_dir / "checkpoints", keep, minutes, faults
        self.last_save = time.monotonic()

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (only our own names: other files are left alone)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if OURS.match(p.name) and p.name.startswith(PREFIX))

    def visible(self) -> list[Path]:
        hidden = self.faults.hidden_checkpoint() if self.faults else None
        return [p for p in self.complete() if p.name != hidden]

    def due(self, accelerator: Accelerator) -> bool:
        """Whether --checkpoint-minutes have passed since the last save, as rank 0's clock says."""
        if self.minutes <= 0:
            return True
        decision = [time.monotonic() - self.last_save >= self.minutes * 60]
        return bool(broadcast_object_list(decision)[0])

    def save(
        self, accelerator: Accelerator, progress: Progress, model: torch.nn.Module, ema: EMA | None = None
    ) -> None:
        """Every rank together: write the state under a temporary name, then rank 0 renames it."""
        # Every rank holds the same weights, so every rank takes this branch together.
        if not weights_are_finite(model):
            raise UserError(f"the weights are not finite at step {progress.step}: no checkpoint written")
        final = self.folder / f"{PREFIX}{progress.step:08d}"
        partial = self.folder / f"{PARTIAL_PREFIX}{final.name}"
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)
        accelerator.wait_for_everyone()
        # every rank: its RNG state; rank 0: model and optimizer (torch.save: see the module docstring)
        accelerator.save_state(str(partial), safe_serialization=False)
        accelerator.wait_for_everyone()
        if self.faults:
            self.faults.in_save(accelerator.process_index, progress.step)
        if accelerator.is_main_process:
            if ema is not None:  # the same on every rank: rank 0 writes it
                torch.save(ema.state_dict(), partial / EMA_FILE)
            (partial / PROGRESS_FILE).write_text(json.dumps(dataclasses.asdict(progress)))
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        self.last_save = time.monotonic()

    def resume(self, accelerator: Accelerator, say) -> tuple[Progress, Path | None]:
        """Load the newest checkpoint every rank can read, as rank 0 lists them; returns where training
        stands and the checkpoint's folder (a new Progress and None if there is none).

        A checkpoint that fails to load on any rank (truncated by a full disk, say) is passed over
        for the one before it, with a line that says so.
        """
        candidates = broadcast_object_list([[str(p) for p in self.visible()] if accelerator.is_main_process else None])
        for path in reversed([Path(p) for p in candidates[0]]):
            error = ""
            try:
                accelerator.load_state(str(path))
                progress = Progress.from_json((path / PROGRESS_FILE).read_text())
            except Exception as exc:  # torch.load and the file system raise many kinds on a damaged state
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            failed = torch.tensor(float(bool(error)), device=accelerator.device)
            if accelerator.reduce(failed, reduction="sum").item() == 0:
                say(f"resuming from {path} (epoch {progress.epoch}, step {progress.step})")
                return progress, path
            say(f"warning: checkpoint {path} cannot be loaded ({error or 'on another rank'}): trying the one before it")
        if candidates[0]:
            raise UserError(f"no checkpoint in {self.folder} can be loaded; use --restart to start over")
        return Progress(), None

    def load_ema(self, path: Path | None, ema: EMA, say) -> None:
        """The averages saved with checkpoint `path`; without any (EMA switched on in a resumed run)
        they start from the resumed weights, as they were built."""
        if path is not None and (path / EMA_FILE).is_file():
            device = ema.shadows[next(iter(ema.shadows))][0].device
            ema.load_state_dict(torch.load(path / EMA_FILE, map_location=device, weights_only=True))
        elif path is not None:
            say(f"note: {path} holds no weight averages: they start from the resumed weights")

    def clear(self) -> None:
        """--restart: delete the checkpoints this program wrote, and nothing else."""
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if OURS.match(path.name) and path.is_dir():
                shutil.rmtree(path)
