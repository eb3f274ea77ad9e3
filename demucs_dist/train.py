"""Train Demucs on shards: Accelerate DDP on every process, mixed precision, gradient accumulation
up to a global batch, validation on whole songs, TensorBoard, checkpoints and automatic resume.

    accelerate launch --config_file accelerate_config.yaml -m demucs_dist.train --shards shards --logdir runs/demucs

Relaunching the same command resumes from the newest checkpoint in --logdir.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from . import SOURCES
from .apply import apply_model
from .config import ModelConfig, option, parse
from .data.augment import AugmentConfig
from .data.loader import LoaderConfig, examples_per_epoch, read_manifest, train_loader, valid_songs
from .distributed import make_accelerator
from .errors import UserError, run_main
from .files import atomic_path
from .model import Demucs, center_trim
from .modelfile import save_model
from .tblog import mono, spectrogram_image

CHECKPOINT_PREFIX = "step-"

# Fault injection for the reliability tests (tests/test_reliability.py), off unless these are set:
#   DEMUCS_DIST_FAULT_NAN_STEPS="3,4"     the loss is NaN on every rank in optimizer steps 3 and 4
#   DEMUCS_DIST_FAULT_KILL="1:5[:MARKER]"  rank 1 SIGKILLs itself after optimizer step 5 (once: if
#                                          MARKER is given, only while that file does not exist; it creates it)
#   DEMUCS_DIST_FAULT_KILL_IN_SAVE="0:4"  rank 0 SIGKILLs itself inside the checkpoint save of step 4,
#                                          after the state files are written and before the rename
FAULT_NAN_STEPS = "DEMUCS_DIST_FAULT_NAN_STEPS"
FAULT_KILL = "DEMUCS_DIST_FAULT_KILL"
FAULT_KILL_IN_SAVE = "DEMUCS_DIST_FAULT_KILL_IN_SAVE"


def _fault_nan_steps() -> set[int]:
    return {int(step) for step in os.environ.get(FAULT_NAN_STEPS, "").split(",") if step.strip()}


def _fault_kill(rank: int, step: int, env: str = FAULT_KILL) -> None:
    """Test hook: SIGKILL this process (no cleanup, like the OOM killer) where `env` says so."""
    spec = os.environ.get(env)
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


@dataclass
class TrainConfig:
    """Training (defaults: the paper's)"""

    shards: str = option("shards", "folder (or URL base) with manifest.json and the train/ and valid/ shards")
    logdir: str = option("runs/demucs", "run folder: TensorBoard events, checkpoints, best.th, last.th")
    restart: bool = option(False, "delete the checkpoints in --logdir and start over (default: resume)")
    epochs: int = option(120, "epochs (paper: 120 with --repeat 2; report: 240 with --repeat 1)")
    repeat: int = option(2, "passes over the shards' training examples per epoch")
    epoch_size: int = option(0, "training examples per pass (0 = what the shards hold)")
    global_batch: int = option(64, "examples per optimizer step, all processes together (paper 64, report 8)")
    max_device_batch: int = option(8, "most examples one device holds; the rest is gradient accumulation")
    segment: float = option(10.0, "training example length in seconds (the input is its valid length)")
    loss: str = option("l1", "training and validation loss", choices=["l1", "mse"])
    lr: float = option(3e-4, "Adam learning rate (constant)")
    seed: int = option(42, "seed of the model's initialisation, the data order and the augmentation")
    valid_every: int = option(1, "validate every N epochs (and after the last one)")
    mixed_precision: str = option(
        "auto",
        "autocast dtype; auto = the launcher's setting; fp16 needs a GPU",
        choices=["auto", "no", "bf16", "fp16"],
    )
    workers: int = option(2, "data loader worker processes per device")
    checkpoint_every: int = option(0, "also checkpoint every N optimizer steps (0 = at epoch ends only)")
    keep_checkpoints: int = option(2, "how many of the newest checkpoints to keep")
    activation_checkpointing: bool = option(False, "recompute encoder/decoder activations in backward (less memory)")
    compile: bool = option(False, "torch.compile the model (GPU; slow first steps)")
    max_nonfinite: int = option(20, "stop after this many consecutive steps with non-finite gradients (each skipped)")
    timeout: float = option(600.0, "seconds a process waits for the others before the whole job fails")
    log_audio: bool = option(True, "log audio and a spectrogram of one validation song to TensorBoard")


@dataclass
class Progress:
    """What a checkpoint records besides model/optimizer/RNG: where training stands."""

    epoch: int = 0  # epochs fully done
    batch: int = 0  # micro-batches done in the current epoch (mid-epoch checkpoints)
    step: int = 0  # optimizer steps done in all
    best_valid: float = math.inf
    best_epoch: int = -1
    skipped_steps: int = 0  # non-finite steps skipped in all


def plan_batches(global_batch: int, world_size: int, max_device_batch: int) -> tuple[int, int]:
    """(device batch, accumulation steps) such that device batch x world size x steps == global batch."""
    if global_batch < world_size or global_batch % world_size:
        raise UserError(
            f"--global-batch {global_batch} cannot be split over {world_size} processes: use a multiple of {world_size}"
        )
    per_process = global_batch // world_size
    device_batch = max(b for b in range(1, min(max_device_batch, per_process) + 1) if per_process % b == 0)
    return device_batch, per_process // device_batch


def loss_function(name: str):
    return F.l1_loss if name == "l1" else F.mse_loss


def enable_activation_checkpointing(model: Demucs) -> None:
    """Recompute each encoder/decoder block's activations during backward instead of storing them."""
    for block in [*model.encoder, *model.decoder]:
        block.forward = lambda x, forward=block.forward: checkpoint(forward, x, use_reentrant=False)


class Checkpoints:
    """Accelerate states in <run>/checkpoints/step-NNNNNNNN, written under a temporary name and renamed
    when complete, so a crash mid-save leaves the previous checkpoint as the newest one."""

    def __init__(self, run_dir: Path, keep: int):
        self.folder, self.keep = run_dir / "checkpoints", keep

    def complete(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX))

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def save(self, accelerator: Accelerator, progress: Progress, model: torch.nn.Module) -> None:
        # Every rank holds the same weights, so every rank takes this branch together.
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise UserError(f"the weights are not finite at step {progress.step}: no checkpoint written")
        final = self.folder / f"{CHECKPOINT_PREFIX}{progress.step:08d}"
        partial = self.folder / f".partial-{final.name}"
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))  # every rank: its RNG state; rank 0: model and optimizer
        accelerator.wait_for_everyone()
        if os.environ.get(FAULT_KILL_IN_SAVE):
            _fault_kill(accelerator.process_index, progress.step, FAULT_KILL_IN_SAVE)
        if accelerator.is_main_process:
            (partial / "progress.json").write_text(json.dumps(dataclasses.asdict(progress)))
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def load(self, accelerator: Accelerator, path: Path) -> Progress:
        accelerator.load_state(str(path))
        return Progress(**json.loads((path / "progress.json").read_text()))

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def validate(model: Demucs, accelerator: Accelerator, cfg: TrainConfig, manifest: dict, writer, step: int) -> float:
    """Mean over all validation songs of the per-song loss, songs split across ranks."""
    model.eval()
    criterion = loss_function(cfg.loss)
    total = torch.zeros(2, device=accelerator.device)  # sum of song losses, number of songs
    songs = valid_songs(cfg.shards, manifest, rank=accelerator.process_index, world_size=accelerator.num_processes)
    for index, song in enumerate(songs):
        mix, sources = song.mix.to(accelerator.device), song.sources.to(accelerator.device)
        with accelerator.autocast():
            estimates = apply_model(model, mix, split=True, segment=cfg.segment)
        total += torch.stack([criterion(estimates.float(), sources), torch.ones((), device=total.device)])
        if writer is not None and index == 0 and cfg.log_audio:
            log_separation(writer, song, estimates, step)
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    if total[1] == 0:
        raise UserError("the shards hold no validation songs")
    return (total[0] / total[1]).item()


