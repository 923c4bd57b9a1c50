# ruff: noqa: E402, E501
# (a notebook source: imports follow the setup cell; markdown tables and LaTeX lines do not wrap)
# %% [markdown]
# # 1. Denoising as a decision process
#
# DDPO starts from a change of viewpoint. A diffusion model is usually *trained* as a likelihood model
# and *used* by running a chain of Gaussian denoising steps (the paper's Eq. 2). Reinforcement learning
# needs something else: states, actions, a policy whose probabilities we can evaluate, and a reward.
# This notebook shows that the sampling chain already is such a decision process, and that the reward of
# the whole chain is simply the reward of the final image.
#
# Plan: (1) the reverse process, Eq. 2, and a real trajectory of the tiny model, each state $x_t$ beside
# the model's current guess $\hat x_0$ of the final image; (2) the two MDPs of the paper (RWR's one-step
# MDP and DDPO's multi-step MDP), and the multi-step MDP rebuilt step by step with diffusers: it
# reproduces the sampler's chain, and its return equals $r(x_0, c)$. The training objective (the paper's
# Eq. 1), which DDPO never uses, comes in notebook 5, where RWR needs it.

# %%
SCALE = "tiny"  # "tiny": the repo's 32x32 emoji model, CPU, offline, ~30 s.
#                 "paper": Stable Diffusion v1.4 (512x512, 4x64x64 latents). Needs the Hugging Face hub
#                 (or a local copy of the weights) and a GPU; not run in CI.

# %%
import nbutils  # finds the repo and puts it on sys.path

SCALE = nbutils.use_scale(SCALE)  # DDPO_SCALE in the environment wins
import matplotlib.pyplot as plt
import torch

import rewards
import sampler

torch.manual_seed(0)
if SCALE == "tiny":
    import tiny

    model = tiny.load_tiny()  # the shipped weights, assets/tiny_unet.safetensors
    PROMPTS = ["a cat", "a frog", "a whale", "a bee"]
    NUM_STEPS, GUIDANCE = 50, 5.0
else:
    model = nbutils.load_paper_model()  # SD v1.4 + LoRA, fp32
    PROMPTS = ["a cat", "a frog"]
    NUM_STEPS, GUIDANCE = 50, 5.0
unet, scheduler = model.unet, model.scheduler
device = next(unet.parameters()).device
print(model.name, "latent (C, H, W) =", model.latent_shape, "| scheduler:", scheduler.config.prediction_type)

# %% [markdown]
# ## 1.1 The reverse process (Eq. 2): sampling is a chain of Gaussians
#
# Sampling starts from $x_T \sim \mathcal N(0, I)$ and applies $T$ steps of
#
# $$p_\theta(x_{t-1}\mid x_t, c) = \mathcal N\big(x_{t-1} \mid \mu_\theta(x_t, t, c),\ \sigma_t^2 I\big).
#   \tag{2}$$
#
# With DDIM and $\eta = 1$ (the paper's sampler), $\mu_\theta$ is DDIM's update and $\sigma_t$ is a
# constant of the schedule; notebook 2 derives both. DDIM with $\eta = 1$ on the strided $T$-step grid
# is the ancestral sampler the paper names: each step draws from the DDPM posterior between two grid
# steps, with the model's $\hat x_0$ in place of $x_0$. `sampler.sample_with_logprob` runs the chain with
# classifier-free guidance and records every state and every step's log-density. Below: one trajectory
# per prompt, decoded at several steps (top row of each pair: the state $x_t$; bottom row: the model's
# current guess $\hat x_0$ of the final image, read from diffusers' `DDIMScheduler.step`).

# %%
g = torch.Generator().manual_seed(0)
embeds = model.encode_prompts(PROMPTS)  # (B, L, D)
negative = model.encode_prompts([""])  # (1, L, D): the empty prompt for classifier-free guidance
traj = sampler.sample_with_logprob(unet, scheduler, embeds, negative, num_steps=NUM_STEPS,
                                   guidance_scale=GUIDANCE, eta=1.0, latent_shape=model.latent_shape,
                                   generator=g)
