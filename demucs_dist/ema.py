"""Exponential moving averages (EMA) of the model's weights, as Demucs v4 trains with.

Each decay d keeps, in fp32 on the model's device, shadow <- d * shadow + (1 - d) * weight after
every applied optimizer step. Every rank holds the same weights (DDP), so every rank updates the
same averages without communication. Validation runs each average next to the raw weights
(`swapped_in`), and the best of them goes to best.th.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


def ema_name(decay: float) -> str:
    """How an average is called in logs, TensorBoard tags and model files: 'ema0.999'."""
    return f"ema{decay:g}"


class EMA:
    """The averages of `model`'s floating-point parameters and buffers, one per decay."""

    def __init__(self, model: torch.nn.Module, decays: Sequence[float]):
        for decay in decays:
            if not 0.0 < decay < 1.0:
                raise ValueError(f"an EMA decay must lie in (0, 1), got {decay}")
        self.decays = list(decays)
        self.names = [name for name, value in model.state_dict().items() if value.is_floating_point()]
        self.shadows = {
            ema_name(decay): [model.state_dict()[name].detach().float().clone() for name in self.names]
            for decay in self.decays
        }

    def _current(self, model: torch.nn.Module) -> list[torch.Tensor]:
        state = model.state_dict()
        return [state[name].detach().float() for name in self.names]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move every average towards the model's current weights (after an applied step)."""
        current = self._current(model)
        for decay in self.decays:
            torch._foreach_lerp_(self.shadows[ema_name(decay)], current, 1.0 - decay)

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module, name: str) -> Iterator[None]:
        """Run `model` with the average `name` as its weights, then put the raw weights back."""
        state = model.state_dict()
        saved = [state[key].detach().clone() for key in self.names]
        with torch.no_grad():
            for key, value in zip(self.names, self.shadows[name]):
                state[key].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for key, value in zip(self.names, saved):
                    state[key].copy_(value)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: dict(zip(self.names, shadow)) for name, shadow in self.shadows.items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        if set(state) != set(self.shadows):
            raise ValueError(
                f"the checkpoint holds the averages {sorted(state)}, this run keeps {sorted(self.shadows)}"
            )
        for name, shadow in self.shadows.items():
            for key, value in zip(self.names, shadow):
                value.copy_(state[name][key])
