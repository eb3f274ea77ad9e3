"""`demucs-dist info MODEL`: what a model file holds."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import run_main
from .modelfile import read_model_file


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="demucs-dist info", description=__doc__)
    parser.add_argument("model", help="a model file written by demucs-dist (best.th, last.th)")
    args = parser.parse_args(argv)
    package = read_model_file(args.model)
    n_params = sum(t.numel() for t in package["state"].values())
    print(json.dumps({"kwargs": package["kwargs"], "parameters": n_params, "info": package["info"]}, indent=2))


if __name__ == "__main__":
    sys.exit(run_main(main))
