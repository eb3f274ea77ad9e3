import torch
import torch.nn.functional as F

from demucs_dist.apply import apply_model, normalize, separate, shift_offsets
from demucs_dist.model import Demucs, center_trim

SR = 4000  # a low sample rate keeps songs short in samples


def tiny_model(lstm_layers=1):
    torch.manual_seed(0)
    return Demucs(channels=4, depth=3, lstm_layers=lstm_layers, samplerate=SR).eval()


def plain_forward(model, x):
    """One forward of x (channels, T) padded to the valid length, trimmed back to T."""
    length = x.size(-1)
    delta = model.valid_length(length) - length
    with torch.no_grad():
        return center_trim(model(F.pad(x, (delta // 2, delta - delta // 2))[None]), length)[0]


def test_no_shift_no_split_is_one_plain_forward():
    model, mix = tiny_model(), torch.randn(2, 3 * SR + 17)
    assert torch.allclose(apply_model(model, mix), plain_forward(model, mix), atol=1e-6)


def test_shifts_equal_the_mean_of_manually_shifted_forwards():
    model, mix = tiny_model(), torch.randn(2, 2 * SR + 5)
    length, max_shift = mix.size(-1), SR // 2
    offsets = shift_offsets(3, max_shift, seed=7)
    assert len(set(offsets)) == 3 and all(0 <= o < max_shift for o in offsets)
    padded = F.pad(mix, (max_shift, max_shift))
    manual = sum(
        plain_forward(model, padded[:, o : o + length + max_shift])[..., max_shift - o : max_shift - o + length]
        for o in offsets
    ) / len(offsets)
    out = apply_model(model, mix, shifts=3, seed=7, batch_size=2)
    assert torch.allclose(out, manual, atol=1e-6)
    # The seed decides the offsets: another seed, another result.
    assert not torch.allclose(apply_model(model, mix, shifts=3, seed=8), manual, atol=1e-6)


def test_chunked_agrees_with_unchunked():
    """Each chunk gets real neighbouring audio as context and chunks cross-fade, so without the
    LSTM (finite receptive field) the only difference is the network's stride alignment; with the
    LSTM (which sees the whole input) they may differ more. Measured: < 0.05%; allowed: 1% relative L2."""
    mix = torch.randn(2, 8 * SR)
    for lstm_layers, tolerance in [(0, 0.01), (1, 0.01)]:
        model = tiny_model(lstm_layers)
        whole = apply_model(model, mix)
        chunked = apply_model(model, mix, split=True, segment=2.0, overlap=0.25, batch_size=3)
        plain_chunks = apply_model(model, mix, split=True, segment=2.0, overlap=0.0)
        for out in (chunked, plain_chunks):
            assert out.shape == whole.shape
            error = (out - whole).norm() / whole.norm()
            assert error < tolerance, (lstm_layers, error.item())


def test_chunked_with_shifts_covers_the_whole_song():
    model, mix = tiny_model(), torch.randn(2, 5 * SR + 3)
    out = apply_model(model, mix, shifts=2, split=True, segment=1.5, batch_size=4)
    reference = apply_model(model, mix, shifts=2)
    assert out.shape == (4, 2, mix.size(-1)) and torch.isfinite(out).all()
    assert (out - reference).norm() / reference.norm() < 0.01


def test_normalize_uses_the_mono_mixture():
    mix = torch.stack([torch.randn(1000) * 3 + 1, torch.randn(1000) + 1])
    normalized, mean, std = normalize(mix)
    ref = mix.mean(0)
    assert abs(mean - ref.mean().item()) < 1e-6 and abs(std - ref.std().item()) < 1e-5
    assert torch.allclose(normalized.mean(0).std(), torch.tensor(1.0), atol=1e-5)


def test_silent_song_does_not_divide_by_zero():
    model, silence = tiny_model(), torch.zeros(2, SR)
    normalized, mean, std = normalize(silence)
    assert std == 1.0 and mean == 0.0 and torch.equal(normalized, silence)
    out = separate(model, silence, shifts=2)
    assert torch.isfinite(out).all()


def test_separate_undoes_the_normalisation():
    model = tiny_model()
    mix = torch.randn(2, SR)
    scaled = mix * 10 + 3
    normalized, mean, std = normalize(scaled)
    assert abs(std - 10 * normalize(mix)[2]) < 1e-4
    assert torch.allclose(separate(model, scaled), apply_model(model, normalized) * std + mean, atol=1e-5)
