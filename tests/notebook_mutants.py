"""Wrong versions of the project's functions, for tests/test_notebook_checks.py: a notebook run with
one of them (DDPO_MUTANT=<name>, applied by notebooks/nbutils.py at import) must fail the check that
is meant to catch it. Each wraps the real function, so the mistake is exactly the one named."""

from __future__ import annotations

import importlib

import torch


def _mse_doubled(real):
    return lambda *args, **kwargs: 2 * real(*args, **kwargs)


def _log_prob_summed(real):
    return lambda x_prev, mean, sigma: real(x_prev, mean, sigma) * x_prev[0].numel()


def _mean_without_sigma_term(real):
    def mean(x0_hat, eps_hat, abar_prev, sigma):
        return abar_prev.sqrt() * x0_hat + (1 - abar_prev).clamp(min=0).sqrt() * eps_hat

    return mean


def _sf_sign_flipped(real):
    return lambda log_prob, advantages: -real(log_prob, advantages)


def _is_min_not_max(real):
    def loss(log_prob, old_log_prob, advantages, clip_range):
        _, info = real(log_prob, old_log_prob, advantages, clip_range)
        ratio = torch.exp(log_prob - old_log_prob.detach())
        a = advantages.detach()
        clipped = -a * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
        return torch.minimum(-a * ratio, clipped).mean(), info

    return loss


def _rwr_unnormalised(real):
    return lambda rewards, beta=0.2: torch.exp(beta * torch.as_tensor(rewards).float())


def _jpeg_in_bytes(real):
    return lambda *args, **kwargs: real(*args, **kwargs) * 1000


MUTANTS = {  # name: (module, attribute, wrong version of it)
    "diffusion_mse_loss x2": ("ddpo_min", "diffusion_mse_loss", _mse_doubled),
    "log-prob summed": ("sampler", "gaussian_log_prob", _log_prob_summed),
    "mean without -sigma^2": ("sampler", "ddim_mean", _mean_without_sigma_term),
    "SF loss sign": ("ddpo_min", "ddpo_sf_loss", _sf_sign_flipped),
    "IS loss min": ("ddpo_min", "ddpo_is_loss", _is_min_not_max),
    "RWR weights unnormalised": ("ddpo_min", "rwr_weights", _rwr_unnormalised),
    "JPEG in bytes": ("rewards", "jpeg_size_kb", _jpeg_in_bytes),
}


def apply(name: str) -> None:
    module_name, attribute, make = MUTANTS[name]
    module = importlib.import_module(module_name)
    setattr(module, attribute, make(getattr(module, attribute)))
