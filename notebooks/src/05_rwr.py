# ruff: noqa: E402, E501
# (a notebook source: imports follow the setup cell; markdown tables and LaTeX lines do not wrap)
# %% [markdown]
# # 5. Reward-weighted regression: a baseline that tilts its own drift toward the reward
#
# Before DDPO, the obvious way to fine-tune a diffusion model on a reward was to keep its usual training
# loss and weight each self-generated sample by how good it is: reward-weighted regression (RWR). The
# paper uses two versions as baselines and finds both clearly worse than DDPO. This notebook computes the
# two weightings with the project's functions, derives why RWR optimises the reward only through *two*
# layers of approximation (arXiv 2305.13301, Sec. 4.2), checks each layer numerically, and runs RWR at tiny scale through
# the training loop. Its last section reads the project's comparison of the four algorithms: at tiny scale
# RWR's gain on compressibility is matched by a control that never sees the reward (fine-tuning on its own
# samples drifts the images that way by itself), and averaged over both JPEG rewards, where that drift
# cancels, both DDPO variants gain more than RWR on every seed (3 to 5 times as much on average).

# %%
SCALE = "tiny"  # "tiny": CPU, offline, ~2 min. "paper": SD v1.4 + LoRA on one GPU; needs the Hugging Face hub.

# %%
import nbutils

SCALE = nbutils.use_scale(SCALE)  # DDPO_SCALE in the environment wins
import json
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

import ddpo_min
import rewards
import sampler
from config import Config
from ddpo_min import diffusion_mse_loss, rwr_weights, sparse_rwr_mask
from loading import load_prompts

if SCALE == "tiny":
    import tiny
    from tools import tiny_data

    model = tiny.load_tiny()
    PROMPTS = tiny.ANIMAL_PROMPTS[:16]
else:
    model = nbutils.load_paper_model()  # SD v1.4 + LoRA, fp32
    PROMPTS = load_prompts("simple_animals")[:16]

# %% [markdown]
# ## 5.1 Two weightings
#
# RWR minimises the diffusion loss (§5.3 derives it from the paper's Eq. 1) on the model's own samples, each weighted by
#
# $$w_\text{RWR}(x_0, c) = \frac1Z\exp\big(\beta\, r(x_0,c)\big)
#   \qquad\text{or}\qquad
#   w_\text{sparse}(x_0,c) = \mathbb 1\big[r(x_0,c)\ge C\big].$$
#
# $\beta$ is an inverse temperature (the reference code uses $\beta = 1/5$) and $Z$ a normaliser; the
# project picks $Z$ so the weights average 1 over the batch (`rwr_weights`), which keeps the loss on the
# scale of the unweighted one. The sparse version keeps the samples above a threshold $C$, here the batch's
# 90th percentile (`sparse_rwr_mask`), and fine-tunes on them unweighted, so only the best samples need to
# be stored.
#
# **Check.** Rewards of real tiny-model samples, both weightings by hand and by the project's functions.

# %%
embeds, negative = model.encode_prompts(PROMPTS), model.encode_prompts([""])
traj = sampler.sample_with_logprob(model.unet, model.scheduler, embeds, negative, num_steps=20, guidance_scale=3.0,
                                   eta=1.0, latent_shape=model.latent_shape,
                                   generator=torch.Generator().manual_seed(0))
r, _ = rewards.jpeg_compressibility(model.decode(traj.x0), PROMPTS)  # r = -(JPEG kB), (B,)
r = torch.as_tensor(r, dtype=torch.float64)
beta = 0.2
w_hand = torch.exp(beta * r) / torch.exp(beta * r).mean()  # exp(beta r) / Z with mean(w) = 1
mask_hand = r >= np.percentile(r.numpy(), 90)  # 1[r >= C], C = 90th percentile (linear interpolation)
print("rewards   :", r.numpy().round(3))
print("w_RWR     :", rwr_weights(r, beta).numpy().round(4))
print("w_sparse  :", sparse_rwr_mask(r, 90.0).int().numpy())
nbutils.check(torch.allclose(rwr_weights(r, beta).double(), w_hand, rtol=1e-5)
              and torch.equal(sparse_rwr_mask(r, 90.0), mask_hand),
              "rwr_weights == exp(beta r)/Z and sparse_rwr_mask == 1[r >= 90th percentile]")

