"""Running a model over a whole song: normalisation, padding to a valid length, the shift trick and
chunked (overlap-add) inference. The one inference path used by validation, evaluation and
separation.

Shapes: a song is (channels, samples); separated sources are (sources, channels, samples).
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

from .data.songs import song_statistics
from .model import Demucs
from .progress import progress_bar


def normalize(mix: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Z-score a song with the statistics of its mono mix-down: returns (normalized, mean, std).

    The statistics are `song_statistics`, the very numbers the shard writer stored for training.
    A silent song (std 0) is returned centred but unscaled rather than divided by zero.
    """
    mean, std = song_statistics(mix.detach().float().cpu().numpy())
    return (mix - mean) / std, mean, std


def loss_function(name: str):
    """The training, validation and test loss by name: "l1" (the paper's) or "mse"."""
    return {"l1": F.l1_loss, "mse": F.mse_loss}[name]


def song_seed(seed: int, name: str) -> int:
    """The shift-trick seed of one song: the same on any rank and in any run (crc32, not hash())."""
    return seed + zlib.crc32(name.encode("utf-8"))


def shift_offsets(shifts: int, max_shift: int, seed: int) -> list[int]:
    """`shifts` distinct offsets in [0, max_shift), drawn from `seed` alone (rank-independent)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(max_shift, generator=generator)[:shifts].tolist()


def length_margin(model: Demucs) -> int:
    """Input length minus output length, the same for every valid input length.

    Each level of the U-Net turns a margin m of the level below into stride * m plus the samples
    its decoder's context convolution eats (stride * (context - 1)).
    """
    margin = 0
    for _ in range(model.depth):
        margin = model.stride * (margin + model.context - 1)
    return margin


def next_valid_length(model: Demucs, length: int) -> int:
    """Smallest valid input length >= `length` (valid lengths are one residue mod stride**depth)."""
    grid = model.stride**model.depth
    smallest = model.valid_length(1)
    if length <= smallest:
        return smallest
    return length + (smallest - length) % grid


def _window(x: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """x[..., start:start+size], zero-padded where that range leaves x."""
    length = x.size(-1)
    left, right = max(0, -start), max(0, start + size - length)
    piece = x[..., max(0, start) : min(length, start + size)]
    return F.pad(piece, (left, right)) if left or right else piece


def _fade_weights(size: int, fade: int, device: torch.device) -> torch.Tensor:
    """Overlap-add weights: linear ramps of `fade` samples at both ends, positive everywhere."""
    t = torch.arange(size, device=device)
    fade = max(1, fade)
    return torch.minimum(torch.minimum(t + 1, size - t), torch.tensor(fade, device=device)) / fade


def apply_model(
    model: Demucs,
    mix: torch.Tensor,
    shifts: int = 0,
    split: bool = False,
    segment: float = 10.0,
    overlap: float = 0.25,
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Separate a normalized song `mix` (channels, length) into (sources, channels, length).

    shifts: the shift trick. The song is zero-padded by `max_shift` = 0.5 s on both sides; for
        each of `shifts` offsets o the model runs on mix[o : o + length + max_shift] and the part
        aligned with the song is kept; the kept outputs are averaged. Offsets come from `seed`.
    split: each (shifted) view is cut into `segment`-second pieces overlapping by `overlap`,
        each given its real neighbouring audio as padding to the valid length, and the outputs
        are blended with linear cross-fades. Without it a view runs in one piece.
    batch_size: pieces (of all shifts) run through the model together.
    Runs on the model's device; the result is on `mix`'s device.
    """
    device = next(model.parameters()).device
    channels, length = mix.shape
    if shifts:
        max_shift = model.samplerate // 2
        source = F.pad(mix, (max_shift, max_shift))
        view_length = length + max_shift
        # View starting at offset o in `source`: its sample p is song sample p + o - max_shift.
        view_starts = shift_offsets(shifts, max_shift, seed)
        song_offset = [o - max_shift for o in view_starts]
    else:
        source, view_length, view_starts, song_offset = mix, length, [0], [0]

    # Pieces are aligned with the whole-view forward: the network is equivariant to shifts by
    # `grid` samples only, so chunk starts are multiples of `grid` and every piece's input starts
    # at the same phase (mod grid) as the whole view's padded input would. Chunked inference then
    # computes the same features as one whole-view pass, except for what the BLSTM sees.
    grid = model.stride**model.depth
    whole_pad = (model.valid_length(view_length) - view_length) // 2
    chunk = max(grid, int(segment * model.samplerate) // grid * grid) if split else view_length
    if chunk >= view_length:
        split, chunk, pad_left = False, view_length, whole_pad
        input_length = model.valid_length(view_length)
    else:
        margin = length_margin(model) // 2  # output sample j lies over input sample j + margin
        pad_left = whole_pad % grid + grid * math.ceil(max(0, margin - whole_pad % grid) / grid)
        input_length = next_valid_length(model, pad_left + chunk + margin)
    hop = max(grid, round(chunk * (1 - overlap) / grid) * grid) if split else chunk
    starts = [0]
    while starts[-1] + chunk < view_length:
        starts.append(starts[-1] + hop)
    keep_from = pad_left - length_margin(model) // 2  # first output sample over the piece's start

    # Every view is cut the same way, so the overlap-add normalisation is computed once.
    weights = _fade_weights(chunk, chunk - hop if split else 0, mix.device)
    total_weight = torch.zeros(view_length, device=mix.device)
    for start in starts:
        size = min(chunk, view_length - start)
        total_weight[start : start + size] += weights[:size]

    # A view is padded with zeros at its own ends, as if it were the whole input (the paper's rule).
    views = [source[..., o : o + view_length] for o in view_starts]
    pieces = [(v, s) for v in range(len(views)) for s in starts]
    out = torch.zeros(model.sources, channels, length, device=mix.device)
    batches = range(0, len(pieces), batch_size)
    bar = progress_bar(len(batches), "separating", "batch", disable=not progress)
    for first in batches:
        bar.update()
        batch = pieces[first : first + batch_size]
        inputs = torch.stack([_window(views[v], s - pad_left, input_length) for v, s in batch])
        with torch.no_grad():
            outputs = model(inputs.to(device))[..., keep_from : keep_from + chunk].to(mix.device)
        for (v, s), y in zip(batch, outputs):
            # Part of this piece that lies inside the song, in view coordinates [lo, hi).
            lo = max(s, -song_offset[v])
            hi = min(s + chunk, view_length, length - song_offset[v])
            if hi <= lo:
                continue
            part = y[..., lo - s : hi - s] * (weights[lo - s : hi - s] / total_weight[lo:hi])
            out[..., lo + song_offset[v] : hi + song_offset[v]] += part
    bar.close()
    return out / len(view_starts)


def separate(model: Demucs, mix: torch.Tensor, **apply_options) -> torch.Tensor:
    """Separate a raw (unnormalized) song: normalize, `apply_model`, and undo the normalisation."""
    normalized, mean, std = normalize(mix)
    return apply_model(model, normalized, **apply_options) * std + mean