def log_separation(writer, song, estimates: torch.Tensor, step: int, seconds: float = 10.0) -> None:
    """Audio of a validation song's mixture, estimates and references, and their spectrograms."""
    rate = writer.samplerate
    length = min(song.mix.size(-1), int(seconds * rate))
    start = (song.mix.size(-1) - length) // 2

    def audio(x: torch.Tensor) -> torch.Tensor:  # undo the normalisation, keep the excerpt
        return mono(x[..., start : start + length].float().cpu() * song.std + song.mean)

    mix = audio(song.mix)
    writer.add_audio("separation/mixture", mix, step, sample_rate=rate)
    rows = [mix]
    for index, name in enumerate(SOURCES):
        estimate, reference = audio(estimates[index]), audio(song.sources[index])
        writer.add_audio(f"separation/{name}_estimate", estimate, step, sample_rate=rate)
        writer.add_audio(f"separation/{name}_reference", reference, step, sample_rate=rate)
        rows += [estimate, reference]
    writer.add_image("separation/spectrograms", spectrogram_image(rows), step)  # mix, then estimate/reference


def train(
    model_cfg: ModelConfig, cfg: TrainConfig, augment: AugmentConfig, loader_cfg: LoaderConfig | None = None
) -> tuple[Progress, Demucs]:
    """Run (or resume) a training run; returns where it ended and this process's trained model."""
    loader_cfg = loader_cfg or LoaderConfig()
    accelerator = make_accelerator(None if cfg.mixed_precision == "auto" else cfg.mixed_precision, cfg.timeout)
    world = accelerator.num_processes
    device_batch, accumulation = plan_batches(cfg.global_batch, world, cfg.max_device_batch)
    accelerator.gradient_accumulation_steps = accumulation
    say = accelerator.print

    manifest = read_manifest(cfg.shards)
    check_shards_fit_model(manifest, model_cfg)
    examples = (cfg.epoch_size or examples_per_epoch(manifest)) * cfg.repeat
    steps_per_epoch = examples // cfg.global_batch
    if steps_per_epoch == 0:
        raise UserError(f"an epoch of {examples} examples is smaller than --global-batch {cfg.global_batch}")
    micro_batches = steps_per_epoch * accumulation  # per process, the same on every process
    if augment.remix and device_batch < augment.remix_group:
        say(
            f"note: device batch {device_batch} < Remix group {augment.remix_group}: sources are remixed "
            f"within each device batch of {device_batch}"
        )
    say(
        f"{world} process(es) on {accelerator.device.type}, mixed precision {accelerator.mixed_precision}: "
        f"global batch {cfg.global_batch} = {device_batch} per device x {world} x {accumulation} accumulation; "
        f"{steps_per_epoch} steps of {examples} examples per epoch"
    )

    run_dir = Path(cfg.logdir)
    checkpoints = Checkpoints(run_dir, cfg.keep_checkpoints)
    if accelerator.is_main_process:
        if cfg.restart:
            checkpoints.clear()
        check_same_model(run_dir, model_cfg)
        with atomic_path(run_dir / "config.json") as tmp:
            tmp.write_text(json.dumps(run_config(model_cfg, cfg, augment, loader_cfg), indent=2))
    accelerator.wait_for_everyone()

    set_seed(cfg.seed)
    model = Demucs(**dataclasses.asdict(model_cfg))
    # The plain module: torch.compile and DDP wrap this same object and share its parameters, so it
    # is what validation runs and what best.th/last.th export (a compiled module's state_dict keys
    # carry an "_orig_mod." prefix that a model file must not have).
    bare_model = model
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    fused = accelerator.device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=fused)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)

    progress = Progress()
    latest = checkpoints.latest()
    if latest is not None:
        progress = checkpoints.load(accelerator, latest)
        say(f"resuming from {latest} (epoch {progress.epoch}, step {progress.step})")

    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        # After a crash, events written past the checkpoint are hidden so the curves do not double back.
        writer = SummaryWriter(str(run_dir), purge_step=progress.step + 1 if progress.step else None)
        writer.samplerate = model_cfg.samplerate
        config_text = json.dumps(run_config(model_cfg, cfg, augment, loader_cfg), indent=2)
        writer.add_text("config", "```\n" + config_text + "\n```")

    criterion = loss_function(cfg.loss)
    segment = bare_model.valid_length(int(cfg.segment * model_cfg.samplerate))
    consecutive_nonfinite = 0
    nan_steps = _fault_nan_steps()  # test hook, empty unless DEMUCS_DIST_FAULT_NAN_STEPS is set
    bad_shards = torch.zeros((), device=accelerator.device)  # unreadable shards skipped, this rank
    if progress.epoch >= cfg.epochs:
        say(f"{run_dir} has finished its {cfg.epochs} epochs already (raise --epochs to train on, or --restart)")
    while progress.epoch < cfg.epochs:
        epoch, epoch_start = progress.epoch, time.perf_counter()
        batches = train_loader(
            cfg.shards,
            manifest,
            segment=segment,
            batch_size=device_batch,
            batches=micro_batches,
            epoch=epoch,
            seed=cfg.seed,
            rank=accelerator.process_index,
            world_size=world,
            workers=cfg.workers,
            augment=augment,
            on_bad_shard=loader_cfg.on_bad_shard,
        )
        bar = tqdm(
            total=steps_per_epoch,
            initial=progress.batch // accumulation,
            desc=f"epoch {epoch + 1}",
            disable=not accelerator.is_main_process,
            leave=False,
            dynamic_ncols=True,
        )
        epoch_loss, window_loss = torch.zeros((), device=accelerator.device), 0.0
        epoch_steps, finite_steps, wait = 0, 0, 0.0
        step_start = fetch_start = time.perf_counter()
        try:  # close the progress bar before an error is printed, so the error is a line of its own
            for index, (mix, sources) in enumerate(batches):
                if index < progress.batch:  # resuming mid-epoch: the loader replays the epoch's order
                    fetch_start = step_start = time.perf_counter()
                    continue
                wait += time.perf_counter() - fetch_start
                mix, sources = (
                    mix.to(accelerator.device, non_blocking=True),
                    sources.to(accelerator.device, non_blocking=True),
                )
                with accelerator.accumulate(model):
                    estimates = model(mix)
                    loss = criterion(estimates, center_trim(sources, estimates))
                    if progress.step + 1 in nan_steps:
                        loss = loss * math.nan
                    accelerator.backward(loss)
                    window_loss = window_loss + loss.detach() / accumulation
                    if accelerator.sync_gradients:
                        # Gradients are all-reduced by now: every rank sees the same norm and takes the same branch.
                        accelerator.unscale_gradients()  # fp16: measure the true gradients
                        grads = [p.grad for p in model.parameters() if p.grad is not None]
                        grad_norm = torch.nn.utils.get_total_norm(grads)  # measure only: no clipping pass
                        finite = bool(torch.isfinite(grad_norm))
                        if finite or accelerator.scaler is not None:  # fp16: the loss scaler skips overflows itself
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                progress.batch = index + 1
                if not accelerator.sync_gradients:
                    fetch_start = time.perf_counter()
                    continue

                skipped = not finite or accelerator.optimizer_step_was_skipped
                consecutive_nonfinite = consecutive_nonfinite + 1 if skipped else 0
                progress.skipped_steps += skipped
                progress.step += 1
                epoch_steps += 1
                step_time = time.perf_counter() - step_start
                if not skipped:  # a skipped step's loss may be NaN: keep it out of the epoch's mean
                    epoch_loss += window_loss
                    finite_steps += 1
                step_loss = accelerator.reduce(window_loss, reduction="mean").item()
                window_loss = 0.0
                if writer is not None:
                    writer.add_scalar("train/loss", step_loss, progress.step)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], progress.step)
                    writer.add_scalar("train/grad_norm", grad_norm.item(), progress.step)
                    writer.add_scalar("train/examples_per_s", cfg.global_batch / step_time, progress.step)
                    writer.add_scalar("train/data_wait_fraction", wait / step_time, progress.step)
                    writer.add_scalar("train/skipped_steps", progress.skipped_steps, progress.step)
                    bar.set_postfix(loss=f"{step_loss:.4f}")
                bar.update(1)
                if consecutive_nonfinite >= cfg.max_nonfinite:
                    raise UserError(
                        f"{consecutive_nonfinite} steps in a row had non-finite gradients (step {progress.step}); "
                        "stopping. The last checkpoint holds finite weights; try a lower --lr or --mixed-precision no"
                    )
                if (
                    cfg.checkpoint_every
                    and progress.step % cfg.checkpoint_every == 0
                    and progress.batch < micro_batches
                ):
                    checkpoints.save(accelerator, progress, bare_model)
                _fault_kill(accelerator.process_index, progress.step)
                wait, step_start = 0.0, time.perf_counter()
                fetch_start = step_start
        finally:
            bar.close()

        train_loss = accelerator.reduce(epoch_loss, reduction="mean").item() / max(1, finite_steps)
        bad_shards += batches.bad_shards
        all_bad_shards = accelerator.reduce(bad_shards, reduction="sum").item()
        progress.epoch, progress.batch = epoch + 1, 0
        last_epoch = progress.epoch == cfg.epochs
        valid = math.nan
        if progress.epoch % cfg.valid_every == 0 or last_epoch:
            valid = validate(bare_model, accelerator, cfg, manifest, writer, progress.step)
            if valid < progress.best_valid:
                progress.best_valid, progress.best_epoch = valid, progress.epoch
                if accelerator.is_main_process:
                    export(bare_model, run_dir / "best.th", progress, cfg)
        if accelerator.is_main_process:
            export(bare_model, run_dir / "last.th", progress, cfg)
        checkpoints.save(accelerator, progress, bare_model)

        seconds = time.perf_counter() - epoch_start
        speed = epoch_steps * cfg.global_batch / seconds
        if writer is not None:
            writer.add_scalar("epoch/train_loss", train_loss, progress.step)
            writer.add_scalar("epoch/epoch", progress.epoch, progress.step)
            writer.add_scalar("train/bad_shards", all_bad_shards, progress.step)
            if not math.isnan(valid):
                writer.add_scalar("valid/loss", valid, progress.step)
                writer.add_scalar("valid/best", progress.best_valid, progress.step)
            writer.flush()
        valid_text = "-" if math.isnan(valid) else f"{valid:.4f}"
        best_text = "-" if progress.best_epoch < 0 else f"{progress.best_valid:.4f} (epoch {progress.best_epoch})"
        say(
            f"epoch {progress.epoch}/{cfg.epochs} | train {train_loss:.4f} | valid {valid_text} | "
            f"best {best_text} | {speed:.1f} examples/s | {seconds:.1f} s"
        )

    if writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return progress, bare_model


