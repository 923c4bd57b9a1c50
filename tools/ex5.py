"""Exercise 5, "your DDPO trains": the student's functions from exercises 1, 3 and 4 inside the real
training loop, and the bar they must reach.

    python -m tools.bench ex5 --seeds 0 1 2      # calibrate the bar: the reference, same harness

`student_loop(...)` patches the loop (with unittest.mock, nothing in the repository changes):
- exercise 1's `ddim_step_with_logprob` replaces the sampler's step, for sampling and for rescoring.
  The student's function takes a python int timestep and one generator; the loop passes per-sample
  timesteps and one generator per sample, so it is called once per sample (the UNet calls, which
  dominate the time, are unchanged);
- exercise 3's clipped loss replaces `ddpo_min.ddpo_is_loss`;
- exercise 4's per-prompt advantages and clipping replace phase 3. At the tiny defaults (8 samples
  per prompt, a buffer of 8, the 8 groups on 8 different prompts) the loop's tracker computes
  exactly these per-batch statistics (tests/test_every_seed.py checks it over 300 seeds).
The bar: after EPOCHS epochs of training with the tiny defaults (compressibility), the mean JPEG
size of a fixed held-out set (the 45 animals x 2 noise seeds) must have fallen by at least
`bar_percent` of assets/ex5_calibration.json, set below the worst of 3 seeds of the reference run
through this same harness. The budget is in epochs, not minutes, so that the bar means the same on
a slow laptop and a fast machine (12 epochs took about 10 minutes on 2 cores).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import config
import ddpo_min
import rewards as R
import sampler
import tiny
from tools.tiny_report import sample_prompts

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "assets" / "ex5_calibration.json"
EPOCHS = 12
EVAL_PER_PROMPT, EVAL_SEED = 2, 1234
_PROJECT_STEP = sampler.ddim_step_with_logprob  # the reference, before any patching


def per_sample(step: Callable) -> Callable:
    """Exercise 1's signature (int timestep, one generator) -> the loop's (per-sample timesteps,
    a list of generators): one call per sample."""

    def loop_step(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None,
                  generator=None):
        batch = sample.shape[0]
        t = torch.as_tensor(timestep).reshape(-1).expand(batch)
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * batch
        outs = [step(scheduler, model_output[b : b + 1], int(t[b]), sample[b : b + 1], eta=eta,
                     prev_sample=None if prev_sample is None else prev_sample[b : b + 1],
                     generator=gens[b]) for b in range(batch)]
        return torch.cat([x for x, _ in outs]), torch.cat([lp.reshape(1) for _, lp in outs])

    return loop_step


@contextmanager
def student_loop(step: Callable | None = None, clipped_loss: Callable | None = None,
                 advantages: Callable | None = None, clip_advantages: Callable | None = None):
    """The training loop with the student's functions in place of the project's (None: keep)."""
    with ExitStack() as stack:
        if step is not None:
            stack.enter_context(mock.patch.object(sampler, "ddim_step_with_logprob",
                                                  per_sample(step)))
        if clipped_loss is not None:
            stack.enter_context(mock.patch.object(ddpo_min, "ddpo_is_loss", clipped_loss))
        if advantages is not None or clip_advantages is not None:
            norm = advantages or _per_batch_reference
            clip = clip_advantages or ddpo_min.clip_advantages

            def phase_3(run, samples):
                adv = np.asarray(norm(list(samples.all_prompts), samples.all_rewards.copy()),
                                 dtype=np.float32)
                samples.all_advantages = np.asarray(clip(adv, run.cfg.adv_clip_max), np.float32)
                rows = samples.all_advantages[samples.index.numpy()]
                return torch.as_tensor(rows, device=run.device)

            stack.enter_context(mock.patch.object(ddpo_min, "compute_advantages", phase_3))
        yield


def _per_batch_reference(prompts, rewards) -> np.ndarray:
    tracker = ddpo_min.PerPromptStatTracker(buffer_size=max(1, len(rewards)), min_count=1)
    return tracker.update(prompts, rewards)


@torch.no_grad()
def held_out_jpeg_kb(model, cfg: config.Config) -> float:
    """Mean JPEG size of the 45 animals x 2 fixed noise seeds, sampled as the run samples."""
    prompts = [p for p in tiny.ANIMAL_PROMPTS for _ in range(EVAL_PER_PROMPT)]
    model.unet.eval()
    images = sample_prompts(model, prompts, steps=cfg.num_steps, guidance=cfg.guidance_scale,
                            eta=cfg.eta, seed=EVAL_SEED, desc="held-out")
    return float(np.mean(R.jpeg_size_kb(images)))


def train_and_measure(folder: Path, seed: int = 0, epochs: int = EPOCHS,
                      functions: dict | None = None, **overrides) -> dict:
    """Train the tiny defaults (compressibility) for `epochs` with the given functions patched
    in; the held-out JPEG size before and after, and the change in percent. `folder` is emptied
    first: a run there before would otherwise add its epochs to this one's metrics."""
    shutil.rmtree(folder, ignore_errors=True)
    cfg = config.Config.tiny(seed=seed, epochs=epochs, output_dir=str(folder), **overrides)
    before = held_out_jpeg_kb(tiny.load_tiny(), cfg)
    t0 = time.perf_counter()
    with student_loop(**(functions or {})):
        run_dir = ddpo_min.train(cfg)
    seconds = time.perf_counter() - t0
    after = held_out_jpeg_kb(tiny.load_tiny(weights=run_dir / "weights" / "unet.safetensors"),
                             cfg)
    epochs = len((run_dir / "metrics.jsonl").read_text().splitlines())
    return dict(seed=seed, minutes=seconds / 60, epochs=epochs, jpeg_kb_before=before,
                jpeg_kb_after=after, change_percent=100 * (after / before - 1),
                run_dir=str(run_dir))


def reference_functions() -> dict:
    """The project's own versions, with exercise 1's signature (what a correct student writes)."""

    def step(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None,
             generator=None):
        return _PROJECT_STEP(scheduler, model_output, timestep, sample, eta, prev_sample, generator)

    return dict(step=step, clipped_loss=ddpo_min.ddpo_is_loss, advantages=_per_batch_reference,
                clip_advantages=ddpo_min.clip_advantages)


def calibrate(seeds: list[int], epochs: int = EPOCHS) -> dict:
    """The reference through the harness, once per seed; the bar is set below the worst seed."""
    runs = [train_and_measure(ROOT / "runs" / f"ex5-calibration-seed{s}", seed=s,
                              epochs=epochs, functions=reference_functions()) for s in seeds]
    worst = max(r["change_percent"] for r in runs)  # the smallest fall (changes are negative)
    bar = float(np.floor(-worst) - 2.0)  # at least this many percent down: 2 points of slack
    result = dict(epochs=epochs, threads=torch.get_num_threads(), runs=runs,
                  worst_change_percent=worst, bar_percent=bar,
                  rule="bar = floor(worst seed's fall) - 2 points")
    CALIBRATION.write_text(json.dumps(result, indent=1))
    for r in runs:
        print(f"seed {r['seed']}: {r['epochs']} epochs in {r['minutes']:.1f} min, held-out JPEG "
              f"{r['jpeg_kb_before']:.3f} -> {r['jpeg_kb_after']:.3f} kB "
              f"({r['change_percent']:+.1f}%)")
    print(f"bar: the held-out JPEG size must fall by at least {bar:.0f}% "
          f"(worst seed {worst:+.1f}%) -> {CALIBRATION}")
    return result
