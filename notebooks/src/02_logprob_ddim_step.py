# ruff: noqa: E402, E501
# (a notebook source: imports follow the setup cell; markdown tables and LaTeX lines do not wrap)
# %% [markdown]
# # 2. The log-probability of one denoising step
#
# Notebook 1 turned sampling into an MDP whose policy is one denoising step,
# $\pi(a_t\mid s_t) = p_\theta(x_{t-1}\mid x_t, c)$. A policy gradient needs $\log\pi$ and its gradient
# for the actions that were actually taken. This notebook derives the DDIM step as a Gaussian, checks the
# project's `sampler.ddim_step_with_logprob` against diffusers and against `torch.distributions.Normal`,
# and then explains the one non-textbook choice in it: the log-density is *averaged* over pixels.

# %%
SCALE = "tiny"  # "tiny": CPU, offline, ~20 s. "paper": SD v1.4; needs the Hugging Face hub and a GPU.

# %%
import nbutils

SCALE = nbutils.use_scale(SCALE)  # DDPO_SCALE in the environment wins
import copy
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

import sampler

if SCALE == "tiny":
    import tiny

    model = tiny.load_tiny()
else:
    model = nbutils.load_paper_model()  # SD v1.4 + LoRA, fp32
unet, scheduler = model.unet, model.scheduler
C, H, W = model.latent_shape
D = C * H * W
print(f"{model.name}: x_t has C*H*W = {C}*{H}*{W} = {D} dimensions; prediction: {scheduler.config.prediction_type}")

# %% [markdown]
# ## 2.1 DDIM as a Gaussian policy
#
# The forward marginals are $q(x_t\mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}\,x_0, (1-\bar\alpha_t)I)$.
# DDIM (Song et al. 2021) observes that many reverse conditionals are consistent with these marginals,
# one for each choice of a variance $\sigma_t^2$:
#
# $$q_\sigma(x_{t-1}\mid x_t, x_0) = \mathcal N\Big(\sqrt{\bar\alpha_{t-1}}\,x_0
#   + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\;\frac{x_t-\sqrt{\bar\alpha_t}\,x_0}{\sqrt{1-\bar\alpha_t}},\ \sigma_t^2 I\Big).$$
#
# *Why the marginals survive.* If $x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon$, the
# fraction above is exactly $\varepsilon$, and a draw is
# $x_{t-1} = \sqrt{\bar\alpha_{t-1}}x_0 + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\,\varepsilon + \sigma_t z$
# with $z\sim\mathcal N(0,I)$ independent of $\varepsilon$. The two noise terms add up to variance
# $(1-\bar\alpha_{t-1}-\sigma_t^2)+\sigma_t^2 = 1-\bar\alpha_{t-1}$: the right marginal at $t-1$.
#
# *The sampler.* At sampling time $x_0$ and $\varepsilon$ are unknown; the network supplies estimates
# $\hat\varepsilon = \varepsilon_\theta(x_t,t,c)$ and $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}$
# (a $v$-predicting network like the tiny one gives both through
# $\hat x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\,v_\theta$ and $\hat\varepsilon = \sqrt{\bar\alpha_t}\,v_\theta + \sqrt{1-\bar\alpha_t}\,x_t$). Plugging them in gives the DDIM mean
#
# $$\mu_\theta(x_t,t,c) = \sqrt{\bar\alpha_{t-1}}\;\hat x_0 + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\;\hat\varepsilon .$$
#
# (A scheduler with `clip_sample`, as the tiny model's, clips $\hat x_0$ to $[-1, 1]$ here and keeps the
# $\hat\varepsilon$ of the unclipped one, as diffusers does: the mean is then no longer the posterior's at the
# clipped $\hat x_0$, and a clipped pixel passes no gradient to the network through $\hat x_0$. Still one
# Gaussian per step. SD's scheduler never clips in latent space.)
#
# *The variance.* DDIM interpolates with $\eta$:
#
# $$\sigma_t = \eta\,\sqrt{\frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\Big(1-\frac{\bar\alpha_t}{\bar\alpha_{t-1}}\Big)} .$$
#
# $\eta = 0$ is deterministic DDIM (no density, so no policy gradient). $\eta = 1$, the paper's choice, is
# the DDPM posterior variance $\tilde\beta_t$ on the sampling grid. Here $t-1$ means the *next timestep of
# the sampling grid*, e.g. 979 after 999 with 50 steps, not literally $t-1$. So DDIM with $\eta = 1$ on the
# strided $T$-step grid is the ancestral sampler the paper names: DDPM's reverse process, run on the grid
# with $\hat x_0$ plugged into the posterior $q(x_{t-1}\mid x_t, x_0)$.
#
# *Why the policy is Gaussian.* Given the state $(c, t, x_t)$, $\mu_\theta$ is one deterministic network
# evaluation (classifier-free guidance included) and $\sigma_t$ is a number, so the only randomness is
# $z$: the action $x_{t-1} = \mu_\theta + \sigma_t z$ is an isotropic Gaussian, the paper's Eq. 2 (Sec. 3.1). Its log-density
#
# $$\log p_\theta(x_{t-1}\mid x_t, c) = -\frac{\|x_{t-1}-\mu_\theta\|^2}{2\sigma_t^2} - D\log\sigma_t - \frac D2\log 2\pi$$
#
# is cheap and exact, and $\theta$ enters only through $\mu_\theta$ (the action is data; $\sigma_t$ is fixed).
#
# **Check 1.** At three timesteps of a real tiny-model trajectory, `sampler.ddim_step_with_logprob` and
# `diffusers.DDIMScheduler.step` are given the same model output and the same noise $z$.

