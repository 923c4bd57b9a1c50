# ruff: noqa: E402, E501
# (a notebook source: imports follow the setup cell; markdown tables and LaTeX lines do not wrap)
# %% [markdown]
# # 4. Importance sampling and the clipped surrogate (DDPO$_\text{IS}$)
#
# DDPO$_\text{SF}$ (notebook 3) is on-policy: its gradient is only valid at the parameters that produced
# the samples, so every batch of 50-step chains buys exactly one optimizer step. DDPO$_\text{IS}$ reuses a
# batch for several steps by reweighting it with an importance ratio, and keeps those steps honest with
# PPO's clipping. This notebook derives the ratio, checks that `ddpo_is_loss` and `ddpo_sf_loss` have the
# same gradient at $\theta = \theta_\text{old}$ on the real tiny model, maps out where the clipped loss
# has zero gradient, and recomputes the two diagnostics the loop logs, `approx_kl` and `clipfrac`.

# %%
SCALE = "tiny"  # "tiny": CPU, offline, ~30 s. "paper": SD v1.4 + LoRA; needs the Hugging Face hub and a GPU.

# %%
import nbutils

SCALE = nbutils.use_scale(SCALE)  # DDPO_SCALE in the environment wins
import copy
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

import rewards
import sampler
from ddpo_min import PerPromptStatTracker, clip_advantages, ddpo_is_loss, ddpo_sf_loss

if SCALE == "tiny":
    import tiny

    model = tiny.load_tiny()
    model.unet.requires_grad_(True)  # full fine-tuning at tiny scale
else:
    model = nbutils.load_paper_model()  # SD v1.4 + LoRA, fp32
unet, scheduler = model.unet, model.scheduler

# %% [markdown]
# ## 4.1 The importance-sampling identity
#
# For two densities $p$ and $q$ with $q > 0$ wherever $p\,f \ne 0$:
#
# $$\mathbb E_{x\sim p}[f(x)] = \int p(x) f(x)\,dx = \int q(x)\,\frac{p(x)}{q(x)}\,f(x)\,dx
#   = \mathbb E_{x\sim q}\Big[\frac{p(x)}{q(x)}\,f(x)\Big].$$
#
# Samples from $q$ can stand in for samples from $p$ if each is weighted by $\rho = p/q$. A quick check with
# $p = \mathcal N(0.3, 1)$, $q = \mathcal N(0, 1)$ and $f(x) = x^2$, for which $\mathbb E_p[f] = 0.3^2 + 1$:

# %%
g = torch.Generator().manual_seed(0)
x = torch.randn(200_000, generator=g, dtype=torch.float64)  # x ~ q
p, q = torch.distributions.Normal(0.3, 1.0), torch.distributions.Normal(0.0, 1.0)
weighted = torch.exp(p.log_prob(x) - q.log_prob(x)) * x**2  # rho(x) f(x)
estimate, se = weighted.mean().item(), weighted.std().item() / math.sqrt(len(x))
print(f"E_q[rho f] = {estimate:.4f} ± {se:.4f}   exact E_p[f] = {0.3**2 + 1:.4f}")
nbutils.check(abs(estimate - 1.09) < 4 * se, "importance-weighted average from q == expectation under p")

