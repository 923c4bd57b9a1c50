"""The toy random Stable Diffusion pipeline the tests load with `--model <folder>` (the SD v1.4
classes, scheduler settings and LoRA targets at toy widths; built by tools/sd_random.py)."""

from __future__ import annotations

from pathlib import Path

from tools.sd_random import save_random_sd


def save_tiny_sd_pipeline(folder: Path, latent_size: int = 8, attention_first: bool = True) -> Path:
    return save_random_sd(folder, "toy", latent_size=latent_size, attention_first=attention_first)
