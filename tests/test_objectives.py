"""Oracles for the objectives in ddpo_min.py: analytic gradients on a toy Gaussian policy,
hand-computed PPO clipping, RWR weights, the diffusion loss targets and the per-prompt advantage
tracker.

Shapes: N samples, D action dims, B batch, C,H,W latent.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ddpo_min import (
    PerPromptStatTracker,
    clip_advantages,
    ddpo_is_loss,
    ddpo_sf_loss,
    diffusion_mse_loss,
    rwr_weights,
    sparse_rwr_mask,
)

# --------------------------------------------------------------------------------------------------
# A toy policy with an analytic gradient
#
#   a ~ pi_theta = N(theta, s^2 I) in D dims,  r(a) = -||a - c||^2
#   J(theta) = E[r] = -(||theta - c||^2 + D s^2),   dJ/dtheta = -2 (theta - c)
#
# log p is averaged over the D dims, like sampler.py's log-probs, so the estimators target
# dJ/dtheta / D.
# --------------------------------------------------------------------------------------------------

S = 0.7  # s
C_TARGET = torch.tensor([1.0, 0.5, -0.2], dtype=torch.float64)  # c
THETA_OLD = torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64)  # theta_old
N = 20_000


def toy_batch(dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """N actions from pi_theta_old and their rewards: (N, D), (N,)."""
    gen = torch.Generator().manual_seed(seed)
    actions = THETA_OLD[:dim] + S * torch.randn(N, dim, generator=gen,
                                                dtype=torch.float64)  # (N, D)
    rewards = -((actions - C_TARGET[:dim]) ** 2).sum(-1)  # r, (N,)
    return actions, rewards


def toy_log_prob(theta: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Normal(theta, S).log_prob(actions).mean(-1)  # (N,), averaged over D


def analytic_grad(theta: torch.Tensor) -> torch.Tensor:
    return -2 * (theta - C_TARGET[: theta.shape[0]])  # dJ/dtheta


def grad_of(loss_fn, theta_value: torch.Tensor) -> torch.Tensor:
    theta = theta_value.clone().requires_grad_(True)
    loss = loss_fn(theta)
    (grad,) = torch.autograd.grad(loss, theta)
    return -grad  # ascent direction: -d loss / d theta


@pytest.mark.parametrize("dim", [1, 3])
def test_sf_gradient_matches_analytic_within_monte_carlo_error(dim):
    actions, rewards = toy_batch(dim)
    theta_old = THETA_OLD[:dim]
    g_sf = grad_of(lambda th: ddpo_sf_loss(toy_log_prob(th, actions), rewards), theta_old)  # (D,)

    # per-sample terms of ĝ_SF: r_i * d/dtheta log p(a_i) = r_i (a_i - theta) / (s^2 D)
    terms = rewards[:, None] * (actions - theta_old) / (S**2 * dim)  # (N, D)
    torch.testing.assert_close(g_sf, terms.mean(0), rtol=1e-10, atol=1e-10)
    standard_error = terms.std(0) / math.sqrt(N)  # (D,)
    error = (g_sf - analytic_grad(theta_old) / dim).abs()
    assert (error < 5 * standard_error).all(), (error, standard_error)


@pytest.mark.parametrize("dim", [1, 3])
def test_is_gradient_equals_sf_at_theta_old_and_is_unbiased_nearby(dim):
    actions, rewards = toy_batch(dim, seed=1)
    theta_old = THETA_OLD[:dim]
    old_log_prob = toy_log_prob(theta_old, actions)  # (N,)

    def is_loss(theta):
        return ddpo_is_loss(toy_log_prob(theta, actions), old_log_prob, rewards, clip_range=1e6)[0]

    g_sf = grad_of(lambda th: ddpo_sf_loss(toy_log_prob(th, actions), rewards), theta_old)
    g_is = grad_of(is_loss, theta_old)
    # rho = 1: the estimators coincide, also at the loop's clip ranges (both branches tie there)
    torch.testing.assert_close(g_is, g_sf, rtol=1e-12, atol=1e-12)
    for clip_range in (1e-4, 1e-3):
        g_clip = grad_of(lambda th, e=clip_range: ddpo_is_loss(
            toy_log_prob(th, actions), old_log_prob, rewards, e)[0], theta_old)
        torch.testing.assert_close(g_clip, g_sf, rtol=1e-12, atol=1e-12)

    # away from theta_old (unclipped), the ratio-weighted gradient still estimates dJ/dtheta at
    # theta
    theta = theta_old + 0.1
    g_is = grad_of(is_loss, theta)
    # the true density ratio
    rho = torch.exp(toy_log_prob(theta, actions) * dim - old_log_prob * dim)
    assert not torch.allclose(rho, torch.ones_like(rho))
    # with averaged log-probs the surrogate's ratio is rho^(1/D); its per-sample gradient terms are:
    terms = (rho ** (1 / dim) * rewards)[:, None] * (actions - theta) / (S**2 * dim)  # (N, D)
    torch.testing.assert_close(g_is, terms.mean(0), rtol=1e-10, atol=1e-10)
    if dim == 1:  # exact importance sampling only when log p is the true log-density
        error = (g_is - analytic_grad(theta)).abs()
        assert (error < 5 * terms.std(0) / math.sqrt(N)).all()


def test_sf_loss_value_and_gradient():
    log_prob = torch.tensor([-1.0, -2.0, 0.5], requires_grad=True)
    advantages = torch.tensor([1.0, -2.0, 3.0])
    loss = ddpo_sf_loss(log_prob, advantages)
    assert loss.item() == pytest.approx(-(1.0 * -1.0 + -2.0 * -2.0 + 3.0 * 0.5) / 3)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -advantages / 3)


# --------------------------------------------------------------------------------------------------
# PPO clipping, by hand
# --------------------------------------------------------------------------------------------------


def test_clipped_surrogate_gradients_kl_and_clipfrac():
    eps = 0.1
    #                   A>0,rho>1+e  A>0,rho<1-e  A<0,rho<1-e  A<0,rho>1+e  inside  inside
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0, -3.0])
    ratios = torch.tensor([1.2, 0.8, 0.8, 1.2, 1.05, 0.95])
    log_prob = ratios.log().requires_grad_(True)
    old_log_prob = torch.zeros(6)
    loss, info = ddpo_is_loss(log_prob, old_log_prob, advantages, clip_range=eps)
    loss.backward()
    grad = log_prob.grad

    # pushed past the trust region in the advantage's direction: the clipped (constant) branch wins
    assert grad[0] == 0 and grad[2] == 0
    # beyond the region on the other side, or inside it: d/dlogp (-A rho) / N = -A rho / N
    for i in (1, 3, 4, 5):
        assert grad[i].item() == pytest.approx(-advantages[i].item() * ratios[i].item() / 6,
                                               rel=1e-6)

    # by hand, max(-A rho, -A clip(rho)) per sample: -1.1, -0.8, 0.9, 1.2, -2.1, 2.85
    assert loss.item() == pytest.approx((-1.1 - 0.8 + 0.9 + 1.2 - 2.1 + 2.85) / 6, rel=1e-6)
    assert info["approx_kl"].item() == pytest.approx(0.5 * (ratios.log() ** 2).mean().item(),
                                                     rel=1e-6)
    assert info["clipfrac"].item() == pytest.approx(4 / 6)
    assert not info["approx_kl"].requires_grad and not info["clipfrac"].requires_grad


def test_clip_advantages_numpy_and_torch():
    values = [-9.0, -5.0, -1.0, 0.0, 4.9, 12.0]
    expected = [-5.0, -5.0, -1.0, 0.0, 4.9, 5.0]
    np.testing.assert_allclose(clip_advantages(np.array(values, dtype=np.float32)), expected,
                               rtol=1e-6)
    torch.testing.assert_close(clip_advantages(torch.tensor(values)), torch.tensor(expected))
    torch.testing.assert_close(
        clip_advantages(torch.tensor(values), max_abs=1.0).abs().max(), torch.tensor(1.0)
    )


# --------------------------------------------------------------------------------------------------
# Reward-weighted regression
# --------------------------------------------------------------------------------------------------


def test_rwr_weights_definition_and_stability():
    rewards = torch.tensor([0.0, 1.0, -3.0, 2.5, 7.0])
    beta = 0.2
    w = rwr_weights(rewards, beta)
    e = torch.exp(beta * rewards.double())
    torch.testing.assert_close(w.double(), e / e.sum() * len(rewards), rtol=1e-6, atol=1e-7)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-6)

    huge = torch.tensor([1e4, 0.0, -1e4, 1e4 - 1.0])
    w = rwr_weights(huge)  # exp(2000) overflows float32 and float64; the weights must not
    assert torch.isfinite(w).all() and w.mean().item() == pytest.approx(1.0, rel=1e-6)
    assert w[0] > w[3] > 0 and w[1] == 0 and w[2] == 0  # exp(-2000) underflows to exactly 0


@pytest.mark.parametrize("n", [50, 100, 256])
def test_sparse_mask_keeps_the_top_decile(n):
    # distinct rewards
    rewards = torch.randperm(n, generator=torch.Generator().manual_seed(n)).float() * 0.37
    mask = sparse_rwr_mask(rewards, percentile=90)
    assert mask.dtype == torch.bool
    assert mask.sum().item() == math.ceil(n / 10)
    kept, dropped = rewards[mask], rewards[~mask]
    assert kept.min() > dropped.max()


# --------------------------------------------------------------------------------------------------
# The diffusion loss (Eq. 1)
# --------------------------------------------------------------------------------------------------


class ZeroUNet(torch.nn.Module):
    """Predicts 0 everywhere, so the loss is mean(target^2): exposes which target is used."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, encoder_hidden_states):
        return SimpleNamespace(sample=torch.zeros_like(x_t) + 0 * self.dummy)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusion_loss_targets(sd_scheduler_factory, prediction_type):
    scheduler = sd_scheduler_factory(prediction_type=prediction_type)
    gen = torch.Generator().manual_seed(0)
    # x0, noise: (B, C, H, W)
    x0, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 250, 600, 999])  # (B,)
    target = {
        "epsilon": noise,
        "v_prediction": scheduler.get_velocity(x0, noise, t),
        "sample": x0,
    }[prediction_type]
    per_sample = (target**2).mean(dim=(1, 2, 3))  # (B,)
    embeds = torch.zeros(4, 5, 16)
    loss = diffusion_mse_loss(ZeroUNet(), scheduler, x0, embeds, t, noise)
    assert loss.item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    w = torch.tensor([0.5, 2.0, 0.0, 1.5])
    weighted = diffusion_mse_loss(ZeroUNet(), scheduler, x0, embeds, t, noise, weights=w)
    assert weighted.item() == pytest.approx((w * per_sample).mean().item(), rel=1e-6)
    if prediction_type == "v_prediction":  # v = sqrt(abar) eps - sqrt(1 - abar) x0, by hand
        abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(target, abar.sqrt() * noise - (1 - abar).sqrt() * x0)


