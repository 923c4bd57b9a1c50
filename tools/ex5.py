"""Exercise 5, "your DDPO trains": the student's functions from exercises 1, 3 and 4 inside the real
training loop, and the bar they must reach.

    python -m tools.bench ex5 --seeds 0 1 2      # calibrate the bars: the reference and the mutants

`student_loop(...)` patches the loop (with unittest.mock, nothing in the repository changes):
- exercise 1's `ddim_step_with_logprob` replaces the sampler's step, for sampling and for rescoring.
  The student's function takes a python int timestep and one generator; the loop passes per-sample
  timesteps and one generator per sample, so it is called once per sample (the UNet calls, which
  dominate the time, are unchanged);
- exercise 3's clipped loss replaces `ddpo_min.ddpo_is_loss`;
- exercise 4's per-prompt advantages and clipping replace phase 3. At the tiny defaults (8 samples
  per prompt, a buffer of 8, the 8 groups on 8 different prompts) the loop's tracker computes
  exactly these per-batch statistics (tests/test_every_seed.py checks it over 300 seeds).
The bar: after EPOCHS epochs of training with the tiny defaults on each JPEG reward, the mean JPEG
size of a fixed held-out set (the 45 animals x 2 noise seeds) must have moved toward that reward by
at least the reward's `bar_percent` in assets/ex5_calibration.json, set 2 points below the worst of
3 seeds of the reference run through this same harness. Both rewards, so that the bar checks that
the loop follows the reward in both directions. And the trust region must hold: the median over the
epochs of `loss/clipfrac` at most CLIPFRAC_BAR. A step whose log-prob is summed over C*H*W instead
of averaged learns (Adam does not care about the gradient's scale), but its log-ratios are D = 3072
times too large, so every minibatch after an epoch's first is clipped whole. MUTANTS are wrong
implementations run through the same harness (assets/ex5_calibration.json says which clear the
bars). The budget is in epochs, not minutes, so that the bar means the same on a slow laptop and a
fast machine (12 epochs took about 3 minutes per reward on a fast 2-core machine, about 10 on a slow
one).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import config
import ddpo_min
import plumbing
import sampler
import tiny
from tools import write_json
from tools.tiny_report import held_out

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "assets" / "ex5_calibration.json"
EPOCHS = 12
EVAL_PER_PROMPT, EVAL_SEED = 2, 1234
_PROJECT_STEP = sampler.ddim_step_with_logprob  # the reference, before any patching
_PROJECT_IS_LOSS = ddpo_min.ddpo_is_loss  # (the harness patches ddpo_min.ddpo_is_loss)


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
        if step is not None:  # the sampler's own calls, and the loop's (rescoring with --kl-coef)
            for module in (sampler, ddpo_min):
                stack.enter_context(mock.patch.object(module, "ddim_step_with_logprob",
                                                      per_sample(step)))
        if clipped_loss is not None:
            stack.enter_context(mock.patch.object(ddpo_min, "ddpo_is_loss", clipped_loss))
        if advantages is not None or clip_advantages is not None:
            norm = advantages or _per_batch_reference
            clip = clip_advantages or ddpo_min.clip_advantages

            def phase_3(run, samples):
                adv = np.asarray(norm(list(samples.all_prompts), samples.all_rewards.copy()),
                                 dtype=np.float32)
                samples.train_rewards = samples.all_rewards
                samples.all_advantages = np.asarray(clip(adv, run.cfg.adv_clip_max), np.float32)
                return torch.as_tensor(samples.all_advantages)  # (S,), as the loop's

            stack.enter_context(mock.patch.object(ddpo_min, "compute_advantages", phase_3))
        yield


def _per_batch_reference(prompts, rewards) -> np.ndarray:
    tracker = ddpo_min.PerPromptStatTracker(buffer_size=max(1, len(rewards)), min_count=1)
    return tracker.update(prompts, rewards)


def held_out_scores(model, cfg: config.Config) -> dict:
    """JPEG size and captioner top-1 of the 45 animals x 2 fixed noise seeds, sampled as the run
    samples (exercise 5's set; exercise 7 scores on it too)."""
    prompts = [p for p in tiny.ANIMAL_PROMPTS for _ in range(EVAL_PER_PROMPT)]
    return held_out(model, cfg, prompts, EVAL_SEED)[0]


def held_out_jpeg_kb(model, cfg: config.Config) -> float:
    """Mean JPEG size of exercise 5's held-out set."""
    return held_out_scores(model, cfg)["jpeg_kb"]


CLIPFRAC_BAR = 0.5  # reference runs: medians 0.05-0.14; summed log-probs 0.75 (3 of 4 minibatches)


def clipfrac_median(run_dir: Path) -> float:
    """The median over a run's epochs of its logged clip fraction."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return float(np.median([json.loads(line)["loss/clipfrac"] for line in lines]))


def train_and_measure(folder: Path, seed: int = 0, epochs: int = EPOCHS,
                      functions: dict | None = None, **overrides) -> dict:
    """Train the tiny defaults (compressibility) for `epochs` with the given functions patched
    in; the held-out JPEG size before and after, and the change in percent. `folder` is emptied
    first: a run there before would otherwise add its epochs to this one's metrics."""
    plumbing.empty_run_folder(folder)
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
                clipfrac_median=clipfrac_median(run_dir), run_dir=str(run_dir))


