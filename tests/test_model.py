import pytest
import torch
from helpers import TINY_KWARGS, tiny_model

from demucs_dist.errors import UserError
from demucs_dist.model import Demucs, center_trim
from demucs_dist.modelfile import load_model, save_model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("channels, expected", [(64, 265_679_496), (100, 648_548_208)])
def test_parameter_counts(channels, expected):
    with torch.device("meta"):  # no memory, no init cost
        model = Demucs(channels=channels, rescale=0)
    assert n_params(model) == expected


@pytest.mark.slow
def test_valid_length_and_output_length_of_ten_seconds():
    model = Demucs(channels=2)  # default depth/kernel/stride/context; small for speed
    assert model.valid_length(441000) == 451924
    with torch.no_grad():
        out = model(torch.zeros(1, 2, 451924))
    assert out.shape == (1, 4, 2, 441004)


def test_valid_length_of_short_inputs_is_the_minimum_that_runs():
    model = Demucs(**TINY_KWARGS)
    minimum = model.valid_length(1)
    assert minimum == model.valid_length(0)  # the max(1, ...) guard: never an empty layer
    assert minimum > model.kernel_size
    with torch.no_grad():
        out = model(torch.zeros(1, 2, minimum))
    assert out.shape[-1] >= 1
    # Below the minimum the network cannot run at all.
    with pytest.raises(RuntimeError):
        model(torch.zeros(1, 2, model.kernel_size - 1))


def test_valid_length_is_valid_for_many_lengths():
    model = Demucs(**TINY_KWARGS)
    for length in [1, 100, 777, 4096, 10_000]:
        with torch.no_grad():
            out = model(torch.zeros(1, 2, model.valid_length(length)))
        assert out.shape[-1] >= length


def test_rescale_moves_each_conv_std_to_sqrt_std_times_reference():
    torch.manual_seed(0)
    plain = Demucs(**TINY_KWARGS, rescale=0)
    torch.manual_seed(0)
    rescaled = Demucs(**TINY_KWARGS, rescale=0.1)
    convs = 0
    for (name, a), b in zip(plain.named_modules(), rescaled.modules()):
        if isinstance(a, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            convs += 1
            expected = (a.weight.std() * 0.1).sqrt()
            assert torch.allclose(b.weight.std(), expected, rtol=1e-5), name
        elif isinstance(a, (torch.nn.LSTM, torch.nn.Linear)):
            for pa, pb in zip(a.parameters(), b.parameters()):
                assert torch.equal(pa, pb), f"{name} must not be rescaled"
    assert convs == 3 * 2 * 2  # per layer: 2 encoder convs, 2 decoder convs


def test_forward_backward_tiny():
    model = Demucs(**TINY_KWARGS)
    length = 3000
    x = torch.randn(2, 2, model.valid_length(length), requires_grad=True)
    y = center_trim(model(x), length)
    assert y.shape == (2, 4, 2, length)
    y.abs().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_center_trim_is_centered():
    x = torch.arange(10)
    assert center_trim(x, 6).tolist() == [2, 3, 4, 5, 6, 7]
    assert center_trim(x, 7).tolist() == [1, 2, 3, 4, 5, 6, 7]  # odd excess: the extra from the end
    with pytest.raises(ValueError):
        center_trim(x, 11)


def test_model_file_roundtrip(tmp_path):
    model = Demucs(**TINY_KWARGS, samplerate=22050)
    path = tmp_path / "m.th"
    save_model(model, path, epoch=3)
    loaded = load_model(path)
    assert loaded.kwargs == model.kwargs and loaded.samplerate == 22050
    x = torch.randn(1, 2, model.valid_length(1000))
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_model_file_rejects_other_files(tmp_path):
    not_model = tmp_path / "x.th"
    not_model.write_text("hello")
    with pytest.raises(UserError, match="not a demucs_dist model"):
        load_model(not_model)
    torch.save({"weights": torch.zeros(1)}, not_model)
    with pytest.raises(UserError, match="not a demucs_dist model"):
        load_model(not_model)
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "missing.th")


def test_blstm_runs_in_fp32_under_bf16_autocast():
    """Autocast would run the LSTM in reduced precision (cuDNN: fp16 even for bf16, unscaled)."""
    model = tiny_model()
    seen = []
    model.lstm.lstm.register_forward_hook(
        lambda module, inputs, output: seen.append((inputs[0].dtype, output[0].dtype))
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 2, model.valid_length(4096)))
    assert seen == [(torch.float32, torch.float32)]
    assert out.dtype == torch.bfloat16  # the rest of the network does run in bf16


def test_model_files_with_nan_weights_or_wrong_contents_are_refused(tmp_path):
    model = tiny_model(depth=2)
    with torch.no_grad():
        model.decoder[0][0].weight[0, 0, 0] = float("nan")
    save_model(model, tmp_path / "nan.th")
    with pytest.raises(UserError, match="non-finite"):
        load_model(tmp_path / "nan.th")
    package = torch.load(tmp_path / "nan.th", weights_only=True)
    package["kwargs"]["channels"] = 8  # a right header, contents of another model
    package["state"] = tiny_model(depth=2).state_dict()
    torch.save(package, tmp_path / "wrong.th")
    with pytest.raises(UserError, match="damaged demucs_dist model file"):
        load_model(tmp_path / "wrong.th")
