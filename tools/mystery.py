"""Exercise 6's "find the bug": a short run of the loop with one undisclosed bug, beside a correct
run from the same seed, saved as metrics and sample grids only.

    python -m tools.mystery --bug stale-old-log-probs      # writes notebooks/exercises/mystery/
    python -m tools.mystery --list

The student sees the two runs' metrics.jsonl and their first and last sample grids (exercise 6,
problem 6), not the code, and names the bug. Instructors pick one of BUGS for their course (the
student release copies the folder; `python -m tools.student_copy OUT --mystery BUG` makes a new
one); the answers are in notebooks/course/ANSWERS.md. Each bug patches the loop with
unittest.mock for the run, as exercise 6's other problems do.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import ddpo_min
from config import Config

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "notebooks" / "exercises" / "mystery"
EPOCHS = 6
SETTINGS = dict(epochs=EPOCHS, grid_size=16, kl_samples=8)  # the tiny defaults otherwise


@contextmanager
def _stale_old_log_probs():
    """The 'old' log-probs are recomputed with the current weights: every ratio is 1."""
    real = ddpo_min.ddpo_is_loss

    def loss(log_prob, old_log_prob, advantages, clip_range):
        return real(log_prob, log_prob.detach(), advantages, clip_range)

    with mock.patch.object(ddpo_min, "ddpo_is_loss", loss):
        yield


@contextmanager
def _shifted_rewards():
    """The rewards are paired with the wrong samples (shifted by one in the batch)."""
    real = ddpo_min.compute_advantages

    def advantages(run, samples):
        samples.all_rewards = np.roll(samples.all_rewards, 1)
        return real(run, samples)

    with mock.patch.object(ddpo_min, "compute_advantages", advantages):
        yield


@contextmanager
def _same_noise_every_epoch():
    """Every epoch draws the prompts and the noise of epoch 0 again."""
    real = ddpo_min.sample_seed
    with mock.patch.object(ddpo_min, "sample_seed",
                           lambda cfg, epoch, number, stream: real(cfg, 0, number, stream)):
        yield


@contextmanager
def _raw_rewards():
    """The raw rewards are used as advantages (no per-prompt normalisation)."""
    def advantages(run, samples):
        samples.train_rewards = samples.all_rewards
        samples.all_advantages = ddpo_min.clip_advantages(
            samples.all_rewards.astype(np.float32), run.cfg.adv_clip_max)
        return torch.as_tensor(samples.all_advantages)

    with mock.patch.object(ddpo_min, "compute_advantages", advantages):
        yield


BUGS: dict[str, Callable] = {
    "stale-old-log-probs": _stale_old_log_probs,
    "shifted-rewards": _shifted_rewards,
    "same-noise-every-epoch": _same_noise_every_epoch,
    "raw-rewards": _raw_rewards,
}


def make(bug: str, out: Path = FOLDER, seed: int = 0) -> Path:
    """Run the correct loop and the loop with `bug` (same seed); keep their metrics and grids."""
    if bug not in BUGS:
        raise SystemExit(f"unknown bug {bug!r}; one of: {', '.join(BUGS)}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name, patch in (("correct", None), ("mystery", BUGS[bug])):
        with tempfile.TemporaryDirectory() as folder:
            cfg = Config.tiny(seed=seed, output_dir=folder, **SETTINGS)
            if patch is None:
                ddpo_min.train(cfg)
            else:
                with patch():
                    ddpo_min.train(cfg)
            (out / name).mkdir()
            shutil.copy(Path(folder) / "metrics.jsonl", out / name / "metrics.jsonl")
            for epoch in (0, EPOCHS - 1):
                grid = f"samples_epoch{epoch:04d}.png"
                shutil.copy(Path(folder) / grid, out / name / grid)
    (out / "README.md").write_text(
        "Two runs of the tiny loop from the same seed, one of them with a bug: exercise 6, "
        f"problem 6. {EPOCHS} epochs each; metrics.jsonl and the first and last sample grids.\n")
    (out / "settings.json").write_text(json.dumps(dict(seed=seed, **SETTINGS), indent=1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tools.mystery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bug", choices=sorted(BUGS))
    p.add_argument("--list", action="store_true", help="the bugs and what each does")
    p.add_argument("--out", type=Path, default=FOLDER)
    args = p.parse_args()
    if args.list or not args.bug:
        for name, patch in BUGS.items():
            print(f"{name:24s} {patch.__doc__}")
        return
    print(f"wrote {make(args.bug, args.out)}")


if __name__ == "__main__":
    main()
