"""Training augmentations (the paper's): Shift, FlipSign, FlipChannels and Remix.

They act on sources only; the training mixture is the sum of the augmented sources, so it
always matches its targets. Every random choice comes from an explicit `torch.Generator`, so a
seed, an epoch, a rank and a step decide them.

Where each runs:
- Shift (`shift_crop`) on the host, in the loader: each source of an example is cropped at its own
  offset from the stored chunk, which is all the loader copies (in the stored dtype, float16 by default).
- FlipSign, FlipChannels and Remix (`augment_step`) on the device, over all examples of one
  optimizer step (device batch x accumulation): the random choices are drawn on the CPU (a few
  integers per example) and applied by one gather and one multiply on the device, which also
  turns float16 into float32. Remix groups therefore span micro-batches: with a device batch of 2
  and 2 accumulation steps, the 4 examples of a step form one group, as in a batch of 4.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..config import option


@dataclasses.dataclass
class AugmentConfig:
    """Training data augmentation (the paper's defaults)"""

    shift: float = option(1.0, "random per-source offset in [0, SHIFT) seconds before cropping (0 = off)", minimum=0)
    flip_sign: bool = option(True, "multiply each item's source by +1 or -1 at random (FlipSign)")
    flip_channels: bool = option(True, "swap left and right of each item's source with p=0.5 (FlipChannels)")
    remix: bool = option(True, "permute each source across the examples of a group (Remix)")
    remix_group: int = option(
        4,
        "consecutive examples of an optimizer step per Remix group (groups span micro-batches); "
        "an incomplete last group is remixed within itself",
        minimum=1,
    )


AUGMENT_STREAM = 0x5EED  # keeps the step generators apart from the loader's (seed, epoch, rank, worker) ones


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU torch generator seeded from several integers (seed, epoch, rank, worker or step, ...)."""
    state = np.random.SeedSequence([k % 2**63 for k in key]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) % 2**63)


def step_generator(seed: int, epoch: int, rank: int, step: int) -> torch.Generator:
    """The generator of `augment_step` for one optimizer step of one rank: a function of where
    training stands only, so a run resumed from a checkpoint draws the same choices."""
    return seeded_generator(AUGMENT_STREAM, seed, epoch, rank, step)


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


def augment_step(sources: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """FlipSign, FlipChannels (stereo) and Remix of the examples `sources` (N, S, C, T), any dtype,
    on any device; returns a new float32 tensor (N, S, C, T) on the same device.

    FlipSign and FlipChannels are drawn per example and per source; Remix gives every source its
    own permutation of each group of `config.remix_group` consecutive examples (an incomplete last
    group is permuted within itself). Output item b, source s is source s of example
    index[b, s], sign-flipped and channel-swapped by that example's draws for source s.
    `generator` is a CPU generator: the draws are small and made on the CPU (the same on any
    device), then used as indices on the device.
    """
    items, count, channels = sources.shape[:3]
    signs = draw_signs(items, count, generator) if config.flip_sign else None
    swaps = draw_swaps(items, count, generator) if config.flip_channels and channels == 2 else None
    remixed = config.remix and config.remix_group > 1
    if remixed:
        origin = draw_remix(items, count, config.remix_group, generator)
    else:
        origin = torch.arange(items)[:, None].expand(items, count)
    source = torch.arange(count)[None, :].expand(items, count)
    if remixed or swaps is not None:
        channel = torch.arange(channels)[None, None, :].expand(items, count, channels)
        if swaps is not None:
            channel = torch.where(swaps[origin, source][..., None], channel.flip(-1), channel)
        device = sources.device
        sources = sources[origin[..., None].to(device), source[..., None].to(device), channel.to(device)]
    if signs is None:
        return sources.to(torch.float32, copy=True)
    scale = signs[origin, source].to(torch.float32)[..., None, None].to(sources.device)
    return sources * scale  # float16 x float32: one pass that also converts to float32