def test_diffusion_loss_with_tiny_unet(tiny_unet_factory, sd_scheduler_factory):
    unet, scheduler = tiny_unet_factory(), sd_scheduler_factory()
    gen = torch.Generator().manual_seed(0)
    # x0, noise: (B, C, H, W)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    embeds = torch.randn(3, 5, 16, generator=gen)  # (B, L, D)
    t = torch.tensor([10, 500, 990])  # (B,)
    assert diffusion_mse_loss(unet, scheduler, x0, embeds, t, noise,
                              weights=torch.zeros(3)).item() == 0.0

    loss = diffusion_mse_loss(
        unet, scheduler, x0, embeds, t, noise, weights=rwr_weights(torch.tensor([1.0, 2, 3]))
    )
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in unet.parameters() if p.grad is not None]
    assert (grads and sum(g.abs().sum() for g in grads) > 0
            and all(torch.isfinite(g).all() for g in grads))


def test_rwr_trains_the_guided_prediction(tiny_unet_factory, sd_scheduler_factory):
    """With w != 1 the loss is that of f_uncond + w (f_cond - f_uncond), the sampled policy."""
    unet, scheduler = tiny_unet_factory(), sd_scheduler_factory()
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    embeds, negative = torch.randn(3, 5, 16, generator=gen), torch.randn(1, 5, 16, generator=gen)
    t = torch.tensor([10, 500, 990])
    x_t = scheduler.add_noise(x0, noise, t)
    with torch.no_grad():
        cond = unet(x_t, t, encoder_hidden_states=embeds).sample
        uncond = unet(x_t, t, encoder_hidden_states=negative.expand(3, -1, -1)).sample
        by_hand = ((uncond + 3.0 * (cond - uncond) - noise) ** 2).mean()  # epsilon target
        guided = diffusion_mse_loss(unet, scheduler, x0, embeds, t, noise, None, negative, 3.0)
        conditional = diffusion_mse_loss(unet, scheduler, x0, embeds, t, noise)
    assert guided.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert conditional.item() == pytest.approx(((cond - noise) ** 2).mean().item(), rel=1e-5)
    assert abs(guided.item() - conditional.item()) > 1e-3  # the check can tell them apart


