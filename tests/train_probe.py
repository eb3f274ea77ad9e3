"""Run the trainer and save this rank's final weights, so a test can compare ranks and runs.

accelerate launch ... tests/train_probe.py OUT_DIR [demucs-dist train options]
"""

import os
import sys

import torch

from demucs_dist.config import ModelConfig, parse
from demucs_dist.data.augment import AugmentConfig
from demucs_dist.errors import run_main
from demucs_dist.train import TrainConfig, train


def main(argv):
    out, options = argv[0], argv[1:]
    model_cfg, cfg, augment = parse(options, "probe", "", ModelConfig, TrainConfig, AugmentConfig)
    run = train(model_cfg, cfg, augment)
    rank = int(os.environ.get("RANK", "0"))
    ema = run.ema.state_dict() if run.ema is not None else None
    state = {"state": run.bare_model.state_dict(), "ema": ema, "step": run.progress.step, "epoch": run.progress.epoch}
    torch.save(state, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    sys.exit(run_main(main))
