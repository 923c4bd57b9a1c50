# ruff: noqa: E402, E501
# (a notebook source: imports follow the setup cell; markdown tables and LaTeX lines do not wrap)
# %% [markdown]
# # 0. DDPO in two dimensions
#
# The whole method on a model small enough to see: a text-to-*point* diffusion model, where the "prompt"
# is one of four labels and the "image" is a point in the plane. It is pretrained here in seconds, sampled
# with the project's own log-prob DDIM step (`sampler.py`), and fine-tuned on a reward with the project's
# own losses (`ddpo_min.py`), by a loop of twenty lines that does what `ddpo_min.train` does. Because
# everything is two-dimensional, the things the later notebooks can only estimate are exact or cheap here:
# the sample cloud moving epoch by epoch, the reward, the per-step KL to the pretrained policy, and the
# true policy gradient, against which the estimators' bias and variance can be measured.
#
# Plan: (1) the model and its pretraining; (2) the policy: trajectories and their log-probs; (3) DDPO$_\text{IS}$
# fine-tuning, the cloud and the KL epoch by epoch; (4) DDPO$_\text{IS}$, DDPO$_\text{SF}$ and RWR side by side;
# (5) the estimators against the true gradient: baselines, the importance ratio on reused samples, the clip; (6) where the field went after DDPO, with one cell each where
# the point model can show it. About a minute on 2 CPU cores; no scale switch, nothing to download.

# %%
import copy
import math
from types import SimpleNamespace

import matplotlib.pyplot as plt
import nbutils  # finds the repo and puts it on sys.path
import numpy as np
import torch
from diffusers import DDIMScheduler

import sampler
from ddpo_min import (
    PerPromptStatTracker,
    clip_advantages,
    ddpo_is_loss,
    ddpo_sf_loss,
    diffusion_mse_loss,
    rwr_weights,
)

torch.manual_seed(0)
torch.set_num_threads(min(2, torch.get_num_threads()))

# %% [markdown]
# ## 0.1 A text-to-point model
#
# Four labelled clusters on a circle of radius 2 are the "data"; the label plays the prompt $c$. The
# network is a small MLP that predicts $v$ from $(x_t, t, c)$, the tiny image model's parametrisation, with
# the same kind of scheduler (cosine schedule, $v$-prediction, the last step deterministic). It has the
# interface of a diffusers UNet (`model(x_t, t, encoder_hidden_states=c).sample`), so the project's
# functions run on it unchanged; a label is a one-hot "embedding" of shape (1, 5), the fifth entry being the
# empty prompt of classifier-free guidance. Pretraining minimises `ddpo_min.diffusion_mse_loss`, the loss
# the tiny model was pretrained with, dropping the label 10% of the time so that guidance has an
# unconditional model to push away from.

# %%
LABELS = ["east", "north", "west", "south"]
CENTRES = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]])  # (4, 2)
SPREAD, EMPTY = 0.3, len(LABELS)  # cluster std; the index of the empty prompt
STEPS, GUIDANCE, ETA = 20, 2.0, 1.0


