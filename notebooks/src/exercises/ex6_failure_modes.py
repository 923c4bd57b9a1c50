# ruff: noqa: E402, E501
# (a notebook source: imports follow the setup cell; markdown tables and LaTeX lines do not wrap)
# %% [markdown]
# # Exercise 6: failure modes
#
# Five ways to get DDPO subtly wrong, and a sixth to find. Each of problems 1-5 breaks one thing in the
# real training loop (with `unittest.mock.patch`, so nothing in the repository changes), runs one short
# epoch of the tiny model beside a correct run from the same seed, and prints the metrics of both. The
# problem states the symptom you should see; your task is to **explain it**: why does this mistake produce
# this symptom, and what would happen in a long run? Write two or three sentences per problem, with numbers
# from the output. (The derivations you need are in notebooks 2-4.) Problem 6 hides the mistake: you get
# two runs' metrics and pictures and name the bug. In the student release the loop runs your functions
# from `my_ddpo.py`, so do exercises 1-4 first.
#
# Every run below: the shipped tiny model, compressibility, 16 samples (4 prompts x 4) of 10 DDIM steps,
# 2 optimizer steps (so the second minibatch sees an updated $\theta$), about 10 seconds each on 2 cores.
# A check after each problem makes sure the symptom is there, so this notebook cannot silently stop
# showing what it describes.

# %%
import sys
import tempfile
from pathlib import Path
from unittest import mock

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "ddpo_min.py").exists())
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "notebooks"))

import json

import nbutils
import numpy as np
from diffusers import DDIMScheduler

import ddpo_min
import sampler
import tiny
from config import Config

FIELDS = ("reward/mean", "loss/approx_kl", "loss/clipfrac", "kl/pretrained")


def run(label: str, **overrides) -> dict:
    """One short tiny epoch (the loop as it is, or as patched around this call); its metrics."""
    with tempfile.TemporaryDirectory() as folder:
        settings = dict(epochs=1, num_steps=10, sample_batch_size=16, sample_batches=1,
                        samples_per_prompt=4, stat_buffer=4, stat_min_count=4, train_batch_size=8,
                        minibatches=2, kl_samples=4, grid_size=4, output_dir=folder)
        cfg = Config.tiny(**{**settings, **overrides})
        ddpo_min.train(cfg)
        m = json.loads((Path(folder) / "metrics.jsonl").read_text().splitlines()[0])
    nbutils.restore_inline_plots()
    print(f"{label:34s}" + "  ".join(f"{k.split('/')[1]} {m[k]:.3g}" for k in FIELDS))
    return m


baseline = run("correct loop")

# %% [markdown]
# ## Problem 1: summed log-probabilities
#
# The loop averages each step's log-density over the $D = C\cdot H\cdot W$ latent dimensions (3072 here).
# Below, the step's log-probability is multiplied by $D$: summed instead, as the textbook density would be.
#
# **Symptom:** `approx_kl` grows by orders of magnitude, and `clipfrac` is about 1 on the second minibatch
# (the epoch's average is near one half: the first minibatch, at $\theta_\text{old}$, has ratios of 1).
# Explain both numbers. What does this do to DDPO$_\text{IS}$'s update, and to DDPO$_\text{SF}$'s?

# %%
D = 3 * 32 * 32
averaged_step = sampler.ddim_step_with_logprob


def summed_step(*args, **kwargs):
    x_prev, log_prob = averaged_step(*args, **kwargs)
    return x_prev, log_prob * D


with mock.patch.object(sampler, "ddim_step_with_logprob", summed_step):
    summed = run("summed log-probs")
nbutils.check(summed["loss/approx_kl"] > 1000 * baseline["loss/approx_kl"] and summed["loss/clipfrac"] > 0.4,
              "summed log-probs: approx_kl up by > 1000x, clipfrac near one half over the epoch")

# %% [markdown]
# ## Problem 2: advantages normalised over the batch instead of per prompt
#
# `per_prompt_stats=False` normalises every reward with the whole batch's mean and standard deviation.
#
# **Symptom:** the advantages keep all of the rewards' variance *between* prompts (the same share as the
# raw rewards'; in this small batch of 4 prompts about a fifth, over many epochs of the tiny JPEG reward
# most of it): that part of the advantage says which animal was drawn, not whether this sample was good
# for its animal. Per prompt, that share is 0 by construction. Explain what the policy gradient then
# learns, and why the per-prompt advantage still points the gradient the right way: up to which factor,
# per prompt, is it an unbiased estimate (notebook 3, §3.2; handout problem (d))?

# %%
captured = {}
real = ddpo_min.compute_advantages


def spy(run_, samples):
    captured["prompts"], captured["rewards"] = samples.all_prompts, samples.all_rewards
    adv = real(run_, samples)
    captured["adv"] = samples.all_advantages
    return adv


def between_share(prompts, values) -> float:
    """The share of the values' variance that is between the prompts' means."""
    values, arr = np.asarray(values, dtype=np.float64), np.asarray(prompts, dtype=object)
    means = {p: values[arr == p].mean() for p in set(prompts)}
    between = np.mean([(means[p] - values.mean()) ** 2 for p in prompts])
    return float(between / values.var())


with mock.patch.object(ddpo_min, "compute_advantages", spy):
    run("batch-wide advantages", per_prompt_stats=False)
share = between_share(captured["prompts"], captured["adv"])
reward_share = between_share(captured["prompts"], captured["rewards"])
print(f"share of the advantages' variance between prompts: {share:.0%} "
      f"(of the raw rewards': {reward_share:.0%})")
nbutils.check(share > 0.1 and abs(share - reward_share) < 1e-3,
              "batch-wide advantages: they keep the rewards' between-prompt variance")