# %% [markdown]
# ## 4.2 The importance-sampled policy gradient
#
# Apply the identity to each step of the SF gradient, with $q$ the policy that *sampled* the batch
# ($\theta_\text{old}$) and $p$ the policy being *optimised* ($\theta$):
#
# $$\hat g_\text{IS} = \mathbb E_{\tau\sim p_{\theta_\text{old}}}\Big[\sum_t
#   \underbrace{\frac{p_\theta(x_{t-1}\mid c,t,x_t)}{p_{\theta_\text{old}}(x_{t-1}\mid c,t,x_t)}}_{\rho_t}
#   \,\nabla_\theta\log p_\theta(x_{t-1}\mid c,t,x_t)\; r(x_0,c)\Big].$$
#
# (Reweighting each step by its own ratio, rather than the whole trajectory by the product, is the usual
# PPO approximation: it ignores that $\theta$ would also change the states visited. It is exact at
# $\theta = \theta_\text{old}$ and good nearby, which is what the trust region below enforces.)
#
# Since $\rho\,\nabla_\theta\log p_\theta = \nabla_\theta\rho$ (because $\nabla\rho = \rho\,\nabla\log p_\theta$),
# the surrogate whose gradient is $-\hat g_\text{IS}$ is simply $-\mathbb E[\rho\,A]$, with
# $\rho = \exp(\log p_\theta - \log p_{\theta_\text{old}})$ computed from log-probs for stability. At
# $\theta = \theta_\text{old}$, $\rho = 1$ and $\nabla\rho = \nabla\log p_\theta$, so the two estimators
# coincide **exactly**: the first minibatch step of DDPO$_\text{IS}$ is a DDPO$_\text{SF}$ step.
#
# **Caveat: averaged log-probs.** This project, like the authors' code, averages log-probs over the
# $D = C\cdot H\cdot W$ dimensions (notebook 2), so the ratio in the loss is
# $\rho_\text{avg} = \rho_\text{true}^{1/D}$. At $\theta_\text{old}$ the identity above holds (the gradient
# is scaled by $1/D$). From the second minibatch on it does not: where $\rho_\text{true}$ has moved to
# $e^{\pm 1}$, $\rho_\text{avg} = e^{\pm 1/D}\approx 1$, so the factor $\rho_\text{avg}$ corrects almost
# nothing and the importance correction is effectively gone. What is left is a stale-policy gradient (the
# score at $\theta$ of samples drawn by $\theta_\text{old}$, unreweighted) with clipping (§4.3) as a
# trust-region mask.
#
# **Check.** Sample a batch with the tiny model, compute rewards (JPEG compressibility) and advantages,
# rescore one denoising step with gradients (`sampler.recompute_log_prob`), and compare the gradients of
# `ddpo_is_loss` and `ddpo_sf_loss` with respect to every UNet weight.

# %%
PROMPTS = ["a cat", "a dog", "a frog", "a whale"] * 2
NUM_STEPS, GUIDANCE, ETA = 20, 5.0, 1.0
embeds, negative = model.encode_prompts(PROMPTS), model.encode_prompts([""])
traj = sampler.sample_with_logprob(unet, scheduler, embeds, negative, num_steps=NUM_STEPS,
                                   guidance_scale=GUIDANCE, eta=ETA, latent_shape=model.latent_shape,
                                   generator=torch.Generator().manual_seed(0))
r, _ = rewards.jpeg_compressibility(model.decode(traj.x0), PROMPTS)  # (B,)
adv = torch.as_tensor(clip_advantages(PerPromptStatTracker().update(PROMPTS, r)))  # (B,) batch fallback
print("rewards:", r.round(3), "\nadvantages:", adv.numpy().round(2))

j = 10  # one denoising step; the loop does this for every step and accumulates
t_j = traj.timesteps[j].expand(len(PROMPTS))  # (B,)


def grads(loss_fn) -> torch.Tensor:
    unet.zero_grad(set_to_none=True)
    log_prob = sampler.recompute_log_prob(unet, scheduler, traj.latents[:, j], traj.latents[:, j + 1], t_j,
                                          embeds, negative, GUIDANCE, ETA)  # (B,) with grad
    loss_fn(log_prob).backward()
    return torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])


old_log_prob = traj.log_probs[:, j]  # recorded at sampling time, under theta_old
g_sf = grads(lambda lp: ddpo_sf_loss(lp, adv))
g_is = grads(lambda lp: ddpo_is_loss(lp, old_log_prob, adv, clip_range=1e-4)[0])
rel = ((g_is - g_sf).norm() / g_sf.norm()).item()
print(f"{g_sf.numel()} gradient entries; ||g_IS - g_SF|| / ||g_SF|| = {rel:.1e}")
nbutils.check(rel < 1e-3, "at theta = theta_old, grad ddpo_is_loss == grad ddpo_sf_loss on the tiny UNet")

