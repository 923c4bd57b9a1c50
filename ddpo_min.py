"""ddpo-min: Denoising Diffusion Policy Optimization (Black et al. 2023, arXiv 2305.13301), minimal.

Read top to bottom: the objectives (small pure functions, each quoting its equation), then the training
loop that calls them. The policy itself (DDIM steps with log-probs) lives in sampler.py, whose notation
table this file shares: x_t, x_{t-1}, c, t, log p = log p_theta(x_{t-1} | x_t, c), r = r(x_0, c), A the
advantage, rho the importance ratio, eps the clip range, w the RWR weight.

Shape letters: B batch (of transitions or of samples), C,H,W latent, L tokens, D embed dim.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

import tiny
from sampler import TextToImage, recompute_log_prob, sample_with_logprob, step_sigmas

ROOT = Path(__file__).resolve().parent

# ====================================================================================================
# Objectives (issue 2)
#
# Every loss takes per-transition tensors of shape (B,) and returns a scalar to *minimise*; its gradient
# is minus the paper's ascent direction. The training loop calls them once per denoising step j and
# accumulates gradients over all T steps ("gradients are always accumulated across all timesteps").
# ====================================================================================================


def ddpo_sf_loss(log_prob: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """DDPO_SF, the score-function (REINFORCE) surrogate (seed 001, ĝ_SF; derivation in seed 002):

        ĝ_SF = E[ sum_{t=0}^{T} ∇_θ log p_θ(x_{t-1} | c, t, x_t) r(x_0, c) ]

        loss = -mean_b( A_b * log p_θ(x_{t-1} | c, t, x_t)_b )        so  ∇_θ loss = -ĝ_SF (one step's term)

    r is replaced by the advantage A (r minus a per-prompt baseline, scaled): a baseline leaves the
    expected gradient unchanged and lowers its variance. Used for exactly one gradient step per round
    of sampling, at θ = θ_old.

    Args: log_prob (B,) with grad (from sampler.recompute_log_prob); advantages (B,), treated as constants.
    """
    return -(advantages.detach() * log_prob).mean()  # -mean(A log p)


def ddpo_is_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO_IS, the importance-sampled gradient with a PPO trust region (seed 001, ĝ_IS; seed 002):

        ĝ_IS = E[ sum_t  p_θ(x_{t-1}|c,t,x_t) / p_θold(x_{t-1}|c,t,x_t)  ∇_θ log p_θ(x_{t-1}|c,t,x_t) r ]

        rho  = exp(log p_θ - log p_θold)
        loss = mean_b( max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) )

    ∇_θ(-A rho) = -A rho ∇_θ log p_θ is exactly one term of -ĝ_IS. The max (a min of the objectives)
    keeps the pessimistic one, so a sample stops contributing gradient once its ratio has moved past
    1 ± eps in the direction its advantage pushes. The paper uses eps = 1e-4.

    Returns:
        loss: scalar. info: {"approx_kl": 0.5 mean((log p - log p_old)^2), "clipfrac": mean(|rho - 1| > eps)},
        detached (logged as loss/approx_kl and loss/clipfrac).
    """
    log_ratio = log_prob - old_log_prob.detach()  # log rho, (B,)
    ratio = torch.exp(log_ratio)  # rho, (B,)
    advantages = advantages.detach()  # A, (B,)
    unclipped = -advantages * ratio  # -A rho
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # -A clip(rho,1-eps,1+eps)
    loss = torch.maximum(unclipped, clipped).mean()  # mean(max(., .))
    info = {
        "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),  # 0.5 E[(log rho)^2] ~ KL(p_old||p)
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),  # share of clipped ratios
    }
    return loss, info


def rwr_weights(rewards: torch.Tensor, beta: float = 0.2) -> torch.Tensor:
    """Reward-weighted regression weights (seed 001, RWR):  w_RWR(x_0, c) = exp(β r(x_0, c)) / Z.

    Z is chosen so the weights average 1 over the batch: w = B * softmax(β r). Softmax subtracts
    max(β r) before exponentiating, so huge rewards do not overflow. With weights averaging 1 the
    weighted loss keeps the scale of the unweighted one. β = 1/5 as in the reference code.

    Args: rewards (B,). Returns: (B,) float32 weights, no grad.
    """
    r = torch.as_tensor(rewards).detach().float()  # r, (B,)
    return torch.softmax(beta * r, dim=0) * r.shape[0]  # exp(β r) / Z with Z = mean_b exp(β r_b)


def sparse_rwr_mask(rewards: torch.Tensor, percentile: float = 90.0) -> torch.Tensor:
    """Sparse RWR (seed 001):  w_sparse(x_0, c) = 1[r(x_0, c) >= C],  C = the batch's `percentile`-th reward.

    Returns a (B,) bool mask. Fine-tune on the kept samples only, unweighted:
    `diffusion_mse_loss(unet, scheduler, x0[mask], prompt_embeds[mask], ...)`. (Passing the mask as
    `weights=` would average over all B and shrink the loss by the kept fraction.)
    """
    r = torch.as_tensor(rewards).detach().float()  # r, (B,)
    threshold = torch.quantile(r, percentile / 100.0)  # C (linear interpolation between order statistics)
    return r >= threshold  # 1[r >= C]