# %% [markdown]
# ## Problem 3: rescoring without guidance
#
# The samples were drawn with classifier-free guidance ($w = 3$). Below, the training step rescores the
# stored transitions with the conditional prediction alone ($w = 1$).
#
# **Symptom:** with a single minibatch (so every transition is rescored at $\theta = \theta_\text{old}$, before
# any update), `approx_kl` and `clipfrac` should be 0; here they are not. Explain why the ratio is not 1,
# and what DDPO$_\text{IS}$ then optimises.

# %%
real_rescore = ddpo_min.rescore


def rescore_without_guidance(run_, samples, idx, j):
    with mock.patch.object(run_.cfg, "guidance_scale", 1.0):
        return real_rescore(run_, samples, idx, j)


on_policy = run("correct, one minibatch", minibatches=1)
with mock.patch.object(ddpo_min, "rescore", rescore_without_guidance):
    unguided = run("rescored without guidance", minibatches=1)
nbutils.check(on_policy["loss/approx_kl"] < 1e-9 and unguided["loss/approx_kl"] > 1e3 * max(on_policy["loss/approx_kl"], 1e-15)
              and unguided["loss/clipfrac"] > 0.1,
              "rescoring without guidance: ratios far from 1 before any update")

# %% [markdown]
# ## Problem 4: a near-zero $\sigma_t$ at the last step
#
# The tiny model's scheduler sets `set_alpha_to_one=True`, so its last DDIM step is deterministic
# ($\sigma_t = 0$) and the loop leaves it out of training. Below it is `False` (Stable Diffusion's setting):
# the last step keeps a tiny $\sigma_t$ and is trained like the others.
#
# **Symptom:** `approx_kl` jumps after the first update, by orders of magnitude above the correct run's,
# while `clipfrac` stays where it was. Print $\sigma_t$ of the last step in pixel units and explain the
# jump. Why does `clipfrac` not show it (what does it count, and what share of the second minibatch is
# clipped in the correct run already)? Why is this a problem for the gradient, not only for the
# diagnostic?

# %%
load_tiny = tiny.load_tiny


def load_with_noisy_last_step(*args, **kwargs):
    model = load_tiny(*args, **kwargs)
    model.scheduler = DDIMScheduler.from_config(model.scheduler.config, set_alpha_to_one=False)
    return model


scheduler = DDIMScheduler.from_config(load_tiny().scheduler.config, set_alpha_to_one=False)
scheduler.set_timesteps(10)
print("sigma_t of the last step:", f"{sampler.step_sigmas(scheduler, scheduler.timesteps, 1.0)[-1]:.4f}",
      "(the image is in [-1, 1])")
with mock.patch.object(tiny, "load_tiny", load_with_noisy_last_step):
    noisy_last = run("last step with a tiny sigma_t")
nbutils.check(noisy_last["loss/approx_kl"] > 10 * baseline["loss/approx_kl"],
              "a near-zero sigma_t at the last step: approx_kl up by > 10x")

# %% [markdown]
# ## Problem 5: too small a clip range
#
# The tiny default clip range is $10^{-3}$ (the paper's $10^{-4}$ with LoRA). Below it is $10^{-6}$.
#
# **Symptom:** `clipfrac` is one half: every transition of the second minibatch is clipped (the correct run
# clips only part of it). Explain why clipping removes those transitions' gradient, which transitions keep
# one, and what is left of "several optimizer steps per round of sampling" with this setting. (Careful:
# AdamW keeps moving the weights with its momentum even when a minibatch's gradient is zero, so how far
# the policy moves is not the symptom to look for.)

# %%
tight = run("clip range 1e-6", clip_range=1e-6)
nbutils.check(tight["loss/clipfrac"] > 0.49 and tight["loss/clipfrac"] > baseline["loss/clipfrac"],
              "clip range 1e-6: all of the second minibatch is clipped")

# %% [markdown]
# ## Problem 6: find the bug
#
# The folder `mystery/` beside this notebook holds two runs of the tiny loop from the same seed, 6 epochs
# each (the tiny defaults: 64 samples per epoch): a correct one and one with a single bug somewhere in the
# loop. You get what a run writes, its `metrics.jsonl` and its first and last sample grids, not the code.
#
# **Name the bug.** Which phase of the loop does it break (the prompts and noise, the rewards, the
# advantages, the ratio, the update), and what exactly goes wrong? Quote the numbers or point at the
# pictures that show it, rule out at least one other explanation, and say what a long run would do. (Your
# instructor may hand out another `mystery/` folder: the bug then differs.)

# %%
import matplotlib.pyplot as plt

mystery = ROOT / "notebooks" / "exercises" / "mystery"
runs = {name: [json.loads(line) for line in (mystery / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("correct", "mystery")}
fig, axes = plt.subplots(1, 4, figsize=(14, 3))
for ax, key in zip(axes, FIELDS):
    for name, history in runs.items():
        ax.plot([m["epoch"] for m in history], [m[key] for m in history], "o-", label=name)
    ax.set_title(key)
    ax.set_xlabel("epoch")
axes[0].legend()
plt.tight_layout()
plt.show()

fig, axes = plt.subplots(2, 2, figsize=(9, 9))
for row, name in zip(axes, runs):
    for ax, grid in zip(row, sorted((mystery / name).glob("samples_epoch*.png"))):
        ax.imshow(plt.imread(grid))
        ax.set_title(f"{name}: {grid.stem}", fontsize=9)
        ax.axis("off")
plt.tight_layout()
plt.show()
nbutils.check(len(runs["correct"]) == len(runs["mystery"]) > 1, "two runs of the same length to compare")
