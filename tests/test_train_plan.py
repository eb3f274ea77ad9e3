"""The trainer's arithmetic and refusals, without starting processes."""

import pytest
from helpers import tiny_model

from demucs_dist.errors import UserError
from demucs_dist.train import plan_batches


@pytest.mark.parametrize(
    "global_batch, world, max_device, expected",
    [
        (64, 8, 8, (8, 1)),  # the paper on 8 GPUs: no accumulation
        (64, 1, 8, (8, 8)),  # one GPU: 8 accumulation steps
        (64, 2, 16, (16, 2)),
        (8, 2, 2, (2, 2)),  # the test setting: accumulation 2
        (64, 4, 6, (4, 4)),  # 6 does not divide 16 per process: the largest divisor that fits
        (24, 2, 100, (12, 1)),  # never more than the per-process share
    ],
)
def test_plan_batches(global_batch, world, max_device, expected):
    device_batch, accumulation = plan_batches(global_batch, world, max_device)
    assert (device_batch, accumulation) == expected
    assert device_batch * world * accumulation == global_batch


@pytest.mark.parametrize("global_batch, world", [(6, 4), (2, 4)])
def test_plan_batches_refuses_what_cannot_be_split(global_batch, world):
    with pytest.raises(UserError, match="cannot be split"):
        plan_batches(global_batch, world, 8)


def test_fp16_on_cpu_is_refused_with_a_clear_message(monkeypatch):
    from demucs_dist.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(UserError, match="fp16 mixed precision needs a GPU"):
        make_accelerator("fp16")


def test_activation_checkpointing_gives_the_same_gradients():
    import torch

    from demucs_dist.model import center_trim
    from demucs_dist.train import enable_activation_checkpointing

    def gradients(checkpointed: bool):
        torch.manual_seed(0)
        model = tiny_model()
        if checkpointed:
            enable_activation_checkpointing(model)
        torch.manual_seed(1)
        length = model.valid_length(2000)
        mix, sources = torch.randn(2, 2, length), torch.randn(2, 4, 2, length)
        out = model(mix)
        torch.nn.functional.l1_loss(out, center_trim(sources, out)).backward()
        return [p.grad for p in model.parameters()]

    for plain, checkpointed in zip(gradients(False), gradients(True)):
        assert torch.allclose(plain, checkpointed, atol=1e-6)