def reference_functions() -> dict:
    """The project's own versions, with exercise 1's signature (what a correct student writes)."""

    def step(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None,
             generator=None):
        return _PROJECT_STEP(scheduler, model_output, timestep, sample, eta, prev_sample, generator)

    return dict(step=step, clipped_loss=ddpo_min.ddpo_is_loss, advantages=_per_batch_reference,
                clip_advantages=ddpo_min.clip_advantages)


def functions_of(module) -> dict:
    """The four functions of a student's my_ddpo.py, by the names the harness patches."""
    return dict(step=module.my_ddim_step_with_logprob, clipped_loss=module.my_clipped_loss,
                advantages=module.my_advantages, clip_advantages=module.my_clip_advantages)


def mutant_functions(name: str, seed: int = 0) -> dict:
    """The reference with one mistake a student could make (MUTANTS names them): the bar must
    reject each. The quick checks of exercises 1, 3 and 4 reject them too; here they train."""
    f = reference_functions()
    if name == "reward-blind":  # advantages drawn at random, independent of the rewards
        rng = np.random.default_rng(seed)
        f["advantages"] = lambda prompts, rewards: rng.standard_normal(len(rewards))
    elif name == "sign-flipped":
        f["advantages"] = lambda prompts, rewards: -_per_batch_reference(prompts, rewards)
    elif name == "batch-wide":  # one mean and std over the whole batch, not per prompt
        f["advantages"] = lambda prompts, rewards: ((rewards - rewards.mean())
                                                    / (rewards.std() + 1e-6))
    elif name == "summed log-probs":
        step = f["step"]
        f["step"] = lambda *a, **k: (lambda x, lp: (x, lp * x[0].numel()))(*step(*a, **k))
    elif name == "no clipping":
        def unclipped(log_prob, old_log_prob, advantages, clip_range):
            _, info = _PROJECT_IS_LOSS(log_prob, old_log_prob, advantages, clip_range)
            ratio = torch.exp(log_prob - old_log_prob.detach())
            return (-advantages.detach() * ratio).mean(), info

        f["clipped_loss"] = unclipped
    else:
        raise ValueError(f"unknown mutant {name!r}; one of {', '.join(MUTANTS)}")
    return f


MUTANTS = {
    "reward-blind": "advantages drawn from N(0, 1), independent of the rewards",
    "sign-flipped": "advantages with the wrong sign",
    "batch-wide": "advantages normalised over the whole batch instead of per prompt",
    "summed log-probs": "the step's log-prob summed over C, H, W instead of averaged",
    "no clipping": "the importance-sampling loss without PPO's clip",
}
# Each reward and the direction in which training on it must move the held-out JPEG size
REWARDS = {"compressibility": -1, "incompressibility": +1}