# %% [markdown]
# (Any residual would be float32 rescoring noise: recomputed log-probs reproduce the recorded ones to
# about $10^{-6}$ or better, so $\rho$ is 1 to that precision.)
#
# **The policy being trained is the guided one.** The sampler drew every action from the
# classifier-free-guided Gaussian, whose mean is built from $o_u + w\,(o_c - o_u)$ (the network's
# unconditional and conditional outputs, $w = 5$ here), and the recorded log-probs are of that step. So
# the MDP's policy $p_\theta$ is the guided step, and rescoring must apply the same guidance (the negative
# prompt and $w$ go into `recompute_log_prob`). Rescored without guidance, the same weights define a
# different Gaussian, and $\rho \ne 1$ already at $\theta_\text{old}$: the first step would no longer be
# a DDPO$_\text{SF}$ step, and the clip would see movement that no update made.

# %%
x_j, x_next = traj.latents[:, j], traj.latents[:, j + 1]  # (B, C, H, W) each
with torch.no_grad():
    lp_guided = sampler.recompute_log_prob(unet, scheduler, x_j, x_next, t_j, embeds, negative,
                                           GUIDANCE, ETA)  # as sampled
    lp_cond = sampler.recompute_log_prob(unet, scheduler, x_j, x_next, t_j, embeds, None,
                                         1.0, ETA)  # the conditional prediction alone
for name, lp in (("with CFG (w = 5)", lp_guided), ("without CFG", lp_cond)):
    print(f"rescored {name:16s}: |log rho| at theta_old in [{(lp - old_log_prob).abs().min():.1e}, "
          f"{(lp - old_log_prob).abs().max():.1e}]")
nbutils.check(bool((lp_guided - old_log_prob).abs().max() < 1e-5)
              and bool((lp_cond - old_log_prob).abs().min() > 1e-4),
              "at theta_old: guided rescoring gives rho = 1, unguided puts every rho past 1 ± 1e-4")

# %% [markdown]
# ## 4.3 Clipping: a trust region on the ratio
#
# After a few steps $\theta$ drifts from $\theta_\text{old}$, the per-step ratio approximation degrades, and
# an unconstrained $-\rho A$ would keep pushing $\rho$ up for good samples without limit. PPO's clipped
# surrogate, which DDPO$_\text{IS}$ uses, is
#
# $$\mathcal L^\text{clip} = \frac1B\sum_b \max\big(-A_b\,\rho_b,\; -A_b\,\operatorname{clip}(\rho_b, 1-\epsilon, 1+\epsilon)\big).$$
#
# The max (a min of the two *objectives*) keeps the more pessimistic branch. Case by case:
#
# | | $\rho < 1-\epsilon$ | $1-\epsilon\le\rho\le 1+\epsilon$ | $\rho > 1+\epsilon$ |
# |---|---|---|---|
# | $A > 0$ (make likelier) | gradient $-A\rho\,\nabla\log p$: keep pushing | gradient | **clipped: zero gradient** (already pushed far enough) |
# | $A < 0$ (make rarer) | **clipped: zero gradient** | gradient | gradient: keep pushing back |
#
# A sample stops contributing once its ratio has moved beyond $1\pm\epsilon$ *in the direction its
# advantage wants*; moves in the wrong direction are always corrected. Below, `ddpo_is_loss` is evaluated
# on a grid of ratios (one sample at a time, $\epsilon = 0.2$ so the picture is readable; the paper uses
# $10^{-4}$ on averaged log-probs, see notebook 2), with autograd giving the slope.

