"""The GPU path of demucs_dist, checked in one command on a new machine or cluster node.

    launch/gpu_check.sh                                  # or: make gpu-check
    .venv/bin/python bench/gpu_check.py --out runs/gpu-check --steps 20
    .venv/bin/python bench/gpu_check.py --cpu            # the CPU part only, on any machine

On every GPU this job may use (launch/run.sh counts them, honouring CUDA_VISIBLE_DEVICES), with
data generated here (`demucs-dist synth`, `demucs-dist shard`):

- ~20 training steps of the default model (channels 64, 10 s examples, 8 per GPU) in fp32, bf16
  and fp16 (loss scaling), each also with --compile and with --activation-checkpointing;
- a run killed by the trainer's fault hook (DEMUCS_DIST_FAULT_KILL) after a checkpoint, then
  relaunched: it must resume from that checkpoint and apply every step exactly once;
- `demucs-dist evaluate` with 10 shifts, and `demucs-dist separate` of a 10-minute file.

Each training row reports, from the run's own TensorBoard scalars (train/examples_per_s and
train/data_wait_fraction, steps after the first few), the peak memory of the busiest rank, the
achieved TFLOP/s per device and its share of the GPU's dense bf16 peak (known GPUs only), the
dtype the BLSTM ran in during the training steps (a forward hook: it must be float32 under
autocast), and whether every rank ended with the same weights as each other and as last.th.
The table is printed and written to OUT/gpu_check.md (and OUT/gpu_check.json). A run's
checkpoints and model files are deleted once it is measured (--keep-runs keeps them), except the
last.th that evaluation and separation use.

Without a GPU (or with --cpu) it runs what a CPU can: a tiny model (channels 4, depth 3, one LSTM
layer, 0.5 s examples) in fp32 and bf16 on 2 gloo processes, the kill and resume, evaluation and
separation, and says what it skipped. Exit status 1 when any check fails.

Internally, each training run is `launch/run.sh bench.gpu_check --train-worker <train options>`:
the trainer's own `train()` in every rank, with the LSTM hook added and a per-rank report after.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER_FLAG = "--train-worker"
REPORT = "gpu_check-rank{rank}.json"  # what each rank of a training run writes into its logdir

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; the first
# name contained in torch.cuda.get_device_name() wins, so the specific names come first.
BF16_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
]

TINY_MODEL = {"channels": 4, "depth": 3, "lstm_layers": 1}  # as tests/helpers.py's TINY
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
VARIANTS = {
    "plain": [],
    "compile": ["--compile"],
    "ckpt": ["--activation-checkpointing"],
    "compile+ckpt": ["--compile", "--activation-checkpointing"],
}


@dataclasses.dataclass
class Plan:
    """What this check runs, decided once from the machine and the options."""

    gpu: bool
    devices: int  # processes per training run: GPUs, or CPU processes
    model: dict  # Demucs arguments that differ from the defaults
    segment: float  # training example length, seconds
    shift: float  # Shift augmentation, seconds
    shard: list[str]  # options of `shard`
    synth: list[str]  # options of `synth`
    device_batch: int
    workers: int
    precisions: list[str]
    variants: list[str]
    skipped: list[str]
    timeout: float  # seconds any one launch may take

    @property
    def global_batch(self) -> int:
        return self.device_batch * self.devices


@dataclasses.dataclass
class Row:
    """One training run of the table."""

    name: str
    ok: bool = False
    device: str = "-"
    examples_per_s: float | None = None
    data_wait: float | None = None
    peak_gb: float | None = None
    tflops: float | None = None  # achieved, per device
    share: str = "?"  # of the device's dense bf16 peak
    lstm: str = "?"
    resume: str = "-"
    weights: str = "?"
    skipped_steps: int | None = None  # non-finite steps not applied (fp16: the loss scaler's first steps)
    seconds: float = 0.0
    checksum: str = ""  # of the final weights, when every rank and last.th agree
    logdir: str = ""
    problems: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The worker: one rank of a training run


def train_worker(argv: Sequence[str]) -> None:
    """Run demucs_dist.train in this rank, recording the dtype of the LSTM in the training steps;
    then write this rank's report (weights checksum, peak memory, device) next to the run."""
    import torch

    from demucs_dist import train as trainer

    seen: dict[str, str] = {}
    runs = []
    start_run = trainer.start_run

    handles = []

    # Run eagerly even inside a compiled model (a graph break), then removed after the first
    # training call: the compiled steps after it run without it (one recompilation).
    @torch.compiler.disable
    def record_lstm(module, inputs, output) -> None:
        if module.training:  # validation runs in eval mode without autocast: only training tells
            seen.update(input=dtype_name(inputs[0]), output=dtype_name(output[0]))
            handles.pop().remove()

    def start_run_with_hook(*args, **kwargs):
        run = start_run(*args, **kwargs)
        if run.bare_model.lstm is not None:
            handles.append(run.bare_model.lstm.lstm.register_forward_hook(record_lstm))
        runs.append(run)
        return run

    trainer.start_run = start_run_with_hook
    trainer.main(list(argv))
    run = runs[0]
    rank = run.accelerator.process_index
    device = run.accelerator.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import resource

        name = f"CPU ({platform.machine()})"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    report = {
        "rank": rank,
        "world": run.accelerator.num_processes,
        "device": name,
        "peak_bytes": peak,
        "peak_kind": "CUDA allocated" if device.type == "cuda" else "RSS",
        "lstm": seen,
        "step": run.progress.step,
        "weights_sha256": weights_checksum(run.bare_model.state_dict()),
    }
    (run.run_dir / REPORT.format(rank=rank)).write_text(json.dumps(report, indent=2))


