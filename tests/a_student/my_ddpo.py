"""A student's my_ddpo.py, written from the exercises' text alone (no project code): the tests fill
the student release with it (tests/test_student_copy.py) and grade it (tests/test_autograde.py)."""

from __future__ import annotations

import math

import numpy as np
import torch


def my_ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None,
                              generator=None):
    config = scheduler.config
    t = int(timestep)
    t_prev = t - config.num_train_timesteps // scheduler.num_inference_steps
    abar_t = scheduler.alphas_cumprod[t].item()
    abar_prev = (scheduler.alphas_cumprod[t_prev].item() if t_prev >= 0
                 else float(scheduler.final_alpha_cumprod))
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    x_t, out = sample.float(), model_output.float()
    if config.prediction_type == "epsilon":
        eps_hat = out
        x0_hat = (x_t - math.sqrt(1 - abar_t) * eps_hat) / math.sqrt(abar_t)
    elif config.prediction_type == "v_prediction":
        x0_hat = math.sqrt(abar_t) * x_t - math.sqrt(1 - abar_t) * out
        eps_hat = math.sqrt(abar_t) * out + math.sqrt(1 - abar_t) * x_t
    else:
        raise ValueError(config.prediction_type)
    if config.clip_sample:
        x0_hat = torch.clamp(x0_hat, -config.clip_sample_range, config.clip_sample_range)
    mu = math.sqrt(abar_prev) * x0_hat + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps_hat
    if prev_sample is None:
        z = torch.randn(sample.shape, generator=generator)
        prev_sample = mu + sigma * z
    x_prev = prev_sample.detach()
    if sigma == 0:
        return x_prev, torch.zeros(sample.shape[0])
    log_density = (-(x_prev - mu) ** 2 / (2 * sigma**2) - math.log(sigma)
                   - 0.5 * math.log(2 * math.pi))
    return x_prev, log_density.mean(dim=(1, 2, 3))


def my_sf_loss(log_prob, advantages):
    return -(advantages.detach() * log_prob).mean()


def my_clipped_loss(log_prob, old_log_prob, advantages, clip_range):
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    a = advantages.detach()
    unclipped = -a * ratio
    clipped = -a * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        approx_kl = 0.5 * (log_ratio**2).mean()
        clipfrac = ((ratio - 1).abs() > clip_range).float().mean()
    return loss, {"approx_kl": approx_kl, "clipfrac": clipfrac}


def my_advantages(prompts, rewards):
    rewards = np.asarray(rewards, dtype=np.float64)
    groups = np.asarray(prompts, dtype=object)
    out = np.zeros_like(rewards)
    for prompt in set(prompts):
        mask = groups == prompt
        out[mask] = (rewards[mask] - rewards[mask].mean()) / (rewards[mask].std() + 1e-6)
    return out


def my_clip_advantages(advantages, max_abs=5.0):
    return advantages.clip(-max_abs, max_abs)


def my_gaussian_kl(mean, mean_pre, sigma):
    # two Gaussians with the same variance: only the means differ; one value per coordinate,
    # averaged like the log-probs
    var = sigma.reshape(-1, *([1] * (mean.dim() - 1))) ** 2
    per_coordinate = (mean - mean_pre).pow(2) / (2.0 * var)
    return per_coordinate.flatten(1).mean(dim=1)