def _run(name: str, reward: str, seed: int, epochs: int) -> dict:
    """One calibration run, kept in runs/ex5-calibration/...: a finished one is read back, so
    an interrupted calibration resumes where it stopped."""
    folder = ROOT / "runs" / "ex5-calibration" / f"{name.replace(' ', '-')}-{reward}-seed{seed}"
    done = folder.with_suffix(".json")
    if done.exists() and json.loads(done.read_text())["epochs"] == epochs:
        result = json.loads(done.read_text())
        if "clipfrac_median" not in result:  # a run finished before the trust-region criterion
            result["clipfrac_median"] = clipfrac_median(result["run_dir"])
            write_json(done, result)
        return result
    functions = (reference_functions() if name == "reference"
                 else mutant_functions(name, seed))
    result = dict(implementation=name, reward=reward,
                  **train_and_measure(folder, seed=seed, epochs=epochs, functions=functions,
                                      reward=reward))
    write_json(done, result)
    print(f"{name:17s} {reward:17s} seed {seed}: {result['epochs']} epochs in "
          f"{result['minutes']:.1f} min, held-out JPEG {result['jpeg_kb_before']:.3f} -> "
          f"{result['jpeg_kb_after']:.3f} kB ({result['change_percent']:+.1f}%), clipfrac "
          f"median {result['clipfrac_median']:.3f}")
    return result


def passes(changes: dict[str, float], clipfracs: dict[str, float], calibration: dict) -> bool:
    """Whether the runs clear the bar of every reward: held-out JPEG changes (percent, per
    reward) far enough toward it, and the clip-fraction medians (per reward) within the trust
    region's bar."""
    return all(REWARDS[reward] * changes[reward] >= bar["bar_percent"]
               and clipfracs[reward] <= calibration["clipfrac_bar"]
               for reward, bar in calibration["bars"].items())


def judged(calibration: dict, changes: dict[str, float], clipfracs: dict[str, float]) -> str:
    """One line per reward: the run's figures against the bars."""
    return ", ".join(f"{r} {changes[r]:+.1f}% (bar: {b['direction']} by {b['bar_percent']:.0f}%) "
                     f"with clipfrac median {clipfracs[r]:.2f} (bar: at most "
                     f"{calibration['clipfrac_bar']:g})" for r, b in calibration["bars"].items())


def calibrate(seeds: list[int], epochs: int = EPOCHS,
              mutants: list[str] | None = None) -> dict:
    """The reference through the harness on both JPEG rewards, once per seed; the bar of each
    reward is set 2 points below its worst seed. Then each mutant, once per reward (seed 0): it
    must miss the bar of at least one reward."""
    runs = [_run("reference", reward, s, epochs) for reward in REWARDS for s in seeds]
    bars = {}
    for reward, sign in REWARDS.items():
        moved = [sign * r["change_percent"] for r in runs if r["reward"] == reward]
        bars[reward] = dict(direction="down" if sign < 0 else "up", worst_percent=min(moved),
                            bar_percent=float(np.floor(min(moved)) - 2.0))
    result = dict(epochs=epochs, threads=torch.get_num_threads(), bars=bars,
                  clipfrac_bar=CLIPFRAC_BAR,
                  reference_clipfrac_max=max(r["clipfrac_median"] for r in runs), runs=runs,
                  rule="per reward: bar = floor(the worst seed's move toward the reward) - 2 "
                       "points, and the median clip fraction over the epochs at most "
                       f"{CLIPFRAC_BAR:g}; a run passes if it clears the bars of both rewards")
    result["mutants"] = {}
    for name in (MUTANTS if mutants is None else mutants):
        mutant_runs = [_run(name, reward, seeds[0], epochs) for reward in REWARDS]
        changes = {r["reward"]: r["change_percent"] for r in mutant_runs}
        clipfracs = {r["reward"]: r["clipfrac_median"] for r in mutant_runs}
        result["mutants"][name] = dict(description=MUTANTS[name], seed=seeds[0],
                                       change_percent=changes, clipfrac_median=clipfracs,
                                       passes=passes(changes, clipfracs, result))
        result["runs"] += mutant_runs
    write_json(CALIBRATION, result)
    for reward, bar in bars.items():
        print(f"bar, {reward}: the held-out JPEG size must go {bar['direction']} by at least "
              f"{bar['bar_percent']:.0f}% (worst reference seed {bar['worst_percent']:.1f}%)")
    print(f"bar, both: the median clip fraction over the epochs at most {CLIPFRAC_BAR:g} "
          f"(reference runs at most {result['reference_clipfrac_max']:.3f})")
    for name, m in result["mutants"].items():
        print(f"mutant {name!r}: " + ", ".join(
            f"{k} {v:+.1f}% (clipfrac {m['clipfrac_median'][k]:.2f})"
            for k, v in m["change_percent"].items())
              + (" -- PASSES the bar" if m["passes"] else " -- misses the bar"))
    print(f"-> {CALIBRATION}")
    return result
