"""`demucs-dist <subcommand> ...`: finds the stage and hands it the rest of the command line.

Every stage is also a module with its own `main` (`python -m demucs_dist.train`), which is what
`accelerate launch -m` runs. Bad input (UserError) ends in one line and exit code 2; `--debug`
anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from .errors import run_main

# subcommand -> (module, one line of help). Modules are imported only when chosen.
SUBCOMMANDS = {
    "synth": ("demucs_dist.data.synth", "generate a synthetic dataset in the MUSDB18 layout"),
    "shard": ("demucs_dist.data.shard", "cut MUSDB18 songs into z-scored webdataset shards"),
    "train": ("demucs_dist.train", "train Demucs on shards (run it under `accelerate launch`)"),
    "evaluate": ("demucs_dist.evaluate", "score a model on MUSDB18 test songs with museval"),
    "score": ("demucs_dist.score", "score existing estimates (any system's) against MUSDB18 references"),
    "separate": ("demucs_dist.separate", "separate your own songs into stems"),
    "info": ("demucs_dist.info", "print a model file's configuration and parameter count"),
}


def usage() -> str:
    lines = ["usage: demucs-dist <subcommand> [options]   (demucs-dist <subcommand> --help)", "", "subcommands:"]
    lines += [f"  {name:<10} {help}" for name, (_, help) in SUBCOMMANDS.items()]
    lines += ["", "Add --debug to any subcommand to see a full traceback on errors."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    if argv[0] not in SUBCOMMANDS:
        print(f"error: unknown subcommand {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return run_main(module.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