# %%
eps = 0.2
rho_grid = torch.linspace(0.5, 1.5, 401, dtype=torch.float64)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=False)
zero_grad_ok = True
for ax, a_val in zip(axes, (1.0, -1.0)):
    losses, slopes = [], []
    for rho in rho_grid:
        log_prob = rho.log().reshape(1).clone().requires_grad_(True)  # log p_theta, with log p_old = 0
        loss, _ = ddpo_is_loss(log_prob, torch.zeros(1, dtype=torch.float64), torch.tensor([a_val]), eps)
        loss.backward()
        losses.append(loss.item())
        slopes.append(log_prob.grad.item())
    losses, slopes = np.array(losses), np.array(slopes)
    zero = slopes == 0
    expected_zero = (rho_grid > 1 + eps).numpy() if a_val > 0 else (rho_grid < 1 - eps).numpy()
    zero_grad_ok &= bool((zero == expected_zero).all())
    ax.plot(rho_grid, losses, lw=2, label="ddpo_is_loss")
    ax.plot(rho_grid, -a_val * rho_grid, "k:", lw=1, label="-A ρ (unclipped)")
    ax.fill_between(rho_grid, losses.min() - 0.1, losses.max() + 0.1, where=zero, color="tab:red", alpha=0.15,
                    label="zero gradient")
    ax.axvline(1 - eps, color="gray", lw=0.8)
    ax.axvline(1 + eps, color="gray", lw=0.8)
    ax.set_title(f"A = {a_val:+.0f}", fontsize=10)
    ax.set_xlabel("ρ = p_θ / p_θold")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
fig.tight_layout()
plt.show()
nbutils.check(zero_grad_ok, "zero-gradient regions are exactly {A>0, rho>1+eps} and {A<0, rho<1-eps}")

# %% [markdown]
# The code of the derivation above, as it runs in the repository:

# %%
nbutils.show_source(ddpo_is_loss)

# %% [markdown]
# ## 4.4 The diagnostics: `approx_kl` and `clipfrac`
#
# Two numbers tell you whether the trust region is doing its job:
#
# * `clipfrac` $= \frac1B\sum_b \mathbb 1[|\rho_b - 1| > \epsilon]$, the share of transitions outside the
#   clip range, on either side. Only those that left in their advantage's direction ($A > 0$,
#   $\rho > 1+\epsilon$ or $A < 0$, $\rho < 1-\epsilon$) lose their gradient (§4.3); the others are still
#   pushed back. So `clipfrac` bounds the share of zeroed gradients from above. Near 0: the clip never
#   binds, the updates are tiny. Near 1: possibly every sample has lost its gradient, and the minibatch
#   steps after the first may barely learn.
# * `approx_kl` $= \frac12\,\mathbb E[(\log\rho)^2]$, a cheap estimate of $\mathrm{KL}(p_{\theta_\text{old}}\,\|\,p_\theta)$.
#   Why it approximates the KL: for one dimension of a Gaussian step whose mean moved by $u\,\sigma_t$,
#   notebook 2 gave $\log\rho = z u - u^2/2$ with $z\sim\mathcal N(0,1)$, so
#   $\mathrm{KL} = \mathbb E[-\log\rho] = u^2/2$ while $\tfrac12\mathbb E[(\log\rho)^2] = u^2/2 + u^4/8$: equal
#   to second order.
#
# **Units of `approx_kl`.** In this project $\log\rho$ is built from averaged log-probs,
# $\log\rho_\text{avg} = \frac1D\sum_i\Delta_i$ over the $D$ dimensions. Its mean is
# $-\frac1{2D}\sum_i u_i^2$ and its variance $\frac1{D^2}\sum_i u_i^2$, so with
# $\mathrm{KL} = \sum_i u_i^2/2$ the true KL of the step,
#
# $$\texttt{approx\_kl} = \tfrac12\mathbb E[\log\rho_\text{avg}^2] = \frac{\mathrm{KL}}{D^2} + \frac12\Big(\frac{\mathrm{KL}}{D}\Big)^2.$$
#
# For a small step (KL well below 2 nats) the first term dominates: `approx_kl` $\approx\mathrm{KL}/D^2$, not
# the per-dimension KL ($\mathrm{KL}/D$) but that divided by $D$ once more ($D = 3072$ for the tiny model,
# 16384 for Stable Diffusion). After a large step the second term takes over. Read it as a relative gauge
# of how far the updates went, to compare between epochs, not as a KL in nats.
# A toy step in $D = 64$ dimensions, with every mean moved by a random $u_i\sigma_t$ (a small step),
# shows the first case; the real update below, the second:

