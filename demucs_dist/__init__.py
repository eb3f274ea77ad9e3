"""demucs_dist: distributed multi-GPU training of Demucs for music source separation."""

import os

__version__ = "0.1.0"

# The order of the sources everywhere: model outputs, shards, tables.
SOURCES = ("drums", "bass", "other", "vocals")
SAMPLERATE = 44100
AUDIO_CHANNELS = 2


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: what SLURM or taskset allowed)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
