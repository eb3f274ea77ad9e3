"""Train Demucs on shards: Accelerate DDP on every process, mixed precision, gradient accumulation
up to a global batch, validation on whole songs, TensorBoard, checkpoints and automatic resume.

    accelerate launch --config_file accelerate_config.yaml -m demucs_dist.train --shards shards --logdir runs/demucs

Relaunching the same command resumes from the newest checkpoint in --logdir.

Reading order: `train` (one screen: set-up, resume, the epoch loop), `train_one_epoch` and
`train_step` (the loop a single-device script would have), `validate`, then the set-up helpers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.checkpoint import checkpoint

from . import SOURCES
from .apply import apply_model, loss_function
from .bss import song_median_sdr
from .checkpoint import Checkpoints, Progress, weights_are_finite
from .config import ModelConfig, option, parse
from .data.augment import AugmentConfig, augment_step, step_generator
from .data.loader import LoaderConfig, TrainBatch, train_batches, valid_songs
from .data.manifest import Manifest, read_manifest
from .distributed import make_accelerator
from .ema import EMA
from .errors import UserError, run_main
from .faults import Faults
from .files import FolderLock, atomic_path, check_folder_is_ours
from .model import Demucs, center_trim
from .modelfile import save_model
from .progress import progress_bar
from .scoring import median_over_songs
from .tblog import log_hparams, log_separation, peak_memory_bytes

VALID_MAX_SAMPLES = 15_000_000  # validation uses each song's first 15M samples, as the 2019 code did


@dataclass
class TrainConfig:
    """Training (defaults: the paper's)"""

    shards: str = option("shards", "folder (or URL base) with manifest.json and the train/ and valid/ shards")
    logdir: str = option(
        "runs/demucs", "run folder: TensorBoard events, checkpoints, init.th (untrained), best.th, last.th"
    )
    restart: bool = option(False, "delete the checkpoints in --logdir and start over (default: resume)")
    epochs: int = option(120, "epochs (paper: 120 with --repeat 2; report: 240 with --repeat 1)", minimum=1)
    repeat: int = option(2, "passes over the shards' training examples per epoch", minimum=1)
    epoch_size: int = option(0, "training examples per pass (0 = what the shards hold)", minimum=0)
    global_batch: int = option(
        64, "examples per optimizer step, all processes together (paper 64, report 8)", minimum=1
    )
    max_device_batch: int = option(8, "most examples one device holds; the rest is gradient accumulation", minimum=1)
    segment: float = option(10.0, "training example length in seconds (the input is its valid length)", minimum=0.01)
    loss: str = option("l1", "training and validation loss", choices=["l1", "mse"])
    lr: float = option(3e-4, "Adam learning rate (constant)", minimum=1e-12, maximum=1)
    seed: int = option(42, "seed of the model's initialisation, the data order and the augmentation")
    valid_every: int = option(1, "validate every N epochs (and after the last one)", minimum=1)
    valid_segment: float = option(
        0.0, "validate in chunks of this many seconds (0 = each song in one pass, the paper's protocol)", minimum=0
    )
    mixed_precision: str = option(
        "auto",
        "autocast dtype of the training step (validation always runs in fp32); auto = the launcher's setting; "
        "fp16 needs a GPU",
        choices=["auto", "no", "bf16", "fp16"],
    )
    workers: int = option(2, "data loader worker processes per device", minimum=0)
    checkpoint_every: int = option(0, "also checkpoint every N optimizer steps (0 = at epoch ends only)", minimum=0)
    checkpoint_minutes: float = option(
        30.0,
        "checkpoint at an epoch's end once this many minutes passed since the last checkpoint (0 = every epoch; "
        "a GPU node's epochs take seconds, a checkpoint of channels 64 ~3 GB); the last epoch always checkpoints",
        minimum=0,
    )
    keep_checkpoints: int = option(2, "how many of the newest checkpoints to keep (at least 1)", minimum=1)
    activation_checkpointing: bool = option(False, "recompute encoder/decoder activations in backward (less memory)")
    compile: bool = option(False, "torch.compile the model (GPU; slow first steps)")
    compile_backend: str = option(
        "inductor",
        "torch.compile's backend with --compile: inductor generates kernels; aot_eager and eager do not "
        "(to tell a code generation problem from a tracing one, or to check --compile quickly on a CPU)",
        choices=["inductor", "aot_eager", "eager"],
    )
    max_nonfinite: int = option(
        20, "stop after this many consecutive steps with non-finite gradients (each skipped)", minimum=1
    )
    timeout: float = option(600.0, "seconds a process waits for the others before the whole job fails", minimum=1)
    log_audio: bool = option(True, "log audio and a spectrogram of one validation song to TensorBoard")
    valid_sdr: bool = option(
        True,
        "score the validation songs at each validation with museval's SDR (bss_eval v4 in torch, on the device): "
        "valid/SDR/<source> in TensorBoard; best.th is still chosen by the loss, as in the paper",
    )
    log_every: int = option(
        10, "write training scalars every N steps (the device is read then, not every step)", minimum=1
    )
    ema: list[float] = option(
        [],
        "decays of exponential moving averages of the weights (e.g. 0.999 0.9999), each validated next to "
        "the raw weights; best.th takes the best of them (default: none, as in the paper)",
        minimum=1e-9,
        maximum=0.999999999,
    )


@dataclass
class Run:
    """Everything one training run holds once `start_run` has set it up."""

    cfg: TrainConfig
    augment: AugmentConfig
    loader_cfg: LoaderConfig
    accelerator: Accelerator
    manifest: Manifest
    device_batch: int
    accumulation: int
    steps_per_epoch: int
    segment_samples: int  # the model's input length
    model: torch.nn.Module  # what the training step runs (DDP, maybe compiled)
    bare_model: Demucs  # the same parameters, unwrapped: validation and model files
    optimizer: torch.optim.Optimizer
    checkpoints: Checkpoints
    progress: Progress
    run_dir: Path
    writer: Any  # TensorBoard SummaryWriter on rank 0, None elsewhere
    lock: FolderLock | None
    faults: Faults | None
    layout: list[int]  # [world size, device batch, accumulation, workers, pool chunks]: what orders an epoch
    ema: EMA | None  # weight averages (--ema), the same on every rank
    consecutive_nonfinite: int = 0
    bad_shards: int = 0  # unreadable shards this rank skipped (--on-bad-shard skip)

    def say(self, text: str) -> None:
        self.accelerator.print(text)


def train(
    model_cfg: ModelConfig, cfg: TrainConfig, augment: AugmentConfig, loader_cfg: LoaderConfig | None = None
) -> Run:
    """Run (or resume) a training run; returns it as it ended (progress, this process's model, averages)."""
    run = start_run(model_cfg, cfg, augment, loader_cfg or LoaderConfig())
    try:
        if run.progress.step == 0 and run.accelerator.is_main_process:
            export(run, run.run_dir / "init.th")  # the untrained model: the floor an evaluation compares to
        if run.progress.epoch >= cfg.epochs:
            run.say(f"{run.run_dir} has finished its {cfg.epochs} epochs already (raise --epochs, or --restart)")
        while run.progress.epoch < cfg.epochs:
            started = time.perf_counter()
            train_loss = train_one_epoch(run)
            valid, sdr = validate_all(run) if validation_due(run) else ({}, {})
            end_epoch(run, train_loss, valid, sdr, time.perf_counter() - started)
        run.accelerator.wait_for_everyone()
    finally:
        finish_run(run)
    return run


# ---------------------------------------------------------------------------------------------
# One epoch, one step


def train_one_epoch(run: Run) -> float:
    """One epoch of optimizer steps (continuing mid-epoch after a resume); returns the mean
    training loss over its steps with finite gradients, all ranks together."""
    progress, accelerator = run.progress, run.accelerator
    skip_steps, train_steps = resume_plan(run)
    progress.layout = run.layout
    batches = epoch_batches(run)
    meter = StepMeter(run, initial=skip_steps, total=skip_steps + train_steps)
    loss_sum = torch.zeros((), device=accelerator.device)
    finite_steps = 0
    try:  # close the progress bar before an error is printed, so the error is a line of its own
        for index, micro_batches in enumerate(steps_of(batches, run.accumulation)):
            if index < skip_steps:  # resuming mid-epoch: the loader replays the epoch's order
                meter.restart_clock()
                continue
            if index == skip_steps + train_steps:
                break
            meter.data_ready()
            loss, grad_norm, finite = train_step(run, micro_batches)
            progress.step += 1
            progress.examples += run.cfg.global_batch
            if finite:
                loss_sum += loss
                finite_steps += 1
            meter.step_done(loss, grad_norm)
            check_nonfinite_streak(run, finite)
            if on_checkpoint_cadence(run.cfg, progress.step):
                if index + 1 < skip_steps + train_steps:  # the epoch's end saves anyway
                    meter.flush()  # the scalars up to the checkpoint survive a crash after it
                    run.checkpoints.save(accelerator, progress, run.bare_model, run.ema)
            if run.faults:
                run.faults.after_step(progress.step)
        meter.flush()
    finally:  # on an error, no collective here: another rank may not be raising
        meter.close()
    run.bad_shards += batches.bad_shards
    return accelerator.reduce(loss_sum, reduction="mean").item() / max(1, finite_steps)


def resume_plan(run: Run) -> tuple[int, int]:
    """(steps to replay without training, steps to train) of the current epoch.

    A mid-epoch checkpoint records the examples trained so far in the epoch and the layout that
    drew them (world size, device batch, accumulation, loader workers, crop pool). Under the same layout the
    loader replays the epoch's order and training continues at the next step: exact. Under
    another one (a requeued job on another node count, another --global-batch) that order is not
    the same, so the rest of the epoch's examples are drawn anew, never twice in count.
    """
    done, cfg = run.progress.examples, run.cfg
    if done == 0 or run.progress.layout == run.layout:
        return done // cfg.global_batch, run.steps_per_epoch - done // cfg.global_batch
    remaining = max(0, run.steps_per_epoch * cfg.global_batch - done)
    steps = math.ceil(remaining / cfg.global_batch)
    run.say(
        f"note: the checkpoint's epoch was drawn with another layout (world size, device batch, accumulation, "
        f"workers, pool chunks: {run.progress.layout} now {run.layout}): the rest of epoch {run.progress.epoch + 1}, "
        f"{remaining} examples, is drawn anew in {steps} steps"
    )
    return 0, steps


def train_step(run: Run, micro_batches: list) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step over this process's micro-batches: forward and backward each (DDP
    all-reduces the gradients with the last one), then Adam, unless the gradients are not finite.

    Returns (loss averaged over the micro-batches, gradient norm, whether the step was applied).
    """
    accelerator, model, optimizer = run.accelerator, run.model, run.optimizer
    criterion = loss_function(run.cfg.loss)
    step_loss = torch.zeros((), device=accelerator.device)
    for mix, sources in step_inputs(run, micro_batches):
        with accelerator.accumulate(model):
            with accelerator.autocast():  # mixed precision here only: validation runs in fp32
                estimates = model(mix)
                loss = criterion(estimates, center_trim(sources, estimates))
            if run.faults:
                loss = run.faults.poison(loss, run.progress.step + 1)
            accelerator.backward(loss)
            step_loss += loss.detach() / len(micro_batches)
    # Gradients are all-reduced by now: every rank sees the same norm and takes the same branch.
    accelerator.unscale_gradients()  # fp16: measure the true gradients
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads)  # measure only: no clipping pass
    finite = bool(torch.isfinite(grad_norm))
    if finite or accelerator.scaler is not None:  # fp16: the loss scaler skips overflows itself
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    applied = finite and not accelerator.optimizer_step_was_skipped
    if applied and run.ema is not None:
        run.ema.update(run.bare_model)
    return step_loss, grad_norm, applied


def step_inputs(run: Run, micro_batches: list[TrainBatch]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (mixture, sources) pairs of one optimizer step, on the device. The step's crops (float16
    from the loader) are augmented together, so Remix groups span its micro-batches, with draws
    seeded from (seed, epoch, rank, step): a resumed run draws the same. Then split back; the
    mixture is the sum of the augmented sources."""
    device = run.accelerator.device
    sources = torch.cat([batch.sources.to(device, non_blocking=True) for batch in micro_batches])
    for batch in micro_batches:  # copied by now: the loader workers may refill their buffers
        batch.release()
    key = (run.cfg.seed, run.progress.epoch, run.accelerator.process_index, run.progress.step)
    sources = augment_step(sources, run.augment, step_generator(*key))
    for part in sources.split(run.device_batch):
        yield part.sum(1), part


