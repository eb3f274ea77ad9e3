"""Shared data fixtures: one small synthetic MUSDB dataset per test session (it takes ~2 s).

Costly fixtures are session-scoped, in the test modules too: pytest-xdist interleaves modules on a
worker, and a module-scoped fixture is built again each time its module comes back."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# pytest-xdist workers share the cores with each other and with the processes the tests start.
# Set before torch and numpy load (each reads these once): OpenMP threads waiting at a barrier
# sleep instead of spinning, and numpy's BLAS keeps to one thread. The processes tests start
# inherit the wait policy; the product's own thread settings still apply in them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import SHARD_ARGS, build_once, keep_output, kept_output, run_probe  # noqa: E402

from demucs_dist.data.synth import synthesize  # noqa: E402

# Small enough for fast tests, long enough for several chunks of a 0.5 s training segment.
SYNTH_SONGS = dict(train=4, valid=2, test=1, seconds=5.0)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A MUSDB18-HQ (wav) layout: 4 train + 2 valid songs in train/, 1 song in test/, 5 s each."""
    folder = build_once(tmp_path_factory, "synth", lambda f: synthesize(f / "musdb", fmt="wav", seed=0, **SYNTH_SONGS))
    return folder / "musdb"


@pytest.fixture(scope="session")
def synth_shards(synth_root, tmp_path_factory) -> Path:
    """Shards of `synth_root` written with SHARD_ARGS (lean chunking, float16, z-scored)."""
    from demucs_dist.data.shard import main

    def build(out: Path) -> None:
        main(["--musdb", str(synth_root), "--is-wav", "--out", str(out), *SHARD_ARGS])

    return build_once(tmp_path_factory, "shards", build)


@pytest.fixture(scope="session")
def two_epochs(synth_shards, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, list[dict]]:
    """One uninterrupted 2-epoch run on 2 processes (helpers.REFERENCE_RUN): its work folder (the
    run in run/), its output and each rank's final state. Resumed runs are compared with it."""

    def build(work: Path) -> None:
        result, _ = run_probe(work / "probe", synth_shards, work / "run", "--epochs", "2", "--valid-sdr", "--log-audio")
        keep_output(result, work / "output")

    work = build_once(tmp_path_factory, "two_epochs", build)
    return work, kept_output(work / "output"), [torch.load(work / "probe" / f"rank{rank}.pt") for rank in (0, 1)]


def pytest_configure(config) -> None:
    """Under pytest-xdist, one torch thread per worker: the workers already fill the cores, and two
    processes of 2 OpenMP threads each on 2 busy cores wait at every barrier (a tiny model's steps
    measured 5x slower, 15x with two more busy processes: enough to time out a training fixture)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items) -> None:
    """The longest tests first, then the other slow ones, then the rest, dealt out to the
    pytest-xdist workers like cards: `--dist worksteal` (the Makefile's) hands each worker a
    contiguous run of the list, and an idle worker takes the far end of another's run. So every
    worker starts on a long test, short tests fill the end, and the workers finish together (a 21 s
    test that came last kept one worker busy alone for ~20 s)."""
    items.sort(key=lambda item: (item.get_closest_marker("first") is None, item.get_closest_marker("slow") is None))
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    items[:] = [item for worker in range(workers) for item in items[worker::workers]]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """In-process runs set torch's thread count (inference, loaders); give it back to the next test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