# --------------------------------------------------------------------------------------------------
# Per-prompt advantages
# --------------------------------------------------------------------------------------------------


def two_prompt_batch(per_prompt: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    prompts = ["cat", "dog"] * per_prompt  # interleaved, to check the output order
    rewards = np.where(
        np.array(prompts) == "cat",
        10 + rng.normal(size=2 * per_prompt),
        -3 + 5 * rng.normal(size=2 * per_prompt),
    )  # (2 * per_prompt,)
    return prompts, rewards


def test_tracker_normalises_per_prompt_once_past_min_count():
    tracker = PerPromptStatTracker(buffer_size=16, min_count=16)
    prompts, rewards = two_prompt_batch(16, seed=0)
    advantages = tracker.update(prompts, rewards)
    assert advantages.dtype == np.float32 and advantages.shape == (32,)
    for prompt in ("cat", "dog"):
        a = advantages[np.array(prompts) == prompt]
        assert abs(a.mean()) < 1e-5 and a.std() == pytest.approx(1.0, abs=1e-4)
        r = rewards[np.array(prompts) == prompt]
        np.testing.assert_allclose(a, (r - r.mean()) / (r.std() + 1e-6), rtol=1e-5, atol=1e-6)


def test_tracker_falls_back_to_batch_statistics_below_min_count():
    tracker = PerPromptStatTracker(buffer_size=32, min_count=16)
    prompts, rewards = two_prompt_batch(4, seed=1)  # 4 rewards per prompt < 16
    advantages = tracker.update(prompts, rewards)
    np.testing.assert_allclose(advantages, (rewards - rewards.mean()) / (rewards.std() + 1e-6),
                               rtol=1e-5)
    # a prompt that crossed min_count uses its own stats while a new prompt in the same batch falls
    # back
    tracker = PerPromptStatTracker(buffer_size=32, min_count=4)
    tracker.update(["cat"] * 4, [1.0, 2.0, 3.0, 4.0])
    advantages = tracker.update(["cat", "owl"], [5.0, 7.0])
    cat = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert advantages[0] == pytest.approx((5.0 - cat.mean()) / (cat.std() + 1e-6), rel=1e-6)
    assert advantages[1] == pytest.approx((7.0 - 6.0) / (1.0 + 1e-6), rel=1e-6)  # batch [5, 7]


def test_tracker_buffer_is_bounded_and_stats_use_only_the_last_rewards():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=4)
    history = []
    for step in range(4):
        rewards = np.arange(5, dtype=np.float64) * (step + 1) + step  # 5 new rewards per update
        advantages = tracker.update(["cat"] * 5, rewards)
        history.extend(rewards)
        assert len(tracker.buffers["cat"]) == min(len(history), 8) <= 8
    last = np.array(history[-8:])
    np.testing.assert_allclose(advantages, (rewards - last.mean()) / (last.std() + 1e-6), rtol=1e-5)
    assert list(tracker.buffers["cat"]) == list(last)


def test_tracker_float_advantages_for_int_rewards_and_state_dict_round_trip():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    advantages = tracker.update(["a", "b", "a", "b"], torch.tensor([1, 5, 3, 5]))  # int64 rewards
    assert advantages.dtype == np.float32
    assert (advantages[0] == pytest.approx(-1.0, rel=1e-5)
            and advantages[2] == pytest.approx(1.0, rel=1e-5))
    assert advantages[1] == 0.0 and advantages[3] == 0.0  # std 0: (r - mean) / (0 + 1e-6) = 0

    restored = PerPromptStatTracker(buffer_size=1, min_count=1)
    restored.load_state_dict(tracker.state_dict())
    assert restored.buffer_size == 8 and restored.min_count == 2
    assert {p: list(b) for p, b in restored.buffers.items()} == {
        p: list(b) for p, b in tracker.buffers.items()
    }
    assert all(b.maxlen == 8 for b in restored.buffers.values())
    batch = (["a", "b", "c"], np.array([2, 9, 4]))
    np.testing.assert_array_equal(tracker.update(*batch), restored.update(*batch))