# %% [markdown]
# **The temperature has units.** $\beta$ multiplies a reward measured in whatever units the reward has.
# The paper's JPEG rewards at 512x512 span tens of kB, so $\beta = 0.2$ separates samples sharply. A 32x32
# image is well under 2 kB and the batch spreads over a fraction of a kB: the same $\beta$ gives weights
# that are all within a few percent of 1, i.e. almost plain fine-tuning on the model's own samples. A
# useful way to see it is the effective sample size $\text{ESS} = (\sum w)^2 / \sum w^2$ (the number of
# equally weighted samples the weighted batch is worth):

# %%
def ess(w: torch.Tensor) -> float:
    return (w.sum() ** 2 / (w**2).sum()).item()


betas = [0.2, 1.0, 5.0, 1 / r.std().item(), 5 / r.std().item()]
for b_ in betas:
    w = rwr_weights(r, b_).double()
    print(f"beta = {b_:7.2f}: weights in [{w.min():.3f}, {w.max():.3f}], ESS = {ess(w):5.1f} of {len(r)}")
print(f"reward std in this batch: {r.std():.3f} kB")

# %% [markdown]
# So at tiny scale the loop does not weigh raw rewards: `Config.tiny()` sets `rwr_signal="advantage"` and
# `rwr_beta=1`, i.e. $w = e^{A}/Z$ with $A$ the per-prompt standardised reward of notebook 3 (and sparse
# RWR keeps the top 10% of $A$). That fixes the units (an advantage is in standard deviations) and, like
# DDPO's baseline, rewards what is good *for its prompt* rather than the prompts that are easy to compress.
# It is marked as a deviation in `config.py`; the paper's setting is `rwr_signal="reward"`, $\beta = 0.2$.

# %% [markdown]
# The code of the derivation above, as it runs in the repository:

# %%
nbutils.show_source(rwr_weights, sparse_rwr_mask)

# %% [markdown]
# ## 5.2 First approximation: RWR solves a KL-regularised problem, approximately
#
# Consider the one-step MDP of notebook 1 (state $c$, action $x_0$) and a policy update that trades
# reward against staying close to the sampling policy $\pi_\text{old}$:
#
# $$\max_\pi\ \mathbb E_{a\sim\pi}[r(a)] - \tfrac1\beta\,\mathrm{KL}(\pi\,\|\,\pi_\text{old}).$$
#
# With $\pi^\star(a) = \pi_\text{old}(a)\,e^{\beta r(a)}/Z$ the objective is
# $-\tfrac1\beta\,\mathrm{KL}(\pi\,\|\,\pi^\star) + \tfrac1\beta\log Z$, so $\pi^\star$ is its maximiser.
# A parametric model cannot simply be set to $\pi^\star$; RWR fits it by weighted maximum likelihood on
# samples of $\pi_\text{old}$:
#
# $$\arg\max_\theta\ \mathbb E_{a\sim\pi_\text{old}}\Big[\frac{e^{\beta r(a)}}{Z}\log\pi_\theta(a)\Big]
#   = \arg\max_\theta\ \mathbb E_{a\sim\pi^\star}[\log\pi_\theta(a)]
#   = \arg\min_\theta\ \mathrm{KL}(\pi^\star\,\|\,\pi_\theta).$$
#
# Each round therefore (i) optimises a *regularised* objective, whose solution is only a tilted
# $\pi_\text{old}$, not the reward maximiser; (ii) projects it onto the model family with the "wrong-way"
# KL; (iii) estimates $Z$ from one batch. It approaches the optimum only over many rounds, or as
# $\beta\to\infty$. On a batch, that limit puts all the weight on the single best sample, the arg-max of
# $r$; it is not the sparse rule of §5.1, which keeps the top 10% with equal weights (a milder filter, not
# a limit of $e^{\beta r}/Z$).
#
# **Check** on a case with a closed form: $\pi_\text{old} = \mathcal N(0, 1)$, $r(a) = -(a - 2)^2$. Then
# $\pi^\star\propto e^{-a^2/2 - \beta(a-2)^2}$ is Gaussian with precision $1 + 2\beta$ and mean
# $4\beta/(1+2\beta)$. Weighted maximum likelihood for a Gaussian is the weighted mean and variance, with
# weights from `rwr_weights`:

# %%
g = torch.Generator().manual_seed(0)
a = torch.randn(200_000, generator=g, dtype=torch.float64)  # samples of pi_old
reward_toy = -((a - 2) ** 2)
w = rwr_weights(reward_toy, beta).double()  # exp(beta r) / Z, mean 1
w = w / w.sum()
mle_mean = (w * a).sum().item()
mle_var = (w * (a - mle_mean) ** 2).sum().item()
exact_mean, exact_var = 4 * beta / (1 + 2 * beta), 1 / (1 + 2 * beta)
print(f"weighted MLE: mean {mle_mean:.4f}, var {mle_var:.4f}   closed form pi*: mean {exact_mean:.4f}, var {exact_var:.4f}")
print(f"the reward is maximal at a = 2; one RWR round moves the mean from 0 to {exact_mean:.3f}")
nbutils.check(abs(mle_mean - exact_mean) < 0.01 and abs(mle_var - exact_var) < 0.01,
              "RWR's weighted maximum likelihood recovers pi* = pi_old exp(beta r) / Z")

# %% [markdown]
# ## 5.3 Second approximation: the diffusion loss is not $\log p_\theta(x_0\mid c)$
#
# The weighted maximum likelihood above needs $\log\pi_\theta(x_0\mid c)$, the marginal density of the whole
# denoising chain, which is intractable. RWR for diffusion substitutes the training loss: the paper's Eq. 1
# (Sec. 3.1), implemented as the "simple" loss. First what that loss is.
#
# The forward process adds Gaussian noise step by step. With $\alpha_t = 1-\beta_t$ and
# $\bar\alpha_t = \prod_{s\le t}\alpha_s$ it can be sampled in one shot:
#
# $$q(x_t \mid x_0) = \mathcal N\!\big(\sqrt{\bar\alpha_t}\,x_0,\ (1-\bar\alpha_t) I\big),\qquad
#   x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon .$$
#
# Going back one step *given* $x_0$ is again Gaussian, with a mean that mixes $x_0$ and $x_t$:
#
# $$q(x_{t-1}\mid x_t, x_0) = \mathcal N(\tilde\mu(x_t,x_0), \tilde\beta_t I),\qquad
#   \tilde\mu(x_t, x_0) = \underbrace{\frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1-\bar\alpha_t}}_{a_t}\,x_0
#   + \underbrace{\frac{\sqrt{\alpha_t}\,(1-\bar\alpha_{t-1})}{1-\bar\alpha_t}}_{b_t}\,x_t .$$
#
# The model learns a mean predictor $\mu_\theta(x_t, t, c)$ for this posterior, which is the paper's Eq. 1 (arXiv 2305.13301, Sec. 3.1):
#
# $$\mathcal L_{\text{DDPM}}(\theta) = \mathbb E\big[\,\|\tilde\mu(x_t, x_0) - \mu_\theta(x_t, t, c)\|^2\,\big]
#   \tag{1}$$
#
# Nobody predicts $\mu_\theta$ directly. The network predicts something from which $\hat x_0$ follows, and
# $\mu_\theta = a_t \hat x_0 + b_t x_t$ (same $a_t, b_t$). The tiny model predicts
# $v = \sqrt{\bar\alpha_t}\,\varepsilon - \sqrt{1-\bar\alpha_t}\,x_0$, so that
# $x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\,v$ exactly and
# $\hat x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\,v_\theta$. The $x_t$ terms cancel:
#
# $$\tilde\mu - \mu_\theta = a_t (x_0 - \hat x_0) = a_t\sqrt{1-\bar\alpha_t}\,(v_\theta - v)
#   \quad\Longrightarrow\quad
#   \|\tilde\mu - \mu_\theta\|^2 = a_t^2 (1-\bar\alpha_t)\;\|v_\theta - v\|^2 .$$
#
# (SD v1.4 predicts $\varepsilon$ instead: then $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon_\theta)/\sqrt{\bar\alpha_t}$
# and the weight is $a_t^2 (1-\bar\alpha_t)/\bar\alpha_t$ on $\|\varepsilon_\theta - \varepsilon\|^2$; the cell below
# handles both.)
#
# So Eq. 1 at a fixed $t$ is the "simple" regression loss on $v$ that `ddpo_min.diffusion_mse_loss`
# computes (and that pretrained the tiny model), times a weight that depends only on $t$.
#
# Neither Eq. 1 nor the "simple" loss is the likelihood: the bound below weighs each $t$ differently again.
#
# **Checks.** First, the coefficients $a_t, b_t$ and $\tilde\beta_t$ written above against diffusers'
# `DDPMScheduler`, which computes the same posterior independently. Then take a real image $x_0$ (a fresh
# render of the cat emoji), noise it at three timesteps, compute $\frac{1}{CHW}\|\tilde\mu - \mu_\theta\|^2$
# from the scheduler's $\beta_t, \bar\alpha_t$ and the network's prediction, and compare it with
# $a_t^2(1-\bar\alpha_t)\times$`diffusion_mse_loss`. (The second check alone could not catch wrong $a_t, b_t$:
# $b_t x_t$ cancels in $\tilde\mu - \mu_\theta$ and $a_t$ appears on both sides.)

