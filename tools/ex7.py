"""Exercise 7, "a KL leash": the student's per-step KL (`my_gaussian_kl`) inside the real loop's
`--kl-coef` penalty, for a few betas, and what each run buys and costs.

`train_leashed(...)` patches `ddpo_min.gaussian_kl` (with unittest.mock, nothing in the repository
changes): the loop calls it for the penalty of every trained transition (`rescore_with_kl`) and for
the `kl/pretrained` diagnostic. Each run is scored on exercise 5's held-out set (the 45 animals x 2
fixed noise seeds): the JPEG change toward the reward and the captioner's top-1 ("is it still the
animal?").

    python -m tools.bench ex7   # the exercise's full run, the reference KL (~10 min on 2 cores)

writes assets/ex7_reference.json: what a correct submission's run looks like (the answer key
quotes it).
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import config
import ddpo_min
import plumbing
import tiny
from tools import write_json
from tools.ex5 import held_out_scores

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "assets" / "ex7_reference.json"

BETAS = (0.0, 0.3, 3.0)  # the trade-off's middle and strong leash beside the paper's objective
EPOCHS = 8


def train_leashed(folder: Path, beta: float, kl_fn=None, epochs: int = EPOCHS, seed: int = 0,
                  **overrides) -> dict:
    """DDPO_IS on compressibility with `--kl-coef beta`, the KL computed by `kl_fn` (default: the
    project's); the held-out figures before and after, and the run's last KL to the pretrained
    policy."""
    plumbing.empty_run_folder(folder)
    cfg = config.Config.tiny(seed=seed, epochs=epochs, kl_coef=beta, output_dir=str(folder),
                             **overrides)
    before = _pretrained_scores(cfg)
    with mock.patch.object(ddpo_min, "gaussian_kl", kl_fn or ddpo_min.gaussian_kl):
        run_dir = ddpo_min.train(cfg)
    after = held_out_scores(tiny.load_tiny(weights=run_dir / "weights" / "unet.safetensors"), cfg)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return dict(beta=beta, epochs=len(history), run_dir=str(run_dir),
                jpeg_change_percent=100 * (after["jpeg_kb"] / before["jpeg_kb"] - 1),
                top1_before=100 * before["caption_top1"], top1_after=100 * after["caption_top1"],
                kl_pretrained=[h["kl/pretrained"] for h in history],
                reward=[h["reward/mean"] for h in history])


_BEFORE: dict = {}  # the pretrained model's held-out figures, per sampler setting


def _pretrained_scores(cfg: config.Config) -> dict:
    """The pretrained model's held-out figures: the same for every beta (fixed weights, prompts
    and noise), so scored once per sampler setting."""
    key = (cfg.num_steps, cfg.guidance_scale, cfg.eta)
    if key not in _BEFORE:
        _BEFORE[key] = held_out_scores(tiny.load_tiny(), cfg)
    return _BEFORE[key]


def reference_run(out: Path = REFERENCE, runs_dir: Path = ROOT / "runs" / "ex7_reference",
                  epochs: int = EPOCHS, **overrides) -> dict:
    """The exercise's run with the project's KL for every beta (what a correct `my_gaussian_kl`
    gives, up to float rounding), written to `out`."""
    runs = [train_leashed(runs_dir / f"beta{beta:g}", beta, epochs=epochs, **overrides)
            for beta in BETAS]
    for r in runs:
        r.pop("run_dir")
        print(f"beta {r['beta']:g}: held-out JPEG {r['jpeg_change_percent']:+.1f}%, top-1 "
              f"{r['top1_before']:.1f}% -> {r['top1_after']:.1f}%, KL to the pretrained policy "
              f"{r['kl_pretrained'][-1]:.2e}")
    result = dict(epochs=epochs, betas=list(BETAS), overrides=overrides, runs=runs)
    write_json(out, result)
    return result
