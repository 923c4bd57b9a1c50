"""A tiny random Stable Diffusion pipeline built from configs and saved like a real one (nothing is
downloaded): the same classes as SD v1.4, its scheduler settings and its LoRA targets."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_clip_tokenizer(folder: Path):
    """A real CLIPTokenizer with a character-level vocabulary (no merges): enough to tokenise
    offline."""
    from transformers import CLIPTokenizer

    # byte-level BPE maps each byte to a printable symbol: printable bytes map to themselves, the
    # others to code points from 256 upwards
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars]
                                            + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         model_max_length=16)


def save_tiny_sd_pipeline(folder: Path, latent_size: int = 8, attention_first: bool = True) -> Path:
    """A tiny random Stable Diffusion pipeline (the SD v1.4 classes, scheduler settings and LoRA
    targets), saved to folder/pipe like a real one: what `--model /local/folder` loads."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    # attention_first=False: attention only at half resolution (cheaper at 64x64 latents)
    blocks = ("CrossAttnDownBlock2D", "DownBlock2D")
    blocks = blocks if attention_first else blocks[::-1]
    blocks_up = tuple(b.replace("Down", "Up") for b in blocks[::-1])
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=blocks, up_block_types=blocks_up,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16,
    )  # fmt: skip
    tok_dir = folder / "tok_src"
    tok_dir.mkdir()
    tokenizer = tiny_clip_tokenizer(tok_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32,
                                                intermediate_size=37, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=16))
    # SD v1.4's scheduler settings (scaled_linear betas, steps_offset 1, set_alpha_to_one False)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe"
