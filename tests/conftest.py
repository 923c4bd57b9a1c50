"""Shared test fixtures: tiny randomly initialised models built from configs (nothing is
downloaded)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# import the repo's modules from any cwd
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

# quiet the 'cast with .to()' notice for half-precision test UNets
diffusers_logging.set_verbosity_error()

TINY_LATENT = (4, 8, 8)  # (C, H, W)
TINY_EMBED_DIM = 16  # D
TINY_TOKENS = 5  # L


def build_tiny_unet(seed: int = 0, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """A ~50k-parameter UNet2DConditionModel (the Stable Diffusion class) with random weights."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_LATENT[1],
        in_channels=TINY_LATENT[0],
        out_channels=TINY_LATENT[0],
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_EMBED_DIM,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    # Random init leaves the output conv at default scale; that is fine for oracles (any function
    # will do).
    return unet.to(dtype).eval()


def build_sd_scheduler(**overrides) -> DDIMScheduler:
    """A DDIMScheduler configured like Stable Diffusion v1.4's (scaled_linear, steps_offset=1,
    ...)."""
    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    config.update(overrides)
    return DDIMScheduler(**config)


@pytest.fixture
def tiny_unet_factory() -> Callable[..., UNet2DConditionModel]:
    return build_tiny_unet


@pytest.fixture
def sd_scheduler_factory() -> Callable[..., DDIMScheduler]:
    return build_sd_scheduler