def steps_of(batches, accumulation: int) -> Iterator[list]:
    """Group a stream of micro-batches into the lists that make one optimizer step each."""
    group: list = []
    for batch in batches:
        group.append(batch)
        if len(group) == accumulation:
            yield group
            group = []


def check_nonfinite_streak(run: Run, applied: bool) -> None:
    """Count skipped steps; stop after --max-nonfinite in a row (every rank decides alike)."""
    run.progress.skipped_steps += not applied
    run.consecutive_nonfinite = 0 if applied else run.consecutive_nonfinite + 1
    if run.consecutive_nonfinite >= run.cfg.max_nonfinite:
        raise UserError(
            f"{run.consecutive_nonfinite} steps in a row had non-finite gradients (step {run.progress.step}); "
            "stopping. The last checkpoint holds finite weights; try a lower --lr or --mixed-precision no"
        )


class StepMeter:
    """Timing, TensorBoard scalars and the progress display of one epoch's steps.

    The loss and gradient norm stay on the device and are read every --log-every steps in one go
    (one all-reduce, one host synchronisation for all of them), so that the training step itself
    waits for the device only once, for its finite check.
    """

    def __init__(self, run: Run, initial: int, total: int):
        self.run = run
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, dict[str, float]]] = []
        self.bar = progress_bar(
            total,
            f"epoch {run.progress.epoch + 1}",
            "steps",
            initial=initial,
            disable=not run.accelerator.is_main_process,
        )
        self.restart_clock()

    def restart_clock(self) -> None:
        self.step_start = time.perf_counter()
        self.wait = 0.0

    def data_ready(self) -> None:
        self.wait = time.perf_counter() - self.step_start

    def step_done(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        run = self.run
        seconds = time.perf_counter() - self.step_start
        examples_per_s = run.cfg.global_batch / seconds
        host_values = {
            "train/lr": run.optimizer.param_groups[0]["lr"],
            "train/examples_per_s": examples_per_s,
            "train/audio_seconds_per_s": examples_per_s * run.cfg.segment,
            "train/data_wait_fraction": self.wait / seconds,
            "train/skipped_steps": run.progress.skipped_steps,
            "train/peak_memory_gb": peak_memory_bytes(run.accelerator.device) / 1e9,
        }
        self.pending.append((run.progress.step, loss, grad_norm, host_values))
        self.bar.update(1)
        if len(self.pending) >= run.cfg.log_every:
            self.flush()
        self.restart_clock()

    def flush(self) -> None:
        """Write the pending steps' scalars (every rank calls this at the same steps: a collective)."""
        if not self.pending:
            return
        run = self.run
        losses = run.accelerator.reduce(torch.stack([p[1] for p in self.pending]), reduction="mean").tolist()
        norms = torch.stack([p[2] for p in self.pending]).tolist()
        if run.writer is not None:
            for (step, _, _, values), loss, norm in zip(self.pending, losses, norms):
                for tag, value in {"train/loss": loss, "train/grad_norm": norm, **values}.items():
                    run.writer.add_scalar(tag, value, step)
            last = self.pending[-1][3]
            self.bar.set_postfix(
                loss=f"{losses[-1]:.4f}",
                examples_per_s=f"{last['train/examples_per_s']:.1f}",
                data_wait=f"{last['train/data_wait_fraction']:.0%}",
            )
        self.pending = []

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------------------------
# Validation and the end of an epoch


def validation_due(run: Run) -> bool:
    epoch = run.progress.epoch + 1  # the epoch that just ended (end_epoch counts it)
    return epoch % run.cfg.valid_every == 0 or epoch == run.cfg.epochs


def validate_all(run: Run) -> tuple[dict[str, float], dict[str, float]]:
    """The validation loss of the raw weights ("raw") and of each weight average (--ema), and the
    raw weights' median SDR per source and "All" (empty with --no-valid-sdr)."""
    loss, sdr = validate(run, log_audio=run.cfg.log_audio, score=run.cfg.valid_sdr)
    losses = {"raw": loss}
    if run.ema is not None:
        for name in run.ema.shadows:
            with run.ema.swapped_in(run.bare_model, name):
                losses[name], _ = validate(run, log_audio=False)
    return losses, sdr


@torch.no_grad()
def validate(run: Run, log_audio: bool = False, score: bool = False) -> tuple[float, dict[str, float]]:
    """Mean over all validation songs of the per-song loss, in fp32, songs split across ranks;
    with `score`, also the SDR per source (museval's median over 1 s windows per song, then the
    median over songs, NaN songs left out; "All": the mean of the sources), else {}.

    The 2019 protocol: each song whole in one pass, no shifts, no autocast (accelerate's autocast
    wrapper was taken off the model in `prepare_model`), so the loss that picks best.th is the
    paper's. --valid-segment chunks long songs for small devices instead.
    """
    model, accelerator, cfg = run.bare_model, run.accelerator, run.cfg
    model.eval()
    criterion = loss_function(cfg.loss)
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)  # sum of song losses, songs
    song_sdrs = []  # (sources,) per song of this rank
    rank, world = accelerator.process_index, accelerator.num_processes
    for index, song in enumerate(valid_songs(cfg.shards, run.manifest, rank=rank, world_size=world)):
        # The 2019 code's bound on a validation song's length (~340 s): a predictable peak memory.
        mix = song.mix[..., :VALID_MAX_SAMPLES].to(accelerator.device)
        sources = song.sources[..., :VALID_MAX_SAMPLES].to(accelerator.device)
        split = cfg.valid_segment > 0
        estimates = apply_model(model, mix, shifts=0, split=split, segment=cfg.valid_segment or 1.0, overlap=0.25)
        total += torch.stack([criterion(estimates, sources).double(), torch.ones((), device=total.device)])
        if score:  # on the song's own scale (undo the z-scoring): what evaluate would score
            song_sdrs.append(song_median_sdr(sources * song.std + song.mean, estimates * song.std + song.mean).cpu())
        if run.writer is not None and index == 0 and log_audio and bool(torch.isfinite(estimates).all()):
            log_separation(run.writer, song, estimates, run.progress.step)
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    if total[1] == 0:
        raise UserError("the shards hold no validation songs")
    sdr = median_over_songs(song.tolist() for song in gather_object(song_sdrs)) if score else {}
    return (total[0] / total[1]).item(), sdr


