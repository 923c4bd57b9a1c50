"""The diffusion model as a policy: DDIM steps with log-probabilities.

(Helper-owned: the notation table, ddim_step_with_logprob, sample_with_logprob and the
log-prob recompute go here. The TextToImage bundle below is the shared interface between
model loading (tiny.py / ddpo_min.py) and everything downstream; keep its fields.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler


@dataclass
class TextToImage:
    """Everything the training loop needs from a text-to-image diffusion model, at either scale.

    Code downstream of loading never branches on scale: it only touches these fields.
    """

    unet: torch.nn.Module  # eps/v/x0 predictor: unet(x_t (B,C,H,W), t, encoder_hidden_states=(B,L,D)).sample
    scheduler: DDIMScheduler  # holds alphas_cumprod and the timestep grid
    encode_prompts: Callable[[list[str]], torch.Tensor]  # prompts -> (B, L, D) embeddings, no grad
    decode: Callable[[torch.Tensor], torch.Tensor]  # x_0 latents (B,C,H,W) -> images float (B,3,H',W') in [0,1]
    latent_shape: tuple[int, int, int]  # (C, H, W) of x_T
    name: str = ""  # hub id, folder or "tiny"; for logs
