# ruff: noqa: E402, E501
# (a notebook source: imports follow the setup cell; markdown tables and LaTeX lines do not wrap)
# %% [markdown]
# # 3. The score-function gradient (DDPO$_\text{SF}$)
#
# We want $\nabla_\theta\,\mathbb E[r(x_0,c)]$, but $x_0$ comes out of a $T$-step random chain: sampling
# is not differentiable in any useful way, and the reward (a JPEG encoder, a VLM) may not be either. The
# score-function trick (REINFORCE) needs neither. This notebook derives it for the denoising MDP
# (arXiv 2305.13301, Sec. 4.3), checks `ddpo_min.ddpo_sf_loss` against a closed-form gradient on a toy
# chain, and measures how much the advantage normalisation (`PerPromptStatTracker`) reduces the
# estimator's variance.
#
# No diffusion model is needed here: the toy problems are exact Gaussians, so the true gradient is known.
# The same loss function is what the training loop applies to the tiny model or to Stable Diffusion, so
# `SCALE` only matters for the other notebooks.

# %%
SCALE = "tiny"  # this notebook runs the same toy problems at either scale (~10 s)

# %%
import nbutils

SCALE = nbutils.use_scale(SCALE)  # DDPO_SCALE in the environment wins
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

from ddpo_min import PerPromptStatTracker, clip_advantages, ddpo_sf_loss

torch.set_default_dtype(torch.float64)  # exact toy arithmetic

# %% [markdown]
# ## 3.1 From $\nabla\,\mathbb E[f]$ to $\mathbb E[f\,\nabla\log p]$
#
# For any density $p_\theta$ and any function $f$ that does not depend on $\theta$:
#
# $$\nabla_\theta\,\mathbb E_{x\sim p_\theta}[f(x)]
#   = \int f(x)\,\nabla_\theta p_\theta(x)\,dx
#   = \int f(x)\,p_\theta(x)\,\frac{\nabla_\theta p_\theta(x)}{p_\theta(x)}\,dx
#   = \mathbb E_{x\sim p_\theta}\big[f(x)\,\nabla_\theta\log p_\theta(x)\big].$$
#
# Only the *density* of the samples is differentiated, never $f$ or the sampling procedure.
#
# **For a trajectory.** In the MDP of notebook 1 a trajectory
# $\tau = (x_T, x_{T-1},\dots,x_0)$ has density
# $p_\theta(\tau) = \rho_0(x_T)\prod_{t=1}^{T}p_\theta(x_{t-1}\mid x_t, c)$ (the transitions are
# deterministic copies and contribute nothing). Neither $\rho_0$ nor $c$ depends on $\theta$, so
#
# $$\nabla_\theta\log p_\theta(\tau) = \sum_{t=1}^{T}\nabla_\theta\log p_\theta(x_{t-1}\mid x_t, c),$$
#
# and with $f(\tau) = r(x_0, c)$, the return of the MDP, the gradient the paper writes $\hat g_\text{SF}$ is
#
# $$\hat g_\text{SF} = \mathbb E\Big[\sum_{t=1}^{T}\nabla_\theta\log p_\theta(x_{t-1}\mid c, t, x_t)\; r(x_0,c)\Big],$$
#
# an expectation, which a batch of trajectories estimates by its mean. This needs every step to be a
# Gaussian. The tiny model's last step is not: it has $\sigma_t = 0$ (notebook 2), so $x_0$ is the fixed
# function $\mu_\theta(x_1, c)$ of $x_1$, and $\nabla_\theta J$ gains a term
# $\mathbb E[\nabla_\theta\, r(\mu_\theta(x_1, c), c)]$ through that step which no score function contains (it
# needs the reward's gradient). The loop's estimate is then the gradient through the stochastic steps,
# with the last step's map held fixed. Stable Diffusion's scheduler keeps $\sigma_t > 0$ at its last step.
#
# **As a loss.** Autograd minimises, so the training loop builds, for each denoising step, the surrogate
#
# $$\mathcal L_t(\theta) = -\frac1B\sum_{b} A_b\,\log p_\theta\big(x^{(b)}_{t-1}\mid x^{(b)}_t, c_b\big)$$
#
# with $A$ held constant; accumulating $\nabla\mathcal L_t$ over $t = 1,\dots,T$ gives $-\hat g_\text{SF}$
# estimated on the batch. That is `ddpo_sf_loss(log_prob, advantages)`. With $A = r$ it is plain
# REINFORCE; §3.2 explains why $A$ is a normalised reward in practice. (Two constant factors, which the
# learning rate absorbs: the project's log-probs are averaged over the $D = C\cdot H\cdot W$ latent
# dimensions (notebook 2), a factor $1/D$; and the training loop divides each step's term by the number
# of timesteps it trains on, $T_\text{train}$, a mean over steps instead of the sum. So it follows
# $-\hat g_\text{SF}/(D\,T_\text{train})$. The check below sums over steps, as $\hat g_\text{SF}$ does.)
#
# **Check.** A toy chain that has DDPO's structure and a known answer: $T$ Gaussian steps
# $x_{k+1} = x_k + \theta_k + s\,z_k$ in $d$ dimensions starting from $x_0 = 0$ (here $k$ counts forward),
# rewarded only at the end with $r = -\|x_T - a^\star\|^2$. Then $x_T \sim \mathcal N(\sum_k\theta_k, T s^2 I)$,
#
# $$J(\theta) = -\Big\|\sum_k\theta_k - a^\star\Big\|^2 - T d s^2,\qquad
#   \nabla_{\theta_k}J = -2\Big(\sum_j\theta_j - a^\star\Big)\ \text{for every }k.$$
#
# We sample $N$ trajectories, call `ddpo_sf_loss` once per step and accumulate gradients, exactly as the
# loop does, and compare with $\nabla J$, allowing 4 Monte-Carlo standard errors.

