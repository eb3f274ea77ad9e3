"""demucs_dist: distributed multi-GPU training of Demucs for music source separation."""

__version__ = "0.1.0"

# The order of the sources everywhere: model outputs, shards, tables.
SOURCES = ("drums", "bass", "other", "vocals")
SAMPLERATE = 44100
AUDIO_CHANNELS = 2
