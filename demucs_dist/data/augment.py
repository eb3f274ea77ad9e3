"""Training augmentations (the paper's): Shift, FlipSign, FlipChannels and Remix.

They act on sources only; the training mixture is the sum of the augmented sources, so it
always matches its targets. Shapes: a crop's sources are (sources, channels, time); a batch is
(batch, sources, channels, time). Every random choice comes from an explicit `torch.Generator`,
so a seed and an epoch decide the batches.

Two forms of the same thing:
- `flip_sign`, `flip_channels`, `remix`: on a float batch tensor (readable, usable anywhere);
- `assemble_batch`: the loader's fast path. It draws the same random choices in the same order
  and writes each (item, source, channel) of the float32 batch once, straight from the stored
  float16 chunk: crop, shift, sign, channel swap, remix and the fp16 -> fp32 conversion in one
  copy (per-op passes over a ~60 MB batch cost more than reading the data).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..config import option


@dataclasses.dataclass
class AugmentConfig:
    """Training data augmentation (the paper's defaults)"""

    shift: float = option(1.0, "random per-source offset in [0, SHIFT) seconds before cropping (0 = off)")
    flip_sign: bool = option(True, "multiply each item's source by +1 or -1 at random (FlipSign)")
    flip_channels: bool = option(True, "swap left and right of each item's source with p=0.5 (FlipChannels)")
    remix: bool = option(True, "permute each source across the items of a group of the batch (Remix)")
    remix_group: int = option(4, "items per Remix group; an incomplete last group is remixed within itself")


@dataclasses.dataclass
class Crop:
    """Where one example lies in a stored chunk (sources, channels, time): a view, not a copy."""

    chunk: torch.Tensor
    start: int
    offsets: list[int]  # Shift: per-source offset added to `start`

    def source(self, index: int, length: int) -> torch.Tensor:
        begin = self.start + self.offsets[index]
        return self.chunk[index, :, begin : begin + length]


def shift_crop(chunk: torch.Tensor, start: int, length: int, max_shift: int, generator: torch.Generator) -> Crop:
    """Shift: each source of `chunk` starts at `start` plus its own offset in [0, max_shift), so the
    stems of an example become mutually misaligned; `length` samples are kept."""
    count = chunk.shape[0]
    offsets = torch.randint(0, max_shift, (count,), generator=generator).tolist() if max_shift > 0 else [0] * count
    if start < 0 or start + max(offsets) + length > chunk.shape[-1]:
        raise ValueError(f"crop at {start} + {max(offsets)} of {length} outside a chunk of {chunk.shape[-1]} samples")
    return Crop(chunk, start, offsets)


def draw_signs(batch: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """FlipSign's choice: (batch, sources) of +1 / -1."""
    return 2 * torch.randint(0, 2, (batch, count), generator=generator) - 1


def draw_swaps(batch: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """FlipChannels' choice: (batch, sources) booleans, True = swap left and right."""
    return torch.randint(0, 2, (batch, count), generator=generator).bool()


def draw_remix(batch: int, count: int, group: int, generator: torch.Generator) -> torch.Tensor:
    """Remix's choice: (batch, sources) item indices; source s of item b comes from item index[b, s].

    Within each group of `group` consecutive items every source gets its own permutation of the
    group. When `batch` is not a multiple of `group`, the last, smaller group is permuted within
    itself: every item is kept and each source of a group is used exactly once."""
    index = torch.arange(batch)[:, None].repeat(1, count)
    for first in range(0, batch, group):
        size = min(group, batch - first)
        for source in range(count):
            index[first : first + size, source] = first + torch.randperm(size, generator=generator)
    return index


def flip_sign(sources: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Multiply every (item, source) of a batch (B, S, C, T) by +1 or -1 at random."""
    signs = draw_signs(sources.shape[0], sources.shape[1], generator)
    return sources * signs[..., None, None].to(sources.dtype)


def flip_channels(sources: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Swap the two channels of every (item, source) of a stereo batch (B, S, 2, T) with p=0.5."""
    swaps = draw_swaps(sources.shape[0], sources.shape[1], generator)
    return torch.where(swaps[..., None, None], sources.flip(2), sources)


def remix(sources: torch.Tensor, group: int, generator: torch.Generator) -> torch.Tensor:
    """Give every source an independent random permutation of the items of its group (Remix)."""
    index = draw_remix(sources.shape[0], sources.shape[1], group, generator)
    return sources[index, torch.arange(sources.shape[1])]


def augment_batch(sources: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """FlipSign, then FlipChannels, then Remix of a batch (B, S, C, T), as `config` enables them."""
    if config.flip_sign:
        sources = flip_sign(sources, generator)
    if config.flip_channels and sources.shape[2] == 2:
        sources = flip_channels(sources, generator)
    if config.remix and config.remix_group > 1:
        sources = remix(sources, config.remix_group, generator)
    return sources


def assemble_batch(
    crops: Sequence[Crop], length: int, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """The float32 batch (B, S, C, length) that `augment_batch` would make of the stacked crops,
    drawing the same random choices, but written in one copy per (item, source, channel)."""
    batch, (count, channels) = len(crops), crops[0].chunk.shape[:2]
    signs = draw_signs(batch, count, generator) if config.flip_sign else torch.ones(batch, count, dtype=torch.long)
    swap = config.flip_channels and channels == 2
    swaps = draw_swaps(batch, count, generator) if swap else torch.zeros(batch, count, dtype=torch.bool)
    if config.remix and config.remix_group > 1:
        index = draw_remix(batch, count, config.remix_group, generator)
    else:
        index = torch.arange(batch)[:, None].repeat(1, count)
    out = torch.empty(batch, count, channels, length, dtype=torch.float32)
    for item in range(batch):
        for source in range(count):
            origin = int(index[item, source])  # Remix: the item this source comes from
            data = crops[origin].source(source, length)
            for channel in range(channels):
                read = channels - 1 - channel if swaps[origin, source] else channel
                out[item, source, channel].copy_(data[read])  # fp16 -> fp32 here
            if signs[origin, source] < 0:
                out[item, source].neg_()
    return out