def on_checkpoint_cadence(cfg: TrainConfig, step: int) -> bool:
    """Whether optimizer step `step` is one --checkpoint-every asks to checkpoint."""
    return cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0


def end_epoch(run: Run, train_loss: float, valid: dict[str, float], sdr: dict[str, float], seconds: float) -> None:
    """Count the epoch, keep the best model (raw or averaged weights, by loss), checkpoint, report
    the epoch. valid: the validation loss per weights; sdr: the raw weights' SDR ({} if not scored)."""
    progress, accelerator = run.progress, run.accelerator
    progress.epoch, progress.examples = progress.epoch + 1, 0
    best_name = min(valid, key=valid.__getitem__) if valid else None
    if best_name is not None and valid[best_name] < progress.best_valid:
        progress.best_valid, progress.best_epoch, progress.best_weights = valid[best_name], progress.epoch, best_name
        if accelerator.is_main_process:
            export(run, run.run_dir / "best.th", weights=best_name)
    last_epoch = progress.epoch == run.cfg.epochs
    # --checkpoint-every's step at an epoch's end is saved here (the step loop leaves it to us);
    # due() is collective: the conditions before it are the same on every rank
    if last_epoch or on_checkpoint_cadence(run.cfg, progress.step) or run.checkpoints.due(accelerator):
        if accelerator.is_main_process:
            export(run, run.run_dir / "last.th")
        run.checkpoints.save(accelerator, progress, run.bare_model, run.ema)
    bad_shards = accelerator.reduce(torch.tensor(float(run.bad_shards), device=accelerator.device), "sum").item()
    if run.writer is not None:
        run.writer.add_scalar("epoch/train_loss", train_loss, progress.step)
        run.writer.add_scalar("epoch/epoch", progress.epoch, progress.step)
        run.writer.add_scalar("train/bad_shards", bad_shards, progress.step)
        for name, loss in valid.items():
            run.writer.add_scalar("valid/loss" if name == "raw" else f"valid/loss_{name}", loss, progress.step)
        if valid:
            run.writer.add_scalar("valid/best", progress.best_valid, progress.step)
        for source, value in sdr.items():
            run.writer.add_scalar(f"valid/SDR/{source}", value, progress.step)
        run.writer.flush()
    valid_text = " ".join(f"{loss:.4f}" if name == "raw" else f"{name} {loss:.4f}" for name, loss in valid.items())
    best_text = "-"
    if progress.best_epoch >= 0:
        weights = "" if progress.best_weights == "raw" else f", {progress.best_weights}"
        best_text = f"{progress.best_valid:.4f} (epoch {progress.best_epoch}{weights})"
    speed = run.steps_per_epoch * run.cfg.global_batch / seconds
    run.say(
        f"epoch {progress.epoch}/{run.cfg.epochs} | train {train_loss:.4f} | valid {valid_text or '-'} | "
        + (f"SDR {sdr['All']:.2f} dB | " if sdr else "")
        + f"best {best_text} | {speed:.1f} examples/s | {seconds:.1f} s"
    )