# %%
T, d, s, N = 3, 2, 0.5, 20_000
a_star = torch.tensor([1.0, -2.0])
theta = torch.tensor([[0.3, 0.1], [-0.2, 0.4], [0.5, -0.3]], requires_grad=True)  # (T, d): one mean per step
g = torch.Generator().manual_seed(0)

with torch.no_grad():  # roll out N trajectories
    states, actions = [torch.zeros(N, d)], []
    for k in range(T):
        a_k = states[-1] + theta[k] + s * torch.randn(N, d, generator=g)  # action = next state
        actions.append(a_k)
        states.append(a_k)
    r = -((states[-1] - a_star) ** 2).sum(-1)  # reward only at the end, (N,)

theta.grad = None
for k in range(T):  # one loss per denoising step, gradients accumulated over steps
    policy = torch.distributions.Normal(states[k] + theta[k], s)  # pi(a_k | s_k), the toy's Eq. 2
    log_prob = policy.log_prob(actions[k]).sum(-1)  # (N,) exact log-density of each action
    ddpo_sf_loss(log_prob, r).backward()
g_sf = -theta.grad  # ascent direction

analytic = (-2 * (theta.detach().sum(0) - a_star)).expand(T, d)  # (T, d)
# per-trajectory terms r_i * d/dtheta_k log pi(a_k | s_k) = r_i (a_k - s_k - theta_k) / s^2
terms = torch.stack([r[:, None] * (actions[k] - states[k] - theta[k].detach()) / s**2 for k in range(T)], 1)
standard_error = terms.std(0) / math.sqrt(N)  # (T, d)
print("analytic gradient:\n", analytic.numpy().round(3))
print(f"ddpo_sf_loss gradient (N = {N}):\n", g_sf.numpy().round(3))
print("|difference| / standard error:\n", ((g_sf - analytic).abs() / standard_error).numpy().round(2))
nbutils.check(((g_sf - analytic).abs() < 4 * standard_error).all(),
              "gradient of ddpo_sf_loss == analytic dJ/dtheta within 4 Monte-Carlo standard errors")

# %% [markdown]
# The code of the derivation above, as it runs in the repository:

# %%
nbutils.show_source(ddpo_sf_loss)