# %%
prompts = ["a cat", "a dog", "a fish", "a fox"]
embeds, negative = model.encode_prompts(prompts), model.encode_prompts([""])
NUM_STEPS, GUIDANCE, ETA = 50, 5.0, 1.0
traj = sampler.sample_with_logprob(unet, scheduler, embeds, negative, num_steps=NUM_STEPS,
                                   guidance_scale=GUIDANCE, eta=ETA, latent_shape=model.latent_shape,
                                   generator=torch.Generator().manual_seed(0))

abar = scheduler.alphas_cumprod.double()
step_gap = scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def abar_pair(t: int) -> tuple[float, float]:
    """alphā_t and alphā_{t-1} on the sampling grid (alphā_{t-1} = final_alpha_cumprod past the end)."""
    t_prev = t - step_gap
    return abar[t].item(), (abar[t_prev].item() if t_prev >= 0 else scheduler.final_alpha_cumprod.item())


all_close, results = True, {}
for j in (0, 25, NUM_STEPS - 1):  # first, middle and last step of the chain
    t = int(traj.timesteps[j])
    x_t = traj.latents[:, j]  # (B, C, H, W)
    with torch.no_grad():
        out = sampler.guided_model_output(unet, x_t, t, embeds, negative, GUIDANCE)  # (B, C, H, W)
    seed = 100 + j
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(seed))  # the noise both will use
    ours, log_prob = sampler.ddim_step_with_logprob(scheduler, out, t, x_t, eta=ETA,
                                                    generator=torch.Generator().manual_seed(seed))
    theirs = scheduler.step(out, t, x_t, eta=ETA, variance_noise=z).prev_sample
    mean = scheduler.step(out, t, x_t, eta=ETA, variance_noise=torch.zeros_like(z)).prev_sample  # z = 0
    a_t, a_prev = abar_pair(t)
    sigma = ETA * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))  # sigma_t from the formula above
    sigma_diffusers = ((theirs - mean) / z).mean().item()  # diffusers' sigma_t: (mu + sigma z - mu) / z
    err = (ours - theirs).abs().max().item()
    # (at the tiny model's last step sigma_t = 0: set_alpha_to_one=True makes it deterministic, notebook 4)
    all_close &= err < 1e-5 and abs(sigma - sigma_diffusers) <= 1e-4 * sigma + 1e-7
    results[j] = dict(t=t, x_t=x_t, out=out, x_prev=ours, log_prob=log_prob, mean=mean, sigma=sigma)
    print(f"step j={j:2d} (t={t:3d})  max|ours - diffusers| = {err:.2e}   sigma_t = {sigma:.5f} "
          f"(formula) vs {sigma_diffusers:.5f} (diffusers)")