def export(run: Run, path: Path, weights: str = "raw") -> None:
    """Write a self-describing model file of the raw weights or of an average (its name); refuse
    to write non-finite weights. The file's info says which weights it holds."""
    progress = run.progress
    context = run.ema.swapped_in(run.bare_model, weights) if weights != "raw" and run.ema else contextlib.nullcontext()
    with context:
        if not weights_are_finite(run.bare_model):
            raise UserError(f"the model's weights are not finite at epoch {progress.epoch}; {path} was not written")
        save_model(
            run.bare_model,
            path,
            epoch=progress.epoch,
            step=progress.step,
            best_valid=progress.best_valid,
            loss=run.cfg.loss,
            segment=run.cfg.segment,
            weights=weights,
        )


# ---------------------------------------------------------------------------------------------
# Set-up and tear-down


def start_run(model_cfg: ModelConfig, cfg: TrainConfig, augment: AugmentConfig, loader_cfg: LoaderConfig) -> Run:
    """Accelerator, batch plan, run folder, model, optimizer, resume, TensorBoard."""
    accelerator = make_accelerator(None if cfg.mixed_precision == "auto" else cfg.mixed_precision, cfg.timeout)
    world = accelerator.num_processes
    device_batch, accumulation = plan_batches(cfg.global_batch, world, cfg.max_device_batch)
    accelerator.gradient_accumulation_steps = accumulation
    manifest = read_manifest(cfg.shards)
    check_shards_fit_model(manifest, model_cfg)
    examples = (cfg.epoch_size or manifest.examples_per_epoch()) * cfg.repeat
    steps_per_epoch = examples // cfg.global_batch
    if steps_per_epoch == 0:
        raise UserError(f"an epoch of {examples} examples is smaller than --global-batch {cfg.global_batch}")
    per_step = device_batch * accumulation  # examples one process augments together
    if augment.remix and per_step < augment.remix_group:
        accelerator.print(
            f"note: each process handles {per_step} example(s) per optimizer step, fewer than a Remix group "
            f"({augment.remix_group}): sources are remixed among those {per_step} only, so each example mixes "
            f"fewer songs than the paper's groups of {augment.remix_group}"
            + (" (no Remix at all with 1)" if per_step == 1 else "")
            + f". For full groups, give each process {augment.remix_group} examples per step: a larger "
            "--global-batch or fewer processes (the accumulation steps then make up the rest)"
        )
    accelerator.print(
        f"{world} process(es) on {accelerator.device.type}, mixed precision {accelerator.mixed_precision}: "
        f"global batch {cfg.global_batch} = {device_batch} per device x {world} x {accumulation} accumulation; "
        f"{steps_per_epoch} steps of {examples} examples per epoch"
    )

    faults = Faults.from_env(accelerator.process_index)
    run_dir = Path(cfg.logdir)
    checkpoints = Checkpoints(run_dir, cfg.keep_checkpoints, cfg.checkpoint_minutes, faults)
    lock = prepare_run_dir(accelerator, run_dir, checkpoints, model_cfg, cfg, augment, loader_cfg)
    model, bare_model, optimizer = prepare_model(accelerator, model_cfg, cfg)

    progress, resumed_from = checkpoints.resume(accelerator, accelerator.print)
    ema = None
    if cfg.ema:  # built from the resumed weights, then given the saved averages
        ema = EMA(bare_model, cfg.ema)
        checkpoints.load_ema(resumed_from, ema, accelerator.print)
    writer = None
    if accelerator.is_main_process:
        writer = open_tensorboard(
            run_dir, progress, model_cfg.samplerate, run_config(model_cfg, cfg, augment, loader_cfg)
        )
    return Run(
        cfg=cfg,
        augment=augment,
        loader_cfg=loader_cfg,
        accelerator=accelerator,
        manifest=manifest,
        device_batch=device_batch,
        accumulation=accumulation,
        steps_per_epoch=steps_per_epoch,
        segment_samples=bare_model.valid_length(int(cfg.segment * model_cfg.samplerate)),
        model=model,
        bare_model=bare_model,
        optimizer=optimizer,
        checkpoints=checkpoints,
        progress=progress,
        run_dir=run_dir,
        writer=writer,
        lock=lock,
        faults=faults,
        layout=[world, device_batch, accumulation, cfg.workers, loader_cfg.pool_chunks],
        ema=ema,
    )