# %%
D_toy, n_toy = 64, 200_000
g = torch.Generator().manual_seed(1)
u = 0.02 * torch.randn(D_toy, generator=g, dtype=torch.float64)  # mean shifts, in units of sigma_t
z = torch.randn(n_toy, D_toy, generator=g, dtype=torch.float64)  # old actions: mu_old + sigma_t z
delta = z * u - u**2 / 2  # per-dimension log-ratios Delta_i, (n, D)
kl_true = (u**2 / 2).sum().item()  # KL(p_old || p_theta) of the whole step: a sum over dimensions
approx_sum = 0.5 * (delta.sum(1) ** 2).mean().item()  # 0.5 E[(log rho)^2] on summed log-probs
approx_avg = 0.5 * (delta.mean(1) ** 2).mean().item()  # on averaged log-probs: what is logged
print(f"true KL {kl_true:.3e}   approx_kl on summed log-probs {approx_sum:.3e}")
print(f"per-dimension KL = KL/D {kl_true / D_toy:.3e}   approx_kl on averaged log-probs "
      f"{approx_avg:.3e}   KL/D^2 {kl_true / D_toy**2:.3e}")
nbutils.check(math.isclose(approx_sum, kl_true, rel_tol=0.03)
              and math.isclose(approx_avg, kl_true / D_toy**2 + (kl_true / D_toy) ** 2 / 2, rel_tol=0.03),
              "approx_kl == KL on summed log-probs, KL / D^2 + (KL / D)^2 / 2 on averaged")

# %% [markdown]
# **Check.** Take one real optimizer step with the DDPO$_\text{IS}$ loss on the batch above (AdamW,
# lr $10^{-4}$, all denoising steps), rescore every transition under the new weights, and compare the info
# that `ddpo_is_loss` returns with the formulas computed by hand.

# %%
B, T = traj.log_probs.shape
j_idx, b_idx = torch.arange(T).repeat(B), torch.arange(B).repeat_interleave(T)  # (B*T,) each
x_t, x_prev = traj.latents[b_idx, j_idx], traj.latents[b_idx, j_idx + 1]  # (B*T, C, H, W)
t_all, old_all, adv_all = traj.timesteps[j_idx], traj.log_probs[b_idx, j_idx], adv[b_idx]  # (B*T,)


def rescore():
    return sampler.recompute_log_prob(unet, scheduler, x_t, x_prev, t_all, embeds[b_idx], negative, GUIDANCE, ETA)


optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
optimizer.zero_grad(set_to_none=True)
loss, info_before = ddpo_is_loss(rescore(), old_all, adv_all, clip_range=1e-4)
loss.backward()
theta_old = copy.deepcopy(unet)  # the policy that sampled, for the KL below
optimizer.step()

with torch.no_grad():
    new_all = rescore()  # (B*T,) log p_theta after one step
_, info = ddpo_is_loss(new_all, old_all, adv_all, clip_range=1e-4)
log_ratio = (new_all - old_all).double()
kl_hand = 0.5 * (log_ratio**2).mean().item()
clipfrac_hand = ((log_ratio.exp() - 1).abs() > 1e-4).double().mean().item()
print(f"before the step: approx_kl = {info_before['approx_kl'].item():.2e}, clipfrac = {info_before['clipfrac'].item():.2f}")
print(f"after one step:  approx_kl = {info['approx_kl'].item():.3e} (function) vs {kl_hand:.3e} (by hand)")
print(f"                 clipfrac  = {info['clipfrac'].item():.3f} (function) vs {clipfrac_hand:.3f} (by hand)")
nbutils.check(math.isclose(info["approx_kl"].item(), kl_hand, rel_tol=1e-4)
              and math.isclose(info["clipfrac"].item(), clipfrac_hand, abs_tol=1e-6),
              "approx_kl and clipfrac from ddpo_is_loss == the formulas by hand")


