"""`demucs-dist separate`: split your own songs into drums, bass, other and vocals.

    demucs-dist separate song.mp3 other.flac --model runs/x/best.th --out separated
    accelerate launch -m demucs_dist.separate *.mp3 --model best.th --out separated   (every GPU)

Reads anything ffmpeg reads. Mono becomes stereo; other sample rates are resampled to the model's
and the stems are resampled back, so each stem has the input's rate and length. Writes
`OUT/<song>/{drums,bass,other,vocals}.wav`, <song> being the file name without its extension.
Under `accelerate launch` the files are split across the devices, balanced by duration.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import AUDIO_CHANNELS, SOURCES
from .apply import separate, song_seed
from .audio import audio_info, fit_length, read_audio, resample, write_wav
from .config import ApplyConfig, add_options, from_options, option
from .distributed import balance, cpus_per_process, processes_on_this_node
from .errors import UserError, run_main
from .model import Demucs
from .progress import progress_bar

SUBTYPES = ("PCM_16", "PCM_24", "FLOAT")


@dataclasses.dataclass
class SeparateConfig:
    """Model and output."""

    model: str = option("", "model file written by demucs-dist train (required)")
    out: str = option("separated", "output folder: OUT/<song>/{drums,bass,other,vocals}.wav")
    subtype: str = option("PCM_16", "wav sample format of the stems", choices=SUBTYPES)
    seed: int = option(0, "seed of the shift offsets (each song adds a hash of its name)")
    timeout: float = option(3600.0, "seconds a rank waits for the others at the end", minimum=1)
    progress: bool = option(True, "a progress bar per rank")


def song_name(path: str | Path) -> str:
    """The output folder name of an input file: its name without extension (and without .stem)."""
    name = Path(path).name
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix else name
    return stem.removesuffix(".stem") or stem


def separate_file(
    model: Demucs, path: str | Path, out_dir: Path, apply_config: ApplyConfig, seed: int, subtype: str
) -> Path:
    """Separate one audio file into `out_dir/<song>/<source>.wav` at the file's own rate and length."""
    audio, rate = read_audio(path, channels=AUDIO_CHANNELS)  # native rate: the stems go back to it
    mix = torch.from_numpy(resample(audio, rate, model.samplerate)).to(next(model.parameters()).device)
    stems = separate(model, mix, seed=seed, **dataclasses.asdict(apply_config)).cpu().numpy()
    folder = out_dir / song_name(path)
    for source, stem in zip(SOURCES, stems):
        stem = fit_length(resample(stem, model.samplerate, rate), audio.shape[-1])
        if subtype != "FLOAT":  # integer formats would wrap around, not saturate
            stem = np.clip(stem, -1.0, 1.0)
        write_wav(folder / f"{source}.wav", stem, rate, subtype)
    return folder


def parse_args(argv: Sequence[str] | None) -> tuple[list[str], SeparateConfig, ApplyConfig]:
    parser = argparse.ArgumentParser(
        prog="demucs-dist separate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files to separate (any format ffmpeg reads)")
    add_options(parser, SeparateConfig, "model and output")
    add_options(parser, ApplyConfig, "inference")
    args = parser.parse_args(argv)
    return args.files, from_options(SeparateConfig, args), from_options(ApplyConfig, args)


def main(argv: Sequence[str] | None = None) -> None:
    from .distributed import make_accelerator
    from .modelfile import load_model

    files, config, apply_config = parse_args(sys.argv[1:] if argv is None else argv)
    if not config.model:
        raise UserError("--model is required: a model file written by demucs-dist train")
    names: dict[str, str] = {}
    for path in files:
        if not os.path.isfile(path):
            raise UserError(f"audio file not found: {path}")
        name = song_name(path)
        if name in names and names[name] != path:
            raise UserError(f"{names[name]} and {path} would both be written to {config.out}/{name}/")
        names[name] = path
    # Every rank checks every file (same answer everywhere) before any rank starts working.
    durations = {path: audio_info(path)[2] for path in names.values()}
    model = load_model(config.model)

    accelerator = make_accelerator(mixed_precision="no", timeout_s=config.timeout)
    rank = accelerator.process_index
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpus_per_process(processes_on_this_node(accelerator)))
    model.to(accelerator.device)
    mine = balance({p: d if d == d else 0.0 for p, d in durations.items()}, accelerator.num_processes)[rank]
    out_dir = Path(config.out)
    # Each rank has its own files: each reports its own progress, its rank in every line.
    bar = progress_bar(len(mine), f"rank {rank} separating", "files", position=rank, disable=not config.progress)
    for path in mine:
        folder = separate_file(
            model, path, out_dir, apply_config, song_seed(config.seed, song_name(path)), config.subtype
        )
        bar.write(f"rank {rank}: {path} -> {folder}/")
        bar.update(1)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(f"separated {len(names)} files into {out_dir}/ with {accelerator.num_processes} processes")
    accelerator.end_training()


if __name__ == "__main__":
    sys.exit(run_main(main))
