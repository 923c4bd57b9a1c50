# ruff: noqa: E402, E501
# (a notebook source: imports follow the setup cell; markdown tables and LaTeX lines do not wrap)
# %% [markdown]
# # 7. A full DDPO run
#
# Everything from notebooks 1-6 in one loop. Each epoch of `ddpo_min.train`:
#
# | phase | what | where |
# |---|---|---|
# | 1. sample | roll out $x_T\to x_0$ with CFG, record every $x_t$ and $\log p_{\theta_\text{old}}(x_{t-1}\mid x_t,c)$ | `sampler.sample_with_logprob` (nb. 1-2) |
# | 2. reward | $r(x_0,c)$ for each image; on a GPU on a worker thread while the next batch samples, on a CPU inline | `rewards.make_reward` (nb. 6) |
# | 3. advantages | $A = (r - \bar r_c)/(\text{std}_c + 10^{-6})$ per prompt, clipped to $\pm5$ | `PerPromptStatTracker`, `clip_advantages` (nb. 3) |
# | 4. train | shuffle samples and, per sample, its stochastic timesteps, keeping a fraction of them (`timestep_fraction`: 1 at paper scale, 0.5 at tiny scale); per minibatch, rescore those transitions and accumulate the gradient of the clipped surrogate over them; clip the grad norm; one AdamW step | `recompute_log_prob`, `ddpo_is_loss` (nb. 4) |
#
# and logs `reward/mean`, `reward/std`, `loss/policy`, `loss/approx_kl`, `loss/clipfrac`, `kl/pretrained`
# (how far the policy is from the pretrained one, a diagnostic: 7.6) and timings to `metrics.jsonl`, plus an
# image grid per epoch and `reward_curve.png`.
#
# The CI version below runs **3 epochs** of DDPO$_\text{IS}$ on JPEG compressibility with the tiny
# defaults (each epoch: 8 prompts x 8 samples, advantages normalised within each prompt's 8, 4 optimizer
# steps, 20 denoising steps). That is enough to see every phase work and the metrics move, not to see
# where the reward leads. Section 7.5 shows that from the repository's own 10-minute runs
# (`python -m tools.bench learning`); to watch a run of your own, set `EPOCHS = 25` (about 6 minutes on 2 CPU
# cores, more on a slow laptop) or run the same thing from the shell:
#
#     python ddpo_min.py --model tiny --reward compressibility --epochs 25
#
# and point `LONG_RUN` at the folder it prints.

# %%
SCALE = "tiny"  # "tiny": CPU, offline, ~2-3 min for 3 epochs.
#                 "paper": SD v1.4 + LoRA rank 4, 256 samples/epoch, as in the paper: one GPU, the Hugging
#                 Face hub (or a local copy), and hours, not minutes.
EPOCHS = 3  # CI setting; 25+ to see over-optimisation
LONG_RUN = None  # optionally: the folder of a longer run (a str path), for section 7.5

# %%
import nbutils

SCALE = nbutils.use_scale(SCALE)  # DDPO_SCALE in the environment wins
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import ddpo_min
import rewards
import sampler
from config import Config
from plumbing import format_metrics

if SCALE == "tiny":
    cfg = Config.tiny(reward="compressibility", algo="ddpo_is", epochs=EPOCHS)  # = `--model tiny`
else:
    cfg = Config.paper(reward="compressibility", algo="ddpo_is", epochs=EPOCHS,
                       **nbutils.PAPER_OVERRIDES)  # the paper's recipe (+ toy sizes in the tests)
for f in ("reward", "algo", "num_steps", "guidance_scale", "sample_batch_size", "sample_batches", "minibatches",
          "train_batch_size", "timestep_fraction", "lr", "clip_range", "adv_clip_max", "epochs"):
    print(f"{f:18s} {getattr(cfg, f)}")

# %% [markdown]
# ## 7.1 Train

# %%
run_dir = ddpo_min.train(cfg)  # a fresh, time-stamped folder under runs/
nbutils.restore_inline_plots()  # train() switched matplotlib to Agg
history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
print(sorted(history[0]))

# %% [markdown]
# The loop that just ran, as it is in the repository (each phase is a function above it in `ddpo_min.py`):

# %%
nbutils.show_source(ddpo_min.train)