# %%
unet, scheduler = model.unet, model.scheduler
device = next(unet.parameters()).device
if SCALE == "tiny":
    x0 = tiny.to_model_space(tiny_data.render_prompt_images(["a cat"], seed=1)).to(device)  # (1, 3, 32, 32)
else:
    x0 = torch.randn(1, *model.latent_shape, device=device)  # stand-in latent (paper scale: encode an image)
c = model.encode_prompts(["a cat"])  # (1, L, D)
betas, alphas = scheduler.betas.double(), scheduler.alphas.double()
abar = scheduler.alphas_cumprod.double()

posterior_ok = []
for t_int in (100, 500, 900):  # a_t, b_t, beta-tilde_t by hand vs DDPMScheduler's posterior
    x_t = scheduler.add_noise(x0, torch.randn_like(x0), torch.tensor([t_int], device=device))
    a_t = abar[t_int - 1].sqrt() * betas[t_int] / (1 - abar[t_int])
    b_t = alphas[t_int].sqrt() * (1 - abar[t_int - 1]) / (1 - abar[t_int])
    beta_tilde_t = (1 - abar[t_int - 1]) / (1 - abar[t_int]) * betas[t_int]
    mean_ref, var_ref = nbutils.ddpm_posterior(scheduler, t_int, x0, x_t)
    mean_ours = (a_t * x0.double() + b_t * x_t.double()).cpu()
    # diffusers works in float32: agreement to ~5e-7 (means) and ~3e-5 relative (variance); a 1% error
    # in a_t moves the mean by ~3e-5
    posterior_ok.append(torch.allclose(mean_ours, mean_ref, atol=2e-6)
                        and abs(beta_tilde_t.item() - var_ref.item()) <= 1e-4 * var_ref.item())
    print(f"t={t_int:4d}  a_t {a_t.item():.5f}  b_t {b_t.item():.5f}  beta-tilde {beta_tilde_t.item():.3e} "
          f"(diffusers {var_ref.item():.3e})")
