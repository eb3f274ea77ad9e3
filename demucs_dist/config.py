"""Configuration as dataclasses with the paper's defaults, and the one place that turns them into
command-line options (`add_options`) and back (`from_options`).

A field's help text and choices live in its metadata, so an option is spelled exactly once::

    segment: float = option(10.0, "training segment in seconds")

The option name is the field name with dashes (`--max-device-batch`). Booleans get `--x/--no-x`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from .errors import UserError

T = TypeVar("T")


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    flag: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """A dataclass field that is also a command-line option.

    minimum/maximum: the inclusive range a number (or each number of a list) must lie in; checked
    by `check_ranges` before any work. Float options must also be finite (NaN never passes).
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "minimum": minimum, "maximum": maximum}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _option_type(annotation: Any) -> tuple[type, bool]:
    """(element type, is_list) of a field annotation such as `int`, `str | None` or `list[str]`."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is list:
        return args[0], True
    if args:  # Optional[X] / X | None
        return _option_type(args[0])
    return annotation, False


def add_options(parser: argparse.ArgumentParser, config_cls: type, title: str | None = None) -> None:
    """Add one option per field of `config_cls` to `parser` (in an argument group named `title`)."""
    group = parser.add_argument_group(title or config_cls.__name__)
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        meta = field.metadata
        if "help" not in meta:
            continue
        flag = meta.get("flag") or "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[operator]
        kind, is_list = _option_type(hints[field.name])
        kwargs: dict[str, Any] = dict(dest=field.name, default=default, help=meta["help"] + " (default: %(default)s)")
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] = meta["help"] + f" (default: {'on' if default else 'off'})"
        else:
            kwargs["type"] = kind
            kwargs["metavar"] = field.name.upper()
            if is_list:
                kwargs["nargs"] = "*"
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
                del kwargs["metavar"]
        group.add_argument(flag, **kwargs)


def from_options(config_cls: type[T], args: argparse.Namespace) -> T:
    """Build a `config_cls` from the parsed options that `add_options` added, range-checked."""
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}  # type: ignore[arg-type]
    config = config_cls(**{k: v for k, v in vars(args).items() if k in names})
    check_ranges(config)
    return config


def check_ranges(config: Any) -> None:
    """Refuse, in one line, an option outside its declared range or a float that is not finite."""
    for field in dataclasses.fields(config):
        values = getattr(config, field.name)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            low, high = field.metadata.get("minimum"), field.metadata.get("maximum")
            name = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
            if not math.isfinite(value):
                raise UserError(f"{name} {value}: must be a finite number")
            if low is not None and value < low:
                raise UserError(f"{name} {value}: must be at least {low:g}")
            if high is not None and value > high:
                raise UserError(f"{name} {value}: must be at most {high:g}")


def parse(
    argv: Sequence[str] | None, prog: str, description: str, *config_classes: type, epilog: str | None = None
) -> tuple:
    """Parse `argv` into one instance of each of `config_classes` (one option group each).

    Field names must be unique across the classes: each option is spelled once.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for config_cls in config_classes:
        title = (config_cls.__doc__ or config_cls.__name__).strip().split("\n")[0].rstrip(".")
        add_options(parser, config_cls, title)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return tuple(from_options(config_cls, args) for config_cls in config_classes)


@dataclasses.dataclass
class ModelConfig:
    """Demucs v1 hyper-parameters. Defaults are the paper's except `channels` (64, the light model)."""

    sources: int = option(4, "number of sources the model separates", minimum=1)
    audio_channels: int = option(2, "audio channels (2 = stereo)", minimum=1, maximum=2)
    channels: int = option(64, "channels of the first encoder layer (paper: 100; 64 is the light model)", minimum=1)
    depth: int = option(6, "number of encoder/decoder layers", minimum=1)
    rewrite: bool = option(True, "1x1 (encoder) and 3-wide (decoder) convolutions with GLU in every layer")
    glu: bool = option(True, "GLU activation after the rewrite convolutions (else ReLU)")
    rescale: float = option(0.1, "reference std for the rescaling init of convolutions (0 = off)", minimum=0)
    kernel_size: int = option(8, "kernel size of the strided convolutions", minimum=1)
    stride: int = option(4, "stride of the strided convolutions", minimum=1)
    growth: float = option(2.0, "channel growth factor from one layer to the next", minimum=1)
    lstm_layers: int = option(2, "BLSTM layers at the bottleneck (0 = none)", minimum=0)
    context: int = option(3, "kernel size of the decoder's rewrite convolution", minimum=1)
    samplerate: int = option(44100, "sample rate the model works at", minimum=1)


@dataclasses.dataclass
class ApplyConfig:
    """How a trained model is run over whole songs (evaluation, separation)."""

    shifts: int = option(
        10, "random shifts in [0, 0.5 s) averaged per song (the shift trick; 0 = off)", minimum=0, maximum=1000
    )
    split: bool = option(
        False,
        "run each shifted song in overlapping segments (overlap-add) to bound memory on long songs; "
        "off = the paper's protocol, each shifted song whole in one pass",
    )
    segment: float = option(10.0, "segment length in seconds with --split", minimum=0.01)
    overlap: float = option(0.25, "overlap between segments, as a fraction (0 = plain chunks)", minimum=0, maximum=0.9)
    batch_size: int = option(4, "segments/shifts run through the model at once", minimum=1)