def dtype_name(tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def weights_checksum(state: dict) -> str:
    """sha256 over the names and bytes of a state_dict, in name order (any dtype, any device)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(tensor.view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The check


def count_gpus(env: dict[str, str]) -> int:
    """The GPUs launch/run.sh will start processes on (its own count_gpus)."""
    result = subprocess.run(
        ["bash", "-c", f'source "{ROOT / "launch" / "run.sh"}" && count_gpus'],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return int(result.stdout.strip() or 0)


def make_plan(args: argparse.Namespace, env: dict[str, str]) -> Plan:
    gpus = 0 if args.cpu else count_gpus(env)
    skipped = []
    if gpus:
        precisions = args.precisions or ["fp32", "bf16", "fp16"]
        variants = args.variants or ["plain", "compile", "ckpt"]
        workers = args.workers if args.workers is not None else 2
        # Enough chunks for every loader slot (ranks x workers): 60 s songs give 2 chunks each.
        songs = max(4, -(-gpus * workers // 2) + 1)
        return Plan(
            gpu=True,
            devices=gpus,
            model={},  # the defaults: channels 64, depth 6, 2 BLSTM layers
            segment=10.0,
            shift=1.0,
            shard=["--workers", "4"],
            synth=["--train", str(songs), "--valid", "1", "--test", "1", "--seconds", "60"],
            device_batch=args.device_batch or 8,
            workers=workers,
            precisions=precisions,
            variants=variants,
            skipped=skipped,
            timeout=1800,
        )
    precisions = [p for p in (args.precisions or ["fp32", "bf16"]) if p != "fp16"]
    if "fp16" in (args.precisions or ["fp16"]):
        skipped.append("fp16 (loss scaling needs a GPU; on CPU the trainer refuses fp16)")
    variants = args.variants or ["plain", "ckpt"]
    if not args.variants:
        skipped.append("--compile (slow to compile on a CPU; give --variants plain,compile to include it)")
    skipped.append("the default model (channels 64): a tiny one here (channels 4, depth 3, 1 LSTM layer, 0.5 s)")
    skipped.append("share of the bf16 peak: no known peak for a CPU")
    why = "--cpu" if args.cpu else "no GPU found"
    skipped.insert(0, f"every GPU part ({why}): 2 CPU processes with gloo instead")
    return Plan(
        gpu=False,
        devices=2,
        model=TINY_MODEL,
        segment=0.5,
        shift=0.25,
        shard=["--segment", "0.5", "--shift", "0.25", "--shard-size", "3", "--workers", "1"],
        synth=["--train", "4", "--valid", "1", "--test", "1", "--seconds", "5"],
        device_batch=args.device_batch or 2,
        workers=args.workers if args.workers is not None else 1,
        precisions=precisions,
        variants=variants,
        skipped=skipped,
        timeout=600,
    )


class Check:
    """Runs the parts of the check and collects their results."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.logs = self.out / "logs"
        self.env = dict(os.environ)
        self.env.pop("NPROC", None)
        if self.env.get("VENV"):  # the launches run in OUT: a relative VENV would point elsewhere
            self.env["VENV"] = str(Path(self.env["VENV"]).resolve())
        if args.cpu:
            self.env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1")
        self.plan = make_plan(args, self.env)
        if not self.plan.gpu:
            self.env["NPROC"] = str(self.plan.devices)
            if not args.cpu:
                self.refuse_uncounted_gpus()
        self.rows: list[Row] = []
        self.others: list[tuple[str, str, float, str]] = []  # (check, result, seconds, note)
        self.notes: list[str] = []
        self.flops_per_example = 0.0

    def say(self, text: str) -> None:
        print(f"[gpu-check] {text}", flush=True)

    # --- processes -------------------------------------------------------------------------

    def launch(self, name: str, command: list, env: dict | None = None) -> tuple[int, float, str]:
        """Run a command with its output in logs/<name>.log; (exit status, seconds, output tail)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        start = time.monotonic()
        with open(log, "w") as handle:
            try:
                status = subprocess.run(
                    [str(c) for c in command],
                    env=env or self.env,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    timeout=self.plan.timeout,
                    cwd=self.out,
                ).returncode
            except subprocess.TimeoutExpired:
                status = 124
        seconds = time.monotonic() - start
        return status, seconds, log.read_text(errors="replace")

    def failure(self, name: str, status: int, text: str) -> str:
        lines = [line for line in re.split(r"[\r\n]", text) if line.strip()]
        errors = [line for line in lines if line.startswith("error:") or "Error" in line]
        last = (errors or lines or ["(no output)"])[-1].strip()
        what = "timed out" if status == 124 else f"exit {status}"
        return f"{what}: {last[:200]} (log: {self.logs / name}.log)"

    def cli(self, name: str, *args: str) -> None:
        status, _, text = self.launch(name, [sys.executable, "-m", "demucs_dist.cli", *args])
        if status != 0:
            raise SystemExit(f"error: {name} failed, {self.failure(name, status, text)}")

    # --- parts -----------------------------------------------------------------------------

    def data(self) -> None:
        data = self.out / ("data-gpu" if self.plan.gpu else "data-cpu")  # sizes differ
        musdb, shards = data / "musdb", data / "shards"
        if not (shards / "manifest.json").is_file():
            self.say(f"generating data: synth {' '.join(self.plan.synth)}, then shards")
            self.cli("synth", "synth", "--out", str(musdb), *self.plan.synth, "--seed", "0")
            self.cli("shard", "shard", "--musdb", str(musdb), "--is-wav", "--out", str(shards), *self.plan.shard)
        self.musdb, self.shards = musdb, shards

    def count_flops(self) -> None:
        """Training FLOPs per example: 3 x the forward pass, counted from the layer shapes."""
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from bench.train import forward_flops
        from demucs_dist.model import Demucs

        model = Demucs(**self.plan.model)
        length = model.valid_length(int(self.plan.segment * model.samplerate))
        self.flops_per_example = 3 * forward_flops(model, length)
        self.parameters = sum(p.numel() for p in model.parameters())

    def train_command(self, logdir: Path, precision: str, extra: Sequence[str] = ()) -> list:
        steps = self.args.steps
        plan = self.plan
        model = [f"--{key.replace('_', '-')}={value}" for key, value in plan.model.items()]
        options = [
            "--shards", self.shards, "--logdir", logdir,
            *model, "--segment", str(plan.segment), "--shift", str(plan.shift),
            "--mixed-precision", PRECISIONS[precision],
            "--epochs", "1", "--repeat", "1", "--epoch-size", str(steps * plan.global_batch),
            "--global-batch", str(plan.global_batch), "--max-device-batch", str(plan.device_batch),
            "--workers", str(plan.workers), "--keep-checkpoints", "1", "--no-log-audio", "--restart", *extra,
        ]  # fmt: skip
        return [ROOT / "launch" / "run.sh", "bench.gpu_check", WORKER_FLAG, *options]

    def training(self, precision: str, variant: str) -> Row:
        name = precision if variant == "plain" else f"{precision} {variant}"
        logdir = self.run_dir(name)
        shutil.rmtree(logdir, ignore_errors=True)
        self.say(f"training {name}: {self.args.steps} steps of {self.plan.global_batch} examples")
        status, seconds, text = self.launch(name, self.train_command(logdir, precision, VARIANTS[variant]))
        row = Row(name=name, seconds=seconds, logdir=str(logdir))
        if status != 0:
            row.problems.append(self.failure(name, status, text))
            return row
        self.measure(row, logdir, first_step=1, precision=precision)
        return row

    def resume(self) -> Row:
        """Killed after a checkpoint, relaunched: resumes there and applies each step once."""
        steps, precision = self.args.steps, "bf16"
        every, kill = max(1, steps // 4), steps // 2 + 1
        resumed_from = (kill - 1) // every * every
        name = f"{precision} killed at step {kill}, resumed"
        logdir = self.run_dir("resume")
        shutil.rmtree(logdir, ignore_errors=True)
        extra = ["--checkpoint-every", str(every)]
        victim = self.plan.devices - 1
        self.say(f"kill and resume: rank {victim} killed after step {kill}, relaunched")
        killed_env = {**self.env, "DEMUCS_DIST_FAULT_KILL": f"{victim}:{kill}"}
        status, first, text = self.launch("resume-killed", self.train_command(logdir, precision, extra), killed_env)
        row = Row(name=name, resume="no", logdir=str(logdir))
        if status == 0 or f"kills itself at step {kill}" not in text:
            row.problems.append(
                f"the killed run did not die at step {kill} ({self.failure('resume-killed', status, text)})"
            )
            return row
        command = [c for c in self.train_command(logdir, precision, extra) if c != "--restart"]
        status, second, text = self.launch("resume-relaunched", command)
        row.seconds = first + second
        if status != 0:
            row.problems.append(self.failure("resume-relaunched", status, text))
            return row
        expected = f"(epoch 0, step {resumed_from})"
        found = re.search(r"resuming from (\S+) \(epoch \d+, step (\d+)\)", text)
        if not found or expected not in text:
            row.problems.append(f"the relaunch did not resume from step {resumed_from} ({found and found.group(0)})")
        self.measure(row, logdir, first_step=resumed_from + 1, precision=precision)
        adam = adam_steps(logdir / "checkpoints" / f"step-{steps:08d}")
        if adam != {steps}:
            row.problems.append(f"Adam applied {sorted(adam)} updates, not {steps}: steps lost or repeated")
        logged = steps_logged(logdir)
        if logged != list(range(1, steps + 1)):
            row.problems.append(f"TensorBoard steps are not 1..{steps} once each: {logged}")
        row.resume = "no" if row.problems else f"yes, from step {resumed_from}"
        uninterrupted = next((r for r in self.rows if r.name == precision and r.checksum), None)
        if uninterrupted and row.checksum and not row.problems:
            same = row.checksum == uninterrupted.checksum
            row.resume += f" ({'=' if same else '!='} {precision} run)"
            if not same:
                self.notes.append(
                    f"the resumed run's weights differ from the uninterrupted {precision} run's: expected where "
                    "kernels are not deterministic (cuDNN, atomic adds on GPUs); on CPU they are equal"
                )
        row.ok = not row.problems
        return row

    def measure(self, row: Row, logdir: Path, first_step: int, precision: str) -> None:
        """Fill a row from the run's TensorBoard scalars and its ranks' reports; check it."""
        warmup = 5 if first_step == 1 else 2  # the first steps: allocator warm-up, compilation
        speed = scalar_values(logdir, "train/examples_per_s", first_step + warmup)
        wait = scalar_values(logdir, "train/data_wait_fraction", first_step + warmup)
        if speed:
            row.examples_per_s = statistics.median(speed)
            row.tflops = row.examples_per_s / self.plan.devices * self.flops_per_example / 1e12
        if wait:
            row.data_wait = statistics.fmean(wait)
        skipped = scalar_values(logdir, "train/skipped_steps", 0)
        row.skipped_steps = int(skipped[-1]) if skipped else None
        reports = [json.loads(p.read_text()) for p in sorted(logdir.glob(REPORT.format(rank="*")))]
        if len(reports) != self.plan.devices:
            row.problems.append(f"{len(reports)} rank reports, {self.plan.devices} expected")
            return
        row.device = reports[0]["device"]
        row.peak_gb = max(r["peak_bytes"] for r in reports) / 1e9
        peak = bf16_peak(row.device) if self.plan.gpu else None
        if peak and row.tflops is not None:
            row.share = f"{100 * row.tflops / peak:.1f}% of {peak:g}"
        dtypes = {(r["lstm"].get("input", "?"), r["lstm"].get("output", "?")) for r in reports}
        row.lstm = ", ".join(sorted(i if i == o else f"{i} -> {o}" for i, o in dtypes))
        if row.lstm != "float32":
            row.problems.append(f"the LSTM ran in {row.lstm} under {precision}, not float32")
        sums = {r["weights_sha256"] for r in reports}
        exported = exported_checksum(logdir / "last.th")
        if len(sums) == 1 and exported in sums:
            row.checksum = exported
            row.weights = f"yes ({len(reports)} ranks = last.th, {next(iter(sums))[:12]})"
        else:
            row.weights = f"NO: {len(sums)} different across {len(reports)} ranks" + (
                "" if exported in sums else ", last.th differs"
            )
            row.problems.append(row.weights)
        row.ok = not row.problems

    def evaluate(self, model: Path) -> None:
        out = self.out / "eval"
        shutil.rmtree(out, ignore_errors=True)
        shifts = self.args.eval_shifts
        self.say(f"evaluation: {shifts} shifts on the test song")
        command = [ROOT / "launch" / "evaluate.sh", "--model", model, "--musdb", self.musdb, "--is-wav",
                   "--out", out, "--shifts", str(shifts), "--no-progress"]  # fmt: skip
        status, seconds, text = self.launch("evaluate", command)
        if status != 0 or not (out / "results.json").is_file():
            self.others.append(
                (f"evaluate, {shifts} shifts", "FAILED", seconds, self.failure("evaluate", status, text))
            )
            return
        results = json.loads((out / "results.json").read_text())
        scored = results.get("this_run", {}).get("scored", "?")
        self.others.append((f"evaluate, {shifts} shifts", "OK", seconds, f"{scored} song(s) scored, results.json"))

    def separate(self, model: Path) -> None:
        import numpy as np
        import soundfile

        minutes = self.args.separate_minutes
        song = self.out / "long" / f"{minutes:g}-minutes.wav"
        source = next((self.musdb / "test").iterdir()) / "mixture.wav"
        audio, rate = soundfile.read(source, dtype="int16", always_2d=True)
        frames = int(minutes * 60 * rate)
        song.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(song, np.resize(audio, (frames, audio.shape[1])), rate, subtype="PCM_16")
        out = self.out / "separated"
        shutil.rmtree(out, ignore_errors=True)
        self.say(f"separation of a {minutes:g}-minute file")
        status, seconds, text = self.launch("separate", [ROOT / "launch" / "separate.sh", song, "--model", model,
                                                         "--out", out, "--no-progress"])  # fmt: skip
        what = f"separate, {minutes:g}-minute file"
        stems = sorted((out / song.stem).glob("*.wav")) if status == 0 else []
        lengths = {soundfile.info(stem).frames for stem in stems}
        if status != 0 or len(stems) != 4 or lengths != {frames}:
            note = self.failure("separate", status, text) if status else f"stems {[s.name for s in stems]}, {lengths}"
            self.others.append((what, "FAILED", seconds, note))
        else:
            speed = minutes * 60 / seconds
            self.others.append((what, "OK", seconds, f"4 stems of {frames:,} frames; {speed:.1f}x real time"))
        shutil.rmtree(song.parent, ignore_errors=True)

    # --- the whole check -------------------------------------------------------------------

    def run(self) -> int:
        plan = self.plan
        self.out.mkdir(parents=True, exist_ok=True)
        if plan.gpu:
            self.check_torch()
        where = f"{plan.devices} GPU(s)" if plan.gpu else f"{plan.devices} CPU processes"
        self.say(f"{where}; output in {self.out}")
        for line in plan.skipped:
            self.say(f"skipped: {line}")
        self.data()
        self.count_flops()
        for precision in plan.precisions:
            for variant in plan.variants:
                self.add(self.training(precision, variant))
        if not self.args.skip_resume:
            self.add(self.resume())
        model = self.model_for_inference()
        if model is None:
            self.notes.append("evaluation and separation skipped: no training run finished")
        else:
            if not self.args.skip_evaluate:
                self.evaluate(model)
            if self.args.separate_minutes > 0:
                self.separate(model)
        table = self.table()
        print("\n" + table)
        (self.out / "gpu_check.md").write_text(table + "\n")
        (self.out / "gpu_check.json").write_text(json.dumps(self.json(), indent=2) + "\n")
        failed = [r.name for r in self.rows if not r.ok] + [o[0] for o in self.others if o[1] != "OK"]
        if failed:
            print(f"\nFAILED: {', '.join(failed)} (details above and in {self.logs})")
            return 1
        print(f"\nall checks passed; table in {self.out / 'gpu_check.md'}")
        return 0

    def check_torch(self) -> None:
        import torch

        from demucs_dist.distributed import check_gpu_is_usable
        from demucs_dist.errors import UserError

        if not torch.cuda.is_available():
            try:
                check_gpu_is_usable()
            except UserError as error:
                raise SystemExit(f"error: {error}") from None
        elif torch.cuda.device_count() != self.plan.devices:
            self.notes.append(
                f"torch sees {torch.cuda.device_count()} GPU(s) but launch/run.sh counts {self.plan.devices} "
                "(nvidia-smi -L and CUDA_VISIBLE_DEVICES): the runs used launch/run.sh's count"
            )

    def add(self, row: Row) -> None:
        """Report a finished training run and free its disk space: at channels 64 a run holds a
        3.2 GB checkpoint and 1.1 GB per model file. Kept: TensorBoard events, logs, rank reports,
        and last.th of the first good run (evaluation and separation use it)."""
        self.rows.append(row)
        self.report_row(row)
        if self.args.keep_runs or not row.logdir:
            return
        logdir = Path(row.logdir)
        shutil.rmtree(logdir / "checkpoints", ignore_errors=True)
        (logdir / "best.th").unlink(missing_ok=True)
        if self.model_for_inference() != logdir / "last.th":
            (logdir / "last.th").unlink(missing_ok=True)

    def refuse_uncounted_gpus(self) -> None:
        """launch/run.sh found no GPU: make sure torch agrees, or the check would test the CPU."""
        import torch

        if torch.cuda.is_available():
            raise SystemExit(
                f"error: torch sees {torch.cuda.device_count()} GPU(s) but launch/run.sh counts none "
                f"(nvidia-smi -L, CUDA_VISIBLE_DEVICES={self.env.get('CUDA_VISIBLE_DEVICES', 'unset')!r}): "
                "the launches would run on the CPU; fix the count (docs/gpu.md, item 1) or pass --cpu"
            )

    def model_for_inference(self) -> Path | None:
        for row in self.rows:
            model = Path(row.logdir) / "last.th"
            if row.ok and model.is_file():
                return model
        return None

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / re.sub(r"[^\w.]+", "-", name)

    def report_row(self, row: Row) -> None:
        if row.ok:
            self.say(f"  {row.name}: {fmt(row.examples_per_s, '.2f')} examples/s, LSTM {row.lstm}, ok")
        else:
            self.say(f"  {row.name}: FAILED: {'; '.join(row.problems)}")

    def table(self) -> str:
        import torch

        plan = self.plan
        cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
        model = "default model (channels 64)" if plan.gpu else "tiny model (channels 4, depth 3, 1 LSTM layer)"
        lines = [
            f"# GPU check: {socket.gethostname()}, {datetime.datetime.now():%Y-%m-%d %H:%M}",
            "",
            f"torch {torch.__version__}{cuda}; {plan.devices} {'GPU' if plan.gpu else 'CPU'} process(es); {model}, "
            f"{self.parameters:,} parameters, {plan.segment:g} s examples, {self.flops_per_example / 1e9:.3g} GFLOP "
            f"per training example; {self.args.steps} steps of {plan.global_batch} examples "
            f"({plan.device_batch} per device), {plan.workers} loader worker(s) per device.",
            "",
            "examples/s: median over the steps after the first few (train/examples_per_s, all devices); data wait: "
            "mean train/data_wait_fraction; peak memory: the busiest rank "
            + ("(torch.cuda.max_memory_allocated)" if plan.gpu else "(process RSS)")
            + "; TFLOP/s per device and its share of the device's dense bf16 peak (TFLOP/s).",
            "",
            "| run | device | examples/s | data wait | peak memory | TFLOP/s per device | share of bf16 peak "
            "| LSTM dtype | skipped steps | resume OK | weights equal across ranks | seconds |",
            "|---|---|---:|---:|---:|---:|---:|---|---:|---|---|---:|",
        ]
        for r in self.rows:
            name = r.name if r.ok else f"{r.name} (FAILED)"
            lines.append(
                f"| {name} | {r.device} | {fmt(r.examples_per_s, '.2f')} | {fmt(r.data_wait, '.3f')} | "
                f"{fmt(r.peak_gb, '.2f')} GB | {fmt(r.tflops, '.3g')} | {r.share} | {r.lstm} | "
                f"{fmt(r.skipped_steps, 'd')} | {r.resume} | {r.weights} | {r.seconds:.0f} |"
            )
        if self.others:
            lines += ["", "| check | result | seconds | note |", "|---|---|---:|---|"]
            lines += [f"| {what} | {result} | {seconds:.0f} | {note} |" for what, result, seconds, note in self.others]
        problems = [f"{r.name}: {p}" for r in self.rows for p in r.problems]
        for title, items in (("Problems", problems), ("Skipped", plan.skipped), ("Notes", self.notes)):
            if items:
                lines += ["", f"{title}:"] + [f"- {item}" for item in items]
        return "\n".join(lines)

    def json(self) -> dict:
        return {
            "gpu": self.plan.gpu,
            "devices": self.plan.devices,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "others": [dict(zip(("check", "result", "seconds", "note"), o)) for o in self.others],
            "skipped": self.plan.skipped,
            "notes": self.notes,
        }


def bf16_peak(device_name: str) -> float | None:
    for name, peak in BF16_PEAK_TFLOPS:
        if name in device_name:
            return peak
    return None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def scalar_values(logdir: Path, tag: str, from_step: int) -> list[float]:
    """A TensorBoard scalar's values from `from_step` on, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0}).Reload()
    if tag not in events.Tags().get("scalars", []):
        return []
    return [e.value for e in events.Scalars(tag) if e.step >= from_step]


def steps_logged(logdir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0}).Reload()
    return [e.step for e in events.Scalars("train/loss")]