nbutils.check(all(posterior_ok), "a_t, b_t and beta-tilde_t == diffusers' DDPMScheduler posterior at t = 100, 500, 900")

rows = []
for t_int in (100, 500, 900):
    t = torch.tensor([t_int], device=device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t_int)).to(device)  # eps
    with torch.no_grad():
        # the project's Eq. 1 in practice: mean over C,H,W of (v_theta - v)^2 (one sample, so no batch mean)
        simple = ddpo_min.diffusion_mse_loss(unet, scheduler, x0, c, t, noise).double()
        # Eq. 1 written out with the posterior means
        x_t = scheduler.add_noise(x0, noise, t).double()  # sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        out = unet(x_t.float(), t, encoder_hidden_states=c).sample.double()  # v_theta (eps_theta for SD)
    a_t = abar[t_int - 1].sqrt() * betas[t_int] / (1 - abar[t_int])  # weight of x0 in mu-tilde
    b_t = alphas[t_int].sqrt() * (1 - abar[t_int - 1]) / (1 - abar[t_int])  # weight of x_t in mu-tilde
    if scheduler.config.prediction_type == "v_prediction":
        x0_hat = abar[t_int].sqrt() * x_t - (1 - abar[t_int]).sqrt() * out
        weight = a_t**2 * (1 - abar[t_int])
    else:  # epsilon
        x0_hat = (x_t - (1 - abar[t_int]).sqrt() * out) / abar[t_int].sqrt()
        weight = a_t**2 * (1 - abar[t_int]) / abar[t_int]
    mu_tilde = a_t * x0.double() + b_t * x_t  # posterior mean
    mu_theta = a_t * x0_hat + b_t * x_t  # model mean
    eq1 = ((mu_tilde - mu_theta) ** 2).mean()
    rows.append((t_int, eq1.item(), weight.item(), simple.item(), (weight * simple).item()))
    print(f"t={t_int:4d}  Eq.1 = {eq1.item():.4e}   weight = {weight.item():.3e}   "
          f"diffusion_mse_loss = {simple.item():.4f}   product = {(weight * simple).item():.4e}")

nbutils.check(all(abs(e - p) <= 1e-5 * abs(e) + 1e-12 for _, e, _, _, p in rows),
              "Eq. 1 == weight_t * diffusion_mse_loss at t = 100, 500, 900")

# %% [markdown]
# That loss comes from the variational bound
#
# $$-\log p_\theta(x_0\mid c) \le \mathbb E_q\Big[\sum_{t>1}\underbrace{\mathrm{KL}\big(q(x_{t-1}\mid x_t,x_0)\,\|\,p_\theta(x_{t-1}\mid x_t,c)\big)}_{L_{t-1}}\Big] + \dots$$
#
# in which each term, with the model's variance fixed to the posterior's $\tilde\beta_t$, is a squared
# error of means: $L_{t-1} = \|\tilde\mu - \mu_\theta\|^2/(2\tilde\beta_t)$. By the derivation above, that is
# $\lambda_t\,\|v_\theta - v\|^2$ with $\lambda_t = a_t^2(1-\bar\alpha_t)/(2\tilde\beta_t)$ (for an $\varepsilon$-predicting
# model such as SD: $\lambda_t = a_t^2(1-\bar\alpha_t)/(2\bar\alpha_t\tilde\beta_t)$ on $\|\varepsilon_\theta - \varepsilon\|^2$). The practical loss
# (`diffusion_mse_loss`, the "simple" loss everyone implements) drops both weights, Eq. 1's
# $a_t^2(1-\bar\alpha_t)$ (the check above) and the bound's $\lambda_t$, leaving 1 for all $t$: the bound's
# terms *reweighted*, which is no longer a bound on $-\log p_\theta$. So RWR maximises a weighted version of
# this reweighted objective, in place of the likelihood that the KL argument of §5.2 assumed.
#
# **Check.** At one timestep, the bound's term computed as a KL between two Gaussians
# (`torch.distributions.kl_divergence`) equals $\lambda_t\times$ `diffusion_mse_loss`.

