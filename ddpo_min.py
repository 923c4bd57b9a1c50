"""ddpo-min: Denoising Diffusion Policy Optimization (Black et al. 2023, arXiv 2305.13301), minimal.

Read top to bottom: the objectives (small pure functions, each quoting its equation), then the training
loop that calls them. The policy itself (DDIM steps with log-probs) lives in sampler.py, whose notation
table this file shares: x_t, x_{t-1}, c, t, log p = log p_theta(x_{t-1} | x_t, c), r = r(x_0, c), A the
advantage, rho the importance ratio, eps the clip range, w the RWR weight.

Shape letters: B batch (of transitions or of samples), C,H,W latent, L tokens, D embed dim.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler

# ====================================================================================================
# Objectives (issue 2)
#
# Every loss takes per-transition tensors of shape (B,) and returns a scalar to *minimise*; its gradient
# is minus the paper's ascent direction. The training loop calls them once per denoising step j and
# accumulates gradients over all T steps ("gradients are always accumulated across all timesteps").
# ====================================================================================================


def ddpo_sf_loss(log_prob: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """DDPO_SF, the score-function (REINFORCE) surrogate (seed 001, ĝ_SF; derivation in seed 002):

        ĝ_SF = E[ sum_{t=0}^{T} ∇_θ log p_θ(x_{t-1} | c, t, x_t) r(x_0, c) ]

        loss = -mean_b( A_b * log p_θ(x_{t-1} | c, t, x_t)_b )        so  ∇_θ loss = -ĝ_SF (one step's term)

    r is replaced by the advantage A (r minus a per-prompt baseline, scaled): a baseline leaves the
    expected gradient unchanged and lowers its variance. Used for exactly one gradient step per round
    of sampling, at θ = θ_old.

    Args: log_prob (B,) with grad (from sampler.recompute_log_prob); advantages (B,), treated as constants.
    """
    return -(advantages.detach() * log_prob).mean()  # -mean(A log p)


def ddpo_is_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO_IS, the importance-sampled gradient with a PPO trust region (seed 001, ĝ_IS; seed 002):

        ĝ_IS = E[ sum_t  p_θ(x_{t-1}|c,t,x_t) / p_θold(x_{t-1}|c,t,x_t)  ∇_θ log p_θ(x_{t-1}|c,t,x_t) r ]

        rho  = exp(log p_θ - log p_θold)
        loss = mean_b( max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) )

    ∇_θ(-A rho) = -A rho ∇_θ log p_θ is exactly one term of -ĝ_IS. The max (a min of the objectives)
    keeps the pessimistic one, so a sample stops contributing gradient once its ratio has moved past
    1 ± eps in the direction its advantage pushes. The paper uses eps = 1e-4.

    Returns:
        loss: scalar. info: {"approx_kl": 0.5 mean((log p - log p_old)^2), "clipfrac": mean(|rho - 1| > eps)},
        detached (logged as loss/approx_kl and loss/clipfrac).
    """
    log_ratio = log_prob - old_log_prob.detach()  # log rho, (B,)
    ratio = torch.exp(log_ratio)  # rho, (B,)
    advantages = advantages.detach()  # A, (B,)
    unclipped = -advantages * ratio  # -A rho
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # -A clip(rho,1-eps,1+eps)
    loss = torch.maximum(unclipped, clipped).mean()  # mean(max(., .))
    info = {
        "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),  # 0.5 E[(log rho)^2] ~ KL(p_old||p)
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),  # share of clipped ratios
    }
    return loss, info


def rwr_weights(rewards: torch.Tensor, beta: float = 0.2) -> torch.Tensor:
    """Reward-weighted regression weights (seed 001, RWR):  w_RWR(x_0, c) = exp(β r(x_0, c)) / Z.

    Z is chosen so the weights average 1 over the batch: w = B * softmax(β r). Softmax subtracts
    max(β r) before exponentiating, so huge rewards do not overflow. With weights averaging 1 the
    weighted loss keeps the scale of the unweighted one. β = 1/5 as in the reference code.

    Args: rewards (B,). Returns: (B,) float32 weights, no grad.
    """
    r = torch.as_tensor(rewards).detach().float()  # r, (B,)
    return torch.softmax(beta * r, dim=0) * r.shape[0]  # exp(β r) / Z with Z = mean_b exp(β r_b)


def sparse_rwr_mask(rewards: torch.Tensor, percentile: float = 90.0) -> torch.Tensor:
    """Sparse RWR (seed 001):  w_sparse(x_0, c) = 1[r(x_0, c) >= C],  C = the batch's `percentile`-th reward.

    Returns a (B,) bool mask. Fine-tune on the kept samples only, unweighted:
    `diffusion_mse_loss(unet, scheduler, x0[mask], prompt_embeds[mask], ...)`. (Passing the mask as
    `weights=` would average over all B and shrink the loss by the kept fraction.)
    """
    r = torch.as_tensor(rewards).detach().float()  # r, (B,)
    threshold = torch.quantile(r, percentile / 100.0)  # C (linear interpolation between order statistics)
    return r >= threshold  # 1[r >= C]


