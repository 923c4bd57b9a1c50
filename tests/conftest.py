"""Shared test fixtures: tiny randomly initialised models built from configs (nothing is
downloaded); and the two tiers.

`python -m pytest -q` runs the fast tier (about a minute on 2 cores): the oracles of the sampler
and the objectives, the rewards, the tiny model, the config and CLI, loading, plumbing, and short
runs of the loop. `python -m pytest -q --full` adds FULL_TIER and every notebook (CI runs it).
"""

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

# the files only `--full` runs, and why they are slow
FULL_TIER = {
    "test_notebooks.py": "executes and inspects the notebooks",
    "test_notebook_checks.py": "each notebook check against a wrong function",
    "test_notebooks_paper.py": "the notebooks' paper-scale branches",
    "test_engine.py": "2 processes against 1, fp16 loss scaling",
    "test_sd_size.py": "Stable Diffusion's real architecture",
    "test_compare.py": "the comparison's protocol, end to end",
    "test_ex5.py": "exercise 5's training harness",
    "test_autograde.py": "the autograder on whole submissions",
    "test_student_copy.py": "builds and runs the student release",
    "test_mystery.py": "the find-the-bug runs",
    "test_gpu_check.py": "the GPU check at toy size",
}


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="the full tier: also the notebooks and the slow tests (CI runs it)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    full = [i for i in items if i.path.suffix == ".ipynb" or i.path.name in FULL_TIER]
    if full:
        config.hook.pytest_deselected(items=full)
        slow = set(full)
        items[:] = [i for i in items if i not in slow]


def pytest_terminal_summary(terminalreporter, config):
    if not config.getoption("--full"):
        terminalreporter.write_line("fast tier; `python -m pytest -q --full` also runs the "
                                    "notebooks and the slow tests (as CI does)")


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


@pytest.fixture()
def random_tiny_weights(tmp_path, monkeypatch):
    """Point the tiny loader at random (seeded) weights: these tests check mechanics, not
    quality."""
    from safetensors.torch import save_file

    import tiny

    torch.manual_seed(0)
    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.make_unet().state_dict().items()}, str(path))
    monkeypatch.setattr(tiny, "UNET_WEIGHTS", path)
    return path