# %% [markdown]
# Note what the estimator did *not* need: the reward's gradient, or a gradient through the sampling
# chain. It needed the log-density of each action under the current parameters, which for diffusion is
# notebook 2's Gaussian.
#
# ## 3.2 Baselines and advantages
#
# The score has zero mean, $\mathbb E[\nabla_\theta\log p_\theta(x)] = \nabla_\theta\!\int p_\theta = 0$, so
# any baseline $b(c)$ that does not depend on the action can be subtracted from the reward without biasing
# the gradient:
#
# $$\mathbb E\big[(r - b(c))\,\nabla_\theta\log p_\theta\big] = \mathbb E\big[r\,\nabla_\theta\log p_\theta\big].$$
#
# The variance, however, changes a lot. With raw rewards every sample is pushed up in proportion to its
# reward: if all rewards are around $-50$ (SD's 512-pixel JPEG sizes in kB; the tiny model's are about
# $-1.3$) every action is *discouraged*, and only the
# small differences between samples carry signal, buried under a large common term. Worse, rewards differ
# systematically by prompt (some animals are simply easier to compress), so a batch-wide baseline still
# leaves a per-prompt offset in every term.
#
# DDPO uses per-prompt statistics (`PerPromptStatTracker`): $A = (r - \bar r_c)/(\text{std}_c + 10^{-6})$,
# with mean and std over recent rewards *of the same prompt* (falling back to the batch until a prompt has
# `--stat-min-count` of them: 16 in the paper's recipes, 8 at the tiny defaults, which keep exactly the
# current epoch's 8 per prompt), then clips $A$ to $[-5, 5]$ (`clip_advantages`). Dividing by the std also rescales each
# prompt's gradient; here every prompt has the same reward spread, so only the variance differs.
#
# Two details of this baseline. The tracker adds the batch to its buffer *before* computing the
# statistics, so the mean includes the sample's own reward and is not quite independent of the action.
# With $n$ rewards in the mean and the other $n-1$ independent of sample $b$,
# $\mathbb E[(r_b - \bar r_c)\,\nabla\log p_b] = \frac{n-1}{n}\,\mathbb E[r_b\,\nabla\log p_b]$: a
# positive factor, harmless for the direction (where $n$ differs between prompts it reweights them
# slightly, as the division by $\text{std}_c$ does). The factor is exact for the mean subtraction
# alone: $\text{std}_c$ also contains the sample's own reward, which bends $A$ as a function of $r_b$
# by a further $O(1/n)$ (its derivative in $r_b$ is $(r_b - \bar r_c)/(n\,\text{std}_c)$). And when a prompt's own rewards are all equal, each
# of its samples gets $A \approx 0$ ($0/(0 + 10^{-6})$): nothing tells them apart, so the prompt
# contributes no gradient, which is right, since there is no within-prompt signal to follow.
#
# **Where is the critic?** PPO for control learns a value function $V(s_t)$ and estimates a per-step
# advantage from it. DDPO has none. The reward $r(x_0, c)$ arrives only at the end and there is no
# discount, so the return from every step of a trajectory is the same number $r(x_0, c)$, and every step
# of a trajectory gets the same advantage $A_b$. The per-prompt mean reward $\bar r_c$ plays the role of
# the value baseline: a Monte-Carlo estimate of $\mathbb E[r(x_0, c)\mid c]$, the value of the prompt before
# $x_T$ is drawn (once $x_T$ is drawn, $V(s_0) = \mathbb E[r\mid c, x_T]$ already depends on the noise), used at
# every step (it depends on $c$, not on the step's action, apart from the own-reward share above). A learned
# $V(s_t)$ could know more at later steps, where $x_t$ already fixes much of the image; DDPO does
# without one.
#
# **Experiment.** Four "prompts" $c$ with their own targets $a^\star_c$ and very different reward offsets
# $b_c$; a one-step Gaussian policy per prompt, $a\sim\mathcal N(\theta_c, s^2 I)$, and reward
# $r = b_c - \|a - a^\star_c\|^2$. The true gradient is known: $\nabla_{\theta_c}J = -2\,P(c)\,(\theta_c - a^\star_c)$.
# For each estimator we draw many independent batches and ask how well one batch's gradient points
# uphill: the cosine similarity between $\hat g$ and $\nabla J$ (scale-free, so dividing by the std
# neither flatters nor penalises the advantage), for several batch sizes.