def prepare_run_dir(accelerator, run_dir, checkpoints, model_cfg, cfg, augment, loader_cfg) -> FolderLock | None:
    """Rank 0 checks the folder is a run's (or new), locks it, applies --restart, checks the model
    and writes config.json."""
    lock = None
    if accelerator.is_main_process:
        check_run_dir(run_dir)
        lock = FolderLock(run_dir, "training", "--logdir").acquire()
        if cfg.restart:
            checkpoints.clear()
        check_same_model(run_dir, model_cfg, checkpoints)
        with atomic_path(run_dir / "config.json") as tmp:
            tmp.write_text(json.dumps(run_config(model_cfg, cfg, augment, loader_cfg), indent=2))
    accelerator.wait_for_everyone()
    return lock


def prepare_model(accelerator: Accelerator, model_cfg: ModelConfig, cfg: TrainConfig):
    """(model for the training step, the plain module, optimizer), seeded and wrapped for DDP."""
    set_seed(cfg.seed)
    bare_model = Demucs(**dataclasses.asdict(model_cfg))
    # The plain module: torch.compile and DDP wrap this same object and share its parameters, so it
    # is what validation runs and what best.th/last.th export (a compiled module's state_dict keys
    # carry an "_orig_mod." prefix that a model file must not have).
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(bare_model)
    optimizer = torch.optim.Adam(bare_model.parameters(), lr=cfg.lr, fused=accelerator.device.type == "cuda")
    model, optimizer = accelerator.prepare(bare_model, optimizer)
    # With mixed precision, prepare() puts autocast inside the module's forward, where it would
    # also apply to validation. Take it off: the training step autocasts explicitly.
    if "_original_forward" in bare_model.__dict__:
        bare_model.forward = bare_model.__dict__.pop("_original_forward")  # type: ignore[method-assign]
    # Compiled after prepare: checkpoints hold the plain module's keys (no "_orig_mod."), so a run
    # resumes with or without --compile.
    if cfg.compile:
        model = torch.compile(model, backend=cfg.compile_backend)
    return model, bare_model, optimizer