B, T1 = traj.latents.shape[:2]
print("latents (B, T+1, C, H, W):", tuple(traj.latents.shape), "| log_probs (B, T):", tuple(traj.log_probs.shape))
print("timesteps t of the", traj.num_steps, "steps:", traj.timesteps[:4].tolist(), "...", traj.timesteps[-3:].tolist())

# %%
show_at = [0, 10, 20, 30, 40, 45, 48, NUM_STEPS]  # indices j into the chain: state j has t = timesteps[j]
rows_x, rows_x0, titles = [], [], []
for j in show_at:
    x_j = traj.latents[:, j]  # (B, C, H, W)
    rows_x.append(model.decode(x_j))
    if j < NUM_STEPS:
        t = traj.timesteps[j]
        with torch.no_grad():
            out = sampler.guided_model_output(unet, x_j, t, embeds, negative, GUIDANCE)
        x0_hat = scheduler.step(out, t, x_j, eta=1.0, variance_noise=torch.zeros_like(x_j)).pred_original_sample
        rows_x0.append(model.decode(x0_hat))
        titles.append(f"t={t.item()}")
    else:
        rows_x0.append(model.decode(x_j))
        titles.append("x_0")

fig, axes = plt.subplots(2 * B, len(show_at), figsize=(1.15 * len(show_at), 2.3 * B))
for b in range(B):
    for k in range(len(show_at)):
        for r, (row, label) in enumerate(((rows_x, "x_t"), (rows_x0, "x̂_0"))):
            ax = axes[2 * b + r, k]
            ax.imshow(row[k][b].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if b == 0 and r == 0:
                ax.set_title(titles[k], fontsize=8)
            if k == 0:
                ax.set_ylabel(f"{PROMPTS[b]}\n{label}" if r == 0 else label, fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# Early states are almost pure noise while $\hat x_0$ already shows a blurry guess of the layout; the
# last handful of steps mostly sharpen detail. Every arrow in this picture but the last is one draw from a
# Gaussian whose density we can evaluate, which is what a policy gradient needs. (The tiny model's last
# step has $\sigma_t = 0$: it maps $x_1$ to $x_0$ deterministically; notebooks 2 and 3 say what that
# changes.)
#
# ## 1.2 Two ways to see the sampler as an MDP
#
# An MDP is $(\mathcal S, \mathcal A, \rho_0, P, R)$ and an agent following $\pi(a\mid s)$ maximises
# $\mathcal J_{\text{RL}}(\pi) = \mathbb E_\tau\big[\sum_t R(s_t, a_t)\big]$. The goal of the paper is
#
# $$\mathcal J_{\text{DDRL}}(\theta) = \mathbb E_{c\sim p(c),\ x_0 \sim p_\theta(\cdot\mid c)}\,[\,r(x_0, c)\,].$$
#
# The paper (Secs. 4.2 and 4.3) gives two MDPs for which $\mathcal J_{\text{RL}} = \mathcal J_{\text{DDRL}}$:
#
# | | **one-step MDP** (RWR) | **multi-step MDP** (DDPO) |
# |---|---|---|
# | state $s$ | $c$ | $s_t = (c,\ t,\ x_t)$ |
# | action $a$ | $x_0$, the finished image | $a_t = x_{t-1}$, the next, less noisy image |
# | policy $\pi(a\mid s)$ | $p_\theta(x_0\mid c)$: no closed form | $p_\theta(x_{t-1}\mid x_t, c)$: the Gaussian of Eq. 2 |
# | initial state $\rho_0$ | $p(c)$ | $\big(p(c),\ \delta_T,\ \mathcal N(0, I)\big)$ |
# | transition $P$ | straight to a terminal state | $(\delta_c,\ \delta_{t-1},\ \delta_{x_{t-1}})$: deterministic |
# | reward $R$ | $r(x_0, c)$ | $r(x_0, c)$ for the last action ($a = x_0$), else $0$ |
# | horizon | 1 | $T$ denoising steps |
#
# The difference that matters: in the one-step MDP the policy's density is $p_\theta(x_0\mid c)$, the
# marginal of the whole chain, which nobody can compute; RWR falls back on the diffusion loss, a
# reweighted version of the bound on it (notebook 5 §5.3). In the multi-step MDP every action's density is an
# isotropic Gaussian, computed exactly and cheaply (`sampler.ddim_step_with_logprob`). (The paper indexes
# the MDP's steps by the diffusion time $t$, which counts down: the rewarded action is the one taken in
# state $t = 1$, the one that produces $x_0$.) The transition just copies the action into the next state,
# so all randomness lives in the policy, and only the last step is rewarded.
#
# **Check.** Rebuild the MDP's trajectory $\tau = (s_0, a_0, \dots, s_{T-1}, a_{T-1})$ without the
# sampler: $\rho_0$ gives $x_T$, each action $a_k$ is drawn from the state $s_k$ by diffusers'
# `DDIMScheduler.step` (on the guided model output, with the step's noise $z$ regenerated from the seed
# of §1.1), and $P$ copies the action into the next state. If `sample_with_logprob` is the policy it claims
# to be, this chain reproduces its recorded latents. Then give rewards as the table says, on freshly
# decoded images of the MDP's own actions, and compare the return $\sum_k R(s_k, a_k)$ with $r(x_0, c)$
# of the sampler's $x_0$. The reward here is the paper's JPEG compressibility,
# $r = -(\text{JPEG size in kB})$, from `rewards.jpeg_compressibility`.

# %%
images = model.decode(traj.x0)  # (B, 3, H, W) in [0, 1]: the sampler's x_0, decoded
r_final, _ = rewards.jpeg_compressibility(images, PROMPTS)  # r(x_0, c), (B,)

# The MDP, rebuilt with diffusers. The sampler drew x_T and then one z per step from one generator.
g_mdp = torch.Generator().manual_seed(0)  # the seed of 1.1
shape = (B, *model.latent_shape)
x = torch.randn(shape, generator=g_mdp).to(device) * scheduler.init_noise_sigma  # x_T ~ rho_0
states, actions = [], []  # MDP step k: s_k = (c, t_k, x_{t_k}), a_k = x_{t_k - 1}; t counts down
for t in traj.timesteps:
    states.append((PROMPTS, int(t), x))
    with torch.no_grad():
        out = sampler.guided_model_output(unet, x, t, embeds, negative, GUIDANCE)
    z = torch.randn(shape, generator=g_mdp).to(device)  # this step's noise
    a = scheduler.step(out, t, x, eta=1.0, variance_noise=z).prev_sample  # a_k ~ pi(. | s_k)
    actions.append(a)
    x = a  # P: the next state keeps c, moves t one grid step, and its image is the action
mdp_chain = torch.stack([states[0][2], *actions], dim=1)  # (B, T+1, C, H, W)
chain_err = (mdp_chain - traj.latents).abs().max().item()
print(f"max |MDP chain (diffusers) - sampler's latents| = {chain_err:.1e}")

returns = []
for b in range(B):
    rewards_k = []
    for k in range(traj.num_steps):
        last = k == traj.num_steps - 1  # the step whose action is x_0 ("t = 0" in the paper's indexing)
        if last:  # a separate reward call on a fresh decode of the MDP's last action
            img = model.decode(actions[k][b : b + 1])
            rewards_k.append(float(rewards.jpeg_compressibility(img, [PROMPTS[b]])[0][0]))
        else:
            rewards_k.append(0.0)
    returns.append(sum(rewards_k))
    print(f"{PROMPTS[b]:8s}  nonzero rewards: {sum(rk != 0 for rk in rewards_k)} of {len(rewards_k)}   "
          f"return = {returns[-1]:+.3f}   r(x_0, c) = {r_final[b]:+.3f}")

nbutils.check(chain_err < 1e-4, "the MDP rebuilt with DDIMScheduler.step (x_T ~ rho_0, "
              "a_k ~ pi(. | s_k), s_(k+1) = P(s_k, a_k)) reproduces the sampler's chain")
nbutils.check(all(abs(ret - r) < 1e-6 for ret, r in zip(returns, r_final.tolist())),
              "return of the rebuilt MDP == r(x_0, c) of the sampler's x_0, for every trajectory")

# %% [markdown]
# Because the return equals $r(x_0, c)$ for every trajectory, the expected return of the multi-step MDP is
# $\mathcal J_{\text{DDRL}}$: maximising one is maximising the other. What we gained is a policy with a
# tractable density at every step. The next notebook computes that density.
