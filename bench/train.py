"""Training-step speed of Demucs on this machine, against its own matmul peak.

    .venv/bin/python bench/train.py                      # channels=64, batch 2 x 10 s, fp32 and bf16
    .venv/bin/python bench/train.py --channels 16 --steps 5

FLOPs are counted from the layer shapes (convolutions, LSTM gates, linear), 2 per multiply-add;
a training step is counted as 3x the forward (backward ~ 2x forward). The trainer's own overhead
is measured by bench/trainer_overhead.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from demucs_dist.model import Demucs, center_trim


def forward_flops(model: Demucs, length: int) -> float:  # noqa: C901 (one branch per layer type)
    """FLOPs of one forward pass on one example of `length` input samples (a valid length)."""
    flops = 0.0
    hooks = []

    def conv_hook(module, inputs, output):
        nonlocal flops
        k = module.kernel_size[0]
        if isinstance(module, torch.nn.ConvTranspose1d):
            flops += 2 * module.in_channels * module.out_channels * k * inputs[0].shape[-1]
        else:
            flops += 2 * module.in_channels * module.out_channels * k * output.shape[-1]

    def lstm_hook(module, inputs, output):
        nonlocal flops
        steps, hidden = inputs[0].shape[0], module.hidden_size
        for layer in range(module.num_layers):
            width = module.input_size if layer == 0 else 2 * hidden
            flops += 2 * steps * 2 * 4 * hidden * (width + hidden)  # 2 directions, 4 gates

    def linear_hook(module, inputs, output):
        nonlocal flops
        flops += 2 * inputs[0].shape[0] * module.in_features * module.out_features

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.LSTM):
            hooks.append(m.register_forward_hook(lstm_hook))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    with torch.no_grad():
        model(torch.zeros(1, model.audio_channels, length))
    for h in hooks:
        h.remove()
    return flops


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Best achieved FLOP/s of a square matmul: the machine's practical limit."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def step_times(model: Demucs, batch: int, length: int, steps: int, dtype: torch.dtype | None) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    mix = torch.randn(batch, model.audio_channels, length)
    sources = torch.randn(batch, model.sources, model.audio_channels, length)
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            estimates = model(mix)
            loss = F.l1_loss(estimates.float(), center_trim(sources, estimates))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Demucs(channels=args.channels)
    length = model.valid_length(int(args.seconds * model.samplerate))
    fwd = forward_flops(model, length)
    print(
        f"channels={args.channels} batch={args.batch} x {args.seconds:g} s ({length} samples), {args.threads} threads"
    )
    print(f"forward: {fwd / 1e9:.1f} GFLOP per example; training step ~{3 * fwd / 1e9:.0f} GFLOP per example")
    for name, dtype in [("fp32", None), ("bf16", torch.bfloat16)]:
        peak = matmul_peak(torch.float32 if dtype is None else dtype)
        times = step_times(model, args.batch, length, args.steps, dtype)
        median = statistics.median(times)
        achieved = 3 * fwd * args.batch / median
        print(
            f"{name}: step {median:.2f} s (min {min(times):.2f}), {args.batch / median:.3f} examples/s, "
            f"{achieved / 1e9:.0f} GFLOP/s = {100 * achieved / peak:.0f}% of matmul peak {peak / 1e9:.0f} GFLOP/s"
        )


if __name__ == "__main__":
    main()