def policy_mean(net):  # mu of every transition's Gaussian, and sigma_t
    with torch.no_grad():
        out = sampler.guided_model_output(net, x_t, t_all, embeds[b_idx], negative, GUIDANCE)
        return sampler.ddim_step_mean(scheduler, out, t_all, x_t, ETA)


(mu_new, sigma), (mu_old, _) = policy_mean(unet), policy_mean(theta_old)
stochastic = sigma > 0  # the deterministic last step has log-ratio 0 and no KL
kl_per_dim = torch.zeros(len(sigma))  # KL(p_old || p_theta) / D of each transition, (B*T,)
kl_per_dim[stochastic] = sampler.gaussian_kl(mu_old[stochastic], mu_new[stochastic], sigma[stochastic])
D = x_t[0].numel()
expected = kl_per_dim / D + kl_per_dim**2 / 2  # E[0.5 (log rho_avg)^2] of each transition, (B*T,)
print(f"logged approx_kl {info['approx_kl'].item():.3e};  expected from the means: {expected.mean():.3e} = "
      f"{(kl_per_dim / D).mean():.3e} (KL / D^2) + {(kl_per_dim**2 / 2).mean():.3e} ((KL / D)^2 / 2)")
print(f"the step's KL summed over the {D} dimensions: median {(kl_per_dim * D).median():.2g} nats, "
      f"max {(kl_per_dim * D).max():.2g}")
# one draw per transition: the tiny step's large moves make the mean term dominate and the comparison
# tight; a small step (the paper branch's LoRA) leaves only the noisy first term, so it is shown there
if SCALE == "tiny":
    nbutils.check(math.isclose(info["approx_kl"].item(), expected.mean().item(), rel_tol=0.2),
                  "on the real step, approx_kl == its expectation from the two policies' means")

per_step = log_ratio.abs().reshape(B, T)  # |log rho| of each transition, (B, T)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 2.8))
ax1.semilogy(range(T), per_step.median(0).values.clamp(min=1e-12).numpy(), "o-", label="median over samples")
ax1.axhline(1e-4, color="k", ls=":", label="clip range 1e-4")
ax1.set_ylabel("|log ρ| after one update")
ax1.legend(fontsize=7)
ax2.bar(range(T), (per_step > 1e-4).double().mean(0).numpy())
ax2.set_ylabel("clipfrac")
for ax in (ax1, ax2):
    ax.set_xticks(range(0, T, 2))
    ax.set_xlabel(f"denoising step index j (t goes {int(traj.timesteps[0])} → {int(traj.timesteps[-1])})")
fig.suptitle("after one update: how far each step's ratio moved, and which left the trust region", fontsize=9)
fig.tight_layout()
plt.show()
print("median |log rho| per step:", " ".join(f"{v:.0e}" for v in per_step.median(0).values.tolist()))

# %% [markdown]
# Late steps have small $\sigma_t$, so the same change of the mean is many more standard deviations
# there: their ratios move most (the median $|\log\rho|$ printed above grows from about $10^{-5}$ at the
# first step, almost pure noise with $\sigma_t\approx 1$, to a few $10^{-3}$ at the late ones), and after
# this one full-fine-tuning step nearly every step but the first is past the clip range: the clipfrac
# bars saturate, the log-scale panel still ranks them. The exception is the very last step, which never moves: the
# tiny model's scheduler has `set_alpha_to_one=True`, so its last step has $\sigma_t = 0$, is
# deterministic, has log-prob 0 and ratio exactly 1, and the training loop does not train on it
# (`sampler.step_sigmas`). With the default `False`, that step's $\sigma_t$ would be 0.0064 in $[-1,1]$
# pixel units, less than one grey level: its ratio reacted to invisible changes of the mean and, in
# trials, dominated `approx_kl` (0.35 against $1.3\cdot10^{-5}$ without it, in epoch 0 of a design trial:
# RESULTS.md, the tiny defaults' trials) and the gradient. In the training
# loop these two numbers are logged every epoch as `loss/approx_kl` and `loss/clipfrac` (notebook 7 plots
# them for a real run).