def adam_steps(checkpoint: Path) -> set[int]:
    """The update counts in a checkpoint's Adam state (one per parameter; all equal when whole)."""
    import torch

    path = checkpoint / "optimizer.bin"
    if not path.is_file():
        return set()
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {int(s["step"]) for s in state["state"].values()}


def exported_checksum(path: Path) -> str | None:
    if not path.is_file():
        return None
    from demucs_dist.modelfile import load_model

    return weights_checksum(load_model(path).state_dict())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )

    def names(choices):
        def convert(text: str) -> list[str]:
            items = [t for t in text.split(",") if t]
            bad = [t for t in items if t not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{','.join(bad)}: choose from {','.join(choices)}")
            return items

        return convert

    parser.add_argument("--out", default=str(ROOT / "runs" / "gpu-check"), help="work folder (data, runs, table)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per training run")
    parser.add_argument("--cpu", action="store_true", help="the CPU part only, even where there are GPUs")
    parser.add_argument("--precisions", type=names(PRECISIONS), help="comma list (default: fp32,bf16,fp16 on GPU)")
    parser.add_argument("--variants", type=names(VARIANTS), help="comma list (default: plain,compile,ckpt on GPU)")
    parser.add_argument("--device-batch", type=int, help="examples per device and step (default: 8 GPU, 2 CPU)")
    parser.add_argument("--workers", type=int, help="loader workers per device (default: 2 GPU, 1 CPU)")
    parser.add_argument("--eval-shifts", type=int, default=10, help="shifts of the evaluation")
    parser.add_argument("--separate-minutes", type=float, default=10.0, help="length of the file to separate (0: skip)")
    parser.add_argument("--skip-resume", action="store_true", help="leave out the kill and resume")
    parser.add_argument("--keep-runs", action="store_true", help="keep every run's checkpoints and model files")
    parser.add_argument("--skip-evaluate", action="store_true", help="leave out the evaluation")
    args = parser.parse_args(argv)
    if args.steps < 8:
        parser.error("--steps must be at least 8 (warm-up steps are left out of the speed, and resume needs room)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [WORKER_FLAG]:
        from demucs_dist.errors import run_main

        return run_main(train_worker, argv[1:])
    return Check(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