def open_tensorboard(run_dir: Path, progress: Progress, samplerate: int, config: dict) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    # After a crash, events written past the checkpoint are hidden so the curves do not double back.
    writer: Any = SummaryWriter(str(run_dir), purge_step=progress.step + 1 if progress.step else None)
    writer.samplerate = samplerate
    writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
    log_hparams(writer, config)
    return writer


def epoch_batches(run: Run):
    """This rank's loader for the current epoch: exactly steps_per_epoch x accumulation batches."""
    return train_batches(
        run.cfg.shards,
        run.manifest,
        segment_samples=run.segment_samples,
        batch_size=run.device_batch,
        batches=run.steps_per_epoch * run.accumulation,
        epoch=run.progress.epoch,
        seed=run.cfg.seed,
        rank=run.accelerator.process_index,
        world_size=run.accelerator.num_processes,
        workers=run.cfg.workers,
        augment=run.augment,
        pool_chunks=run.loader_cfg.pool_chunks,
        on_bad_shard=run.loader_cfg.on_bad_shard,
    )


def finish_run(run: Run) -> None:
    if run.writer is not None:
        run.writer.close()
    if run.lock is not None:
        run.lock.release()
    run.accelerator.end_training()


def plan_batches(global_batch: int, world_size: int, max_device_batch: int) -> tuple[int, int]:
    """(device batch, accumulation steps) such that device batch x world size x steps == global batch."""
    if global_batch < world_size or global_batch % world_size:
        raise UserError(
            f"--global-batch {global_batch} cannot be split over {world_size} processes: use a multiple of {world_size}"
        )
    per_process = global_batch // world_size
    device_batch = max(b for b in range(1, min(max_device_batch, per_process) + 1) if per_process % b == 0)
    return device_batch, per_process // device_batch