# %%
prompts = ["a cat", "a dog", "a frog", "a whale"]
offsets = torch.tensor([-60.0, -45.0, -30.0, -15.0])  # b_c: prompt-dependent reward level
targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # a*_c
mu = targets + torch.tensor([0.8, 0.6])  # policy means theta_c, the same distance from every target
s_policy = 0.5
true_grad = (-2 * (mu - targets) / len(prompts)).flatten()  # dJ/dtheta with P(c) = 1/4, (8,)


def draw_batch(batch: int, gen: torch.Generator):
    c = torch.randint(len(prompts), (batch,), generator=gen)  # prompt index per sample
    a = mu[c] + s_policy * torch.randn(batch, 2, generator=gen)  # actions
    r = offsets[c] - ((a - targets[c]) ** 2).sum(-1)  # reward with a per-prompt offset
    return c, a, r


def sf_gradient(c, a, weights):
    """-d/dtheta of ddpo_sf_loss with the given per-sample weights (rewards or advantages), flattened."""
    theta_c = mu.clone().requires_grad_(True)
    log_prob = torch.distributions.Normal(theta_c[c], s_policy).log_prob(a).sum(-1)
    ddpo_sf_loss(log_prob, torch.as_tensor(weights, dtype=torch.float64)).backward()
    return -theta_c.grad.flatten()


tracker = PerPromptStatTracker(buffer_size=32, min_count=16)
gen = torch.Generator().manual_seed(1)
for _ in range(20):  # warm the tracker up so every prompt has its own statistics
    c, _, r = draw_batch(64, gen)
    tracker.update([prompts[i] for i in c], r)

batch_sizes, repeats = [8, 16, 32, 64, 128], 200
cosine = {"raw reward r": [], "r - batch mean": [], "per-prompt advantage A": []}
for batch in batch_sizes:
    cos = {k: [] for k in cosine}
    for _ in range(repeats):
        c, a, r = draw_batch(batch, gen)
        adv = clip_advantages(tracker.update([prompts[i] for i in c], r))  # A, clipped to [-5, 5]
        for k, w in zip(cosine, (r, r - r.mean(), adv)):
            cos[k].append(torch.cosine_similarity(sf_gradient(c, a, w), true_grad, dim=0).item())
    for k in cosine:
        cosine[k].append(np.mean(cos[k]))

plt.figure(figsize=(5.5, 3.5))
for k, v in cosine.items():
    plt.semilogx(batch_sizes, v, "o-", label=k)
plt.xticks(batch_sizes, [str(b) for b in batch_sizes])
plt.ylim(-0.05, 1.0)
plt.xlabel("batch size B")
plt.ylabel("mean cos(ĝ, ∇J)")
plt.title("does one batch's gradient point uphill?", fontsize=9)
plt.legend(fontsize=8)
plt.grid(alpha=0.3)
plt.show()
for k, v in cosine.items():
    print(f"{k:24s}", "  ".join(f"B={b}: {x:5.2f}" for b, x in zip(batch_sizes, v)))

# %% [markdown]
# The ordering is the point. Raw rewards give a gradient that is mostly noise; a batch-mean baseline
# removes the common offset; per-prompt statistics also remove the prompt-to-prompt offsets, leaving only
# the within-prompt differences the policy can act on. All three estimate the same direction, but for a
# given accuracy the better estimator needs many fewer samples, i.e. many fewer denoising chains.

# %%
raw, adv = np.array(cosine["raw reward r"]), np.array(cosine["per-prompt advantage A"])
nbutils.check((adv > raw + 0.2).all() and adv[-1] > 0.8,
              "per-prompt advantages point uphill far better than raw rewards at every batch size")

# %% [markdown]
# The code of this section, as it runs in the repository:

# %%
nbutils.show_source(PerPromptStatTracker.update, clip_advantages)
