"""augment_step: FlipSign, FlipChannels and Remix over all examples of an optimizer step."""

from __future__ import annotations

import pytest
import torch

from demucs_dist.data.augment import AugmentConfig, augment_step, draw_remix, draw_signs, draw_swaps

ONLY_REMIX = AugmentConfig(flip_sign=False, flip_channels=False)
ONLY_SIGN = AugmentConfig(flip_channels=False, remix=False)
ONLY_CHANNELS = AugmentConfig(flip_sign=False, remix=False)


def labelled(items: int, sources: int = 4, length: int = 3) -> torch.Tensor:
    """(items, sources, 2, length) float16 whose values say where they are: 100 item + 10 source + channel + 1."""
    item = torch.arange(items)[:, None, None, None]
    source = torch.arange(sources)[None, :, None, None]
    channel = torch.arange(2)[None, None, :, None]
    return (100 * item + 10 * source + channel + 1).expand(items, sources, 2, length).to(torch.float16)


def where_from(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(item, source, first channel, sign) each output (item, source) was taken from."""
    value = out[:, :, 0, 0]
    sign = value.sign()
    value = value.abs().round().long() - 1
    return value // 100, (value // 10) % 10, value % 10, sign


def reference(sources: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """The documented meaning, one (item, source, channel) at a time, with the same draws in the same order."""
    items, count, channels = sources.shape[:3]
    signs = draw_signs(items, count, generator) if config.flip_sign else torch.ones(items, count, dtype=torch.long)
    swap = config.flip_channels and channels == 2
    swaps = draw_swaps(items, count, generator) if swap else torch.zeros(items, count, dtype=torch.bool)
    remix = config.remix and config.remix_group > 1
    index = draw_remix(items, count, config.remix_group, generator) if remix else torch.arange(items)[:, None]
    out = torch.empty(sources.shape, dtype=torch.float32)
    for item in range(items):
        for source in range(count):
            origin = int(index[item, source] if remix else item)
            for channel in range(channels):
                read = channels - 1 - channel if swaps[origin, source] else channel
                out[item, source, channel] = signs[origin, source] * sources[origin, source, read].float()
    return out


@pytest.mark.parametrize(
    "config", [AugmentConfig(), ONLY_REMIX, ONLY_SIGN, ONLY_CHANNELS, AugmentConfig(remix_group=3)], ids=str
)
def test_matches_the_reference_and_returns_float32(config):
    sources = torch.randn(10, 4, 2, 50).to(torch.float16)
    before = sources.clone()
    out = augment_step(sources, config, torch.Generator().manual_seed(7))
    assert out.dtype == torch.float32 and out.shape == sources.shape
    assert torch.equal(out, reference(sources, config, torch.Generator().manual_seed(7)))
    assert torch.equal(sources, before)  # the input is left alone


def test_remix_draws_an_independent_permutation_per_source():
    differing = 0
    for seed in range(5):
        items, sources, _, _ = where_from(augment_step(labelled(8), ONLY_REMIX, torch.Generator().manual_seed(seed)))
        assert torch.equal(sources, torch.arange(4).expand(8, 4))  # sources stay in place
        for first in (0, 4):
            group = items[first : first + 4]
            for source in range(4):  # each source of the group is used exactly once
                assert sorted(group[:, source].tolist()) == list(range(first, first + 4))
            differing += not all(torch.equal(group[:, 0], group[:, s]) for s in range(1, 4))
    assert differing >= 8  # of 10 groups: one permutation shared by all sources would give 0


def test_flip_sign_is_drawn_per_item_and_per_source():
    _, _, _, sign = where_from(augment_step(labelled(16), ONLY_SIGN, torch.Generator().manual_seed(0)))
    mixed_items = sum(len(set(row.tolist())) > 1 for row in sign)  # an item with + and - sources
    assert mixed_items >= 8 and (sign < 0).any() and (sign > 0).any()  # per item only would give 0


def test_flip_channels_is_drawn_per_item_and_per_source():
    out = augment_step(labelled(16), ONLY_CHANNELS, torch.Generator().manual_seed(0))
    items, sources, first_channel, _ = where_from(out)
    assert torch.equal(items, torch.arange(16)[:, None].expand(16, 4)) and torch.equal(sources % 4, sources)
    assert torch.equal(out[:, :, 1, 0].round().long() % 10 - 1, 1 - first_channel)  # both channels, swapped or not
    mixed_items = sum(len(set(row.tolist())) > 1 for row in first_channel)
    assert mixed_items >= 8  # per item only would give 0


def test_groups_span_the_micro_batches_of_a_step():
    """Two micro-batches of 2 examples, augmented together: one Remix group of 4 across both."""
    crossed = 0
    for seed in range(5):
        micro_batches = labelled(4).split(2)
        step = augment_step(torch.cat(micro_batches), ONLY_REMIX, torch.Generator().manual_seed(seed))
        items, _, _, _ = where_from(step)
        first, second = items[:2], items[2:]
        crossed += bool((first >= 2).any() or (second < 2).any())
    assert crossed == 5  # each micro-batch on its own could only remix within itself


def test_an_incomplete_last_group_is_remixed_within_itself():
    items, _, _, _ = where_from(augment_step(labelled(6), ONLY_REMIX, torch.Generator().manual_seed(3)))
    assert set(items[4:].flatten().tolist()) == {4, 5} and set(items[:4].flatten().tolist()) == {0, 1, 2, 3}


def test_mono_and_nothing_enabled():
    mono = torch.randn(4, 4, 1, 20)
    out = augment_step(mono, AugmentConfig(), torch.Generator().manual_seed(0))  # no channel swap on mono
    assert torch.equal(out.abs().sort(0).values, mono.abs().sort(0).values)
    plain = AugmentConfig(flip_sign=False, flip_channels=False, remix=False)
    same = augment_step(mono, plain, torch.Generator())
    assert torch.equal(same, mono) and same.data_ptr() != mono.data_ptr()


def test_the_generator_decides_the_draws():
    sources = torch.randn(8, 4, 2, 30)
    a = augment_step(sources, AugmentConfig(), torch.Generator().manual_seed(1))
    b = augment_step(sources, AugmentConfig(), torch.Generator().manual_seed(1))
    c = augment_step(sources, AugmentConfig(), torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("device_batch", [1, 2])
def test_the_trainer_remixes_across_the_micro_batches_of_a_step(device_batch):
    """train.step_inputs with a step of 4 examples in micro-batches of 1 or 2 (a large cluster's
    case: 64 examples over 64 GPUs, accumulation 4): Remix groups of 4 take sources from other
    micro-batches, each micro-batch keeps its size, and the mixture is the sum of its sources."""
    from types import SimpleNamespace

    from demucs_dist.train import step_inputs

    crossed = 0
    for step in range(5):
        run = SimpleNamespace(
            accelerator=SimpleNamespace(device=torch.device("cpu"), process_index=0),
            cfg=SimpleNamespace(seed=0),
            progress=SimpleNamespace(epoch=0, step=step),
            augment=ONLY_REMIX,
            device_batch=device_batch,
        )
        micro_batches = [
            SimpleNamespace(sources=part, release=lambda: None) for part in labelled(4).split(device_batch)
        ]
        parts = list(step_inputs(run, micro_batches))  # type: ignore[arg-type]
        assert [sources.shape[0] for _, sources in parts] == [device_batch] * (4 // device_batch)
        for mixture, sources in parts:
            assert torch.equal(mixture, sources.sum(1))
        items, _, _, _ = where_from(torch.cat([sources for _, sources in parts]))
        home = torch.arange(4)[:, None] // device_batch  # the micro-batch each output item is in
        crossed += bool((items // device_batch != home).any())
    # Each micro-batch on its own could never take sources from the others; with groups of 4 a step
    # keeps every source inside its micro-batch by chance only (1 in 1296 for micro-batches of 2:
    # step 0 here does).
    assert crossed >= 4
