"""Stable Diffusion v1.4 at its real size, on a CPU: built with random weights from the shipped
configs (assets/sd_v1_4), so the paper-scale code meets SD's channel widths, its 768-d
cross-attention and its LoRA targets without a GPU or the hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ddpo_min
from loading import add_lora
from sampler import ddim_step_with_logprob, guided_model_output, recompute_log_prob

SD = Path(__file__).resolve().parents[1] / "assets" / "sd_v1_4"


def unet_config() -> dict:
    return json.loads((SD / "unet_config.json").read_text())


def lora_parameters_by_hand(config: dict, rank: int) -> int:
    """LoRA rank r on to_q, to_k, to_v, to_out.0 of every attention block, counted from the config.

    A LoRA pair on Linear(a -> b) holds r (a + b) weights. Each transformer block of width d has
    self-attention (four d -> d projections) and cross-attention (to_q and to_out.0: d -> d; to_k
    and to_v: cross_attention_dim -> d).
    """
    widths, layers = config["block_out_channels"], config["layers_per_block"]
    cross = config["cross_attention_dim"]
    blocks = [widths[i] for i, kind in enumerate(config["down_block_types"])
              if kind.startswith("CrossAttn") for _ in range(layers)]
    blocks.append(widths[-1])  # the mid block's transformer
    blocks += [widths[::-1][i] for i, kind in enumerate(config["up_block_types"])
               if kind.startswith("CrossAttn") for _ in range(layers + 1)]  # up blocks: one more
    per_block = lambda d: 4 * rank * (d + d) + 2 * rank * (d + d) + 2 * rank * (cross + d)  # noqa: E731
    return sum(per_block(d) for d in blocks)


@pytest.fixture(scope="module")
def sd_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(unet_config())


def test_lora_rank_4_on_sd_v1_4_has_the_parameter_count_of_its_config(sd_unet):
    base = sum(p.numel() for p in sd_unet.parameters())
    add_lora(sd_unet, rank=4)
    trainable = sum(p.numel() for p in sd_unet.parameters() if p.requires_grad)
    by_hand = lora_parameters_by_hand(unet_config(), rank=4)
    print(f"SD v1.4 UNet: {base / 1e6:.1f}M weights; LoRA rank 4: {trainable} trainable, "
          f"{by_hand} by hand from the config")
    assert 859e6 < base < 860e6  # the UNet's 859.5M parameters
    assert trainable == by_hand == 797184
    assert all(p.dtype == torch.float32 for p in sd_unet.parameters() if p.requires_grad)


def test_one_sampling_step_and_one_training_step_at_sd_width(sd_unet):
    """Real channel widths and 768-d cross-attention, 8x8 latents: the sampler's step and one
    DDPO_IS update of the LoRA weights (and nothing else) through the project's functions."""
    from diffusers import DDIMScheduler

    if not any(p.requires_grad for p in sd_unet.parameters()):
        add_lora(sd_unet, rank=4)  # when run alone
    scheduler = DDIMScheduler.from_config(json.loads((SD / "scheduler_config.json").read_text()))
    scheduler.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77, 768, generator=g)  # (B, L, D): a CLIP ViT-L/14 text encoding
    negative = torch.randn(1, 77, 768, generator=g)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    t = scheduler.timesteps[20]
    with torch.no_grad():  # one sampling step, theta_old
        out = guided_model_output(sd_unet, x_t, t, context, negative, 5.0)
        x_prev, old = ddim_step_with_logprob(scheduler, out, t, x_t, eta=1.0, generator=g)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(old).all()

    params = [p for p in sd_unet.parameters() if p.requires_grad]
    frozen = {n: p.detach().clone() for n, p in sd_unet.named_parameters()
              if not p.requires_grad and n.endswith("attn2.to_k.base_layer.weight")}
    lora_b = {n: p.detach().clone() for n, p in sd_unet.named_parameters() if "lora_B" in n}
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    log_prob = recompute_log_prob(sd_unet, scheduler, x_t, x_prev, t.repeat(2), context, negative,
                                  5.0, 1.0)
    assert torch.allclose(log_prob, old, atol=1e-5)  # theta = theta_old: ratio 1
    loss, info = ddpo_min.ddpo_is_loss(log_prob, old, torch.tensor([1.0, -1.0]), 1e-4)
    loss.backward()
    assert all(p.grad is not None for p in params)
    optimizer.step()
    now = dict(sd_unet.named_parameters())
    assert len(lora_b) == 2 * 16 * 4  # (self + cross) x 16 transformer blocks x 4 projections
    assert all(not torch.equal(now[n], w) for n, w in lora_b.items())  # B starts at 0: moved
    assert len(frozen) == 16 and all(torch.equal(now[n], w) for n, w in frozen.items())
    # and nothing but LoRA can move: every other weight is frozen and got no gradient
    rest = [(n, p) for n, p in sd_unet.named_parameters() if "lora_" not in n]
    assert len(rest) > 600 and all(not p.requires_grad and p.grad is None for _, p in rest)
