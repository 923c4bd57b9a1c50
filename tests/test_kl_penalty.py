"""KL-regularised DDPO (--kl-coef β): the penalty's value and gradient are the closed-form KL of
the two Gaussian steps, computed independently from diffusers' DDIM step; β = 0 trains exactly as
the loop without the penalty; β > 0 keeps the policy closer to the pretrained one."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

import ddpo_min
import plumbing
import sampler
from config import Config

TOY = dict(num_steps=4, sample_batch_size=8, sample_batches=1, samples_per_prompt=4,
           stat_buffer=4, stat_min_count=4, train_batch_size=4, minibatches=2, grid_size=4,
           kl_samples=2, device="cpu")


def test_the_penalty_is_the_closed_form_kl_with_its_gradient(tmp_path):
    cfg = Config.tiny(epochs=1, output_dir=str(tmp_path), kl_coef=1.0, **TOY)
    run = plumbing.Run(cfg)
    samples, _ = ddpo_min.sample_epoch(run, plumbing.InlineExecutor())
    with torch.no_grad():  # move the policy away from the pretrained one
        for p in run.params:
            p.add_(1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    idx, j = torch.arange(4), torch.tensor([0, 1, 2, 1])
    log_prob, kl = ddpo_min.rescore_with_kl(run, samples, idx, j)
    kl.sum().backward()
    got = [p.grad.clone() for p in run.params]
    run.model.unet.zero_grad()

    # the oracle: each policy's mean from diffusers' DDIMScheduler.step with zero noise, sigma_t
    # from its response to unit noise; KL of two Gaussians with one sigma, averaged over C*H*W
    scheduler = run.model.scheduler
    x_t, t = samples.latents[idx, j], samples.timesteps[j]

    def mean_of(unet):
        out = sampler.guided_model_output(unet, x_t, t, samples.prompt_embeds[idx],
                                          run.negative_embeds, cfg.guidance_scale)
        return torch.stack([scheduler.step(out[b:b + 1], int(t[b]), x_t[b:b + 1], eta=cfg.eta,
                                           variance_noise=torch.zeros_like(x_t[b:b + 1])
                                           ).prev_sample[0] for b in range(len(idx))])

    sigma = torch.stack([(scheduler.step(torch.zeros_like(x_t[b:b + 1]), int(t[b]),
                                         x_t[b:b + 1], eta=cfg.eta,
                                         variance_noise=torch.ones_like(x_t[b:b + 1])
                                         ).prev_sample - scheduler.step(
        torch.zeros_like(x_t[b:b + 1]), int(t[b]), x_t[b:b + 1], eta=cfg.eta,
        variance_noise=torch.zeros_like(x_t[b:b + 1])).prev_sample).mean() for b in range(4)])
    with torch.no_grad():
        mean_pre = mean_of(run.reference)
    oracle = ((mean_of(run.model.unet) - mean_pre) ** 2).mean(dim=(1, 2, 3)) / (2 * sigma**2)
    assert kl.detach() == pytest.approx(oracle.detach(), rel=1e-4)
    assert (kl > 0).all()
    oracle.sum().backward()
    for g, p in zip(got, run.params):  # to float rounding of each tensor's largest entry
        assert (g - p.grad).abs().max() <= 1e-5 * p.grad.abs().max()
    # and the log-probs are the loop's own rescoring
    assert torch.allclose(log_prob, ddpo_min.rescore(run, samples, idx, j), atol=1e-6)


def _weights(folder, **overrides):
    run_dir = ddpo_min.train(Config.tiny(epochs=2, output_dir=str(folder), **{**TOY, **overrides}))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return load_file(run_dir / "weights" / "unet.safetensors"), metrics


def test_beta_zero_trains_exactly_as_without_the_penalty(tmp_path):
    """The loop's own penalty branch (its log-probs through the step, one more UNet call), run
    with a KL that is zero but keeps its graph, changes no weight: the log-probs it trains on are
    the plain path's, bit for bit."""
    plain, _ = _weights(tmp_path / "plain")

    def zero_kl(mean, mean_pre, sigma):
        return 0.0 * ((mean - mean_pre) ** 2).mean(dim=(1, 2, 3))

    with mock.patch.object(ddpo_min, "gaussian_kl", zero_kl):
        forced, metrics = _weights(tmp_path / "forced", kl_coef=1.0)
    assert metrics[-1]["loss/kl_penalty"] == 0.0  # the branch ran
    assert all(torch.equal(plain[k], forced[k]) for k in plain)


def test_a_large_beta_keeps_the_policy_near_the_pretrained_one(tmp_path):
    _, free = _weights(tmp_path / "free", lr=1e-3)
    _, leashed = _weights(tmp_path / "leashed", lr=1e-3, kl_coef=1e4)
    assert leashed[-1]["kl/pretrained"] < free[-1]["kl/pretrained"]
    assert "loss/kl_penalty" in leashed[-1] and "loss/kl_penalty" not in free[-1]
    # the leash's extra cost per epoch is logged and printed
    assert 0 < leashed[-1]["time/kl_penalty"] < leashed[-1]["time/train"]
    assert "time/kl_penalty" not in free[-1]
    assert "of which the KL leash's pretrained forwards" in plumbing.format_metrics(leashed[-1])
    assert "KL leash" not in plumbing.format_metrics(free[-1])


def test_exercise_7s_reference_run_trains_every_beta_and_writes_its_figures(tmp_path, monkeypatch):
    """`python -m tools.bench ex7` at toy size (the held-out scoring replaced by a stub that
    counts its calls): every beta trains the given epochs with the project's KL and is scored
    after (the pretrained model once, before), and lands in the JSON; a huge beta ends nearer the
    pretrained policy."""
    from tools import ex7

    scored = []

    def fake_scores(model, cfg):
        scored.append(cfg.kl_coef)
        return dict(jpeg_kb=2.0 - 0.1 * (len(scored) % 2 == 0), caption_top1=0.5)

    monkeypatch.setattr(ex7, "held_out_scores", fake_scores)
    monkeypatch.setattr(ex7, "_BEFORE", {})
    monkeypatch.setattr(ex7, "BETAS", (0.0, 1e4))
    out = tmp_path / "ex7.json"
    result = ex7.reference_run(out, tmp_path / "runs", epochs=2, lr=1e-3, **TOY)
    assert json.loads(out.read_text()) == result
    assert scored == [0.0, 0.0, 1e4]  # the pretrained model once, then each beta's weights
    free, leashed = result["runs"]
    assert [r["beta"] for r in result["runs"]] == [0.0, 1e4]
    assert all(r["epochs"] == 2 and len(r["kl_pretrained"]) == 2 for r in result["runs"])
    assert free["jpeg_change_percent"] == pytest.approx(-5.0)
    assert leashed["kl_pretrained"][-1] < free["kl_pretrained"][-1]