def diffusion_mse_loss(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    x0: torch.Tensor,
    prompt_embeds: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The diffusion training loss (seed 001, Eq. 1), optionally weighted per sample for RWR:

        L_DDPM(θ) = E[ || μ̃(x_t, x_0) - μ_θ(x_t, t, c) ||^2 ]                                      (Eq. 1)

    in its practical form: μ_θ is parametrised through the network's prediction, and matching means is
    (up to a per-t weight that is dropped, as in Ho et al.'s "simple" loss) matching that prediction:

        x_t = sqrt(alphā_t) x_0 + sqrt(1 - alphā_t) ε                 (scheduler.add_noise)
        loss = mean_b( w_b * mean_{CHW} (f_θ(x_t, t, c) - target)^2 ),
        target = ε (epsilon) | sqrt(alphā_t) ε - sqrt(1 - alphā_t) x_0 (v_prediction) | x_0 (sample)

    Args:
        x0: (B, C, H, W) clean latents; prompt_embeds: (B, L, D); timesteps: (B,) long in [0, 1000);
        noise: (B, C, H, W) ε ~ N(0, I); weights: (B,) e.g. rwr_weights(r), or None (all ones).
    Returns: scalar loss, float32.
    """
    dtype = next(unet.parameters()).dtype
    x0, noise = x0.float(), noise.float()
    x_t = scheduler.add_noise(x0, noise, timesteps)  # x_t = sqrt(alphā_t) x_0 + sqrt(1-alphā_t) ε, (B,C,H,W)
    prediction = unet(x_t.to(dtype), timesteps, encoder_hidden_states=prompt_embeds.to(dtype)).sample.float()

    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise  # ε
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, timesteps)  # v = sqrt(alphā_t) ε - sqrt(1-alphā_t) x_0
    elif kind == "sample":
        target = x0  # x_0
    else:
        raise ValueError(f"unknown prediction_type {kind!r}")

    per_sample = ((prediction - target) ** 2).mean(dim=tuple(range(1, x0.ndim)))  # (B,)
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float32, device=per_sample.device)  # w, (B,)
        per_sample = per_sample * w  # w_b * MSE_b
    return per_sample.mean()


class PerPromptStatTracker:
    """Advantages from per-prompt reward statistics: A = (r - mean_c) / (std_c + 1e-6).

    For each prompt c, keeps the last `buffer_size` rewards in a bounded deque. A prompt whose buffer
    holds fewer than `min_count` rewards (counting the current batch) is normalised with the whole
    current batch's mean and std instead. Stds are population stds (ddof=0). `update` returns float32
    **numpy** advantages, (B,), in the order of its inputs, even for integer rewards.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        if not 1 <= min_count <= buffer_size:
            raise ValueError(f"need 1 <= min_count ({min_count}) <= buffer_size ({buffer_size})")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(
        self, prompts: Sequence[str], rewards: np.ndarray | torch.Tensor | Sequence[float]
    ) -> np.ndarray:
        if isinstance(rewards, torch.Tensor):
            rewards = rewards.detach().cpu().numpy()
        r = np.asarray(rewards, dtype=np.float64).reshape(-1)  # r, (B,)
        if len(prompts) != r.shape[0]:
            raise ValueError(f"{len(prompts)} prompts but {r.shape[0]} rewards")
        prompts_arr = np.asarray(prompts, dtype=object)
        batch_mean, batch_std = r.mean(), r.std()  # fallback statistics
        advantages = np.empty_like(r)  # A, (B,)
        for prompt in dict.fromkeys(prompts):  # unique prompts, first-seen order
            idx = np.flatnonzero(prompts_arr == prompt)
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(r[idx].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = float(np.mean(buffer)), float(np.std(buffer))
            advantages[idx] = (r[idx] - mean) / (std + 1e-6)  # A = (r - mean) / (std + 1e-6)
        return advantages.astype(np.float32)

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.buffers = {p: deque(map(float, b), maxlen=self.buffer_size) for p, b in state["buffers"].items()}


def clip_advantages(advantages: np.ndarray | torch.Tensor, max_abs: float = 5.0) -> np.ndarray | torch.Tensor:
    """A <- clip(A, -max_abs, max_abs); works on numpy arrays and torch tensors alike."""
    # DEVIATION: advantage clipping is not in the paper; it is in the authors' reference code (seed 002,
    # footnote 1), with max_abs = 5. Why: one outlier reward, normalised by a small per-prompt std, would
    # otherwise dominate a minibatch. Effect: bounded per-sample gradient weight; no change for |A| <= 5.
    return advantages.clip(-max_abs, max_abs)  # clip(A, -5, 5)


# ====================================================================================================
# Configuration (issue 5)
#
# One typed dataclass; every field carries its help text and the CLI is generated from it. Defaults are
# the paper's single-GPU setting (Stable Diffusion v1.4 + LoRA). `--model tiny` switches to TINY_DEFAULTS
# below, for a laptop CPU; any flag given explicitly wins over both.
# ====================================================================================================

ALGOS = ("ddpo_is", "ddpo_sf", "rwr", "rwr_sparse")
TRAINABLE = ("all", "cross_attention")
PROMPT_SETS = ("simple_animals", "imagenet_animals", "animals_activities")
ACTIVITIES = ("washing the dishes", "riding a bike", "playing chess")
REWARD_OPTIONS = {"aesthetic": ("clip_model",), "alignment": ("vlm", "bertscore_model")}  # Config -> make_reward


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class Config:
    # what to optimise
    reward: str = _help("compressibility | incompressibility | aesthetic | alignment", "aesthetic")
    algo: str = _help("ddpo_is (PPO-clipped, paper's best) | ddpo_sf (REINFORCE) | rwr | rwr_sparse", "ddpo_is")
    model: str = _help("hub id or local folder of a Stable Diffusion pipeline, or `tiny`",
                       "CompVis/stable-diffusion-v1-4")
    prompts: str = _help("simple_animals (45) | imagenet_animals (398) | animals_activities (45x3) | a .txt path",
                         "simple_animals")
    clip_model: str = _help("aesthetic: CLIP ViT-L/14 hub id or local folder (default "
                            "openai/clip-vit-large-patch14)", "")
    vlm: str = _help("alignment: VLM hub id or folder (default Qwen/Qwen2-VL-2B-Instruct; paper: "
                     "llava-hf/llava-1.5-7b-hf)", "")
    bertscore_model: str = _help("alignment: BERTScore model, hub id, folder or `minilm` (offline)", "")
    # sampling
    num_steps: int = _help("DDIM denoising steps T", 50)
    eta: float = _help("DDIM noise scale; must be > 0 for a stochastic policy", 1.0)
    guidance_scale: float = _help("classifier-free guidance weight w (negative prompt: empty)", 5.0)
    sample_batch_size: int = _help("images per sampling forward pass", 8)
    sample_batches: int = _help("sampling batches per epoch (samples/epoch = this x sample_batch_size)", 32)
    samples_per_prompt: int = _help("images per drawn prompt in a sampling batch; 1 = every image draws its own "
                                    "prompt (the paper)", 1)
    # training
    train_batch_size: int = _help("samples per training forward pass (gradients accumulate over them)", 2)
    minibatches: int = _help("optimizer steps per inner epoch (paper: 4 for ddpo_is, 1 for ddpo_sf)", 4)
    inner_epochs: int = _help("passes over each epoch's samples", 1)
    timestep_fraction: float = _help("fraction of the T steps trained per sample (shuffled per sample)", 1.0)
    lr: float = _help("AdamW learning rate", 3e-4)
    adam_beta1: float = _help("AdamW beta1", 0.9)
    adam_beta2: float = _help("AdamW beta2", 0.999)
    weight_decay: float = _help("AdamW weight decay", 1e-4)
    max_grad_norm: float = _help("gradient-norm clip", 1.0)
    clip_range: float = _help("PPO clip range eps on the ratio (ddpo_is)", 1e-4)
    adv_clip_max: float = _help("advantages are clipped to [-this, this]", 5.0)
    per_prompt_stats: bool = _help("normalise rewards per prompt (else over the batch)", True)
    stat_buffer: int = _help("per-prompt reward buffer length", 32)
    stat_min_count: int = _help("rewards a prompt needs before its own stats are used", 16)
    rwr_beta: float = _help("RWR inverse temperature beta in exp(beta r)", 0.2)
    rwr_percentile: float = _help("sparse RWR keeps samples with reward >= this batch percentile", 90.0)
    lora_rank: int = _help("LoRA rank on the UNet attention projections; 0 = full fine-tuning", 4)
    trainable: str = _help("which UNet weights train: all (LoRA: every attention projection; full fine-tuning: "
                           "every weight) | cross_attention (only the text-to-image attention blocks, attn2)", "all")
    mixed_precision: str = _help("fp16 | bf16 | no: dtype of the frozen base model (GPU only)", "fp16")
    # run
    epochs: int = _help("sampling+training epochs", 100)
    max_minutes: float = _help("stop (with a checkpoint) after the epoch that passes this many minutes of this "
                               "invocation (a resumed run counts afresh); 0 = off", 0.0)
    seed: int = _help("random seed (sampling, prompts, shuffles)", 0)
    output_dir: str = _help("run folder (default: runs/<reward>-<algo>-<model>-<time>)", "")
    resume: str = _help("a run folder to continue exactly from its last checkpoint", "")
    save_every: int = _help("checkpoint every N epochs (and always at the end)", 1)
    device: str = _help("cuda | cpu | mps (default: cuda if available)", "")
    log: str = _help("none | tensorboard | wandb, besides metrics.jsonl", "none")
    grid_size: int = _help("images in each epoch's sample grid", 16)

    @classmethod
    def tiny(cls, **overrides) -> Config:
        """The tiny-scale config, as `--model tiny` gives it: Config.tiny(reward="alignment", epochs=5)."""
        reward = overrides.get("reward", TINY_DEFAULTS["reward"])
        return replace(cls(), **{"model": "tiny", **TINY_DEFAULTS, **TINY_REWARD_DEFAULTS.get(reward, {}), **overrides})


# Tiny-scale defaults (`--model tiny`): a 1.2M-parameter pixel-space model on a laptop CPU.
# DEVIATION: 20 DDIM steps (paper 50), 64 samples per epoch (paper 256), half the timesteps trained per
# sample, full fine-tuning in fp32 (paper: LoRA on fp16). Why: minutes on 2 CPU cores instead of hours on
# 8 A100s. Effect: noisier gradients.
# DEVIATION: each epoch draws 8 prompts and samples each 8 times, and advantages are normalised within
# those 8 (stat buffer = min count = 8: a per-prompt baseline from the current epoch only); the paper
# draws a prompt per sample and keeps a 32-reward buffer per prompt. Why: at this scale 82% of the JPEG
# reward's variance is between prompts, and 64 i.i.d. prompts over 45 animals leave the per-prompt
# buffers too short for ~11 epochs, so advantages were mostly "which animal". A longer buffer also lags a
# fast-improving policy (advantages drift positive).
# DEVIATION: clip range 1e-3 (paper 1e-4). Why: one AdamW step of full fine-tuning moves the averaged
# log-prob ratio ~50x further than 1e-4, so with 1e-4 most transitions of the 2nd-4th minibatch were
# clipped and carried no gradient. Measured (7 min, 1 thread, step-3000 weights, held-out JPEG size):
# clip 1e-4 -5.3% (12 epochs); clip 1e-3 with a 32-reward buffer -11.5%; with the 8-reward group -16.7%.
# Kept from the paper: eta 1, DDPO_IS with 4 optimizer steps per epoch, advantages clipped at 5.
TINY_DEFAULTS = dict(
    reward="compressibility", num_steps=20, guidance_scale=tiny.GUIDANCE, sample_batch_size=32, sample_batches=2,
    samples_per_prompt=8, stat_buffer=8, stat_min_count=8, clip_range=1e-3,
    train_batch_size=16, minibatches=4, timestep_fraction=0.5, lr=2e-4, lora_rank=0, mixed_precision="no",
    epochs=15, grid_size=16,
)  # fmt: skip
# Per reward, on top of TINY_DEFAULTS.
# DEVIATION: alignment at tiny scale trains only the cross-attention blocks (attn2; 0.23M of 1.15M weights, full
# fine-tuning) at lr 1e-4, on every timestep (timestep fraction 1, the paper's value). The paper trains LoRA on
# every attention projection at lr 3e-4. Why: trained on every weight, alignment traded recognisability away for
# busier images (held-out JPEG +2% to +13%, speckle, magenta backgrounds) and was slow (3 seeds, 20 min:
# +7.4 top-1 points at lr 2e-5; lr 2e-4 lost reward). Our reading: each epoch sees 8 of the 45 prompts, and
# a prompt-independent weight (a conv, a self-attention) that helped those 8 changes every image; attn2 is
# where the prompt enters, so its changes stay closer to the prompts that asked for them. Single-seed 1-thread
# trials, top-1 on 45 animals x 8: lr 1e-4 +4.4 / +8.3 points (seeds 0 / 1) after 12 epochs; lr 3e-4 -9.7;
# lr 1e-4 on every timestep +10.8 (seed 0) after 12 epochs, which cost 11.5 min there against 8.4 min at
# fraction 0.5. Then `bench.py learning --only alignment --seeds 0 1 2` (20 min each): +12.5 points at the
# picked checkpoints (+11.7 / +10.6 / +15.3), held-out JPEG +3.9% (every weight at 2e-5: +6.0%).
# Effect: the images still drift busier, more slowly. The JPEG rewards keep the defaults above.
TINY_REWARD_DEFAULTS = {"alignment": dict(lr=1e-4, trainable="cross_attention", timestep_fraction=1.0)}


def samples_per_epoch(cfg: Config) -> int:
    return cfg.sample_batch_size * cfg.sample_batches


def check_config(cfg: Config) -> None:
    """Fail early, with the numbers, on anything that would fail (or silently misbehave) later."""
    if cfg.algo not in ALGOS:
        raise ConfigError(f"unknown --algo {cfg.algo!r}; choose one of {', '.join(ALGOS)}")
    from rewards import REWARDS

    if cfg.reward not in REWARDS:
        raise ConfigError(f"unknown --reward {cfg.reward!r}; choose one of {', '.join(REWARDS)}")
    if cfg.eta <= 0:
        raise ConfigError(f"--eta {cfg.eta}: DDPO needs a stochastic sampler, eta > 0 (paper: 1)")
    if not 0 < cfg.timestep_fraction <= 1:
        raise ConfigError(f"--timestep-fraction {cfg.timestep_fraction} must be in (0, 1]")
    if cfg.samples_per_prompt < 1 or cfg.sample_batch_size % cfg.samples_per_prompt:
        raise ConfigError(f"--samples-per-prompt {cfg.samples_per_prompt} must divide --sample-batch-size "
                          f"{cfg.sample_batch_size}")
    n = samples_per_epoch(cfg)
    per_step = n // cfg.minibatches if n % cfg.minibatches == 0 else None
    if per_step is None or per_step % cfg.train_batch_size:
        raise ConfigError(
            f"batch arithmetic: {cfg.sample_batch_size} x {cfg.sample_batches} = {n} samples per epoch must split "
            f"into --minibatches {cfg.minibatches} of a multiple of --train-batch-size {cfg.train_batch_size}"
        )
    if cfg.log not in ("none", "tensorboard", "wandb"):
        raise ConfigError(f"unknown --log {cfg.log!r}; choose none, tensorboard or wandb")
    if cfg.trainable not in TRAINABLE:
        raise ConfigError(f"unknown --trainable {cfg.trainable!r}; choose one of {', '.join(TRAINABLE)}")
    if cfg.mixed_precision not in ("fp16", "bf16", "no"):
        raise ConfigError(f"unknown --mixed-precision {cfg.mixed_precision!r}; choose fp16, bf16 or no")


class ConfigError(ValueError):
    """Bad input from the user: printed as one line by the CLI."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or reward: the run stops, keeping its last good checkpoint."""


# ====================================================================================================
# Prompts and models
# ====================================================================================================


def load_prompts(name: str) -> list[str]:
    """The paper's prompt sets, or one prompt per line of a text file."""
    if name == "simple_animals":
        return list(tiny.ANIMAL_PROMPTS)  # "a(n) [animal]", the paper's 45 common animals
    if name == "imagenet_animals":  # the first 398 ImageNet classes are animals
        lines = (ROOT / "assets" / "imagenet_animals.txt").read_text().splitlines()
        return [tiny.prompt_for(x.strip()) for x in lines if x.strip()]
    if name == "animals_activities":  # "a(n) [animal] [activity]", 45 x 3
        return [f"{prompt} {act}" for prompt in tiny.ANIMAL_PROMPTS for act in ACTIVITIES]
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"--prompts {name!r} is neither one of {', '.join(PROMPT_SETS)} nor a text file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompts file {name} has no prompts (one per line)")
    return prompts


def load_model(cfg: Config, device: torch.device) -> TextToImage:
    """The tiny model, or Stable Diffusion (hub id / local folder) with LoRA or full fine-tuning."""
    if cfg.model == "tiny":
        try:
            model = tiny.load_tiny(device)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
        if cfg.lora_rank > 0:
            add_lora(model.unet, cfg.lora_rank, cfg.trainable)
        else:
            full_fine_tuning(model.unet, cfg.trainable)  # in fp32 at tiny scale
        return model
    return load_stable_diffusion(cfg, device)


# The UNet's attention blocks come in pairs: attn1 is self-attention (pixels attend to pixels), attn2 is
# cross-attention (pixels attend to the prompt's tokens). attn2 is the only place the prompt enters the
# UNet, so `--trainable cross_attention` trains exactly the weights that map text to image.
CROSS_ATTENTION = ".attn2."


def full_fine_tuning(unet: torch.nn.Module, trainable: str = "all") -> None:
    """Train the UNet's own weights (kept in float32): all of them, or only the cross-attention blocks."""
    unet.float()
    for name, p in unet.named_parameters():
        p.requires_grad_(trainable == "all" or CROSS_ATTENTION in name)


def add_lora(unet: torch.nn.Module, rank: int, trainable: str = "all") -> None:
    """LoRA (peft) on the attention projections to_q, to_k, to_v, to_out.0; only LoRA weights train.

    trainable="cross_attention" puts LoRA on the cross-attention (attn2) projections only.
    LoRA weights stay in float32 even when the base UNet is fp16/bf16 (autocast mixes them).
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    projections = ["to_q", "to_k", "to_v", "to_out.0"]
    if trainable == "cross_attention":  # a string is a regex peft matches against whole module names
        projections = f".*{re.escape(CROSS_ATTENTION)}({'|'.join(map(re.escape, projections))})"
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=projections)
    unet.add_adapter(config)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def load_stable_diffusion(cfg: Config, device: torch.device) -> TextToImage:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[cfg.mixed_precision]
    if device.type == "cpu" and dtype != torch.float32:
        print(f"note: --mixed-precision {cfg.mixed_precision} ignored on CPU (float32)")
        dtype = torch.float32
    try:
        pipe = StableDiffusionPipeline.from_pretrained(cfg.model, safety_checker=None,
                                                       requires_safety_checker=False)
    except (OSError, ValueError) as err:
        hub = "" if Path(cfg.model).is_dir() else " The Hugging Face hub is unreachable or offline."
        raise ConfigError(
            f"cannot load Stable Diffusion from {cfg.model!r} ({type(err).__name__}).{hub} Pass --model with a "
            "local folder holding a saved StableDiffusionPipeline, or use --model tiny (no download)."
        ) from None
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the sampler the paper uses (eta = 1)
    vae, text_encoder, tokenizer, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    for module in (vae, text_encoder):
        module.requires_grad_(False).to(device, dtype).eval()
    if cfg.lora_rank > 0:
        unet.to(device, dtype)
        add_lora(unet, cfg.lora_rank, cfg.trainable)
    else:
        unet.to(device)
        full_fine_tuning(unet, cfg.trainable)  # full fine-tuning stays in fp32

    @torch.no_grad()
    def encode_prompts(prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        return text_encoder(ids)[0]  # (B, 77, 768)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        images = vae.decode(latents.to(dtype) / vae.config.scaling_factor).sample  # (B, 3, 512, 512) in [-1, 1]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    size = unet.config.sample_size
    return TextToImage(unet=unet, scheduler=scheduler, encode_prompts=encode_prompts, decode=decode,
                       latent_shape=(unet.config.in_channels, size, size), name=cfg.model)


def trainable_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.named_parameters() if v.requires_grad}


def save_weights(model: TextToImage, cfg: Config, folder: Path) -> None:
    """LoRA in the format `StableDiffusionPipeline.load_lora_weights` reads; full UNet as safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.lora_rank > 0:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(model.unet))
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=lora, safe_serialization=True)
    else:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in model.unet.state_dict().items()},
                  str(folder / "unet.safetensors"))