class PointDenoiser(torch.nn.Module):
    """v_theta(x_t, t, c) for points in the plane: an MLP on x_t, a sinusoidal embedding of t, and c."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.freqs = torch.exp(-math.log(1000.0) * torch.arange(8) / 8)  # (8,)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2 + 16 + EMPTY + 1, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, 2))

    def forward(self, x, t, encoder_hidden_states):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])  # (B,)
        angles = t[:, None] * self.freqs[None]  # (B, 8)
        features = [x, angles.sin(), angles.cos(), encoder_hidden_states[:, 0]]
        return SimpleNamespace(sample=self.net(torch.cat(features, dim=1)))  # (B, 2)


def embed(labels: torch.Tensor) -> torch.Tensor:
    """Labels (B,) -> one-hot prompt embeddings (B, 1, 5), the empty prompt being index 4."""
    return torch.nn.functional.one_hot(labels, EMPTY + 1).float()[:, None]


scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                          prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=True,
                          timestep_spacing="trailing")
pretrained = PointDenoiser()
optimizer = torch.optim.Adam(pretrained.parameters(), lr=2e-3)
g = torch.Generator().manual_seed(0)
for _ in range(3000):
    labels = torch.randint(len(LABELS), (512,), generator=g)
    x0 = CENTRES[labels] + SPREAD * torch.randn(512, 2, generator=g)  # data: the clusters
    dropped = torch.rand(512, generator=g) < 0.1
    c = embed(torch.where(dropped, EMPTY, labels))
    t = torch.randint(1000, (512,), generator=g)
    loss = diffusion_mse_loss(pretrained, scheduler, x0, c, t, torch.randn(512, 2, generator=g))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
pretrained.requires_grad_(False)
print(f"pretraining: final diffusion loss {loss.item():.3f}")


def sample(model, per_label: int, seed: int):
    """`per_label` trajectories of each label, sampled with the DDPO policy; the labels (B,)."""
    labels = torch.arange(len(LABELS)).repeat_interleave(per_label)
    traj = sampler.sample_with_logprob(model, scheduler, embed(labels), embed(torch.tensor([EMPTY])),
                                       num_steps=STEPS, guidance_scale=GUIDANCE, eta=ETA,
                                       latent_shape=(2,), generator=torch.Generator().manual_seed(seed))
    return traj, labels


traj, labels = sample(pretrained, 256, seed=1)
means = torch.stack([traj.x0[labels == k].mean(0) for k in range(len(LABELS))])
stds = torch.stack([traj.x0[labels == k].std(0).mean() for k in range(len(LABELS))])
for k, name in enumerate(LABELS):
    print(f"{name:5s}: mean ({means[k, 0]:+.2f}, {means[k, 1]:+.2f}), centre ({CENTRES[k, 0]:+.0f}, "
          f"{CENTRES[k, 1]:+.0f}); std {stds[k]:.2f} (data {SPREAD})")
nbutils.check(((means - CENTRES).norm(dim=1) < 0.3).all() and (stds < 2 * SPREAD).all(),
              "the pretrained model samples each label's cluster")

# %% [markdown]
# ## 0.2 The policy
#
# A trajectory is $x_T \to x_{T-1} \to \dots \to x_0$, every arrow but the last one draw from the Gaussian of
# the paper's Eq. 2 (the last step has $\sigma_t = 0$ here, as in the tiny model: a deterministic map). Below, a few trajectories per label, from pure noise to the clusters. `sample_with_logprob`
# records each step's log-density (averaged over the $D = 2$ coordinates, as everywhere in the project);
# rescoring the stored transitions with `recompute_log_prob` under the same weights must return the
# same numbers, and they must be `torch.distributions.Normal`'s.

# %%
fig, ax = plt.subplots(figsize=(4.5, 4.5))
for k in range(len(LABELS)):
    for b in torch.nonzero(labels == k).flatten()[:6]:
        path = traj.latents[b].numpy()  # (T+1, 2)
        ax.plot(path[:, 0], path[:, 1], "-", color=f"C{k}", lw=0.7, alpha=0.7)
        ax.plot(*path[-1], "o", color=f"C{k}", ms=3)
ax.set(title="trajectories x_T -> x_0 (dots: x_0)", aspect="equal", xlim=(-4, 4), ylim=(-4, 4))
plt.show()

j = 5  # one step of every trajectory
t_j = traj.timesteps[j].expand(len(labels))
rescored = sampler.recompute_log_prob(pretrained, scheduler, traj.latents[:, j], traj.latents[:, j + 1], t_j,
                                      embed(labels), embed(torch.tensor([EMPTY])), GUIDANCE, ETA)
out = sampler.guided_model_output(pretrained, traj.latents[:, j], t_j, embed(labels),
                                  embed(torch.tensor([EMPTY])), GUIDANCE)
mean, sigma = sampler.ddim_step_mean(scheduler, out, t_j, traj.latents[:, j], ETA)
by_torch = torch.distributions.Normal(mean, sigma[:, None]).log_prob(traj.latents[:, j + 1]).mean(1)
print(f"step {j}: sigma_t = {sigma[0]:.3f}; log-probs recorded {traj.log_probs[:3, j].numpy().round(4)}, "
      f"rescored {rescored[:3].numpy().round(4)}")
nbutils.check(torch.allclose(rescored, traj.log_probs[:, j], atol=1e-5)
              and torch.allclose(by_torch, traj.log_probs[:, j], atol=1e-5),
              "recorded log-probs == rescored == torch.distributions.Normal (averaged over D = 2)")

# %% [markdown]
# ## 0.3 Fine-tuning with DDPO$_\text{IS}$
#
# The reward asks every cluster to move toward the point $(2, 2)$, between "east" and "north":
# $r(x_0, c) = -\|x_0 - (2, 2)\|$, exact and cheap. The loop below is the training loop of `ddpo_min.train`
# at this size: sample 64 trajectories per label; score them; advantages per prompt (`PerPromptStatTracker`,
# `clip_advantages`); then, on 4 shuffled minibatches, rescore every stochastic step under the current weights
# and step on `ddpo_is_loss`, the clipped surrogate. Each epoch also measures the exact per-step KL to the
# pretrained policy on that epoch's trajectories: both policies are Gaussians with the same $\sigma_t$, so
# $\mathrm{KL} = \|\mu_\theta - \mu_\text{pre}\|^2 / (2\sigma_t^2)$ per coordinate (`sampler.gaussian_kl`), with no
# estimator in between.

# %%
TARGET = torch.tensor([2.0, 2.0])
NEGATIVE = embed(torch.tensor([EMPTY]))


def reward(x0: torch.Tensor) -> torch.Tensor:
    return -(x0 - TARGET).norm(dim=1)  # (B,)


def kl_to_pretrained(model, traj, labels) -> float:
    """The exact per-step KL(p_theta || p_pretrained), averaged over the stochastic steps, the
    trajectories and the 2 coordinates (what the loop logs as kl/pretrained)."""
    steps, _ = sampler.trainable_steps(scheduler, traj.timesteps, ETA, 1.0)
    kls = []
    with torch.no_grad():
        for j in steps.tolist():
            x_t, t = traj.latents[:, j], traj.timesteps[j].expand(len(labels))
            mu = [sampler.ddim_step_mean(scheduler, sampler.guided_model_output(
                m, x_t, t, embed(labels), NEGATIVE, GUIDANCE), t, x_t, ETA) for m in (model, pretrained)]
            kls.append(sampler.gaussian_kl(mu[0][0], mu[1][0], mu[0][1]))
    return torch.stack(kls).mean().item()


def finetune(algo: str, epochs: int = 12, lr: float = 3e-4, clip_range: float = 0.05,
             minibatches: int = 4, seed: int = 0, keep_clouds: bool = False):
    """DDPO_IS, DDPO_SF or RWR on the point model, one epoch = 4 x 64 trajectories."""
    model = copy.deepcopy(pretrained).requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    tracker = PerPromptStatTracker(buffer_size=64, min_count=64)  # each label by its own 64 rewards
    history, clouds = [], []
    shuffle = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        traj, labels = sample(model, 64, seed=1000 * seed + epoch)  # phase 1: sample
        r = reward(traj.x0)  # phase 2: reward
        adv = torch.as_tensor(clip_advantages(tracker.update([LABELS[k] for k in labels], r), 5.0))  # phase 3
        history.append(dict(reward=r.mean().item(), kl=kl_to_pretrained(model, traj, labels)))
        if keep_clouds:
            clouds.append((traj.x0, labels))
        steps, _ = sampler.trainable_steps(scheduler, traj.timesteps, ETA, 1.0)
        parts = 1 if algo == "ddpo_sf" else minibatches  # DDPO_SF: one step per round of sampling
        for mb in torch.randperm(len(labels), generator=shuffle).chunk(parts):  # phase 4: train
            if algo == "rwr":  # the diffusion loss on the model's own samples, weighted exp(A)/Z
                t = torch.randint(1000, (len(mb),), generator=shuffle)
                loss = diffusion_mse_loss(model, scheduler, traj.x0[mb], embed(labels[mb]), t,
                                          torch.randn(len(mb), 2, generator=shuffle),
                                          weights=rwr_weights(adv[mb], 1.0), negative_prompt_embeds=NEGATIVE,
                                          guidance_scale=GUIDANCE)
            else:
                losses = []
                for j in steps.tolist():
                    log_prob = sampler.recompute_log_prob(
                        model, scheduler, traj.latents[mb, j], traj.latents[mb, j + 1],
                        traj.timesteps[j].expand(len(mb)), embed(labels[mb]), NEGATIVE, GUIDANCE, ETA)
                    if algo == "ddpo_is":
                        losses.append(ddpo_is_loss(log_prob, traj.log_probs[mb, j], adv[mb], clip_range)[0])
                    else:
                        losses.append(ddpo_sf_loss(log_prob, adv[mb]))
                loss = torch.stack(losses).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    return model, history, clouds


model_is, history_is, clouds = finetune("ddpo_is", keep_clouds=True)
shown = [0, 3, 6, 9, 11]
fig, axes = plt.subplots(1, len(shown) + 1, figsize=(3 * len(shown) + 3.5, 3))
for ax, e in zip(axes, shown):
    x0, lab = clouds[e]
    for k in range(len(LABELS)):
        ax.scatter(*x0[lab == k].T, s=4, color=f"C{k}")
    ax.plot(*TARGET, "k*", ms=12)
    ax.set(title=f"epoch {e}: reward {history_is[e]['reward']:.2f}", aspect="equal", xlim=(-3.5, 3.5),
           ylim=(-3.5, 3.5))
axes[-1].plot([h["kl"] for h in history_is], "o-")
axes[-1].set(title="exact KL to the pretrained policy", xlabel="epoch", yscale="log")
plt.tight_layout()
plt.show()
for k, name in enumerate(LABELS):
    (x_first, l_first), (x_last, l_last) = clouds[0], clouds[-1]
    m0, m1 = x_first[l_first == k].mean(0), x_last[l_last == k].mean(0)
    print(f"{name:5s}: cloud centre ({m0[0]:+.2f}, {m0[1]:+.2f}) -> ({m1[0]:+.2f}, {m1[1]:+.2f})")
gain = history_is[-1]["reward"] - history_is[0]["reward"]
print(f"reward {history_is[0]['reward']:.3f} -> {history_is[-1]['reward']:.3f}; "
      f"KL per step and coordinate {history_is[1]['kl']:.2e} -> {history_is[-1]['kl']:.2e}")
nbutils.check(gain > 0.3 and history_is[-1]["kl"] > history_is[1]["kl"] > 0,
              "DDPO_IS moves the clouds toward the target, and away from the pretrained policy")

# %% [markdown]
# Every cluster moves toward the star, and keeps its label: "west" and "south" cannot reach $(2, 2)$ in
# twelve epochs, but they drift toward it, because the advantage is computed *per label*, so each cluster
# is compared with itself. The KL grows with the reward: the reward is bought by moving away from the
# pretrained model, which is what over-optimisation is, seen from the policy's side (notebook 7).
#
# ## 0.4 Three algorithms, one loop
#
# The same loop with DDPO$_\text{SF}$ (one optimizer step per round of sampling, the REINFORCE loss) and with
# RWR (the diffusion loss on the model's own samples, each weighted by $e^{A}/Z$), from the same seed.

# %%
runs = {"DDPO_IS": history_is,
        "DDPO_SF": finetune("ddpo_sf")[1],
        "RWR": finetune("rwr")[1]}
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for name, history in runs.items():
    axes[0].plot([h["reward"] for h in history], "o-", label=name)
    axes[1].plot([h["kl"] for h in history], "o-", label=name)
axes[0].set(title="mean reward", xlabel="epoch")
axes[1].set(title="exact KL to the pretrained policy", xlabel="epoch", yscale="log")
axes[0].legend()
plt.tight_layout()
plt.show()
for name, history in runs.items():
    print(f"{name:8s} reward {history[0]['reward']:.3f} -> {history[-1]['reward']:.3f}, "
          f"final KL {history[-1]['kl']:.2e}")
nbutils.check(all(h[-1]["reward"] > h[0]["reward"] for h in runs.values()),
              "all three raise the reward on the same budget of samples")

# %% [markdown]
# ## 0.5 The estimators against the true gradient
#
# The objective is $J(\theta) = \mathbb E[r(x_0, c)]$ and DDPO follows estimates of $\nabla_\theta J$ from one
# batch. Here the true gradient at the pretrained weights can be estimated to high precision from many
# cheap trajectories: `ddpo_sf_loss` on 4 x 2048 of them, with the per-label mean reward subtracted (an
# unbiased baseline), gives $g^\star$, whose own Monte-Carlo error we measure by splitting it in two halves.
# Then, for small batches, how well does one batch's estimate point along $g^\star$? Two estimators, both
# unbiased: the score-function gradient with raw rewards, and with per-label advantages (notebook 3 §3.2).
# (Strictly, $g^\star$ is the gradient through the stochastic steps: the last step is deterministic here,
# and $J$'s dependence on $\theta$ through its mean, a term that needs the reward's gradient, is in no
# score-function estimate. The pathwise gradient at the end of this section includes it.)

# %%
def sf_gradient(traj, labels, weights: torch.Tensor) -> torch.Tensor:
    """The gradient of ddpo_sf_loss summed over every step, flattened over the parameters."""
    model = copy.deepcopy(pretrained).requires_grad_(True)
    steps, _ = sampler.trainable_steps(scheduler, traj.timesteps, ETA, 1.0)
    B = len(labels)
    x_t = traj.latents[:, steps].reshape(-1, 2)
    x_prev = traj.latents[:, steps + 1].reshape(-1, 2)
    t = traj.timesteps[steps].repeat(B)
    lab = labels.repeat_interleave(len(steps))
    log_prob = sampler.recompute_log_prob(model, scheduler, x_t, x_prev, t, embed(lab), NEGATIVE,
                                          GUIDANCE, ETA)
    loss = len(steps) * ddpo_sf_loss(log_prob, weights.repeat_interleave(len(steps)))
    return -torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


def per_label_baseline(r, labels):
    return r - torch.stack([r[labels == k].mean() for k in range(len(LABELS))])[labels]


big, big_labels = sample(pretrained, 2048, seed=99)
r_big = reward(big.x0)
halves = [torch.arange(len(big_labels)) % 2 == h for h in (0, 1)]
g_half = [sf_gradient(SimpleNamespace(latents=big.latents[m], timesteps=big.timesteps), big_labels[m],
                      per_label_baseline(r_big[m], big_labels[m])) for m in halves]
g_star = (g_half[0] + g_half[1]) / 2
cos = torch.nn.functional.cosine_similarity
print(f"ground truth: cosine between the two halves' estimates {cos(g_half[0], g_half[1], dim=0):.3f}")


def cosines(batch: int, kind: str, repeats: int = 12) -> np.ndarray:
    out = []
    for rep in range(repeats):
        tr, lab = sample(pretrained, batch // len(LABELS), seed=5000 + 100 * batch + rep)
        r = reward(tr.x0)
        weights = r if kind == "raw rewards" else per_label_baseline(r, lab)
        out.append(cos(sf_gradient(tr, lab, weights), g_star, dim=0).item())
    return np.array(out)


sizes = [16, 64, 256]
results = {kind: [cosines(n, kind) for n in sizes] for kind in ("raw rewards", "per-label advantages")}
plt.figure(figsize=(5, 3))
for kind, values in results.items():
    plt.errorbar(sizes, [v.mean() for v in values], yerr=[v.std() for v in values], marker="o",
                 capsize=3, label=kind)
plt.xscale("log")
plt.xlabel("batch size (trajectories)")
plt.ylabel("cosine(one batch's gradient, g*)")
plt.legend(fontsize=8)
plt.tight_layout()
plt.show()
for kind, values in results.items():
    print(f"{kind:22s} " + "  ".join(f"B={n}: {v.mean():.2f} ± {v.std():.2f}" for n, v in zip(sizes, values)))
nbutils.check(all(a.mean() > r.mean() for a, r in zip(results["per-label advantages"], results["raw rewards"]))
              and results["per-label advantages"][-1].mean() > 0.5,
              "per-label advantages point along the true gradient better than raw rewards, at every batch size")

# %% [markdown]
# Both estimators are unbiased, so their *average* over many batches is $g^\star$; what differs is how far a
# single batch strays from it. Raw rewards carry a common offset (every reward here is negative) that
# multiplies the score of every sample, and the differences between labels: both add variance and no
# signal. Subtracting each label's mean removes them: a batch of 16 with per-label advantages points along
# the true gradient better than a batch of 256 with raw rewards. This is the per-prompt
# normalisation of `PerPromptStatTracker`, and the group normalisation of GRPO in language models.
#
# **Reusing samples: the ratio and the clip.** DDPO$_\text{IS}$ takes several optimizer steps on one round of
# samples. After the first, $\theta \ne \theta_\text{old}$: the trajectories come from the old policy, while the
# gradient wanted is $\nabla J$ at the new $\theta$. Below, $\theta_1$ is the pretrained model after 4 AdamW steps of
# `ddpo_sf_loss` on one batch (as many steps as one epoch of 4 minibatches takes), and $g^\star(\theta_1)$ its true gradient from 8192 fresh
# trajectories, as above. Four estimates of it from 16 batches of 64 trajectories of $\theta_\text{old}$:
# (a) the score function at $\theta_1$, ignoring that the samples are stale; (b) each step's term weighted by
# the ratio the project uses, $\bar\rho = \exp(\text{mean over the } D \text{ coordinates of the log-ratio})$;
# (c) weighted by the exact per-step ratio $\rho$ (summed log-probs); (d) `ddpo_is_loss`, i.e. (b) with the
# clip, at this notebook's $\epsilon = 0.05$. The *bias* is read off the cosine between the average of the 16
# estimates and $g^\star(\theta_1)$, the *noise* off one batch's cosine.

# %%
def step_log_probs(model, traj, labels) -> torch.Tensor:
    """(B, S) log-probs of every stochastic step (averaged over the D = 2 coordinates)."""
    steps, _ = sampler.trainable_steps(scheduler, traj.timesteps, ETA, 1.0)
    B, S = len(labels), len(steps)
    return sampler.recompute_log_prob(
        model, scheduler, traj.latents[:, steps].reshape(-1, 2), traj.latents[:, steps + 1].reshape(-1, 2),
        traj.timesteps[steps].repeat(B), embed(labels.repeat_interleave(S)), NEGATIVE, GUIDANCE, ETA
    ).reshape(B, S)


def gradient(model, objective) -> torch.Tensor:
    """d objective / d parameters, flattened (the graph is kept: several objectives share it)."""
    grads = torch.autograd.grad(objective, list(model.parameters()), retain_graph=True)
    return torch.cat([g.flatten() for g in grads])


theta_1 = copy.deepcopy(pretrained).requires_grad_(True)  # 4 Adam steps on one batch
optimizer = torch.optim.AdamW(theta_1.parameters(), lr=3e-4)
tr, lab = sample(pretrained, 64, seed=1)
adv = per_label_baseline(reward(tr.x0), lab)
for _ in range(4):
    optimizer.zero_grad()
    log_probs = step_log_probs(theta_1, tr, lab)  # (B, S)
    ddpo_sf_loss(log_probs.flatten(), adv.repeat_interleave(log_probs.shape[1])).backward()
    optimizer.step()
fresh, fresh_labels = sample(theta_1, 2048, seed=98)
g_star_1 = gradient(theta_1, (per_label_baseline(reward(fresh.x0), fresh_labels)[:, None]
                              * step_log_probs(theta_1, fresh, fresh_labels)).mean())

estimates, moved = {k: [] for k in ("(a) stale, no ratio", "(b) averaged ratio", "(c) exact ratio",
                                     "(d) (b) clipped")}, []
for rep in range(16):
    tr, lab = sample(pretrained, 16, seed=7000 + rep)  # theta_old's trajectories
    adv = per_label_baseline(reward(tr.x0), lab)
    old = step_log_probs(pretrained, tr, lab).detach()
    new = step_log_probs(theta_1, tr, lab)
    log_ratio = new - old  # log of the averaged ratio, (B, S); the exact one is D = 2 times it
    moved.append(2 * log_ratio.detach().abs().mean().item())
    terms = {"(a) stale, no ratio": adv[:, None] * new,
             "(b) averaged ratio": adv[:, None] * torch.exp(log_ratio),
             "(c) exact ratio": adv[:, None] * torch.exp(2 * log_ratio)}
    for name, objective in terms.items():
        estimates[name].append(gradient(theta_1, objective.mean()))
    clipped, _ = ddpo_is_loss(new.flatten(), old.flatten(), adv.repeat_interleave(new.shape[1]), 0.05)
    estimates["(d) (b) clipped"].append(gradient(theta_1, -clipped))
print(f"theta_1 against theta_old: mean |log rho| per step {np.mean(moved):.3f} (the clip at 0.05 on the averaged "
      f"ratio is 0.1 on the exact one)")
bias = {}
for name, grads in estimates.items():
    bias[name] = cos(torch.stack(grads).mean(0), g_star_1, dim=0).item()
    single = np.array([cos(g, g_star_1, dim=0).item() for g in grads])
    print(f"{name:22s} cosine with g*(theta_1): average of 16 estimates {bias[name]:+.3f}, "
          f"one batch {single.mean():+.3f} ± {single.std():.3f}")
nbutils.check(bias["(c) exact ratio"] > bias["(b) averaged ratio"] > bias["(a) stale, no ratio"] > 0.9,
              "on stale samples, the exact ratio corrects best, the averaged ratio partly, no ratio least")
nbutils.check(bias["(d) (b) clipped"] < 0,
              "past the clip, the clipped loss's gradient points back toward theta_old")

# %% [markdown]
# Three readings. First, the averaged ratio corrects the stale samples only part of the way: $\bar\rho$ is the
# $D$-th root of the exact ratio, halfway in log at $D = 2$; at Stable Diffusion's $D = 16384$ it is
# $1 + \log\rho / 16384$ to first order, so DDPO$_\text{IS}$ with averaged log-probs is close to estimate (a), the
# score function on stale samples, held near $\theta_\text{old}$ by the clip. Second, one batch's noise is
# larger than any of these biases (the single-batch cosines barely differ, and their spreads over the 16 batches,
# 0.02-0.03, are larger than the differences). Third, the clip does more than stop the step: once most ratios are past
# $1 \pm \epsilon$ in the direction of their advantage, their terms have no gradient, and what is left are the
# transitions that moved *against* their advantage, whose gradients pull $\theta$ back. The clipped loss's
# gradient then points away from $g^\star(\theta_1)$: a restoring force toward $\theta_\text{old}$, which is
# what a trust region is.
#
# ## 0.6 Where the field went
#
# DDPO (2023) was one of the first policy-gradient methods for diffusion models. What came after, each tied
# to something above:
#
# - **A KL leash.** DPOK (Fan et al., arXiv 2305.16381) adds a KL penalty to the pretrained model to the
#   policy gradient, the standard remedy of RL fine-tuning for the over-optimisation of §0.3's KL curve. The
#   per-step Gaussian KL it penalises is the one `kl_to_pretrained` computes exactly above; the project's
#   `--kl-coef` adds it to the loss of every trained transition.
# - **Groups instead of critics.** GRPO (Shao et al., arXiv 2402.03300), for language models, samples a group
#   of answers per prompt and normalises each reward by its group's mean and standard deviation, with PPO's
#   clipped ratio and no value network: DDPO's per-prompt advantages and clipped importance ratio, found again.
#   §0.5 measured why the group helps.
# - **Flow models made stochastic.** Flow-matching models (Stable Diffusion 3, FLUX) sample with an ODE: each
#   step is deterministic and has no density, so there is no policy to take a gradient of. Flow-GRPO (Liu et
#   al., arXiv 2505.05470) replaces the ODE with an SDE that has the same marginals, which makes every step a
#   Gaussian policy again. DDIM's $\eta$ is the same dial: $\eta = 0$ is an ODE sampler, $\eta > 0$ a stochastic
#   one whose marginals the DDIM paper keeps the same. The cell below samples the point model both ways.
# - **Backpropagating the reward.** When the reward is differentiable, its gradient can flow back through
#   the whole sampling chain, as through a recurrent network: DRaFT (Clark et al., arXiv 2309.17400) and
#   AlignProp (Prabhudesai et al., arXiv 2310.03739). The second cell computes that pathwise gradient for the
#   point model and measures it against $g^\star$ like the estimators of §0.5. It needs a differentiable
#   reward (JPEG size and a captioner's words are not) and memory for the whole chain.
# - **Offline preferences.** Diffusion-DPO (Wallace et al., arXiv 2311.12908) learns from a fixed dataset of
#   pairwise human preferences, with DPO's objective and the diffusion loss in place of the log-likelihood,
#   the same substitution RWR makes (notebook 5 §5.3): no sampling during training, no reward model.

# %%
def sample_eta(eta: float, per_label: int = 256, seed: int = 3) -> torch.Tensor:
    """x_0 of the pretrained point model, sampled by DDIM with this eta (0: the ODE)."""
    labels = torch.arange(len(LABELS)).repeat_interleave(per_label)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 2, generator=g)
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = sampler.guided_model_output(pretrained, x, t, embed(labels), NEGATIVE, GUIDANCE)
            x = scheduler.step(out, t, x, eta=eta, generator=g).prev_sample
    return x, labels


fig, axes = plt.subplots(1, 2, figsize=(7, 3.5))
spread = {}
for ax, eta in zip(axes, (0.0, 1.0)):
    x0, lab = sample_eta(eta)
    spread[eta] = torch.stack([x0[lab == k].std(0).mean() for k in range(len(LABELS))]).mean().item()
    for k in range(len(LABELS)):
        ax.scatter(*x0[lab == k].T, s=3, color=f"C{k}")
    ax.set(title=f"eta = {eta:g}: cluster std {spread[eta]:.2f}", aspect="equal", xlim=(-3.5, 3.5), ylim=(-3.5, 3.5))
plt.tight_layout()
plt.show()
try:
    sampler.ddim_step_mean(scheduler, torch.zeros(1, 2), scheduler.timesteps[0], torch.zeros(1, 2), 0.0)
    no_density = False
except ValueError as err:
    no_density = "no density" in str(err)
    print(err)
nbutils.check(no_density and abs(spread[0.0] - spread[1.0]) < 0.5 * SPREAD,
              "eta = 0 and eta = 1 sample the same clusters; only eta > 0 is a policy with a density")

# %%
def pathwise_gradient(batch: int, seed: int) -> torch.Tensor:
    """d E[r] / d theta by backpropagating the reward through the sampling chain (fixed noise)."""
    model = copy.deepcopy(pretrained).requires_grad_(True)
    labels = torch.arange(len(LABELS)).repeat_interleave(batch // len(LABELS))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 2, generator=g)
    scheduler.set_timesteps(STEPS)
    for t in scheduler.timesteps:
        out = sampler.guided_model_output(model, x, t, embed(labels), NEGATIVE, GUIDANCE)
        mean, sigma = sampler.ddim_step_mean(scheduler, out, t, x, ETA)
        x = mean + sigma[:, None] * torch.randn(x.shape, generator=g)  # reparameterised: x depends on theta
    objective = reward(x).mean() / 2  # / D: on the scale of the averaged log-probs' estimators
    return torch.cat([p.flatten() for p in torch.autograd.grad(objective, list(model.parameters()))])


pathwise = np.array([cos(pathwise_gradient(64, 7000 + rep), g_star, dim=0).item() for rep in range(12)])
advantage_64 = results["per-label advantages"][sizes.index(64)]
print(f"batch of 64, cosine with g*: pathwise {pathwise.mean():.2f} ± {pathwise.std():.2f}, "
      f"score function with per-label advantages {advantage_64.mean():.2f} ± {advantage_64.std():.2f}")
nbutils.check(pathwise.mean() > advantage_64.mean(),
              "with a differentiable reward, backpropagating through the chain points along g* better "
              "than the score-function estimate from the same batch size")

# %% [markdown]
# The pathwise gradient estimates $\nabla_\theta J$ through the reward's gradient instead of the
# log-probabilities': the same gradient as $g^\star$ but for the deterministic last step's term, which only
# it contains (a cosine near 1 says that term is small here), and a batch of 64 gives it with far less
# noise. DDPO's score-function gradient needs only reward values, which is why it can train on a
# JPEG encoder, a human rating or a VLM's answer.
#
# **Try it.** (1) In `finetune`, set `clip_range=1e-4` (the paper's value for $D = 16384$) and compare the
# rewards after 12 epochs: what does the clip do when $D = 2$, and why does the paper's value suit Stable
# Diffusion's averaged log-probs but not these? (2) Make the reward depend only on the first coordinate and
# watch which clusters move.