# %% [markdown]
# ## 7.2 The metrics
#
# * `reward/mean` (± `reward/std`): the batch's reward, i.e. $-$JPEG kB. It should trend up; at 64 samples
#   per epoch it is noisy from epoch to epoch.
# * `loss/approx_kl`: $\frac12\mathbb E[(\log\rho)^2]$ over all transitions of the epoch's minibatch steps,
#   how far each update moved the policy from the one that sampled. With $\rho$ built from log-probs
#   averaged over the $D = C\cdot H\cdot W$ dimensions ($D = 3072$ at tiny scale) it is about
#   $\mathrm{KL}/D^2$, the per-dimension KL divided by $D$ once more (notebook 4 §4.4): a gauge to compare
#   between epochs, not a KL in nats.
# * `loss/clipfrac`: the share of transitions whose ratio left $1\pm\epsilon$. The first minibatch of
#   every epoch is at $\theta=\theta_\text{old}$ (ratio 1, nothing clipped), so the epoch's average mixes
#   that zero with the later minibatches' values; the same holds for `loss/approx_kl` above. Only the transitions that left in their advantage's
#   direction lose their gradient (notebook 4 §4.3), so this is an upper bound on that share. If it
#   approached 1, the later minibatch steps could lose most of their gradient: lower the learning rate or
#   raise `clip_range`.

# %%
epochs = [m["epoch"] for m in history]
fig, axes = plt.subplots(1, 3, figsize=(12, 3))
mean, std = np.array([m["reward/mean"] for m in history]), np.array([m["reward/std"] for m in history])
axes[0].plot(epochs, mean, "o-")
axes[0].fill_between(epochs, mean - std, mean + std, alpha=0.2)
axes[0].set_title(f"reward/mean ± std ({cfg.reward})", fontsize=9)
axes[1].plot(epochs, [m["loss/approx_kl"] for m in history], "o-", color="tab:orange")
axes[1].set_title("loss/approx_kl", fontsize=9)
axes[2].plot(epochs, [m["loss/clipfrac"] for m in history], "o-", color="tab:green")
axes[2].set_ylim(0, 1)
axes[2].set_title(f"loss/clipfrac (eps = {cfg.clip_range:g})", fontsize=9)
for ax in axes:
    ax.set_xlabel("epoch")
    ax.set_xticks(epochs)
    ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()
for m in history:
    print(format_metrics(m))

# %% [markdown]
# **Check.** The logged diagnostics are what notebook 4 says they are: a KL estimate is non-negative, a
# clip fraction is a fraction, and both are positive once the policy has moved; and the epochs are all
# there, with finite losses.

# %%
ok = (len(history) == EPOCHS and all(np.isfinite(m["loss/policy"]) for m in history)
      and all(m["loss/approx_kl"] > 0 and 0 < m["loss/clipfrac"] < 1 for m in history))
nbutils.check(ok, "metrics.jsonl has every epoch, finite losses, approx_kl > 0 and clipfrac in (0, 1)")

# %% [markdown]
# ## 7.3 Before and after, same prompts, same noise
#
# The grids the loop saves each epoch use fresh prompts and noise. For a like-for-like comparison, sample
# the pretrained and the fine-tuned model from the same $x_T$ and the same per-step noise.

# %%
if SCALE == "tiny":
    import tiny

    before = tiny.load_tiny()
    after = tiny.load_tiny(weights=run_dir / "weights" / "unet.safetensors")  # full fine-tuning at tiny scale
    prompts = tiny.ANIMAL_PROMPTS[:8]
    rows, titles = [], []
    for name, m in (("pretrained", before), (f"after {EPOCHS} epochs", after)):
        traj = sampler.sample_with_logprob(m.unet, m.scheduler, m.encode_prompts(prompts), m.encode_prompts([""]),
                                           num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                                           eta=cfg.eta, latent_shape=m.latent_shape,
                                           generator=torch.Generator().manual_seed(123))
        imgs = m.decode(traj.x0)
        r, _ = rewards.jpeg_compressibility(imgs, prompts)
        rows.append(imgs)
        titles += [f"{name[:10]}\n{p[2:]} {x:+.2f}" for p, x in zip(prompts, r)]
        print(f"{name:18s} mean reward on these 8: {r.mean():+.3f}")
    nbutils.show_images(torch.cat(rows), titles, ncols=8, size=1.3)
    example = rows[0][:1]  # one pretrained sample, (1, 3, H, W), for section 7.4