nbutils.check(all_close, "ddim_step_with_logprob == DDIMScheduler.step under the same noise, and sigma_t agrees")

# %% [markdown]
# **Check 2.** The log-probability. The mean $\mu_\theta$ is diffusers' step with $z = 0$, the standard
# deviation is $\sigma_t$ above; `torch.distributions.Normal` then gives per-pixel log-densities, which we
# average over the $C\cdot H\cdot W$ dimensions (next section says why) and compare with the sampler's.

# %%
ok = True
for res in results.values():
    if res["sigma"] == 0:  # the deterministic last step: no density; the sampler returns log-prob 0
        ok &= bool((res["log_prob"] == 0).all()) and torch.equal(res["x_prev"], res["mean"])
        print(f"t={res['t']:3d}  sigma_t = 0: deterministic, x_(t-1) = mu_theta, log-prob {res['log_prob'].tolist()}")
        continue
    normal = torch.distributions.Normal(res["mean"].double(), res["sigma"])
    reference = normal.log_prob(res["x_prev"].double()).mean(dim=(1, 2, 3))  # (B,) averaged over C,H,W
    err = (reference - res["log_prob"].double()).abs().max().item()
    ok &= err < 1e-4
    print(f"t={res['t']:3d}  sampler: {res['log_prob'].numpy().round(4)}   Normal: {reference.numpy().round(4)}"
          f"   max diff {err:.1e}")
nbutils.check(ok, "sampler log-prob == Normal(mu_theta, sigma_t).log_prob(x_{t-1}) averaged over C,H,W")

# %% [markdown]
# The code of the derivation above, as it runs in the repository:

# %%
nbutils.show_source(sampler.ddim_step_mean, sampler.gaussian_log_prob, sampler.ddim_step_with_logprob)

# %% [markdown]
# The log-probs sit near $-\log\sigma_t - \tfrac12\log 2\pi - \tfrac12$ (the average of $-z^2/2$ is
# $-1/2$), which is why they grow as $\sigma_t$ shrinks towards the end of the chain.
#
# ## 2.2 Averaged, not summed
#
# The exact log-density of an action is a **sum** over $D$ dimensions. The authors' code, and this
# project (`# DEVIATION:` in `sampler.py`), use the **mean** instead. Why that matters shows up in the
# importance ratio $\rho = \exp(\log p_\theta - \log p_{\theta_\text{old}})$ that DDPO$_\text{IS}$ clips to
# $1 \pm \epsilon$ with $\epsilon = 10^{-4}$ (notebook 4).
#
# Write $u_i = (\mu_{\theta,i} - \mu_{\theta_\text{old},i})/\sigma_t$ for how far a parameter update moves
# the mean in dimension $i$, in units of $\sigma_t$. For an action drawn from the old policy,
# $x_i = \mu_{\text{old},i} + \sigma_t z_i$, the per-dimension log-ratio is
#
# $$\Delta_i = \frac{z_i^2}{2} - \frac{(z_i - u_i)^2}{2} = z_i u_i - \frac{u_i^2}{2}.$$
#
# Summed over dimensions, $\sum_i \Delta_i$ has standard deviation about $\sqrt D\,\|u\|_\text{rms}$, so it
# **grows** with the image size; averaged, $\frac1D\sum_i\Delta_i$ has standard deviation about
# $\|u\|_\text{rms}/\sqrt D$ and **shrinks**. The ratio of the two is exactly $D$.
#
# **Experiment.** Move every weight of the model by $3\cdot10^{-4}$ (random sign), about the size of one
# Adam step at the paper's learning rate, rescore the same recorded transitions with
# `sampler.recompute_log_prob`, and compare ratios built from averaged and from summed log-probs. The
# summed log-prob is $D$ times the averaged one, so no second implementation is needed.