def enable_activation_checkpointing(model: Demucs) -> None:
    """Recompute each encoder/decoder block's activations during backward instead of storing them."""
    for block in [*model.encoder, *model.decoder]:
        block.forward = lambda x, forward=block.forward: checkpoint(forward, x, use_reentrant=False)


def run_config(model_cfg: ModelConfig, cfg: TrainConfig, augment: AugmentConfig, loader: LoaderConfig) -> dict:
    return {
        "model": dataclasses.asdict(model_cfg),
        "train": dataclasses.asdict(cfg),
        "augment": dataclasses.asdict(augment),
        "loader": dataclasses.asdict(loader),
    }


def check_run_dir(run_dir: Path) -> None:
    """--logdir must be new, empty, or a run folder of ours (its config.json): --restart deletes
    checkpoints there and a run writes into it. UserError (one line) otherwise."""
    check_folder_is_ours(
        run_dir, "--logdir", lambda folder: (folder / "config.json").is_file(),
        "holds no run of demucs-dist train (no config.json)",
    )  # fmt: skip


def check_same_model(run_dir: Path, model_cfg: ModelConfig, checkpoints: Checkpoints) -> None:
    """Resuming a run with another model would fail deep inside load_state; say it plainly."""
    saved = run_dir / "config.json"
    if not saved.is_file() or not checkpoints.complete():
        return
    try:
        before = json.loads(saved.read_text())["model"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{saved} is not a run configuration written by demucs-dist train") from None
    changed = {k: (before.get(k), v) for k, v in dataclasses.asdict(model_cfg).items() if before.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
        raise UserError(f"{run_dir} holds a run of another model ({detail}); use another --logdir or --restart")


def check_shards_fit_model(manifest: Manifest, model_cfg: ModelConfig) -> None:
    """Refuse, before any training, shards that this model cannot use or validate on."""
    if not manifest.valid or not manifest.songs.valid:
        raise UserError("the shards hold no validation songs: reshard with --valid-tracks (a count, names or a file)")
    rate, sources = manifest.samplerate, manifest.sources
    if rate != model_cfg.samplerate:
        raise UserError(f"the shards are at {rate} Hz but the model works at {model_cfg.samplerate} Hz")
    if len(sources) != model_cfg.sources:
        raise UserError(f"the shards hold {len(sources)} sources ({', '.join(sources)}), the model {model_cfg.sources}")
    if sources != SOURCES[: len(sources)]:
        raise UserError(f"the shards' source order {list(sources)} is not {list(SOURCES)}")


def main(argv: Sequence[str] | None = None) -> None:
    configs = parse(argv, "demucs-dist train", __doc__, ModelConfig, TrainConfig, AugmentConfig, LoaderConfig)
    train(*configs)


if __name__ == "__main__":
    sys.exit(run_main(main))
