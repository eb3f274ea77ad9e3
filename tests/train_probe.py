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
    progress, model = train(model_cfg, cfg, augment)
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"state": model.state_dict(), "step": progress.step, "epoch": progress.epoch}, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    sys.exit(run_main(main))