# %%
B, T = traj.log_probs.shape
j_idx = torch.arange(T).repeat(B)  # (B*T,): step index of each transition
b_idx = torch.arange(B).repeat_interleave(T)  # (B*T,): sample index of each transition
x_t = traj.latents[b_idx, j_idx]  # (B*T, C, H, W)
x_prev = traj.latents[b_idx, j_idx + 1]  # (B*T, C, H, W)
t_all = traj.timesteps[j_idx]  # (B*T,)

perturbed = copy.deepcopy(unet)
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for p in perturbed.parameters():
        p.add_(3e-4 * torch.randn(p.shape, generator=g).sign())


def rescore(net):
    with torch.no_grad():
        return sampler.recompute_log_prob(net, scheduler, x_t, x_prev, t_all, embeds[b_idx], negative,
                                          GUIDANCE, ETA)  # (B*T,) averaged log-probs


old_avg, new_avg = rescore(unet), rescore(perturbed)
print(f"max |rescored - recorded| = {(old_avg - traj.log_probs[b_idx, j_idx]).abs().max():.1e}")
nbutils.check(torch.allclose(old_avg, traj.log_probs[b_idx, j_idx], rtol=0, atol=1e-5),
              "rescoring with unchanged weights reproduces the recorded log-probs (ratio 1)")

log_ratio_avg = (new_avg - old_avg).double()  # log rho with averaged log-probs, (B*T,)
log_ratio_sum = D * log_ratio_avg  # with summed log-probs: sum_i = D * mean_i
eps = 1e-4
for name, lr in (("averaged", log_ratio_avg), ("summed", log_ratio_sum)):
    rho = lr.exp()
    print(f"{name:8s}: |log rho| median {lr.abs().median():.2e}, max {lr.abs().max():.2e};  "
          f"rho in [{rho.min():.4g}, {rho.max():.4g}];  outside 1 ± 1e-4: {((rho - 1).abs() > eps).float().mean():.0%}")

# %% [markdown]
# Same parameter change, same transitions. With averaging, a typical $|\log\rho|$ is $10^{-5}$ to
# $10^{-4}$, the scale of $\epsilon = 10^{-4}$: the clip range catches the ratios that moved most (mostly
# the late, low-noise steps) and leaves the rest alone. With summing, the same update moves the tiny
# model's ratios by factors of about $e^{\pm 0.2}$ typically and up to $e^{\pm 2}$ (the printed range), and
# almost every one would land outside a trust region of $1 \pm 10^{-4}$.
#
# At Stable Diffusion's $D = 4\cdot 64\cdot 64 = 16384$ the gap widens: the sum's spread grows like
# $\sqrt D$, the mean's shrinks like $1/\sqrt D$. Below, the measured per-transition spreads are scaled to
# $D = 16384$ under the independence approximation of the formula above, and as if the per-dimension shift
# $\|u\|_\text{rms}$ were the same there (another model, trained through LoRA: this illustrates how the two
# ratios scale with $D$, it does not predict SD's values).

# %%
D_SD = 4 * 64 * 64
spread_avg = log_ratio_avg.std().item()  # measured at D
u_rms = spread_avg * math.sqrt(D)  # ~ ||u||_rms, from std(mean) = ||u||_rms / sqrt(D)
print(f"measured at D={D}: std(log rho, averaged) = {spread_avg:.2e}  ->  ||u||_rms ≈ {u_rms:.2e}")
for d in (D, D_SD):
    print(f"D = {d:5d}: std(log rho) ≈ {u_rms / math.sqrt(d):.1e} (averaged)   vs   "
          f"{u_rms * math.sqrt(d):.2f} (summed)  ->  typical summed ratio e^±{u_rms * math.sqrt(d):.2f}")

