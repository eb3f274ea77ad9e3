"""The trainer's per-step overhead against a bare PyTorch loop over the same model and batches.

    .venv/bin/python bench/trainer_overhead.py              # channels 32, batch 4 x 2 s, 24 steps each

Both read the same shards through the same loader (1 process, 1 worker) and do the same forward,
L1 loss, backward and Adam step. The trainer adds what a real run needs: Accelerate, gradient-norm
measurement, the loss all-reduce, TensorBoard scalars, the progress bar. Its step time is read
back from its own TensorBoard log (wall-clock time between consecutive steps' events); epoch-end
work (validation, checkpoints) is not per-step and is reported separately.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from demucs_dist.config import ModelConfig
from demucs_dist.data.augment import AugmentConfig, augment_step, step_generator
from demucs_dist.data.loader import train_batches
from demucs_dist.data.manifest import read_manifest
from demucs_dist.data.shard import main as shard_main
from demucs_dist.data.synth import synthesize
from demucs_dist.model import Demucs, center_trim
from demucs_dist.train import TrainConfig, train


def bare_loop(model_cfg: ModelConfig, shards: str, batch: int, steps: int, segment_s: float) -> list[float]:
    torch.manual_seed(0)
    model = Demucs(**vars(model_cfg))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    manifest = read_manifest(shards)
    segment = model.valid_length(int(segment_s * model.samplerate))
    batches = train_batches(shards, manifest, segment_samples=segment, batch_size=batch, batches=steps, epoch=0, seed=0,
                           rank=0, world_size=1, workers=1, augment=AugmentConfig())  # fmt: skip
    times, start = [], time.perf_counter()
    for index, item in enumerate(batches):  # augmented on the device, as the trainer does
        sources = augment_step(item.sources, AugmentConfig(), step_generator(0, 0, 0, index))
        mix = sources.sum(1)
        estimates = model(mix)
        loss = F.l1_loss(estimates, center_trim(sources, estimates))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times


def trainer_steps(model_cfg: ModelConfig, shards: str, batch: int, steps: int, segment_s: float, logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(shards=shards, logdir=str(logdir), epochs=1, repeat=1, epoch_size=steps * batch,
                      global_batch=batch, max_device_batch=batch, segment=segment_s, workers=1, seed=0,
                      log_audio=False, mixed_precision="no")  # fmt: skip
    start = time.perf_counter()
    train(model_cfg, cfg, AugmentConfig())
    total = time.perf_counter() - start
    # Wall-clock between consecutive steps' events: everything the trainer does per step, its
    # logging included (train/examples_per_s leaves the logging out).
    wall = [e.wall_time for e in EventAccumulator(str(logdir)).Reload().Scalars("train/loss")]
    return [b - a for a, b in zip(wall, wall[1:])], total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--segment", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    model_cfg = ModelConfig(channels=args.channels)
    with tempfile.TemporaryDirectory() as tmp:
        root = synthesize(Path(tmp) / "musdb", train=4, valid=1, test=0, seconds=20.0, seed=0)
        shards = str(Path(tmp) / "shards")
        shard_main(["--musdb", str(root), "--is-wav", "--out", shards, "--segment", str(args.segment),
                    "--workers", "1"])  # fmt: skip
        bare = bare_loop(model_cfg, shards, args.batch, args.steps, args.segment)
        trainer, total = trainer_steps(model_cfg, shards, args.batch, args.steps, args.segment, Path(tmp) / "run")
    # The first steps include allocator warm-up in both: compare medians of the rest.
    t, b = statistics.median(trainer[2:]), statistics.median(bare[2:])
    print(f"model channels={args.channels}, batch {args.batch} x {args.segment:g} s, {args.steps} steps, 1 process")
    print(f"bare loop: {b:.3f} s/step (median)   trainer: {t:.3f} s/step (median)   overhead {100 * (t / b - 1):+.1f}%")
    print(f"trainer total incl. start-up, validation, checkpoint and exports: {total:.1f} s")


if __name__ == "__main__":
    main()