else:  # the loop's own grids (fresh prompts and noise each epoch)
    grids = sorted(run_dir.glob("samples_epoch*.png"))
    for path in grids[:: max(1, EPOCHS // 3)]:
        plt.figure(figsize=(8, 4))
        plt.imshow(plt.imread(path))
        plt.axis("off")
        plt.title(path.name, fontsize=8)
        plt.show()
    sheet = torch.from_numpy(plt.imread(grids[0])[..., :3].copy()).float()  # (H, W, 3) in [0, 1]
    example = sheet[:256, :256].permute(2, 0, 1)[None]  # its first 256x256 tile, (1, 3, 256, 256)

# %% [markdown]
# ## 7.4 Over-optimisation: what the reward asks for
#
# The paper reports that, trained long enough, every reward is exploited: compressibility removes
# backgrounds and blurs, incompressibility dissolves into high-frequency noise, and the alignment reward
# is fooled by typographic attacks. Nothing in the objective says "stay a picture of a cat"; the only
# brakes are the trust region (per update) and stopping early. The paper names over-optimisation an open
# problem with no general-purpose remedy (Sec. 6.4); its runs were stopped by looking at the samples, a
# limitation its OpenReview reviewers point out.
#
# Where compressibility leads can be read off the reward itself, without training. Take a sample and
# remove its content step by step: blur it, then flatten it to its mean colour. Every step *raises* the
# reward; its maximum is an image with no content at all. The incompressibility reward points the other
# way, towards noise.

# %%
img = example  # a sample from 7.3, (1, 3, H, W) in [0, 1]
levels, reward_c, reward_i = [], [], []
for k in (0, 1, 2, 4, 8):  # box blur of growing width, then the flat mean colour
    x = img if k == 0 else torch.nn.functional.avg_pool2d(
        torch.nn.functional.pad(img, (k, k, k, k), mode="replicate"), 2 * k + 1, stride=1)
    levels.append((f"blur {k}" if k else "sample", x))
levels.append(("flat", img.mean(dim=(2, 3), keepdim=True).expand_as(img)))
noise = (img + 0.25 * torch.randn(img.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
levels.append(("+ noise", noise))
batch = torch.cat([x for _, x in levels])
comp, _ = rewards.jpeg_compressibility(batch, [""] * len(batch))
nbutils.show_images(batch, [f"{n}\nr_comp {c:+.2f}" for (n, _), c in zip(levels, comp)], ncols=len(levels), size=1.4)
print("compressibility rises monotonically as content is removed:", bool(np.all(np.diff(comp[:-1]) > 0)))

# %% [markdown]
# ## 7.5 What the model turned into
#
# `python -m tools.bench learning` fine-tunes the shipped tiny model for 10 minutes on each JPEG reward (2 CPU
# cores, tiny defaults) and scores a fixed held-out set (45 animals x 8 seeds) before and after, with the
# same initial noise. Its figures are committed in `assets/`. Besides the JPEG size it records the
# captioner's top-1 rate: the share of samples in which the animal can still be recognised.

# %%
ROOT = Path(ddpo_min.__file__).resolve().parent
for reward in ("compressibility", "incompressibility"):
    path = ROOT / "assets" / f"bench_learning_{reward}.json"
    if not path.exists():
        print(f"{path.name} missing: run `python -m tools.bench learning`")
        continue
    res = json.loads(path.read_text())
    b = res["before"]
    for run in res["runs"]:  # one per training seed; the pictures below are from the first
        a = run["final"]  # the held-out scores at the end of the budget
        print(f"{reward:18s} seed {run['seed']}, {run['epochs']} epochs, {run['wall_seconds'] / 60:.1f} min: JPEG "
              f"{b['jpeg_kb']:.3f} -> {a['jpeg_kb']:.3f} kB ({100 * (a['jpeg_kb'] / b['jpeg_kb'] - 1):+.1f}%), "
              f"animal recognised {100 * b['caption_top1']:.1f}% -> {100 * a['caption_top1']:.1f}% of samples")
    plt.figure(figsize=(12, 2.4))
    plt.imshow(plt.imread(ROOT / "assets" / f"before_after_{reward}.png"))
    plt.axis("off")
    plt.title(f"{reward}: top, pretrained; bottom, after {res['runs'][0]['epochs']} epochs (same prompts, "
              "same noise)", fontsize=9)
    plt.show()

# %% [markdown]
# Read the two rows against 7.4. The reward went where it was asked to go, and the animals went with it:
# compressibility buys its kilobytes by removing what makes the image a particular animal (detail, edges,
# colour), incompressibility by adding texture no animal has. Nothing in the objective says "stay a picture
# of a cat". The paper stops its runs early, by looking at the samples (Sec. 6.4 leaves the problem
# open); a KL penalty towards the pretrained model is the other common choice. It is not part of DDPO; the
# project has it as an option, `--kl-coef` $\beta$ (`ddpo_min.rescore_with_kl` derives it), and
# `python -m tools.bench kl` measures what it buys here.
#
# With `LONG_RUN` set to a run folder of your own, the cell below shows its saved grids from the first to
# the last epoch and its reward curve.

# %%
if LONG_RUN is not None:
    grids = sorted(Path(LONG_RUN).glob("samples_epoch*.png"))
    for path in [*grids[:: max(1, len(grids) // 4)], grids[-1], Path(LONG_RUN) / "reward_curve.png"]:
        plt.figure(figsize=(9, 4))
        plt.imshow(plt.imread(path))
        plt.axis("off")
        plt.title(str(path.name), fontsize=8)
        plt.show()
else:
    print("LONG_RUN is None: run `python ddpo_min.py --model tiny --reward compressibility --epochs 25`, "
          "then set LONG_RUN to the folder it prints.")

# %% [markdown]
# ## 7.6 Four algorithms, generalisation and over-optimisation, from the committed comparison
#
# `python -m tools.bench compare` trains DDPO$_\text{IS}$, DDPO$_\text{SF}$, RWR and sparse RWR on the same
# sample budget, each beside a reward-blind control (notebook 5, §5.5 describes the protocol), and records, at
# held-out checkpoints, three things this notebook has only seen in one run:
# - the **reward on prompts never trained on** (9 held-out animals, 32 everyday emoji), next to the reward on
#   the trained animals: the paper's generalisation result (Sec. 6.3);
# - the **captioner's top-1** on the trained animals: when the reward keeps rising while this falls, the
#   model is being over-optimised (Sec. 6.4, and 7.4-7.5 above);
# - the **KL to the pretrained policy**, `kl/pretrained` in `metrics.jsonl`: the mean over the stochastic
#   steps of 8 of the epoch's trajectories (spread over its prompts) of $\mathrm{KL}(p_\theta \,\|\, p_\text{pretrained})$. Both policies are Gaussians with
#   the same $\sigma_t$ (Eq. 2), so each step's KL is $\|\mu_\theta - \mu_\text{pre}\|^2 / 2\sigma_t^2$, per latent
#   dimension like the log-probs. With LoRA the pretrained policy is the same UNet with its adapters off.

# %%
summary = nbutils.show_comparison()
kl_after_first_update = {(reward, algo): r["kl_pretrained"]["mean"][0]
                         for reward, res in summary["results"].items() for algo, r in res.items()}
print({k: f"{v:.2e}" for k, v in kl_after_first_update.items()})
nbutils.check(all(v > 0 for v in kl_after_first_update.values()),
              "every algorithm has moved the policy after its first epoch (kl/pretrained > 0)")

# %%
from tools.compare import LABELS

pre_top1 = 100 * summary["pretrained"]["trained"]["caption_top1"]
print(f"captioner top-1 on the trained animals after the last epoch (%; {pre_top1:.0f}% before training) and KL to "
      "the pretrained policy, algorithm / its control, mean over seeds (a control serves both rewards: its "
      "figures repeat)")
for reward, algos in summary["grid"].items():
    print(reward)
    for algo, grid in algos.items():
        print(f"  {LABELS[algo]:<11}" + "   ".join(
            f"lr {lr}: top-1 {c['trained/top1']['mean'][-1]:4.1f} / {c['trained/control_top1']['mean'][-1]:4.1f}, "
            f"KL {c['kl_pretrained']['mean'][-1]:.0e} / {c['control_kl_pretrained']['mean'][-1]:.0e}"
            for lr, c in grid.items()))

# %% [markdown]
# **Think about it.** (1) Compare each algorithm's captioner top-1 with its control's, in the figure's fourth
# column and in the lines above. The control never sees the reward. Where both are near 0, can the comparison
# tell the reward's share of the lost animals from the drift's? At which rates does a control keep the
# animals, and is a larger KL always the reason it loses them? (2) RWR's control shrinks the files of the
# unseen animals and the everyday objects as well as those of the trained animals: it "generalises" with no
# reward (its gain on a set is the algorithm's gain minus the gain over the control). What does that say about
# a generalisation claim read against the pretrained model? Is the gain *over the control* on the unseen
# animals and the objects close to that on the trained animals?