# %%
unet, scheduler = model.unet, model.scheduler
betas_s, alphas_s, abar = scheduler.betas.double(), scheduler.alphas.double(), scheduler.alphas_cumprod.double()
a_coef = abar[:-1].sqrt() * betas_s[1:] / (1 - abar[1:])  # a_t for t = 1..999 (weight of x_0 in mu-tilde)
b_coef = alphas_s[1:].sqrt() * (1 - abar[:-1]) / (1 - abar[1:])  # b_t (weight of x_t)
beta_tilde = (1 - abar[:-1]) / (1 - abar[1:]) * betas_s[1:]  # posterior variance
v_pred = scheduler.config.prediction_type == "v_prediction"  # the tiny model; SD v1.4 predicts eps
# ||x_0 - x0_hat||^2 = (1 - abar_t) ||v_theta - v||^2, or (1 - abar_t) / abar_t ||eps_theta - eps||^2
pred_weight = (1 - abar[1:]) if v_pred else (1 - abar[1:]) / abar[1:]
lam = a_coef**2 * pred_weight / (2 * beta_tilde)  # lambda_t, t = 1..999

if SCALE == "tiny":
    x0 = tiny.to_model_space(tiny_data.render_prompt_images(["a cat"], seed=3))  # (1, 3, 32, 32)
else:
    x0 = traj.x0[:1]
device = next(unet.parameters()).device
x0, c = x0.to(device), model.encode_prompts(["a cat"])
t_int = 300
t = torch.tensor([t_int], device=device)
noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(device)
with torch.no_grad():
    simple = diffusion_mse_loss(unet, scheduler, x0, c, t, noise).double()  # mean (v_theta - v)^2
    x_t = scheduler.add_noise(x0, noise, t).double()
    out = unet(x_t.float(), t, encoder_hidden_states=c).sample.double()  # v_theta (SD: eps_theta)
if v_pred:
    x0_hat = abar[t_int].sqrt() * x_t - (1 - abar[t_int]).sqrt() * out
else:
    x0_hat = (x_t - (1 - abar[t_int]).sqrt() * out) / abar[t_int].sqrt()
k = t_int - 1  # index into the t = 1..999 arrays
posterior = torch.distributions.Normal(a_coef[k] * x0.double().cpu() + b_coef[k] * x_t.cpu(), beta_tilde[k].sqrt())
model_step = torch.distributions.Normal(a_coef[k] * x0_hat.cpu() + b_coef[k] * x_t.cpu(), beta_tilde[k].sqrt())
L_t = torch.distributions.kl_divergence(posterior, model_step).mean()  # per dimension, like the loss
print(f"t = {t_int}: KL term = {L_t.item():.5e}, lambda_t = {lam[k].item():.4e}, "
      f"lambda_t * diffusion_mse_loss = {(lam[k] * simple).item():.5e}")
# the posterior's coefficients themselves, against diffusers' DDPMScheduler (the check above alone would
# pass with wrong ones: the same a_t, b_t, beta-tilde enter both of its sides)
mean_ref, var_ref = nbutils.ddpm_posterior(scheduler, t_int, x0, x_t)
nbutils.check(torch.allclose(posterior.mean, mean_ref, atol=2e-6)
              and math.isclose(beta_tilde[k].item(), var_ref.item(), rel_tol=1e-4),
              "a_t x_0 + b_t x_t and beta-tilde_t == diffusers' DDPMScheduler posterior")