def diffusion_mse_loss(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    x0: torch.Tensor,
    prompt_embeds: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The diffusion training loss (seed 001, Eq. 1), optionally weighted per sample for RWR:

        L_DDPM(θ) = E[ || μ̃(x_t, x_0) - μ_θ(x_t, t, c) ||^2 ]                                      (Eq. 1)

    in its practical form: μ_θ is parametrised through the network's prediction, and matching means is
    (up to a per-t weight that is dropped, as in Ho et al.'s "simple" loss) matching that prediction:

        x_t = sqrt(alphā_t) x_0 + sqrt(1 - alphā_t) ε                 (scheduler.add_noise)
        loss = mean_b( w_b * mean_{CHW} (f_θ(x_t, t, c) - target)^2 ),
        target = ε (epsilon) | sqrt(alphā_t) ε - sqrt(1 - alphā_t) x_0 (v_prediction) | x_0 (sample)

    Args:
        x0: (B, C, H, W) clean latents; prompt_embeds: (B, L, D); timesteps: (B,) long in [0, 1000);
        noise: (B, C, H, W) ε ~ N(0, I); weights: (B,) e.g. rwr_weights(r), or None (all ones).
    Returns: scalar loss, float32.
    """
    dtype = next(unet.parameters()).dtype
    x0, noise = x0.float(), noise.float()
    x_t = scheduler.add_noise(x0, noise, timesteps)  # x_t = sqrt(alphā_t) x_0 + sqrt(1-alphā_t) ε, (B,C,H,W)
    prediction = unet(x_t.to(dtype), timesteps, encoder_hidden_states=prompt_embeds.to(dtype)).sample.float()

    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise  # ε
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, timesteps)  # v = sqrt(alphā_t) ε - sqrt(1-alphā_t) x_0
    elif kind == "sample":
        target = x0  # x_0
    else:
        raise ValueError(f"unknown prediction_type {kind!r}")

    per_sample = ((prediction - target) ** 2).mean(dim=tuple(range(1, x0.ndim)))  # (B,)
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float32, device=per_sample.device)  # w, (B,)
        per_sample = per_sample * w  # w_b * MSE_b
    return per_sample.mean()


class PerPromptStatTracker:
    """Advantages from per-prompt reward statistics: A = (r - mean_c) / (std_c + 1e-6).

    For each prompt c, keeps the last `buffer_size` rewards in a bounded deque. A prompt whose buffer
    holds fewer than `min_count` rewards (counting the current batch) is normalised with the whole
    current batch's mean and std instead. Stds are population stds (ddof=0). `update` returns float32
    **numpy** advantages, (B,), in the order of its inputs, even for integer rewards.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        if not 1 <= min_count <= buffer_size:
            raise ValueError(f"need 1 <= min_count ({min_count}) <= buffer_size ({buffer_size})")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(
        self, prompts: Sequence[str], rewards: np.ndarray | torch.Tensor | Sequence[float]
    ) -> np.ndarray:
        if isinstance(rewards, torch.Tensor):
            rewards = rewards.detach().cpu().numpy()
        r = np.asarray(rewards, dtype=np.float64).reshape(-1)  # r, (B,)
        if len(prompts) != r.shape[0]:
            raise ValueError(f"{len(prompts)} prompts but {r.shape[0]} rewards")
        prompts_arr = np.asarray(prompts, dtype=object)
        batch_mean, batch_std = r.mean(), r.std()  # fallback statistics
        advantages = np.empty_like(r)  # A, (B,)
        for prompt in dict.fromkeys(prompts):  # unique prompts, first-seen order
            idx = np.flatnonzero(prompts_arr == prompt)
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(r[idx].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = float(np.mean(buffer)), float(np.std(buffer))
            advantages[idx] = (r[idx] - mean) / (std + 1e-6)  # A = (r - mean) / (std + 1e-6)
        return advantages.astype(np.float32)

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.buffers = {p: deque(map(float, b), maxlen=self.buffer_size) for p, b in state["buffers"].items()}


def clip_advantages(advantages: np.ndarray | torch.Tensor, max_abs: float = 5.0) -> np.ndarray | torch.Tensor:
    """A <- clip(A, -max_abs, max_abs); works on numpy arrays and torch tensors alike."""
    # DEVIATION: advantage clipping is not in the paper; it is in the authors' reference code (seed 002,
    # footnote 1), with max_abs = 5. Why: one outlier reward, normalised by a small per-prompt std, would
    # otherwise dominate a minibatch. Effect: bounded per-sample gradient weight; no change for |A| <= 5.
    return advantages.clip(-max_abs, max_abs)  # clip(A, -5, 5)


# --- Training loop (issue 5) ---
