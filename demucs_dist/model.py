"""Demucs v1 (Défossez et al., 2019): a waveform U-Net with a BLSTM at its bottleneck.

Only the network lives here: no file I/O, no song normalisation (see `apply.py`); from the rest
of the project it imports only its hyper-parameters' declaration (`config.ModelConfig`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from .config import ModelConfig


def center_trim(tensor: torch.Tensor, reference: torch.Tensor | int) -> torch.Tensor:
    """Trim the last dimension of `tensor` on both sides to the length of `reference`.

    When the difference is odd, the extra sample is removed from the end.
    """
    length = reference if isinstance(reference, int) else reference.size(-1)
    excess = tensor.size(-1) - length
    if excess < 0:
        raise ValueError(f"cannot trim length {tensor.size(-1)} to a longer {length}")
    return tensor[..., excess // 2 : excess // 2 + length]


def valid_length(length: int, *, depth: int, kernel_size: int, stride: int, context: int) -> int:
    """Smallest input length (samples) >= `length` for which every convolution of a Demucs with these
    hyper-parameters fits exactly. A free function so that the shard writer can size its chunks
    without building a model."""
    for _ in range(depth):
        length = math.ceil((length - kernel_size) / stride) + 1
        length = max(1, length)
        length += context - 1
    for _ in range(depth):
        length = (length - 1) * stride + kernel_size
    return int(length)


def rescale_conv(conv: nn.Conv1d | nn.ConvTranspose1d, reference: float) -> None:
    """Divide a convolution's weight and bias by sqrt(std(weight) / reference).

    The weight's std becomes sqrt(std * reference): this is the paper's "rescaling" initialisation,
    which brings the initial weights closer to `reference` and helps training.
    """
    std = conv.weight.std().detach()
    scale = (std / reference) ** 0.5
    conv.weight.data /= scale
    if conv.bias is not None:
        conv.bias.data /= scale


class BLSTM(nn.Module):
    """Bidirectional LSTM over time followed by a linear projection back to `dim` channels."""

    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(input_size=dim, hidden_size=dim, num_layers=layers, bidirectional=True)
        self.linear = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(2, 0, 1)  # (batch, channels, time) -> (time, batch, channels)
        # fp32 under any autocast: on CUDA, autocast sends the cuDNN RNN to fp16 even when bf16 was
        # asked for, with no loss scaler to keep its small gradients in range. The LSTM runs ~109
        # latency-bound steps, so full precision costs little.
        with torch.autocast(x.device.type, enabled=False):
            x = self.lstm(x.float())[0]
        x = self.linear(x)
        return x.permute(1, 2, 0)


class Demucs(nn.Module):
    """Demucs v1. Input (batch, audio_channels, valid_length(T)), output (batch, sources, audio_channels, T').

    All convolutions are "valid" (no padding): pad the input to `valid_length` and center-trim
    the output to the wanted length, as `apply.py` does.
    """

    def __init__(self, **hyperparameters: Any):
        """hyperparameters: fields of `config.ModelConfig`, where the defaults (the paper's, but
        channels 64) are declared once; unknown names are a TypeError."""
        super().__init__()
        config = ModelConfig(**hyperparameters)
        # Kept so that a saved model file can rebuild this exact network.
        self.kwargs = dataclasses.asdict(config)
        sources, audio_channels, channels, depth = config.sources, config.audio_channels, config.channels, config.depth
        kernel_size, stride, context, glu = config.kernel_size, config.stride, config.context, config.glu
        self.sources = sources
        self.audio_channels = audio_channels
        self.depth = depth
        self.kernel_size = kernel_size
        self.stride = stride
        self.context = context
        self.samplerate = config.samplerate

        def activation() -> nn.Module:
            return nn.GLU(dim=1) if glu else nn.ReLU()

        widen = 2 if glu else 1  # GLU halves its input channels
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        in_channels, width = audio_channels, channels
        for index in range(depth):
            encode = [nn.Conv1d(in_channels, width, kernel_size, stride), nn.ReLU()]
            if config.rewrite:
                encode += [nn.Conv1d(width, widen * width, 1), activation()]
            self.encoder.append(nn.Sequential(*encode))

            outermost = index == 0
            out_channels = sources * audio_channels if outermost else in_channels
            decode = []
            if config.rewrite:
                decode += [nn.Conv1d(width, widen * width, context), activation()]
            decode += [nn.ConvTranspose1d(width, out_channels, kernel_size, stride)]
            if not outermost:
                decode.append(nn.ReLU())
            self.decoder.insert(0, nn.Sequential(*decode))  # decoder runs deepest first

            in_channels, width = width, int(config.growth * width)

        self.lstm = BLSTM(in_channels, config.lstm_layers) if config.lstm_layers else None

        if config.rescale:
            for module in self.modules():
                if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
                    rescale_conv(module, config.rescale)

    def valid_length(self, length: int) -> int:
        """Smallest input length >= `length` for which every convolution fits exactly.

        The output for such an input is slightly longer than `length`; center-trim it.
        """
        return valid_length(
            length, depth=self.depth, kernel_size=self.kernel_size, stride=self.stride, context=self.context
        )

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        x = mix
        skips = []
        for encode in self.encoder:
            x = encode(x)
            skips.append(x)
        if self.lstm is not None:
            x = self.lstm(x)
        for decode in self.decoder:
            x = x + center_trim(skips.pop(), x)
            x = decode(x)
        return x.view(x.size(0), self.sources, self.audio_channels, x.size(-1))