# ====================================================================================================
# The training loop (issue 5): sample -> reward -> advantages -> policy-gradient steps, every epoch
# ====================================================================================================


@dataclass
class Samples:
    """One epoch of experience, N = samples per epoch, T = denoising steps."""

    latents: torch.Tensor  # (N, T+1, C, H, W) x_T ... x_0
    log_probs: torch.Tensor  # (N, T) log p_theta_old(x_{t-1} | x_t, c) at sampling time
    timesteps: torch.Tensor  # (T,)
    prompt_embeds: torch.Tensor  # (N, L, D)
    prompts: list[str]
    images: torch.Tensor  # (N, 3, H', W') float in [0, 1], on CPU
    rewards: np.ndarray  # (N,) float32
    extras: dict


@dataclass
class State:
    """Everything that must survive a restart for the run to continue exactly."""

    epoch: int = 0
    step: int = 0  # optimizer steps so far
    history: list = field(default_factory=list)  # per-epoch metric dicts


class Run:
    """Holds the model, optimizer, RNGs and folders of one training run. The loop is `train()` below."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dir = Path(cfg.output_dir)
        self.prompts = load_prompts(cfg.prompts)
        from rewards import RewardModelUnavailable, make_reward

        scale = "tiny" if cfg.model == "tiny" else "paper"
        options = {k: getattr(cfg, k) for k in REWARD_OPTIONS.get(cfg.reward, ()) if getattr(cfg, k)}
        try:
            self.reward_fn = make_reward(cfg.reward, scale=scale, device=str(self.device), **options)
        except (ValueError, RewardModelUnavailable) as err:
            raise ConfigError(str(err)) from None
        self.model = load_model(cfg, self.device)  # after the cheap checks: loading SD takes a while
        self.params = [p for p in self.model.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           weight_decay=cfg.weight_decay)
        self.tracker = PerPromptStatTracker(cfg.stat_buffer, cfg.stat_min_count)
        self.negative_embeds = self.model.encode_prompts([""])  # (1, L, D) the empty negative prompt
        # Three generators, all checkpointed: prompt choice (numpy), sampling noise (on the model's
        # device), and training shuffles / RWR noise (CPU).
        self.prompt_rng = np.random.default_rng(cfg.seed)
        self.sample_gen = torch.Generator(self.device).manual_seed(cfg.seed)
        self.train_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.state = State()
        dtype = next(self.model.unet.parameters()).dtype
        self.autocast = torch.autocast(self.device.type, dtype=dtype,
                                       enabled=self.device.type == "cuda" and dtype != torch.float32)

    # --- checkpoints ------------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        state = {
            "trainable": trainable_state(self.model.unet),
            "optimizer": self.optimizer.state_dict(),
            "tracker": self.tracker.state_dict(),
            "prompt_rng": self.prompt_rng.bit_generator.state,
            "sample_gen": self.sample_gen.get_state(),
            "train_gen": self.train_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "epoch": self.state.epoch,
            "step": self.state.step,
            "history": self.state.history,
        }
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_path)  # atomic: a kill during the save keeps the previous checkpoint

    def load_checkpoint(self) -> None:
        s = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        params = dict(self.model.unet.named_parameters())
        with torch.no_grad():
            for k, v in s["trainable"].items():
                params[k].copy_(v)
        self.optimizer.load_state_dict(s["optimizer"])
        self.tracker.load_state_dict(s["tracker"])
        self.prompt_rng.bit_generator.state = s["prompt_rng"]
        self.sample_gen.set_state(s["sample_gen"])
        self.train_gen.set_state(s["train_gen"])
        torch.set_rng_state(s["torch_rng"])
        if s["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda_rng"])
        self.state = State(epoch=s["epoch"], step=s["step"], history=s["history"])


class InlineExecutor(Executor):
    """An executor that runs each job at once on the calling thread (the CPU stand-in for a worker thread).

    On a GPU the reward worker thread overlaps real work: the GPU samples batch i+1 while the CPU (or
    another stream) scores batch i. On a CPU there is nothing to overlap: torch already runs the UNet on
    every core, and a second thread that runs torch ops makes OpenMP start a second team of threads on the
    same cores. Measured on 2 cores (tiny defaults, epoch 1 of 2, alternating runs): 33.8-35.9 s per
    epoch with the worker thread, 22.9-27.0 s inline, and the train phase slowed too, after the rewards
    were done (NOTES.md).
    """

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:  # re-raised by future.result(), as a worker thread's would be
            # (KeyboardInterrupt is not caught: Ctrl-C must stop the loop at once, not after sampling)
            future.set_exception(error)
        return future


def reward_executor(device: torch.device) -> Executor:
    """A one-thread pool for the rewards on an accelerator; inline on a CPU (see InlineExecutor)."""
    if device.type == "cpu":
        return InlineExecutor()
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")


def sample_epoch(run: Run, pool: Executor) -> tuple[Samples, dict]:
    """Phase 1+2: roll out the policy (no grad) and score the images on a worker thread.

    On a GPU the reward of batch i is computed while batch i+1 samples, so a slow reward (a VLM)
    overlaps with the UNet instead of adding to it. On a CPU `pool` is an InlineExecutor: same code
    path, but each batch is scored at once on this thread (time/sample then includes the rewards).
    """
    cfg, model = run.cfg, run.model
    t0 = time.perf_counter()
    batches, futures = [], []
    model.unet.eval()
    for _ in tqdm(range(cfg.sample_batches), desc=f"epoch {run.state.epoch}: sampling", leave=False):
        # sample_batch_size / k prompts, each repeated k times (k = 1: i.i.d. prompts, as in the paper)
        k = cfg.samples_per_prompt
        prompts = [p for p in run.prompt_rng.choice(run.prompts, cfg.sample_batch_size // k) for _ in range(k)]
        embeds = model.encode_prompts(prompts)  # (B, L, D)
        with run.autocast:
            traj = sample_with_logprob(model.unet, model.scheduler, embeds, run.negative_embeds,
                                       num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, eta=cfg.eta,
                                       latent_shape=model.latent_shape, generator=run.sample_gen)
        images = model.decode(traj.x0).cpu()  # (B, 3, H', W') in [0, 1]
        futures.append(pool.submit(_timed, run.reward_fn, images, prompts))
        batches.append((traj, embeds, prompts, images))
    t_sample = time.perf_counter() - t0
    t1 = time.perf_counter()
    results = [f.result() for f in futures]  # ((rewards, extras), seconds) per batch
    t_wait = time.perf_counter() - t1
    rewards = np.concatenate([r for (r, _), _ in results]).astype(np.float32)  # (N,)
    extras: dict = {}
    for (_, ex), _ in results:
        for k, v in ex.items():
            extras.setdefault(k, []).extend(list(v))
    samples = Samples(
        latents=torch.cat([b[0].latents for b in batches]),  # (N, T+1, C, H, W)
        log_probs=torch.cat([b[0].log_probs for b in batches]),  # (N, T)
        timesteps=batches[0][0].timesteps,  # (T,)
        prompt_embeds=torch.cat([b[1] for b in batches]),  # (N, L, D)
        prompts=[p for b in batches for p in b[2]],
        images=torch.cat([b[3] for b in batches]),  # (N, 3, H', W')
        rewards=rewards,
        extras=extras,
    )
    timing = {"time/sample": t_sample, "time/reward": sum(s for _, s in results), "time/reward_wait": t_wait}
    return samples, timing


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def compute_advantages(run: Run, samples: Samples) -> torch.Tensor:
    """Phase 3: A = (r - mean) / (std + 1e-6), per prompt (or over the batch), clipped to +-adv_clip_max."""
    cfg = run.cfg
    if cfg.per_prompt_stats:
        adv = run.tracker.update(samples.prompts, samples.rewards)  # (N,)
    else:
        r = samples.rewards.astype(np.float64)
        adv = ((r - r.mean()) / (r.std() + 1e-6)).astype(np.float32)
    return torch.as_tensor(clip_advantages(adv, cfg.adv_clip_max), device=run.device)  # (N,)


def policy_loss(run: Run, samples: Samples, idx: torch.Tensor, j: torch.Tensor, adv: torch.Tensor):
    """The DDPO loss on transitions (sample idx, step j): recompute log p under theta, compare with theta_old.

    idx, j: (b,) sample and step indices; adv: (b,) advantages. Returns (loss, info).
    """
    cfg, model = run.cfg, run.model
    x_t = samples.latents[idx, j]  # (b, C, H, W)
    x_prev = samples.latents[idx, j + 1]  # (b, C, H, W)
    t = samples.timesteps[j]  # (b,)
    with run.autocast:
        log_prob = recompute_log_prob(model.unet, model.scheduler, x_t, x_prev, t, samples.prompt_embeds[idx],
                                      run.negative_embeds, cfg.guidance_scale, cfg.eta)  # (b,)
    if cfg.algo == "ddpo_sf":
        return ddpo_sf_loss(log_prob, adv), {}
    return ddpo_is_loss(log_prob, samples.log_probs[idx, j], adv, cfg.clip_range)


def rwr_loss(run: Run, samples: Samples, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """RWR / sparse RWR: the diffusion loss (Eq. 1) on the sampled x_0, weighted per sample."""
    x0 = samples.latents[idx, -1]  # (b, C, H, W)
    t = torch.randint(0, run.model.scheduler.config.num_train_timesteps, (len(idx),), generator=run.train_gen)
    noise = torch.randn(x0.shape, generator=run.train_gen)
    with run.autocast:
        return diffusion_mse_loss(run.model.unet, run.model.scheduler, x0, samples.prompt_embeds[idx],
                                  t.to(x0.device), noise.to(x0.device), weights)


def trainable_steps(cfg: Config, scheduler, timesteps: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The indices of the stochastic sampling steps, (T_s,), and how many of them each sample trains on.

    A deterministic last step (sigma_t = 0 with set_alpha_to_one=True, as in the tiny model) has
    log-prob 0 and no gradient, so training on it would only cost time.
    """
    steps = (step_sigmas(scheduler, timesteps, cfg.eta) > 0).nonzero().flatten()  # (T_s,)
    return steps, max(1, int(round(len(steps) * cfg.timestep_fraction)))