plt.figure(figsize=(6.5, 3))
bins = np.logspace(-8, 2, 61)
plt.hist(log_ratio_avg.abs().numpy(), bins=bins, alpha=0.7, label="log-probs averaged over C,H,W")
plt.hist(log_ratio_sum.abs().numpy(), bins=bins, alpha=0.7, label="log-probs summed over C,H,W")
plt.axvline(eps, color="k", ls="--", lw=1, label="clip range eps = 1e-4")
plt.xscale("log")
plt.xlabel("|log rho| per transition (same update, same transitions)")
plt.ylabel("count")
plt.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# **Reading the clip range.** Averaging divides every log-ratio by $D$, so clipping the averaged ratio to
# $1\pm\epsilon$ is (to first order) clipping the true per-step log-ratio to $\pm D\epsilon$:
#
# $$|\log\rho_\text{avg}| \le \epsilon \iff |\log\rho_\text{true}| \le D\,\epsilon \approx 1.6 \text{ at } D = 16384 .$$
#
# So $\epsilon = 10^{-4}$ is not a strangely tiny trust region: in true-density terms it lets each step's
# ratio move within about $e^{\pm 1.6}$. PPO's usual $\epsilon = 0.2$ applied to averaged log-probs would
# allow $e^{\pm 3277}$, i.e. no trust region at all.
#
# **The price of averaging.** Averaged log-probs are the true ones divided by $D$, and the ratio the
# loss sees is $\rho_\text{avg} = \rho_\text{true}^{1/D}$. What that does depends on where the gradient
# is taken:
#
# * DDPO$_\text{SF}$, and DDPO$_\text{IS}$'s first minibatch step (at $\theta_\text{old}$, where
#   $\rho_\text{avg} = \rho_\text{true} = 1$): the gradient is exactly $1/D$ of the true one. The
#   learning rate absorbs that, and the direction does not change.
# * DDPO$_\text{IS}$'s later minibatch steps: a $\rho_\text{true}$ of $e^{\pm 1}$ becomes
#   $\rho_\text{avg} = e^{\pm 1/D} \approx 1$, so weighting by $\rho_\text{avg}$ corrects almost
#   nothing. The importance correction is effectively gone: what is left is the gradient at $\theta$ of
#   samples drawn by the stale policy $\theta_\text{old}$, unreweighted, with clipping acting as a
#   trust-region mask (notebook 4).
#
# The KL diagnostic shrinks further. `approx_kl` $= \frac12\mathbb E[(\log\rho_\text{avg})^2]$, and
# $\log\rho_\text{avg} = \frac1D\sum_i\Delta_i$ has variance $\sum_i u_i^2/D^2 = 2\,\mathrm{KL}/D^2$, where
# $\mathrm{KL} = \sum_i u_i^2/2$ is the true KL of the step. So `approx_kl` $\approx \mathrm{KL}/D^2$: the
# per-dimension KL, $\mathrm{KL}/D$, divided by $D$ once more (notebook 4 checks this on a toy step).

# %%
print(f"D * eps at SD scale: {D_SD * eps:.2f}   (e^±{D_SD * eps:.2f} = [{math.exp(-D_SD * eps):.2f}, "
      f"{math.exp(D_SD * eps):.2f}])")

# The summed log-ratio used above was D times the averaged one. Check that against an independent
# computation of the exact (summed) log-density with torch.distributions.Normal, at the middle step.
j = 25
t = int(traj.timesteps[j])
x_j, x_next = traj.latents[:, j], traj.latents[:, j + 1]  # (B, C, H, W)
exact = []
for net in (unet, perturbed):
    with torch.no_grad():
        out = sampler.guided_model_output(net, x_j, t, embeds, negative, GUIDANCE)
    mean = scheduler.step(out, t, x_j, eta=ETA, variance_noise=torch.zeros_like(x_j)).prev_sample
    exact.append(torch.distributions.Normal(mean.double(), results[25]["sigma"]).log_prob(x_next.double())
                 .sum(dim=(1, 2, 3)))  # (B,) the true log-density: a sum over C,H,W
exact_log_ratio = exact[1] - exact[0]
ours = log_ratio_sum[j_idx == j]  # (B,) D * averaged log-ratio from recompute_log_prob
print("exact summed log-ratio:", exact_log_ratio.numpy().round(4))
print("D * averaged log-ratio:", ours.numpy().round(4))
nbutils.check(torch.allclose(exact_log_ratio, ours, rtol=0, atol=1e-3),
              "D * (averaged log-ratio) == exact summed log-ratio from Normal.log_prob")
