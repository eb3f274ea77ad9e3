"""A trained model as one self-describing file: its constructor arguments plus its weights.

`evaluate` and `separate` need nothing but this file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from . import __version__
from .errors import UserError
from .files import atomic_path
from .model import Demucs

FORMAT = "demucs_dist.model"
FORMAT_VERSION = 1


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """No NaN or infinite value in any floating-point tensor (one host sync): the one check of
    weights, for model files read here and for what checkpoints and exports write."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def save_model(model: Demucs, path: str | os.PathLike, **info: Any) -> None:
    """Write `model` (unwrapped, any device) with optional `info` (epoch, valid loss...) atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    package = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "demucs_dist_version": __version__,
        "class": type(model).__name__,
        "kwargs": dict(model.kwargs),
        "state": state,
        "info": info,
    }
    with atomic_path(path) as tmp:
        torch.save(package, tmp)


def read_model_file(path: str | os.PathLike) -> dict:
    """The raw contents of a model file, checked; raises UserError for anything that is not one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"model file not found: {path}")
    try:
        package = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many kinds on foreign bytes
        raise UserError(f"{path} is not a demucs_dist model file ({type(exc).__name__})") from None
    if not isinstance(package, dict) or package.get("format") != FORMAT:
        raise UserError(f"{path} is not a demucs_dist model file (no '{FORMAT}' header)")
    if package.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path} is a model file of format version {package.get('format_version')}, "
            f"this demucs_dist reads version {FORMAT_VERSION}"
        )
    return package


def load_model(path: str | os.PathLike) -> Demucs:
    """Rebuild the model saved by `save_model`, on CPU, in eval mode."""
    package = read_model_file(path)
    if not all_finite(package["state"].values()):
        raise UserError(f"{path} holds non-finite (NaN or infinite) weights: it cannot separate anything")
    try:
        model = Demucs(**package["kwargs"])
        model.load_state_dict(package["state"])
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:  # a right header with wrong contents
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is a damaged demucs_dist model file ({reason})") from None
    return model.eval()