def train_epoch(run: Run, samples: Samples, adv: torch.Tensor) -> dict:
    """Phase 4-6: inner epochs over shuffled samples and independently shuffled timesteps.

    Each optimizer step sees one minibatch of samples and accumulates gradients over all of its samples
    and over the trained timesteps of each ("gradients are always accumulated across all timesteps"),
    then clips the gradient norm. DDPO_SF takes one step at theta = theta_old; DDPO_IS takes
    `minibatches` steps per inner epoch, kept close to theta_old by the clipped ratio.
    """
    cfg, model = run.cfg, run.model
    model.unet.train()
    n = samples.log_probs.shape[0]
    steps, T_train = trainable_steps(cfg, model.scheduler, samples.timesteps)
    stats: dict[str, list[float]] = {"loss/policy": [], "loss/approx_kl": [], "loss/clipfrac": [], "grad_norm": []}

    if cfg.algo in ("rwr", "rwr_sparse"):  # per-sample weights over the whole epoch
        r = torch.as_tensor(samples.rewards)
        if cfg.algo == "rwr":
            keep, weights = torch.arange(n), rwr_weights(r, cfg.rwr_beta)  # w = exp(beta r) / Z
        else:
            keep = sparse_rwr_mask(r, cfg.rwr_percentile).nonzero().flatten()  # 1[r >= C]
            weights = torch.ones(n)
    for _ in range(cfg.inner_epochs):
        if cfg.algo in ("rwr", "rwr_sparse"):
            order = keep[torch.randperm(len(keep), generator=run.train_gen)]
        else:
            order = torch.randperm(n, generator=run.train_gen)  # shuffled samples, (N,)
        # independently shuffled timesteps for every sample: perms[i] is a permutation of the stochastic steps
        perms = steps[torch.argsort(torch.rand(n, len(steps), generator=run.train_gen), dim=1)]  # (N, T_s)
        for mb in tqdm(order.chunk(cfg.minibatches), desc=f"epoch {run.state.epoch}: training", leave=False):
            chunks = mb.split(cfg.train_batch_size)
            n_terms = len(chunks) * (1 if cfg.algo.startswith("rwr") else T_train)
            for chunk in chunks:
                chunk_dev = chunk.to(run.device)
                if cfg.algo.startswith("rwr"):
                    loss, info = rwr_loss(run, samples, chunk_dev, weights[chunk].to(run.device)), {}
                    _backward(run, loss / n_terms, "train")
                    stats["loss/policy"].append(loss.item())
                    continue
                for k in range(T_train):
                    j = perms[chunk, k].to(run.device)  # the k-th shuffled step of each sample, (b,)
                    loss, info = policy_loss(run, samples, chunk_dev, j, adv[chunk_dev])
                    _backward(run, loss / n_terms, "train")
                    stats["loss/policy"].append(loss.item())
                    for key, v in info.items():
                        stats[f"loss/{key}"].append(v.item())
            grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise TrainingDiverged(f"epoch {run.state.epoch}, phase train: non-finite gradient norm")
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.state.step += 1
            stats["grad_norm"].append(grad_norm.item())
    return {k: (float(np.mean(v)) if v else None) for k, v in stats.items()}


