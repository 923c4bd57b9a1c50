"""Wrong versions of the project's functions, for tests/test_notebook_checks.py: a notebook run with
one of them (DDPO_MUTANT=<name>, applied by notebooks/nbutils.py at import) must fail the check that
is meant to catch it. Each wraps the real function, so the mistake is exactly the one named."""

from __future__ import annotations

import importlib
import inspect

import numpy as np
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


def _with_arguments(real, **forced):
    """real, called with some of its arguments replaced, however the caller passes them."""
    signature = inspect.signature(real)

    def wrong(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments.update(forced)
        return real(*bound.args, **bound.kwargs)

    return wrong


def _unguided(real):
    """Rescoring (recompute_log_prob) or the model output itself (guided_model_output) with the
    conditional prediction alone: no negative prompt, w = 1."""
    return _with_arguments(real, negative_prompt_embeds=None, guidance_scale=1.0)


def _is_ratio_inverted(real):
    def loss(log_prob, old_log_prob, advantages, clip_range):  # rho = p_old / p_theta
        return real(2 * old_log_prob.detach() - log_prob, old_log_prob, advantages, clip_range)

    return loss


def _approx_kl_without_half(real):
    def loss(log_prob, old_log_prob, advantages, clip_range):
        value, info = real(log_prob, old_log_prob, advantages, clip_range)
        return value, {**info, "approx_kl": 2 * info["approx_kl"]}

    return loss


def _tracker_returns_raw_rewards(real):
    def update(self, prompts, rewards):
        real(self, prompts, rewards)
        return np.asarray(rewards, dtype=np.float64)

    return update


def _head_with_relu(real):
    def load(*args, **kwargs):
        head = real(*args, **kwargs)
        layers = list(head.layers)
        head.layers = torch.nn.Sequential(layers[0], torch.nn.ReLU(), *layers[1:])
        return head

    return load


def _float_images_rescaled_twice(real):
    def preprocess(images):
        if torch.is_tensor(images) and images.is_floating_point():
            images = images / 255.0  # float images in [0, 1] divided by 255 again
        return real(images)

    return preprocess


def _recall_precision_swapped(real):
    def score(self, candidates, references):
        out = real(self, candidates, references)
        return {**out, "recall": out["precision"], "precision": out["recall"]}

    return score


MUTANTS = {  # name: (module, attribute, wrong version of it)
    "diffusion_mse_loss x2": ("ddpo_min", "diffusion_mse_loss", _mse_doubled),
    "log-prob summed": ("sampler", "gaussian_log_prob", _log_prob_summed),
    "mean without -sigma^2": ("sampler", "ddim_mean", _mean_without_sigma_term),
    "SF loss sign": ("ddpo_min", "ddpo_sf_loss", _sf_sign_flipped),
    "IS loss min": ("ddpo_min", "ddpo_is_loss", _is_min_not_max),
    "RWR weights unnormalised": ("ddpo_min", "rwr_weights", _rwr_unnormalised),
    "JPEG in bytes": ("rewards", "jpeg_size_kb", _jpeg_in_bytes),
    "rescored without guidance": ("sampler", "recompute_log_prob", _unguided),
    "guidance ignored": ("sampler", "guided_model_output", _unguided),
    "IS ratio inverted": ("ddpo_min", "ddpo_is_loss", _is_ratio_inverted),
    "approx_kl without 1/2": ("ddpo_min", "ddpo_is_loss", _approx_kl_without_half),
    "tracker returns raw rewards": ("ddpo_min", "PerPromptStatTracker.update",
                                    _tracker_returns_raw_rewards),
    "aesthetic head with a ReLU": ("rewards", "load_aesthetic_head", _head_with_relu),
    "float images rescaled twice": ("rewards", "clip_preprocess", _float_images_rescaled_twice),
    "BERTScore recall and precision swapped": ("rewards", "BERTScorer.score",
                                               _recall_precision_swapped),
}


def apply(name: str) -> None:
    """Replace module.attribute (a dotted attribute: a method of a class) by its wrong version."""
    module_name, attribute, make = MUTANTS[name]
    owner = importlib.import_module(module_name)
    *path, leaf = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, leaf, make(getattr(owner, leaf)))
