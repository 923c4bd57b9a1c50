"""The tiny model at toy size, for tests of the loop's mechanics (not of learning)."""

from __future__ import annotations

import json
from pathlib import Path

import config
from config import Config

TINY_ARGS = dict(config.TINY_DEFAULTS, model="tiny", num_steps=3, sample_batch_size=4,
                 sample_batches=2, samples_per_prompt=2, train_batch_size=4, minibatches=2,
                 epochs=3, grid_size=4, device="cpu")


def tiny_config(out: Path, **kw) -> Config:
    """TINY_ARGS writing to `out`, with overrides."""
    return Config(**{**TINY_ARGS, "output_dir": str(out), **kw})


def history(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per epoch."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
