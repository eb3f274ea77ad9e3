"""bss_eval v4 (SiSEC 2018, image version) in torch: museval's numbers, on the rank's own device.

What museval computes (`museval.evaluate`, i.e. `museval.metrics.bss_eval` with
`framewise_filters=False`, `bsseval_sources_version=False`), and how this module gets the same
numbers much faster:

1. Distortion filters, once per song. Every reference channel delayed by 0..511 samples spans a
   subspace; each estimate channel is projected on it by least squares (`C`, 512 taps from every
   reference channel to every estimate channel) and, for SIR/ISR, on its own source's channels
   only (`Cj`). The Gram matrix `G` (4 sources x 2 channels x 512 lags = 4096 square) holds the
   correlations of the references at lags -511..511, the right-hand sides those of references
   and estimates at lags 0..511. museval gets each correlation from a full-length FFT of the
   song (2^21 points for 30 s) and factors `G + eps I` anew for each estimate. Here the
   correlations of every pair of signals are accumulated block by block: each 1 s block of every
   signal is transformed once, the cross-spectra of all blocks are summed (a batched matrix
   product per frequency) before one inverse FFT per pair, and the products that straddle block
   boundaries are added from the 511 samples on either side of each boundary. `G + eps I` is
   factored once (Cholesky; LU, then museval's least squares, if that fails) for all estimates.
   `eps` is museval's: float64's machine epsilon, absolute.
2. Per 1 s window (hop 1 s, the last partial window dropped, museval's `Framing`), the windowed
   references are filtered: the full linear convolution of the window (not a slice of the
   whole song's convolution: museval convolves the windowed signals, so the first and last
   511 samples differ), giving `P` (all sources) and `Pj` (own source), over window + 511
   samples. With s = the reference and e = the estimate (both zero past the window),
   SDR = |s|²/|e - s|², ISR = |s|²/|Pj - s|², SIR = |Pj|²/|P - Pj|², SAR = |P|²/|e - P|², in dB,
   energies summed over channels (museval's e_spat = Pj - s, e_interf = P - Pj, e_artif = e - P).
   The filters do not change between windows, so their spectra are computed once; each window
   costs one FFT per reference and estimate channel, and the energies are read off the spectra
   (Parseval) instead of transforming the projections back.
3. A window is NaN for every source and metric when, for any reference or any estimate, the sum
   over channels is zero at every sample of the window (museval's `_any_source_silent`: L = -R
   counts as silent). A source silent over the whole song is an error, as in museval.

Everything is float64. Inputs are (sources, channels, samples), the layout used everywhere in
this project; outputs are (sources, windows), as from museval.evaluate. The device is that of
the inputs (or `device=`); on CPU, torch's thread count (set by the caller) is what it uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import SAMPLERATE
from .errors import UserError

FILTER_TAPS = 512  # museval's filters_len: distortion filters of 512 taps (lags 0..511)
WINDOW_SECONDS = 1.0  # SiSEC 2018: metrics on 1 s windows with 1 s hops
BLOCK_FFT_SIZE = 16384  # FFT size of the block-wise correlations (small enough to stay in cache)


class SilentSourceError(UserError):
    """A reference or an estimate is silent over the whole song: museval refuses such songs."""


@dataclass
class BssScores:
    """bss_eval v4 metrics in dB, float64 tensors of shape (sources, windows); NaN for silent windows."""

    sdr: torch.Tensor
    isr: torch.Tensor
    sir: torch.Tensor
    sar: torch.Tensor

    def numpy(self) -> dict[str, np.ndarray]:
        """{"SDR": .., "ISR": .., "SIR": .., "SAR": ..} as numpy arrays (museval's names)."""
        return {name: getattr(self, name.lower()).cpu().numpy() for name in ("SDR", "ISR", "SIR", "SAR")}


def fft_size(n: int) -> int:
    """The smallest n' >= n whose only prime factors are 2, 3, 5 and 7: fast in every FFT library
    (pocketfft on CPU, cuFFT), and often much smaller than the next power of two."""
    best = 1 << max(0, (n - 1).bit_length())
    odd = [1]
    for prime in (3, 5, 7):
        odd = [m * prime**k for m in odd for k in range(int(math.log(best, prime)) + 1) if m * prime**k < best]
    for m in odd:
        size = m
        while size < n:
            size *= 2
        best = min(best, size)
    return best


def window_count(samples: int, window_samples: int, hop_samples: int) -> int:
    """museval's number of windows (`Framing.nwin`): whole windows only, or 1 for a short song."""
    if window_samples < samples:
        return (samples - window_samples + hop_samples) // hop_samples
    return 1


def _silent(frames: torch.Tensor) -> torch.Tensor:
    """(sources, channels, ..., samples) -> (...): whether any source's channel sum is 0 at every
    sample (museval's `_any_source_silent`, summed in float64 as museval does).

    A cheap probe first: a source with a nonzero channel sum at one of ~64 spread samples is not
    silent, which settles nearly every window of real music; the rest get the full check.
    """
    step = max(1, frames.shape[-1] // 64)
    maybe = (frames[..., ::step].sum(dim=1, dtype=torch.float64) == 0).all(dim=-1).any(dim=0)
    if not bool(maybe.any()):
        return maybe
    return (frames.sum(dim=1, dtype=torch.float64) == 0).all(dim=-1).any(dim=0)


def _padded(signals: Sequence[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """The rows of `signals` (each (rows, samples)) stacked, samples start:stop, as float64 and zero
    outside [0, samples) (museval's zero padding), without copying whole songs."""
    rows = sum(signal.shape[0] for signal in signals)
    out = torch.empty(rows, stop - start, dtype=torch.float64, device=signals[0].device)
    first, last = max(start, 0), min(stop, signals[0].shape[-1])
    out[:, : max(0, first - start)] = 0
    out[:, max(0, last - start) :] = 0
    row = 0
    for signal in signals:
        if last > first:
            out[row : row + signal.shape[0], first - start : last - start] = signal[:, first:last]
        row += signal.shape[0]
    return out


def _correlations(x: torch.Tensor, y: Sequence[torch.Tensor], taps: int, blocks_per_chunk: int) -> torch.Tensor:
    """Cross-correlations r[p, q, taps - 1 + d] = sum_n x[p, n + d] y[q, n] for |d| < taps.

    x: (P, samples); y: tensors (rows, samples) whose rows, stacked, are the Q signals; any float
    dtype, zero outside [0, samples) (museval's zero padding). Overlap-save: y is cut into blocks
    of B samples, x into the same blocks extended by taps - 1 on each side (one FFT long); the
    cross-spectra of all blocks are summed (a batched matrix product per frequency), then
    transformed back once per pair. Returns float64 (P, Q, 2 * taps - 1). Memory: one chunk of
    `blocks_per_chunk` blocks at a time, never a whole song in float64.
    """
    samples = x.shape[-1]
    margin = taps - 1
    size = max(min(BLOCK_FFT_SIZE, fft_size(samples + 2 * margin)), fft_size(2 * margin + 1))
    block = size - 2 * margin  # a segment of x (block + both margins) is exactly one FFT long
    blocks = -(-samples // block)
    rows = sum(signal.shape[0] for signal in y)
    spectra = torch.zeros(size // 2 + 1, x.shape[0], rows, dtype=torch.complex128, device=x.device)
    for first in range(0, blocks, blocks_per_chunk):
        count = min(blocks, first + blocks_per_chunk) - first
        start, stop = first * block, (first + count) * block
        segments = _padded([x], start - margin, stop + margin).unfold(-1, size, block)  # (P, blocks, size)
        pieces = _padded(y, start, stop).view(rows, count, block)  # (Q, blocks, block)
        xf = torch.fft.rfft(segments).permute(2, 0, 1).contiguous()  # (F, P, blocks)
        # conj() is resolved by the copy that transposes: a lazy conjugate would slow the product.
        yf = torch.fft.rfft(pieces, n=size).permute(2, 1, 0).conj().contiguous()  # (F, blocks, Q)
        spectra += torch.matmul(xf, yf)  # summed over blocks: one small matrix product per frequency
    # No wrap-around: lags up to +-margin of a block fit in its segment.
    return torch.fft.irfft(spectra.permute(1, 2, 0), n=size)[..., : 2 * margin + 1]


def _blockwise(
    signals: Sequence[torch.Tensor], block: int, size: int, taps: int, blocks_per_chunk: int
) -> torch.Tensor:
    """The correlations of `_correlations`, from one FFT per block of every signal (instead of a
    segment of x and a block of y): 2/3 of the transforms, where blocks can be long.

    signals: the references (P, samples), then the estimates (P, samples). Each signal is cut into
    blocks of `block` samples (the last one zero-padded) and transformed once (`size` >= block +
    taps - 1, so a block's own correlation at lags within taps - 1 does not wrap around). The
    products of lags that straddle a block boundary are added from the taps - 1 samples on each
    side of every boundary (small FFTs). Returns float64 correlations (P, 2P, 2 * taps - 1), as
    `_correlations(references, signals)` does. (Keeping the blocks' spectra for the windows, when
    windows are these blocks, was measured: it saves no time, the products and energies dominate,
    and costs 5.7 MB per window.)
    """
    rows = sum(signal.shape[0] for signal in signals)
    flat = signals[0].shape[0]
    samples = signals[0].shape[-1]
    margin = taps - 1
    blocks = -(-samples // block)
    device = signals[0].device
    products = torch.zeros(size // 2 + 1, rows, flat, dtype=torch.complex128, device=device)
    for first in range(0, blocks, blocks_per_chunk):
        count = min(blocks, first + blocks_per_chunk) - first
        frames = _padded(signals, first * block, (first + count) * block).view(rows, count, block)
        spectra = torch.fft.rfft(frames, n=size).permute(2, 1, 0).contiguous()  # (F, blocks, rows)
        products += torch.matmul(spectra.mH, spectra[..., :flat])  # (F, rows, P): sum of conj(Y) X
    lags = torch.arange(-margin, margin + 1, device=device)
    correlation = torch.fft.irfft(products.permute(2, 1, 0), n=size)[..., lags % size]  # (P, rows, lags)
    if blocks > 1:  # the products across each boundary: block k's last and block k + 1's first samples
        small = fft_size(2 * margin)
        # The 2 * margin samples around each boundary, gathered (not a float64 copy of the song).
        around = torch.arange(-margin, margin, device=device) + block * torch.arange(1, blocks, device=device)[:, None]
        inside = around < samples
        straddles = torch.cat([signal[:, around.clamp(max=samples - 1)] for signal in signals]).double()
        straddles *= inside  # zero past the end of the song
        tails = torch.fft.rfft(straddles[..., :margin], n=small).permute(2, 1, 0).contiguous()  # (F', k, rows)
        heads = torch.fft.rfft(straddles[..., margin:], n=small).permute(2, 1, 0).contiguous()
        ahead = torch.fft.irfft(torch.matmul(tails.mH, heads[..., :flat]).permute(2, 1, 0), n=small)
        behind = torch.fft.irfft(torch.matmul(heads.mH, tails[..., :flat]).permute(2, 1, 0), n=small)
        # Lag d > 0: x's head against y's tail at d - taps + 1; d < 0: x's tail against y's head at d + taps - 1.
        positive = torch.arange(1, margin + 1, device=device)
        correlation[..., margin + positive] += ahead[..., (positive - margin) % small]
        correlation[..., margin - positive] += behind[..., margin - positive]
    return correlation


def _solve(holder: list[torch.Tensor], rhs: torch.Tensor) -> torch.Tensor:
    """Solve (matrix + eps I) X = rhs, batched, as museval does (eps absolute: float64's epsilon).

    Cholesky where the matrix is numerically positive definite; otherwise LU (museval's
    np.linalg.solve); museval's least squares on the matrix itself where even LU finds it
    singular. The matrix (4096 x 4096: 134 MB) is taken out of `holder` and regularised in place,
    so that it is freed as soon as it is factored; the triangular solves use the factor as it is.
    """
    matrix = holder.pop()
    eps = torch.finfo(torch.float64).eps
    matrix.diagonal(dim1=-2, dim2=-1).add_(eps)
    factor, info = torch.linalg.cholesky_ex(matrix)
    if not bool((info != 0).any()):
        del matrix
        half = torch.linalg.solve_triangular(factor, rhs, upper=False)
        return torch.linalg.solve_triangular(factor.mH, half, upper=True)
    del factor
    solution, info = torch.linalg.solve_ex(matrix, rhs)
    if not bool((info != 0).any()):
        return solution
    matrix.diagonal(dim1=-2, dim2=-1).sub_(eps)
    return torch.linalg.lstsq(matrix.cpu(), rhs.cpu(), driver="gelsd").solution.to(matrix.device)


def distortion_filters(
    references: torch.Tensor, estimates: torch.Tensor, filter_taps: int = FILTER_TAPS, blocks_per_chunk: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """bss_eval v4's time-invariant filters, estimated once on the whole song.

    references, estimates: (sources, channels, samples). Returns float64
    (all_sources (S*C, taps, S*C), own_source (S, C, taps, C)): all_sources[p, a, e] weighs
    reference channel p delayed by a samples in the projection of estimate channel e (e = index
    of estimate source * C + channel); own_source[j, cj, a, c] the same on source j's channels
    only, for estimate j.
    """
    sources, channels, _ = references.shape
    x = references.reshape(sources * channels, -1)
    correlation = _correlations(x, [x, estimates.reshape(sources * channels, -1)], filter_taps, blocks_per_chunk)
    return _filters(correlation, sources, channels)


def _filters(correlation: torch.Tensor, sources: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`distortion_filters` from the correlations (P, 2P, 2 * taps - 1) of references and estimates."""
    flat = sources * channels
    filter_taps = (correlation.shape[-1] + 1) // 2
    device = correlation.device
    lag = torch.arange(filter_taps, device=device)
    margin = filter_taps - 1
    # gram[(p, a), (q, b)] = <x_p delayed by a, x_q delayed by b> = r_pq(b - a): for each delay a,
    # one slice of the correlations, written in place (no index tensors or copies of 134 MB).
    gram = torch.empty(flat, filter_taps, flat, filter_taps, dtype=torch.float64, device=device)
    for a in range(filter_taps):
        gram[:, a] = correlation[:, :flat, margin - a : margin - a + filter_taps]
    gram = gram.view(flat * filter_taps, flat * filter_taps)
    # rhs[(p, a), e] = <x_p delayed by a, estimate e> = r_pe(-a)
    rhs = correlation[:, flat:][:, :, margin - lag].permute(0, 2, 1).reshape(flat * filter_taps, flat)
    # Own source j: the diagonal block of gram and the rows/columns of source j.
    size = channels * filter_taps
    own_gram = torch.stack([gram[j * size : (j + 1) * size, j * size : (j + 1) * size] for j in range(sources)])
    own_rhs = torch.stack([rhs[j * size : (j + 1) * size, j * channels : (j + 1) * channels] for j in range(sources)])
    holder = [gram]
    del gram  # _solve frees it once factored
    all_sources = _solve(holder, rhs).reshape(flat, filter_taps, flat)
    own_source = _solve([own_gram], own_rhs).reshape(sources, channels, filter_taps, channels)
    return all_sources, own_source


class _WindowMetrics:
    """The four ratios of a batch of windows, with the filters' spectra computed once per song.

    Per window, s (reference) and e (estimate) are zero past the window; P = the full linear
    convolution of the windowed references with all_sources (all sources), Pj = with own_source.
    museval's s_true = s, e_spat = Pj - s, e_interf = P - Pj, e_artif = e - P; energies are sums
    over samples and channels, read from the spectra (Parseval) except |s|^2 and |e - s|^2.
    """

    def __init__(self, all_sources: torch.Tensor, own_source: torch.Tensor, length: int):
        self.sources, self.channels, taps, _ = own_source.shape
        self.flat = self.sources * self.channels
        self.size = fft_size(length + taps - 1)  # the window's full linear convolution fits
        # Both projections from one product: estimate channel e from every reference channel
        # (all_sources) and from its own source's channels (own_source, as a block diagonal).
        own_full = torch.zeros_like(all_sources)
        for j in range(self.sources):
            block = slice(j * self.channels, (j + 1) * self.channels)
            own_full[block, :, block] = own_source[j]
        filters = torch.fft.rfft(torch.cat([all_sources, own_full], dim=2).permute(0, 2, 1), n=self.size)
        self.filters = filters.permute(2, 0, 1).contiguous()  # (F, p, 2 * e)
        # Parseval for a real signal from its rfft: bins other than 0 (and size/2) count twice.
        weight = torch.full((self.size // 2 + 1,), 2.0 / self.size, dtype=torch.float64, device=all_sources.device)
        weight[0] = 1.0 / self.size
        if self.size % 2 == 0:
            weight[-1] = 1.0 / self.size
        self.weight = weight

    def _spectra(self, frames: torch.Tensor) -> torch.Tensor:
        """(p, T, length) frames -> (F, T, p) spectra, frequency first for the batched product."""
        return torch.fft.rfft(frames, n=self.size).permute(2, 1, 0).contiguous()

    def _energy(self, spectrum: torch.Tensor) -> torch.Tensor:
        """(F, T, k * p) spectra -> (k, sources, T) energies, summed over each source's channels."""
        power = torch.view_as_real(spectrum).square().view(self.weight.shape[0], -1)
        energies = (self.weight @ power).view(spectrum.shape[1], -1, self.sources, self.channels, 2)
        return energies.sum(dim=(-1, -2)).permute(1, 2, 0)

    def _time_energy(self, frames: torch.Tensor) -> torch.Tensor:
        """(p, T, length) frames -> (sources, T) energies."""
        return torch.einsum("ptn,ptn->pt", frames, frames).view(self.sources, self.channels, -1).sum(dim=1)

    def __call__(self, s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """float64 (p, T, length) reference and estimate frames -> (4, sources, T): SDR, ISR, SIR, SAR."""
        s_spectrum, e_spectrum = self._spectra(s), self._spectra(e)
        projections = torch.matmul(s_spectrum, self.filters)  # (F, T, 2 * e): P, then Pj
        projection, own = projections[..., : self.flat], projections[..., self.flat :]
        projection_energy, own_energy = self._energy(projections)
        s_energy = self._time_energy(s)
        ratios = (
            (s_energy, self._time_energy(e - s)),  # SDR: s vs e_spat + e_interf + e_artif = e - s
            (s_energy, self._energy(own - s_spectrum)[0]),  # ISR: s vs e_spat
            (own_energy, self._energy(projection - own)[0]),  # SIR: s + e_spat vs e_interf
            (projection_energy, self._energy(e_spectrum - projection)[0]),  # SAR: s + e_spat + e_interf vs e_artif
        )
        numerator = torch.stack([n for n, _ in ratios])
        denominator = torch.stack([d for _, d in ratios])
        # museval's _safe_db: a zero denominator is +inf dB, whatever the numerator.
        return torch.where(denominator == 0, math.inf, 10 * torch.log10(numerator / denominator))


def _as_inputs(references, estimates, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as tensors on `device` (default: that of references), checked like museval's validate."""
    if device is None:
        device = references.device if isinstance(references, torch.Tensor) else "cpu"
    references = torch.as_tensor(references, device=torch.device(device))
    estimates = torch.as_tensor(estimates, device=references.device)
    if references.ndim != 3 or references.shape != estimates.shape:
        raise UserError(
            f"references and estimates must both be (sources, channels, samples); got "
            f"{tuple(references.shape)} and {tuple(estimates.shape)}"
        )
    if references.numel() == 0:
        raise UserError(f"nothing to score: references of shape {tuple(references.shape)}")
    for name, signals in (("reference", references), ("estimate", estimates)):
        if bool(_silent(signals)):
            raise SilentSourceError(f"a {name} source is silent over the whole song (museval cannot score it)")
    return references, estimates


def bss_eval_v4(
    references: torch.Tensor | np.ndarray,
    estimates: torch.Tensor | np.ndarray,
    window_samples: int = int(WINDOW_SECONDS * SAMPLERATE),
    hop_samples: int | None = None,
    filter_taps: int = FILTER_TAPS,
    device: torch.device | str | None = None,
    windows_per_batch: int | None = None,
) -> BssScores:
    """SDR, ISR, SIR and SAR per source and window: what `museval.evaluate(refs, ests, win, hop)`
    returns for the same song (bss_eval v4, images, no permutation), to within float64 rounding.

    references, estimates: (sources, channels, samples), any float dtype (windows and blocks are
    cast to float64 as they are used, so a long song is not copied whole in float64).
    window_samples / hop_samples: museval's win and hop, in samples (SiSEC 2018: 1 s, the
    default at 44.1 kHz; hop defaults to the window). device: where to compute (default: that of
    `references`). windows_per_batch: windows transformed at once (~35 MB each for 4 stereo
    sources; default 4 on CPU, where larger batches are no faster, and 64 on GPU).
    Raises SilentSourceError when a whole reference or estimate is silent (museval's check).
    """
    references, estimates = _as_inputs(references, estimates, device)
    sources, channels, samples = references.shape
    hop_samples = hop_samples or window_samples
    if windows_per_batch is None:
        windows_per_batch = 4 if references.device.type == "cpu" else 64
    windows = window_count(samples, window_samples, hop_samples)
    length = window_samples if window_samples < samples else samples  # samples per window

    x = references.reshape(sources * channels, samples)
    y = estimates.reshape(sources * channels, samples)
    size = fft_size(length + filter_taps - 1)  # a window's full linear convolution fits
    if hop_samples == length and length >= filter_taps:  # windows tile the song: blocks of one window
        correlation = _blockwise([x, y], length, size, filter_taps, blocks_per_chunk=windows_per_batch)
        filters = _filters(correlation, sources, channels)
    else:  # overlapping (or tiny) windows: segments and blocks of 16k-point FFTs
        filters = distortion_filters(references, estimates, filter_taps)
    metrics = _WindowMetrics(*filters, length)
    scores = torch.empty(4, sources, windows, dtype=torch.float64, device=references.device)
    for first in range(0, windows, windows_per_batch):
        count = min(windows, first + windows_per_batch) - first
        span = slice(first * hop_samples, (first + count - 1) * hop_samples + length)
        s = x[:, span].double().unfold(-1, length, hop_samples)  # (p, T, length)
        e = y[:, span].double().unfold(-1, length, hop_samples)
        batch = metrics(s, e)
        shape = (sources, channels, count, length)
        silent = _silent(s.reshape(shape)) | _silent(e.reshape(shape))  # museval: NaN for all
        scores[:, :, first : first + count] = batch.masked_fill(silent, math.nan)
    return BssScores(sdr=scores[0], isr=scores[1], sir=scores[2], sar=scores[3])


def song_median_sdr(references: torch.Tensor, estimates: torch.Tensor, samplerate: int = SAMPLERATE) -> torch.Tensor:
    """Median SDR over a song's 1 s windows, per source: the validation score of one song.

    references, estimates: (sources, channels, samples) on any device; computed there (float64).
    Returns (sources,) float64: the nanmedian over windows of bss_eval v4's SDR, exactly museval's
    per-song SDR (EvalStore's frame median). A source whose every window is silent, or a song
    with a silent source or estimate throughout (which museval refuses), gives NaN, so one odd
    validation song cannot stop training; the caller takes the median over songs with NaNs left
    out (as museval's EvalStore does).
    """
    try:
        scores = bss_eval_v4(references, estimates, window_samples=int(WINDOW_SECONDS * samplerate))
    except SilentSourceError:
        return torch.full((references.shape[0],), math.nan, dtype=torch.float64, device=references.device)
    return nanmedian(scores.sdr)


def nanmedian(values: torch.Tensor) -> torch.Tensor:
    """numpy's nanmedian over the last dimension (the mean of the two middle values for an even
    count, where torch.nanmedian takes the lower one); NaN where every value is NaN."""
    ordered = torch.sort(values, dim=-1).values  # NaN sorts last
    count = (~values.isnan()).sum(dim=-1, keepdim=True)
    low = ordered.gather(-1, ((count - 1) // 2).clamp(min=0))
    high = ordered.gather(-1, (count // 2).clamp(max=values.shape[-1] - 1))
    middle = (low + high) / 2
    return torch.where(count == 0, math.nan, middle).squeeze(-1)