nbutils.check(math.isclose(L_t.item(), (lam[k] * simple).item(), rel_tol=1e-4),
              "variational-bound term L_{t-1} == lambda_t * diffusion_mse_loss")

plt.figure(figsize=(6, 3))
plt.semilogy(np.arange(1, 1000), lam.numpy(), label="λ_t in the variational bound")
plt.axhline(1.0, color="k", ls="--", lw=1, label="λ_t = 1 in the loss actually used")
plt.xlabel("timestep t")
plt.ylabel("weight on ||v_θ - v||²")
plt.legend(fontsize=8)
plt.title("the 'simple' diffusion loss reweights the bound by orders of magnitude", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# The code of the derivation above, as it runs in the repository:

# %%
nbutils.show_source(diffusion_mse_loss)

# %% [markdown]
# DDPO sidesteps both layers. It never needs $\log p_\theta(x_0\mid c)$: it uses the exact log-density of
# each denoising step (notebook 2), and it follows the policy gradient of $\mathbb E[r]$ itself rather than
# the solution of a KL-regularised surrogate.
#
# ## 5.4 RWR at tiny scale, through the training loop
#
# `ddpo_min.train` runs RWR with `algo="rwr"` (weights $e^{\beta r}/Z$; at tiny scale $e^{A}/Z$, see §5.1)
# or `algo="rwr_sparse"` (top 10%). Each epoch samples a batch, scores it, and takes optimizer steps on the
# weighted diffusion loss of the sampled $x_0$ at random timesteps, through the guided prediction (the
# policy that sampled). Below: two epochs of each at the tiny defaults (`Config.tiny()`, 64 samples per
# epoch).
#
# Two epochs only show the mechanics; §5.5 compares the algorithms over whole runs.

# %%
EPOCHS = 2  # CI setting; try 15+
histories = {}
for algo in ("rwr", "rwr_sparse"):
    if SCALE == "tiny":
        cfg = Config.tiny(algo=algo, epochs=EPOCHS)  # what `--model tiny` selects
    else:
        cfg = Config.paper(reward="compressibility", algo=algo, epochs=EPOCHS, **nbutils.PAPER_OVERRIDES)
    run_dir = ddpo_min.train(cfg)  # a fresh folder under runs/ (a finished run's folder would be resumed)
    nbutils.restore_inline_plots()
    histories[algo] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

# %%
for algo, hist in histories.items():
    for m in hist:
        print(f"{algo:10s} epoch {m['epoch']}: reward {m['reward/mean']:+.4f} ± {m['reward/std']:.4f}   "
              f"loss {m['loss/policy']:.4f}   {m['time/epoch']:.0f} s")
nbutils.check(all(len(h) == EPOCHS and all(np.isfinite(m["loss/policy"]) for m in h) for h in histories.values()),
              f"both RWR variants ran {EPOCHS} epochs through ddpo_min.train with finite losses")

# %% [markdown]
# ## 5.5 DDPO against RWR, over whole runs, each against a control
#
# The paper's Fig. 4 plots reward against the number of reward queries (samples) and finds both DDPO
# variants above both RWR variants, and DDPO$_\text{IS}$ (several clipped steps per round of sampling)
# above DDPO$_\text{SF}$ (one step). `python -m tools.bench compare` asks the same question at tiny scale, on
# both JPEG rewards, with two things the paper's figure does not have:
#
# - **A control per algorithm.** Fine-tuning on its own samples changes a diffusion model even when the reward
#   plays no part. Each algorithm therefore has a reward-blind twin, trained exactly as the algorithm is but on
#   standard normal draws in place of the rewards; for RWR the control is every weight 1 ($\beta = 0$), plain
#   fine-tuning on the model's own samples, and sparse RWR's twin fits a random tenth of them. These
#   likelihood-style controls fit the denoiser to samples drawn with guidance in 20 steps, which are not the
#   distribution it models, so each round moves it toward them; at tiny scale that shrinks the JPEG files with
#   no reward at all. A reward-blind DDPO twin instead weighs each sample's gradient by a random number of mean
#   zero: its expected update is zero, but it takes a random walk whose steps grow with the rate. Every gain
#   is reported over the pretrained model *and* over the same seed's control. The second removes the drift
#   the control measures, provided the run would have drifted as its control did. A control *breaks down*
#   when it moves much further than its run: JPEG size changed by tens of percent, the animals gone, a larger
#   KL to the pretrained policy than the run's. A large gain over such a control says little.
# - **No learning rate picked on one seed.** Every algorithm runs at every rate of one grid (5e-5, 2e-4,
#   8e-4), 3 seeds each, so that DDPO$_\text{IS}$ and DDPO$_\text{SF}$ can be compared at the same rate. Each
#   algorithm is reported at one rate for both rewards, as the paper uses one setting per algorithm: the rate
#   with the largest gain over the pretrained model averaged over the two rewards. The drift moves JPEG size
#   the same way whatever the reward, so it counts for one reward and against the other and cancels in that
#   average (which is therefore also the average gain over the control). Beside the pick, a
#   *leave-one-seed-out* figure scores each seed at the rate the two other seeds pick, which the pick cannot
#   flatter.
#
# Every run makes 12 epochs of 64 samples (768 reward queries), training on 36 animals. Every 4 epochs the
# policy samples fixed held-out noise on the trained animals, on 9 animals never trained on and on 32 everyday
# emoji (generalisation, the paper's Sec. 6.3), and the tiny captioner says whether the animal is still
# recognisable (over-optimisation, Sec. 6.4). The RWR here is the tiny scale's: $\exp(A)$ of the per-prompt
# advantages of §5.1, not the paper's $\exp(r/5)$ on raw rewards. The 108 runs took hours on 2 cores, so they
# are made once by that command and committed (the report `assets/comparison.json`, its tables
# `assets/comparison.md` and its figure `assets/comparison.png`); this cell reads them.
#
# The tables below are the report's. In the figure, one row per reward; the columns: the held-out gain over
# the pretrained model (each control dotted, in its algorithm's colour), the gain over the control on the
# three held-out sets, the final gain over the pretrained model at every rate (controls dotted, the pick
# ringed), the captioner's top-1 and the KL to the pretrained policy. Bands are the min-max over the 3 seeds.

# %%
summary = nbutils.show_comparison()
rewards_ = list(summary["grid"])
gap = max(abs(np.mean([summary["grid"][r][algo][lr]["trained/gain"]["mean"][-1] for r in rewards_])
              - np.mean([summary["grid"][r][algo][lr]["trained/gain_over_control"]["mean"][-1] for r in rewards_]))
          for algo in summary["grid"][rewards_[0]] for lr in summary["grid"][rewards_[0]][algo])
nbutils.check(len(rewards_) == 2 and gap < 1e-9,
              "averaged over the two rewards, every algorithm's gain over its control equals its gain over "
              f"the pretrained model, at every rate (largest difference {gap:.1e} points): the drift cancels")

# %% [markdown]
# **Think about it.** (1) In the table of gains over the pretrained model by rate, the italic rows are the
# controls (on compressibility a positive gain means smaller files). Which controls move the held-out JPEG
# size on their own, which way, and how does that depend on the rate? (One control run serves both rewards,
# so its row on incompressibility is its row on compressibility with the sign flipped.) (2) Which control's
# expected update is exactly zero, and why? The likelihood-style controls (RWR's, sparse RWR's) would also
# have a zero expected update if the samples came from the distribution the denoiser models (the score has
# mean zero under its own distribution): why do they not here? (3) Rank the four algorithms at their picked
# rates by the gain over the pretrained model on each reward, then by the gain over the control. Does the
# order change? Why does averaging an algorithm's gain over the two rewards remove its control's drift? And
# where a control breaks down, what is a large gain over it worth?