def export(model: Demucs, path: Path, progress: Progress, cfg: TrainConfig) -> None:
    """Write a self-describing model file; refuse to write non-finite weights."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"the model's weights are not finite at epoch {progress.epoch}; {path} was not written")
    save_model(
        model,
        path,
        epoch=progress.epoch,
        step=progress.step,
        best_valid=progress.best_valid,
        loss=cfg.loss,
        segment=cfg.segment,
    )


def run_config(model_cfg: ModelConfig, cfg: TrainConfig, augment: AugmentConfig, loader: LoaderConfig) -> dict:
    return {
        "model": dataclasses.asdict(model_cfg),
        "train": dataclasses.asdict(cfg),
        "augment": dataclasses.asdict(augment),
        "loader": dataclasses.asdict(loader),
    }


def check_same_model(run_dir: Path, model_cfg: ModelConfig) -> None:
    """Resuming a run with another model would fail deep inside load_state; say it plainly."""
    saved = run_dir / "config.json"
    if not saved.is_file() or not Checkpoints(run_dir, 0).latest():
        return
    before = json.loads(saved.read_text())["model"]
    changed = {k: (before.get(k), v) for k, v in dataclasses.asdict(model_cfg).items() if before.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
        raise UserError(f"{run_dir} holds a run of another model ({detail}); use another --logdir or --restart")


def check_shards_fit_model(manifest: dict, model_cfg: ModelConfig) -> None:
    """Refuse, before any training, shards that this model cannot use or validate on."""
    if not manifest.get("valid") or not manifest.get("songs", {}).get("valid"):
        raise UserError("the shards hold no validation songs: reshard with --valid-tracks (a count, names or a file)")
    rate, sources = manifest.get("samplerate"), manifest.get("sources")
    if rate is not None and rate != model_cfg.samplerate:
        raise UserError(f"the shards are at {rate} Hz but the model works at {model_cfg.samplerate} Hz")
    if sources is not None and len(sources) != model_cfg.sources:
        raise UserError(f"the shards hold {len(sources)} sources ({', '.join(sources)}), the model {model_cfg.sources}")
    if sources is not None and tuple(sources) != SOURCES[: len(sources)]:
        raise UserError(f"the shards' source order {sources} is not {list(SOURCES)}")


def main(argv: Sequence[str] | None = None) -> None:
    configs = parse(argv, "demucs-dist train", __doc__, ModelConfig, TrainConfig, AugmentConfig, LoaderConfig)
    train(*configs)


if __name__ == "__main__":
    sys.exit(run_main(main))