def _backward(run: Run, loss: torch.Tensor, phase: str) -> None:
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"epoch {run.state.epoch}, phase {phase}: non-finite loss {loss.item()}")
    loss.backward()


# ====================================================================================================
# Logging: metrics.jsonl, an image grid per epoch, the reward curve
# ====================================================================================================


def save_grid(samples: Samples, path: Path, n: int) -> None:
    """The first n images with their prompt and reward underneath."""
    from PIL import Image, ImageDraw

    n = min(n, len(samples.prompts))
    tile = 128 if samples.images.shape[-1] <= 128 else 256
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    text_h = 28
    sheet = Image.new("RGB", (cols * tile, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    captions = samples.extras.get("captions")
    for i in range(n):
        arr = (samples.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        im = Image.fromarray(arr).resize((tile, tile), Image.NEAREST if arr.shape[0] < tile else Image.BILINEAR)
        x, y = (i % cols) * tile, (i // cols) * (tile + text_h)
        sheet.paste(im, (x, y))
        label = f"{samples.prompts[i][:22]}\nr={samples.rewards[i]:.3g}"
        if captions:
            label = f"{samples.prompts[i][:13]}>{str(captions[i])[:9]}\nr={samples.rewards[i]:.3g}"
        draw.multiline_text((x + 2, y + tile + 1), label, fill="black", spacing=1)
    sheet.save(path)


def save_reward_curve(history: list[dict], path: Path, reward: str) -> None:
    # a bare Figure, not pyplot: no global backend switch, so notebooks keep their inline plots
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    mean = np.array([h["reward/mean"] for h in history])
    std = np.array([h["reward/std"] for h in history])
    fig = Figure(figsize=(5, 3.2), dpi=120)
    ax = fig.subplots()
    ax.plot(epochs, mean, marker="o", ms=3)
    ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set(xlabel="epoch", ylabel=f"reward ({reward})", title="reward/mean ± reward/std")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


class ExternalLogger:
    """Optional tensorboard / wandb mirror of metrics.jsonl (only imported when asked for)."""

    def __init__(self, cfg: Config, folder: Path):
        self.kind, self.writer = cfg.log, None
        try:
            if cfg.log == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(folder / "tb"))
            elif cfg.log == "wandb":
                import wandb

                self.writer = wandb.init(project="ddpo-min", config=asdict(cfg), dir=str(folder))
        except ImportError as err:
            raise ConfigError(f"--log {cfg.log} needs its package: pip install {cfg.log} ({err})") from None

    def log(self, metrics: dict, step: int) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        if self.kind == "tensorboard":
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        elif self.kind == "wandb":
            self.writer.log(scalars, step=step)


# ====================================================================================================
# train(): the thin loop over the phases above
# ====================================================================================================


def train(cfg: Config) -> Path:
    """Run DDPO (or RWR) for cfg.epochs epochs; returns the run folder. Resumes exactly from cfg.resume."""
    if cfg.resume:
        cfg = resume_config(cfg)
    check_config(cfg)
    if not cfg.output_dir:
        name = "tiny" if cfg.model == "tiny" else Path(cfg.model).name
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg = replace(cfg, output_dir=str(ROOT / "runs" / f"{cfg.reward}-{cfg.algo}-{name}-{stamp}"))
    torch.manual_seed(cfg.seed)
    run = Run(cfg)
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    if run.ckpt_path.exists():
        run.load_checkpoint()
        print(f"resumed {run.dir} at epoch {run.state.epoch} (optimizer step {run.state.step})")
    print_sizes(cfg, run)
    metrics_path = run.dir / "metrics.jsonl"
    # keep only the epochs the checkpoint contains (a crash between the two writes leaves one extra)
    metrics_path.write_text("".join(json.dumps(h) + "\n" for h in run.state.history))
    logger = ExternalLogger(cfg, run.dir)

    pool = reward_executor(run.device)  # rewards overlap the next batch's sampling on a GPU
    started = time.perf_counter()
    try:
        while run.state.epoch < cfg.epochs:
            if cfg.max_minutes and time.perf_counter() - started > 60 * cfg.max_minutes:
                print(f"--max-minutes {cfg.max_minutes} reached after epoch {run.state.epoch - 1}")
                run.save_checkpoint()
                break
            epoch, t0 = run.state.epoch, time.perf_counter()
            samples, timing = sample_epoch(run, pool)  # 1-2. sample with log-probs; rewards on a thread
            if not np.all(np.isfinite(samples.rewards)):
                raise TrainingDiverged(f"epoch {epoch}, phase reward: non-finite reward from {cfg.reward!r}")
            adv = compute_advantages(run, samples)  # 3. per-prompt advantages
            t1 = time.perf_counter()
            losses = train_epoch(run, samples, adv)  # 4-6. clipped policy-gradient steps
            t_train = time.perf_counter() - t1
            metrics = {
                "epoch": epoch, "step": run.state.step,
                "reward/mean": float(samples.rewards.mean()), "reward/std": float(samples.rewards.std()),
                **losses, **timing, "time/train": t_train, "time/epoch": time.perf_counter() - t0,
                "samples_per_second": len(samples.prompts) / (time.perf_counter() - t0),
            }  # fmt: skip
            run.state.history.append(metrics)
            run.state.epoch += 1
            with metrics_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            save_grid(samples, run.dir / f"samples_epoch{epoch:04d}.png", cfg.grid_size)
            save_reward_curve(run.state.history, run.dir / "reward_curve.png", cfg.reward)
            logger.log(metrics, run.state.step)
            if run.state.epoch % cfg.save_every == 0 or run.state.epoch == cfg.epochs:
                run.save_checkpoint()
            print(format_metrics(metrics))
    except KeyboardInterrupt:
        # The checkpoint on disk is the end of the last finished epoch: resuming from it repeats the
        # interrupted epoch exactly. The half-trained weights are exported too, so nothing is lost.
        save_weights(run.model, cfg, run.dir / "interrupted_weights")
        print(f"\ninterrupted in epoch {run.state.epoch}; resume exactly with: python ddpo_min.py --resume {run.dir}"
              f"\n(current weights saved to {run.dir / 'interrupted_weights'})")
        raise
    finally:
        pool.shutdown(wait=True)
    save_weights(run.model, cfg, run.dir / "weights")
    print(f"done: {run.dir} (weights in {run.dir / 'weights'})")
    return run.dir


def resume_config(cfg: Config) -> Config:
    folder = Path(cfg.resume)
    if not (folder / "config.json").is_file() or not (folder / "checkpoint.pt").is_file():
        raise ConfigError(f"--resume {cfg.resume}: no config.json + checkpoint.pt there")
    saved = Config(**json.loads((folder / "config.json").read_text()))
    # the saved config wins (the run continues as it began); only how long to go on may change: the number
    # of epochs, and the wall-time limit of this invocation
    return replace(saved, epochs=cfg.epochs or saved.epochs, max_minutes=cfg.max_minutes, output_dir=str(folder),
                   resume="")


def print_sizes(cfg: Config, run: Run) -> None:
    n = samples_per_epoch(cfg)
    run.model.scheduler.set_timesteps(cfg.num_steps)
    steps, T_train = trainable_steps(cfg, run.model.scheduler, run.model.scheduler.timesteps)
    n_train = sum(p.numel() for p in run.params)
    print(
        f"model {cfg.model} on {run.device} | trainable params {n_train / 1e6:.2f}M "
        f"({'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full fine-tuning'}"
        f"{', cross-attention only' if cfg.trainable == 'cross_attention' else ''})\n"
        f"samples/epoch {n} = {cfg.sample_batches} batches x {cfg.sample_batch_size} | {len(run.prompts)} prompts "
        f"({cfg.prompts}) | reward {cfg.reward} | algo {cfg.algo}\n"
        f"optimizer steps/epoch {cfg.minibatches * cfg.inner_epochs} = {cfg.minibatches} minibatches of "
        f"{n // cfg.minibatches} samples x {cfg.inner_epochs} inner epochs, each accumulating "
        f"{n // cfg.minibatches // cfg.train_batch_size} forward chunks"
        + (" (RWR: one diffusion loss per sample)" if cfg.algo.startswith("rwr") else
           f" x {T_train}/{len(steps)} stochastic timesteps (of {cfg.num_steps})")
    )


def format_metrics(m: dict) -> str:
    parts = [f"epoch {m['epoch']}", f"reward {m['reward/mean']:.4g} ± {m['reward/std']:.3g}"]
    for k in ("loss/policy", "loss/approx_kl", "loss/clipfrac"):
        if m.get(k) is not None:
            parts.append(f"{k.split('/')[1]} {m[k]:.3g}")
    parts.append(f"{m['time/epoch']:.1f}s (sample {m['time/sample']:.1f}, train {m['time/train']:.1f})")
    return " | ".join(parts)


# ====================================================================================================
# CLI: generated from Config; unknown flags fail; errors are one line
# ====================================================================================================


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        description="DDPO: fine-tune a text-to-image diffusion model on a reward with RL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = Config()
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str, "bool": _parse_bool}[f.type]
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                            help=f"{f.metadata['help']} (default: {getattr(defaults, f.name)!r})")
    explicit = vars(parser.parse_args(argv))  # only the flags actually given (unknown flags exit 2)
    if explicit.get("resume"):
        explicit = {"epochs": 0, **explicit}  # 0 = keep the run's own epochs unless --epochs is given
    return Config.tiny(**explicit) if explicit.get("model") == "tiny" else replace(Config(), **explicit)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (ConfigError, TrainingDiverged) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
