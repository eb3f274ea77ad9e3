"""The GPU check (launch/gpu_check.sh -> bench/gpu_check.py): its CPU part, run for real, and the
table it writes. On a GPU machine --cpu keeps this test on the CPU part too."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from helpers import output, run

ROOT = Path(__file__).parents[1]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in `text`, as a list of {header: cell} rows."""
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [cell.strip() for cell in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")))))
            tables.append(rows)
    return tables


def test_known_bf16_peaks():
    check = load_gpu_check()
    assert check.bf16_peak("NVIDIA H100 80GB HBM3") == 989
    assert check.bf16_peak("NVIDIA H200") == 989
    assert check.bf16_peak("NVIDIA H100 PCIe") == 756
    assert check.bf16_peak("NVIDIA A100-SXM4-80GB") == 312
    assert check.bf16_peak("NVIDIA L40S") == 362
    assert check.bf16_peak("Tesla V100-SXM2-32GB") is None


@pytest.mark.first
@pytest.mark.slow
def test_cpu_part_trains_resumes_evaluates_separates_and_writes_the_table(tmp_path):
    out = tmp_path / "check"
    # bf16 only (fp32 is every other test's precision); fp16 asked for, to see it declined on a CPU.
    command = [ROOT / "launch" / "gpu_check.sh", "--cpu", "--out", out, "--steps", "8", "--variants", "plain",
               "--precisions", "bf16,fp16", "--separate-minutes", "0.25"]  # fmt: skip
    result = run(command, dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
    assert result.returncode == 0, output(result)
    table = (out / "gpu_check.md").read_text()
    assert table.strip() in result.stdout  # printed as written
    training, others = markdown_tables(table)

    assert [row["run"] for row in training] == ["bf16", "bf16 killed at step 5, resumed"]
    for row in training:
        assert row["LSTM dtype"] == "float32", row  # in fp32 even under bf16 autocast
        assert row["weights equal across ranks"].startswith("yes (2 ranks = last.th"), row
        assert float(row["examples/s"]) > 0 and 0 <= float(row["data wait"]) <= 1, row
        assert row["device"].startswith("CPU") and row["share of bf16 peak"] == "?"
        assert row["skipped steps"] == "0"
    bf16, resumed = training
    assert bf16["resume OK"] == "-"
    # Checkpoints every 2 steps, killed after step 5: resumed from step 4, and on CPU the resumed
    # run ends with the uninterrupted run's weights.
    assert resumed["resume OK"] == "yes, from step 4 (= bf16 run)"

    assert [(row["check"], row["result"]) for row in others] == [
        ("evaluate, 10 shifts", "OK"),
        ("separate, 0.25-minute file", "OK"),
    ]
    assert "- fp16 (loss scaling needs a GPU" in table
    assert "FAILED" not in table and "Problems:" not in table
    # Measured runs give their disk back; the first run's last.th served evaluation and separation.
    assert not list(out.glob("runs/*/checkpoints")) and not list(out.glob("runs/*/best.th"))
    assert [path.parent.name for path in out.glob("runs/*/last.th")] == ["bf16"]
