"""ddpo-min: Denoising Diffusion Policy Optimization, minimal.

Black, Janner, Du, Kostrikov, Levine, "Training Diffusion Models with Reinforcement Learning",
arXiv 2305.13301. Denoising is a T-step MDP whose policy is the sampler's Gaussian step (Sec. 4.3,
sampler.py); DDPO improves it with policy gradients on a reward r(x_0, c) of the final image.

    train(cfg)                                                   one epoch = one round of sampling
    ├─ sample_epoch        1. roll out p_θ(x_{t-1} | x_t, c) with log-probs (sampler.py)
    │                      2. score the images, r(x_0, c) (rewards.py)
    ├─ compute_advantages  3. A = (r - mean_c) / std_c per prompt, clipped (PerPromptStatTracker)
    ├─ train_epoch         4. for each minibatch that `minibatches` yields, by cfg.algo:
    │                            ddpo_is: rescore log p_θ, ddpo_is_loss (clipped ratio, Sec. 4.3)
    │                            ddpo_sf: rescore log p_θ, ddpo_sf_loss (REINFORCE, Sec. 4.3)
    │                            with --kl-coef β: + β KL_t to the pretrained policy (not the
    │                                              paper's; rescore_with_kl)
    │                            rwr, rwr_sparse: diffusion_mse_loss weighted by rwr_weights or
    │                                             restricted by sparse_rwr_mask (Sec. 4.2)
    │                        accumulate over samples and timesteps, clip the norm, AdamW step
    └─ kl_to_pretrained    a diagnostic: how far p_θ has moved from the pretrained policy

Read top to bottom: the objectives (small pure functions, each quoting its equation), the
advantages, the epoch, then train(). Notation is sampler.py's: x_t, x_{t-1}, c, t,
log p = log p_θ(x_{t-1} | x_t, c), r = r(x_0, c), A the advantage, ρ the importance ratio, ε the
clip range, w the RWR weight. Shapes: B batch, S samples per epoch, T steps, C,H,W latent,
L tokens, D embedding width (and N processes). Configuration: config.py; loading models:
loading.py; the run's parts (Run), the optimizer step, checkpoints, the run folder and printing:
plumbing.py.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

import loading
import plumbing
from config import Config, ConfigError, TrainingDiverged, parse_args, samples_per_epoch
from plumbing import Run
from sampler import (
    Trajectory,
    ddim_step_mean,
    ddim_step_with_logprob,
    gaussian_kl,
    guided_model_output,
    recompute_log_prob,
    sample_with_logprob,
    trainable_steps,
)

# ==============================================================================================
# Objectives
#
# Every loss returns a scalar to *minimise*; its gradient is minus the paper's ascent direction.
# DDPO's two take per-transition tensors of shape (B,): the loop calls them once per chunk and
# trained denoising step, and accumulates the gradients over all of them before each optimizer
# step. RWR's diffusion_mse_loss takes the UNet and x_0, once per chunk, with weights from
# rwr_weights or a selection from sparse_rwr_mask.
#
# Two scalings separate the code's gradient from the paper's sums (DEVIATION, README): log p is the
# log-density averaged over the C*H*W latent dimensions (sampler.py), not summed, so the code's ρ is
# the true ratio to the power 1/(C*H*W); and each optimizer step averages its terms over the
# minibatch's samples and their T_train trained steps, where ĝ sums over t. The score-function
# gradient is thus the paper's divided by C*H*W * T_train: the learning rate and the gradient-norm
# clip absorb both.
# ==============================================================================================


def ddpo_sf_loss(log_prob: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """DDPO_SF, the score-function (REINFORCE) surrogate (Sec. 4.3, ĝ_SF):

        ĝ_SF = E[ sum_{t=1}^{T} ∇_θ log p_θ(x_{t-1} | c, t, x_t) r(x_0, c) ]

        loss = -mean_b( A_b * log p_θ(x_{t-1} | c, t, x_t)_b )     so  ∇_θ loss = -(one step's term)

    r is replaced by the advantage A (r minus a per-prompt baseline, scaled): a baseline leaves the
    expected gradient unchanged and lowers its variance. Valid for exactly one gradient step per
    round of sampling, at θ = θ_old.

    Args: log_prob (B,) with grad (from sampler.recompute_log_prob); advantages (B,), constants.
    """
    return -(advantages.detach() * log_prob).mean()  # -mean(A log p)


def ddpo_is_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO_IS, the importance-sampled gradient with a PPO trust region (Sec. 4.3, ĝ_IS):

        ĝ_IS = E[ sum_{t=1}^{T} ρ ∇_θ log p_θ(x_{t-1} | c, t, x_t) r(x_0, c) ],

        ρ    = p_θ(x_{t-1} | c, t, x_t) / p_θold(x_{t-1} | c, t, x_t) = exp(log p_θ - log p_θold)
        loss = mean_b( max(-A ρ, -A clip(ρ, 1 - ε, 1 + ε)) )

    ∇_θ(-A ρ) = -A ρ ∇_θ log p_θ is one term of -ĝ_IS (up to the scalings in the header above:
    here ρ and log p are per latent dimension). The max (a min of the objectives)
    keeps the pessimistic one, so a sample stops contributing gradient once its ratio has moved
    past 1 ± ε in the direction its advantage pushes. The paper uses ε = 1e-4.

    Returns:
        loss: scalar. info: {"approx_kl": 0.5 mean((log p - log p_old)^2), "clipfrac":
        mean(|ρ - 1| > ε)}, detached (logged as loss/approx_kl and loss/clipfrac).
    """
    log_ratio = log_prob - old_log_prob.detach()  # log ρ, (B,)
    ratio = torch.exp(log_ratio)  # ρ, (B,)
    advantages = advantages.detach()  # A, (B,)
    unclipped = -advantages * ratio  # -A ρ
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # -A clip(ρ)
    loss = torch.maximum(unclipped, clipped).mean()  # mean(max(., .))
    info = {
        "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),  # 0.5 E[(log ρ)^2]
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),  # clipped share
    }
    return loss, info


def rwr_weights(rewards: torch.Tensor, beta: float = 0.2) -> torch.Tensor:
    """Reward-weighted regression weights (Sec. 4.2):  w_RWR(x_0, c) = exp(β r(x_0, c)) / Z.

    Z is chosen so the weights average 1 over the batch: w = B * softmax(β r). Softmax subtracts
    max(β r) before exponentiating, so huge rewards do not overflow. With weights averaging 1 the
    weighted loss keeps the scale of the unweighted one. β = 1/5 as in the authors' code.

    Args: rewards (B,). Returns: (B,) float32 weights, no grad.
    """
    r = torch.as_tensor(rewards).detach().float()  # r, (B,)
    return torch.softmax(beta * r, dim=0) * r.shape[0]  # exp(β r) / Z, Z = mean_b exp(β r_b)


def sparse_rwr_mask(rewards: torch.Tensor, percentile: float = 90.0) -> torch.Tensor:
    """Sparse RWR (Sec. 4.2):  w_sparse(x_0, c) = 1[r(x_0, c) >= C],  C = the batch's percentile.

    Returns a (B,) bool mask. Fine-tune on the kept samples only, unweighted:
    `diffusion_mse_loss(unet, scheduler, x0[mask], prompt_embeds[mask], ...)`. (Passing the mask
    as `weights=` would average over all B and shrink the loss by the kept fraction.)
    """
    r = torch.as_tensor(rewards).detach().float()  # r, (B,)
    threshold = torch.quantile(r, percentile / 100.0)  # C (linear interpolation)
    return r >= threshold  # 1[r >= C]


def diffusion_mse_loss(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    x0: torch.Tensor,
    prompt_embeds: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    weights: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """The diffusion training loss (Sec. 3.1, Eq. 1), optionally weighted per sample for RWR:

        L_DDPM(θ) = E[ || μ̃(x_t, x_0) - μ_θ(x_t, t, c) ||^2 ]                             (Eq. 1)

    in its practical form: μ_θ is parametrised through the network's prediction, and matching
    means is (up to a per-t weight that is dropped, as in Ho et al.'s "simple" loss) matching
    that prediction:

        x_t = sqrt(alphā_t) x_0 + sqrt(1 - alphā_t) ε                 (scheduler.add_noise)
        loss = mean_b( w_b * mean_{CHW} (f_θ(x_t, t, c) - target)^2 ),
        target = ε (epsilon) | sqrt(alphā_t) ε - sqrt(1 - alphā_t) x_0 (v_prediction) | x_0

    With guidance_scale w != 1, f_θ is the guidance-combined prediction f_uncond + w (f_cond -
    f_uncond), the policy that sampling actually uses; RWR trains it, as the authors' code does.

    Args:
        x0: (B, C, H, W) clean latents; prompt_embeds: (B, L, D); timesteps: (B,) long in
        [0, 1000); noise: (B, C, H, W) ε ~ N(0, I); weights: (B,) e.g. rwr_weights(r), or None;
        negative_prompt_embeds: (1 or B, L, D), needed when guidance_scale != 1.
    Returns: scalar loss, float32.
    """
    x0, noise = x0.float(), noise.float()
    x_t = scheduler.add_noise(x0, noise, timesteps)  # sqrt(ā_t) x_0 + sqrt(1-ā_t) ε, (B,C,H,W)
    prediction = guided_model_output(unet, x_t, timesteps, prompt_embeds, negative_prompt_embeds,
                                     guidance_scale)  # f_θ(x_t, t, c), float32, (B, C, H, W)

    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise  # ε
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, timesteps)  # v = sqrt(ā_t) ε - sqrt(1-ā_t) x_0
    elif kind == "sample":
        target = x0  # x_0
    else:
        raise ValueError(f"unknown prediction_type {kind!r}")

    per_sample = ((prediction - target) ** 2).mean(dim=tuple(range(1, x0.ndim)))  # (B,)
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float32, device=per_sample.device)  # w, (B,)
        per_sample = per_sample * w  # w_b * MSE_b
    return per_sample.mean()


# ==============================================================================================
# Advantages
# ==============================================================================================


class PerPromptStatTracker:
    """Advantages from per-prompt reward statistics: A = (r - mean_c) / (std_c + 1e-6).

    For each prompt c, keeps the last `buffer_size` rewards in a bounded deque. A prompt whose
    buffer holds fewer than `min_count` rewards (counting the current batch) is normalised with the
    whole current batch's mean and std instead. Stds are population stds (ddof=0). `update`
    returns float32 **numpy** advantages, (B,), in the order of its inputs.
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
            # every reward normalised is in its statistics: a batch holding more of this prompt's
            # rewards than the buffer keeps is normalised with all of them
            recent = r[idx] if len(idx) > self.buffer_size else np.asarray(buffer)
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = float(np.mean(recent)), float(np.std(recent))
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
        self.buffers = {p: deque(map(float, b), maxlen=self.buffer_size)
                        for p, b in state["buffers"].items()}


def clip_advantages(advantages: np.ndarray | torch.Tensor, max_abs: float = 5.0):
    """A <- clip(A, -max_abs, max_abs); works on numpy arrays and torch tensors alike."""
    # DEVIATION: advantage clipping is not in the paper. The authors' JAX code clips at 10, the
    # PyTorch reimplementation (ddpo-pytorch) at 5, which we follow. Why: one outlier reward over a
    # small per-prompt std would dominate a minibatch. Effect: no change for |A| <= 5.
    return advantages.clip(-max_abs, max_abs)  # clip(A, -5, 5)


# ==============================================================================================
# The epoch: sample -> reward -> advantages -> train
#
# With N processes (`accelerate launch` or `torchrun`), the epoch's samples are numbered 0..S-1
# and process r owns the block [r S/N, (r+1) S/N). A sample's prompt and noise are drawn from its
# number alone, so N processes draw exactly the samples one process would. The rewards are
# gathered, so every process computes the same advantages, the same shuffles and the same
# minibatches, and trains on the part of each minibatch it owns; the gradients are summed over
# processes before every optimizer step. With N = 1 all of this reduces to a plain loop.
# ==============================================================================================


@dataclass
class Samples:
    """This process's share of one epoch, M = its samples, T = denoising steps; S = all samples."""

    index: torch.Tensor  # (M,) each row's number in the epoch, 0..S-1
    latents: torch.Tensor  # (M, T+1, C, H, W) x_T ... x_0
    log_probs: torch.Tensor  # (M, T) log p_θold(x_{t-1} | x_t, c) at sampling time
    timesteps: torch.Tensor  # (T,)
    prompt_embeds: torch.Tensor  # (M, L, D)
    prompts: list[str]  # (M,)
    images: torch.Tensor  # (M, 3, H', W') float in [0, 1], on CPU
    rewards: np.ndarray  # (M,) float32
    extras: dict
    all_prompts: list[str]  # (S,) every process's prompts, in sample order
    all_rewards: np.ndarray  # (S,) every process's rewards, gathered
    all_advantages: np.ndarray | None = None  # (S,) set in phase 3
    train_rewards: np.ndarray | None = None  # (S,) what phases 3-4 train on, set in phase 3


def progress(run: Run, iterable, **kwargs):
    """A progress bar on the main process (TQDM_DISABLE=1 turns it off); the others just iterate."""
    return tqdm(iterable, leave=False, **kwargs) if run.is_main else iterable


def sample_seed(cfg: Config, epoch: int, number: int, stream: int) -> int:
    """A seed for one sample's draws (stream 0: its prompt, 1: its noise), from its number; stream
    2 with number c: the c-th permutation of the prompts that groups of samples draw from; stream
    3: the epoch's draws of a reward-blind control."""
    return int(np.random.SeedSequence([cfg.seed, epoch, number, stream]).generate_state(1)[0])


def epoch_prompts(cfg: Config, prompts: Sequence[str], epoch: int) -> list[str]:
    """The prompt of every sample of the epoch, (S,), the same on every process.

    samples_per_prompt = 1 (the paper): every sample draws its own prompt, i.i.d. from its number.
    samples_per_prompt = k > 1: the samples come in groups of k that share one prompt, and the
    groups draw their prompts without replacement (one permutation of the prompts per P groups).
    """
    total, k = samples_per_epoch(cfg), cfg.samples_per_prompt
    if k == 1:
        return [prompts[np.random.default_rng(sample_seed(cfg, epoch, i, 0)).integers(len(prompts))]
                for i in range(total)]
    # DEVIATION: groups of samples draw their prompts without replacement (the paper draws each
    # sample's prompt independently). Why: the tiny scale normalises each group by its own rewards
    # (a buffer of exactly k per prompt); two groups on one prompt would share one baseline over
    # their 2k rewards, so neither group would be measured against its own samples alone. Effect:
    # every group's advantages average 0 while there are at least as many prompts as groups per
    # epoch (tiny: 8 groups, 45 prompts).
    P, groups = len(prompts), total // k
    order = np.concatenate([np.random.default_rng(sample_seed(cfg, epoch, c, 2)).permutation(P)
                            for c in range(-(-groups // P))])  # prompt numbers, (>= groups,)
    return [prompts[order[g]] for g in range(groups) for _ in range(k)]  # (S,)


@dataclass
class Scored:
    """A batch's rewards, as the reward thread returns them."""

    rewards: np.ndarray  # (B,)
    extras: dict  # per-sample extras of the reward (the VLM's captions, ...)
    seconds: float  # the reward's wall time


@dataclass
class Batch:
    """One sampling batch of this process, with its rewards still on their way (a future)."""

    numbers: range  # the samples' numbers in the epoch
    prompts: list[str]  # (B,)
    embeds: torch.Tensor  # (B, L, D)
    traj: Trajectory  # latents (B, T+1, C, H, W), log_probs (B, T), timesteps (T,)
    images: torch.Tensor  # (B, 3, H', W') in [0, 1], on CPU
    scored: Future  # -> Scored


def score(reward_fn: Callable, images: torch.Tensor, prompts: list[str]) -> Scored:
    """r(x_0, c) of one batch, timed (runs on the reward thread on a GPU)."""
    t0 = time.perf_counter()
    rewards, extras = reward_fn(images, prompts)
    if isinstance(rewards, torch.Tensor):  # (a reward of one's own may return a tensor)
        rewards = rewards.detach().float().cpu().numpy()
    rewards = np.asarray(rewards, dtype=np.float32)
    if rewards.shape != (len(prompts),):  # a reward of one's own, returning the wrong shape
        raise ConfigError(f"the reward returned an array of shape {rewards.shape} for "
                          f"{len(prompts)} images: it must return one number per image, (B,)")
    return Scored(rewards, extras, time.perf_counter() - t0)


def sample_epoch(run: Run, pool: Executor) -> tuple[Samples, dict]:
    """Phases 1-2: roll out the policy (no grad) on this process's samples, score them, gather
    the rewards of all processes.

    On a GPU `pool` is a worker thread: the reward of batch i is computed while batch i+1 samples,
    so a slow reward (a VLM) overlaps the UNet. On a CPU it is an InlineExecutor: the same code
    path, each batch scored at once on this thread (time/sample then includes the rewards).
    """
    cfg, model, epoch, acc = run.cfg, run.model, run.state.epoch, run.accelerator
    total = samples_per_epoch(cfg)  # S, over all processes
    mine = total // acc.num_processes  # M, this process's share
    first = acc.process_index * mine
    all_prompts = epoch_prompts(cfg, run.prompts, epoch)  # (S,), alike on every process
    t0 = time.perf_counter()
    batches: list[Batch] = []
    model.unet.eval()
    for b in progress(run, range(mine // cfg.sample_batch_size), desc=f"epoch {epoch}: sampling"):
        run.cpu_threads.adjust()
        numbers = range(first + b * cfg.sample_batch_size, first + (b + 1) * cfg.sample_batch_size)
        prompts = all_prompts[numbers.start:numbers.stop]
        noise = [torch.Generator(run.device).manual_seed(sample_seed(cfg, epoch, i, 1))
                 for i in numbers]  # one generator per sample: x_T and every step's z
        embeds = model.encode_prompts(prompts)  # (B, L, D)
        with run.autocast:
            traj = sample_with_logprob(model.unet, model.scheduler, embeds, run.negative_embeds,
                                       num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                                       eta=cfg.eta, latent_shape=model.latent_shape,
                                       generator=noise)
        images = model.decode(traj.x0).cpu()  # (B, 3, H', W') in [0, 1]
        # NaN latents, or finite ones that an fp16 VAE decode overflows: a reward would turn such
        # images into numbers like any other, so every process stops together here
        bad = (~torch.isfinite(traj.latents)).flatten(1).any(1).sum().item()  # (of B)
        bad_images = (~torch.isfinite(images)).flatten(1).any(1).sum().item()
        if plumbing.any_process(run, bad + bad_images > 0):
            raise TrainingDiverged(
                f"epoch {epoch}, phase sample: non-finite latents in {bad} and non-finite decoded "
                f"images in {bad_images} of {len(prompts)} samples (of process "
                f"{acc.process_index}; a decode alone overflowing in fp16: try --mixed-precision "
                "bf16)")
        batches.append(Batch(numbers, prompts, embeds, traj, images,
                             scored=pool.submit(score, run.reward_fn, images, prompts)))
    t_sample = time.perf_counter() - t0
    t1 = time.perf_counter()
    scored = [b.scored.result() for b in batches]  # waits for the reward thread
    t_wait = time.perf_counter() - t1
    rewards = np.concatenate([s.rewards for s in scored]).astype(np.float32)  # (M,)
    all_rewards = acc.gather(torch.as_tensor(rewards, device=run.device)).cpu().numpy()  # (S,)
    extras: dict = {}
    for s in scored:
        for key, v in s.extras.items():
            extras.setdefault(key, []).extend(list(v))
    samples = Samples(
        index=torch.tensor([i for b in batches for i in b.numbers]),  # (M,)
        latents=torch.cat([b.traj.latents for b in batches]),  # (M, T+1, C, H, W)
        log_probs=torch.cat([b.traj.log_probs for b in batches]),  # (M, T)
        timesteps=batches[0].traj.timesteps,  # (T,)
        prompt_embeds=torch.cat([b.embeds for b in batches]),  # (M, L, D)
        prompts=[p for b in batches for p in b.prompts],
        images=torch.cat([b.images for b in batches]),  # (M, 3, H', W')
        rewards=rewards,
        extras=extras,
        all_prompts=all_prompts,
        all_rewards=all_rewards,
    )
    timing = {"time/sample": t_sample, "time/reward": sum(s.seconds for s in scored),
              "time/reward_wait": t_wait}
    return samples, timing


def compute_advantages(run: Run, samples: Samples) -> torch.Tensor:
    """Phase 3: A = (r - mean) / (std + 1e-6) per prompt (or over the batch), clipped.

    Computed from every process's rewards, identically on each: returns the advantages of all S
    samples, (S,), indexed by sample number (a process picks its rows with samples.index)."""
    cfg = run.cfg
    samples.train_rewards = samples.all_rewards  # (S,)
    if cfg.reward_blind:  # a control (tools/compare.py): the same loop on draws that say nothing
        rng = np.random.default_rng(sample_seed(cfg, run.state.epoch, 0, 3))
        samples.train_rewards = rng.standard_normal(len(samples.all_rewards)).astype(np.float32)
    if cfg.per_prompt_stats:
        adv = run.tracker.update(samples.all_prompts, samples.train_rewards)  # (S,)
    else:
        r = samples.train_rewards.astype(np.float64)
        adv = ((r - r.mean()) / (r.std() + 1e-6)).astype(np.float32)
    samples.all_advantages = clip_advantages(adv, cfg.adv_clip_max)  # (S,)
    return torch.as_tensor(samples.all_advantages)  # (S,)


# ---- Phase 4: the loss terms of each algorithm ------------------------------------------------
#
# Each algorithm is one generator: for every optimizer step of a pass over the epoch's samples,
# it yields that step's loss terms on this process, each as (loss, weight, info). A term is the
# mean loss of a chunk of samples; its weight is the chunk's share of the whole minibatch (over
# all processes and trained timesteps), so the weighted sum over processes is the minibatch mean
# and every sample counts equally. Both take the advantages of all S samples, A (S,).


def my_rows(samples: Samples, numbers: torch.Tensor) -> torch.Tensor:
    """The rows of `samples` whose sample numbers are in `numbers`, in its order (maybe none)."""
    row = torch.full((len(samples.all_prompts),), -1, dtype=torch.long)  # number -> row, (S,)
    row[samples.index] = torch.arange(len(samples.index))
    rows = row[numbers]
    return rows[rows >= 0]


def my_chunks(samples: Samples, minibatch: torch.Tensor, size: int) -> list[torch.Tensor]:
    """This process's rows of the minibatch in chunks of at most `size` rows. With N processes a
    process may own none of a minibatch: then no chunk at all (torch.empty(0).split(size) would
    give one empty chunk, and a UNet cannot run on 0 samples)."""
    rows = my_rows(samples, minibatch)
    return list(rows.split(size)) if len(rows) else []


def rescore(run: Run, samples: Samples, idx: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """log p_θ(x_{t-1} | x_t, c) of stored transitions (rows idx, steps j) under the current θ."""
    cfg, model = run.cfg, run.model
    x_t = samples.latents[idx, j]  # (b, C, H, W)
    x_prev = samples.latents[idx, j + 1]  # (b, C, H, W)
    t = samples.timesteps[j]  # (b,)
    with run.autocast:
        return recompute_log_prob(model.unet, model.scheduler, x_t, x_prev, t,
                                  samples.prompt_embeds[idx], run.negative_embeds,
                                  cfg.guidance_scale, cfg.eta)  # (b,)


def policy_loss(run: Run, samples: Samples, idx: torch.Tensor, j: torch.Tensor,
                adv: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The DDPO loss of transitions (rows idx, steps j, advantages adv (b,)): rescore under θ,
    compare with θ_old. With --kl-coef β > 0, plus β times their mean KL to the pretrained
    policy."""
    cfg = run.cfg
    if cfg.kl_coef:
        log_prob, kl = rescore_with_kl(run, samples, idx, j)  # (b,) each
    else:
        log_prob = rescore(run, samples, idx, j)  # log p_θ, (b,)
    if cfg.algo == "ddpo_is":
        loss, info = ddpo_is_loss(log_prob, samples.log_probs[idx, j], adv, cfg.clip_range)
    else:  # ddpo_sf: valid at θ = θ_old only, one optimizer step per epoch
        loss, info = ddpo_sf_loss(log_prob, adv), {}
    if cfg.kl_coef:
        return loss + cfg.kl_coef * kl.mean(), {**info, "kl_penalty": kl.mean().detach()}
    return loss, info


def rescore_with_kl(run: Run, samples: Samples, idx: torch.Tensor,
                    j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_θ of stored transitions and their per-step KL to the pretrained policy, (b,) each,
    both with gradient through μ_θ. The objective with a KL leash (not the paper's):

        J_β(θ) = E[ r(x_0, c) ] - β KL( p_θ(x_{0:T} | c) || p_pre(x_{0:T} | c) )
        KL( p_θ(x_{0:T} | c) || p_pre(x_{0:T} | c) ) = Σ_t E_{x_t ~ p_θ}[ KL_t ]        (chain rule)
        KL_t = KL( p_θ(x_{t-1} | x_t, c) || p_pre(x_{t-1} | x_t, c) )
             = |μ_θ(x_t, t, c) - μ_pre(x_t, t, c)|^2 / (2 σ_t^2)   (Eq. 2: one σ_t for both)

    Each trained transition adds β KL_t to its loss, at its stored state x_t (sampled by θ_old,
    which the trust region keeps near θ); the gradient flows through μ_θ, not through the
    distribution of the states. KL_t is averaged over C*H*W like the log-probs, so β weighs it
    against the advantage term as it would with both summed. The sum over steps of these per-step
    KLs bounds the KL between the final images' distributions; DPOK (Fan et al., arXiv 2305.16381)
    regularises with the same sum. The pretrained mean costs one more guided UNet call per
    transition, without gradient (the frozen copy, or the UNet with its LoRA adapters off)."""
    cfg, model = run.cfg, run.model
    x_t, x_prev = samples.latents[idx, j], samples.latents[idx, j + 1]  # (b, C, H, W) each
    t, embeds = samples.timesteps[j], samples.prompt_embeds[idx]  # (b,), (b, L, D)
    with run.autocast:
        out = guided_model_output(model.unet, x_t, t, embeds, run.negative_embeds,
                                  cfg.guidance_scale)  # under θ, with gradient
        t0 = plumbing.synced_clock(run.device)
        with torch.no_grad(), loading.pretrained_unet(model.unet, run.reference) as pretrained:
            out_pre = guided_model_output(pretrained, x_t, t, embeds, run.negative_embeds,
                                          cfg.guidance_scale)
        run.kl_penalty_seconds += plumbing.synced_clock(run.device) - t0  # its extra cost
    _, log_prob = ddim_step_with_logprob(model.scheduler, out, t, x_t, cfg.eta,
                                         prev_sample=x_prev)  # (b,); the release's is exercise 1
    mean, sigma = ddim_step_mean(model.scheduler, out, t, x_t, cfg.eta)  # μ_θ, σ_t
    mean_pre, _ = ddim_step_mean(model.scheduler, out_pre, t, x_t, cfg.eta)  # μ_pre
    return log_prob, gaussian_kl(mean, mean_pre, sigma)  # (b,) each


def ddpo_minibatches(run: Run, samples: Samples, adv: torch.Tensor
                     ) -> Iterator[Iterator[tuple[torch.Tensor, float, dict]]]:
    """DDPO (Sec. 4.3): shuffled samples, each trained on its own shuffled timesteps.

    One term per (chunk of train_batch_size samples, trained timestep): every optimizer step
    accumulates over all trained timesteps of its samples. DDPO_SF takes one step at θ = θ_old;
    DDPO_IS takes `minibatches` steps, kept close to θ_old by the clipped ratio.
    """
    cfg, total = run.cfg, len(samples.all_prompts)
    steps, T_train = trainable_steps(run.model.scheduler, samples.timesteps, cfg.eta,
                                     cfg.timestep_fraction)
    order = torch.randperm(total, generator=run.train_gen)  # shuffled sample numbers, (S,)
    # every sample's own shuffle of the stochastic steps: perms[i] is a permutation of `steps`
    shuffle = torch.argsort(torch.rand(total, len(steps), generator=run.train_gen), dim=1)
    perms = steps[shuffle]  # (S, T_s)

    def terms(mb: torch.Tensor):
        for chunk in my_chunks(samples, mb, cfg.train_batch_size):
            idx, number = chunk.to(run.device), samples.index[chunk]  # rows, sample numbers (b,)
            for k in range(T_train):
                j = perms[number, k].to(run.device)  # each sample's k-th step, (b,)
                loss, info = policy_loss(run, samples, idx, j, adv[number].to(run.device))
                yield loss, len(chunk) / (len(mb) * T_train), info

    for mb in order.chunk(cfg.minibatches):
        yield terms(mb)


def rwr_loss(run: Run, samples: Samples, idx: torch.Tensor, weights: torch.Tensor,
             t: torch.Tensor, noise: torch.Tensor):
    """RWR / sparse RWR: the diffusion loss (Eq. 1) on the sampled x_0, weighted per sample."""
    x0 = samples.latents[idx, -1]  # (b, C, H, W)
    with run.autocast:  # the guided prediction: the policy that sampled x_0
        return diffusion_mse_loss(run.model.unet, run.model.scheduler, x0,
                                  samples.prompt_embeds[idx], t, noise, weights,
                                  run.negative_embeds, run.cfg.guidance_scale)


def rwr_minibatches(run: Run, samples: Samples, adv: torch.Tensor
                    ) -> Iterator[Iterator[tuple[torch.Tensor, float, dict]]]:
    """RWR (Sec. 4.2): one diffusion loss per chunk of the selected samples, selected and weighted
    by the reward r (the paper), or by the advantage A (`rwr_signal`, the tiny default)."""
    cfg, total = run.cfg, len(samples.all_prompts)
    signal = torch.as_tensor(samples.train_rewards) if cfg.rwr_signal == "reward" else adv  # (S,)
    if cfg.algo == "rwr":  # every sample, weighted w = exp(β r) / Z
        keep, weights = torch.arange(total), rwr_weights(signal, cfg.rwr_beta)
    else:  # rwr_sparse: the samples with r >= C, unweighted
        keep = sparse_rwr_mask(signal, cfg.rwr_percentile).nonzero().flatten()  # 1[r >= C]
        weights = torch.ones(total)
    order = keep[torch.randperm(len(keep), generator=run.train_gen)]  # shuffled kept samples
    # each sample's diffusion timestep and noise ε, drawn for all S alike on every process
    t_all = torch.randint(0, run.model.scheduler.config.num_train_timesteps, (total,),
                          generator=run.train_gen)  # (S,)
    noise_all = torch.randn((total, *run.model.latent_shape), generator=run.train_gen)

    def terms(mb: torch.Tensor):
        for chunk in my_chunks(samples, mb, cfg.train_batch_size):
            number = samples.index[chunk]  # (b,)
            loss = rwr_loss(run, samples, chunk.to(run.device), weights[number].to(run.device),
                            t_all[number].to(run.device), noise_all[number].to(run.device))
            yield loss, len(chunk) / len(mb), {}

    for mb in order.chunk(cfg.minibatches):  # (sparse RWR keeps few: chunk may give fewer steps)
        yield terms(mb)


def minibatches(run: Run, samples: Samples, adv: torch.Tensor):
    """The algorithm is chosen here, once: DDPO's or RWR's loss terms, one iterator of terms per
    optimizer step."""
    if run.cfg.algo in ("ddpo_is", "ddpo_sf"):
        return ddpo_minibatches(run, samples, adv)
    return rwr_minibatches(run, samples, adv)


def train_epoch(run: Run, samples: Samples, adv: torch.Tensor) -> dict:
    """Phase 4: `inner_epochs` passes; each optimizer step accumulates its minibatch's terms, then
    sums the gradients over processes, clips their norm and steps AdamW (plumbing.optimizer_step,
    which also handles fp16 loss scaling)."""
    cfg = run.cfg
    # rescoring takes t_prev from the scheduler's grid (sampler.step_constants): the grid that
    # sampled this epoch's trajectories, unless something set other timesteps since
    if run.model.scheduler.num_inference_steps != len(samples.timesteps):
        raise RuntimeError(f"the scheduler was set to {run.model.scheduler.num_inference_steps} "
                           f"steps after sampling {len(samples.timesteps)}: rescoring would pair "
                           "each x_t with the wrong t_prev")
    run.model.unet.train()
    # the logged losses: every term's value times its weight (its share of the minibatch), summed
    # over the epoch and the processes, over the weights' sum: sample-weighted, the same for any
    # number of processes and any chunking
    stats = {"loss/policy": [0.0, 0.0], "loss/approx_kl": [0.0, 0.0], "loss/clipfrac": [0.0, 0.0]}
    if cfg.kl_coef:
        stats["loss/kl_penalty"] = [0.0, 0.0]  # the KL term before its β
    run.kl_penalty_seconds = 0.0  # the pretrained policy's forward passes (--kl-coef)
    grad_norms, skipped_steps = [], 0
    for _ in range(cfg.inner_epochs):
        for terms in progress(run, minibatches(run, samples, adv), total=cfg.minibatches,
                              desc=f"epoch {run.state.epoch}: training"):
            run.cpu_threads.adjust()
            nonfinite = 0
            for loss, weight, info in terms:
                if not torch.isfinite(loss):
                    nonfinite += 1  # every process must learn of it: counted in optimizer_step
                    continue
                plumbing.backward(run, loss, weight)
                for key, v in {"policy": loss, **info}.items():
                    stats[f"loss/{key}"][0] += weight * v.item()  # Σ w * value
                    stats[f"loss/{key}"][1] += weight  # Σ w
            grad_norm, skipped = plumbing.optimizer_step(run, nonfinite)
            if not skipped:  # a skipped fp16 step's norm is inf: the norms of the steps taken
                grad_norms.append(grad_norm)  # the same on every process (summed gradients)
            skipped_steps += skipped
    out = plumbing.weighted_means_over_processes(run, stats)  # {key: Σ w value / Σ w, or None}
    grad_norm = float(np.mean(grad_norms)) if grad_norms else None
    cost = {"time/kl_penalty": run.kl_penalty_seconds} if cfg.kl_coef else {}
    return {**out, "grad_norm": grad_norm, "skipped_steps": skipped_steps, **cost}


@torch.no_grad()
def kl_to_pretrained(run: Run, samples: Samples) -> float | None:
    """Diagnostic, not a loss: how far the policy has moved from the pretrained one.

        KL_t = KL( p_θ(x_{t-1} | x_t, c) || p_pretrained(x_{t-1} | x_t, c) ),  after this epoch's
        update, averaged over `kl_samples` of the epoch's trajectories in all (evenly spaced over
        its samples, so over several prompts) and `kl_steps` stochastic steps of each

    Both policies are Gaussians with the same σ_t (Eq. 2), so KL_t = |μ_θ - μ_pre|^2 / (2 σ_t^2),
    averaged over C*H*W like the log-probs. With LoRA the pretrained policy is the same UNet with
    its adapters switched off. Each trajectory is scored at kl_steps of the T_s stochastic steps,
    evenly spaced and staggered from one trajectory to the next, so that together they cover the
    steps evenly (each one once when kl_samples * kl_steps >= T_s); kl_steps >= T_s scores them
    all.
    """
    cfg, model = run.cfg, run.model
    if not cfg.kl_samples:
        return None
    # K samples evenly spaced over the whole epoch, whichever process holds them: K in all, for
    # any number of processes
    total = len(samples.all_prompts)
    K = min(cfg.kl_samples, total)
    numbers = torch.linspace(0, total - 1, K).round().long()  # (K,) sample numbers
    steps, _ = trainable_steps(model.scheduler, samples.timesteps, cfg.eta, 1.0)  # (T_s,)
    R = min(cfg.kl_steps, len(steps))
    # trajectory k's r-th step: position (r + k/K) T_s/R of the T_s stochastic steps, (K, R)
    where = ((torch.arange(R)[None, :] + torch.arange(K)[:, None] / K) * len(steps) / R).long()
    mine = torch.isin(numbers, samples.index)  # the K that this process holds, (K,)
    idx, where = my_rows(samples, numbers), where[mine]  # (k,), (k, R): maybe none
    if not len(idx):
        return plumbing.mean_over_processes(run, [])  # (a collective: every process calls it)
    embeds = samples.prompt_embeds[idx]  # (k, L, D)

    def policy_mean(unet, x_t, t):
        with run.autocast:
            out = guided_model_output(unet, x_t, t, embeds, run.negative_embeds,
                                      cfg.guidance_scale)
        return ddim_step_mean(model.scheduler, out, t, x_t, cfg.eta)  # μ (k, C, H, W), σ_t (k,)

    model.unet.eval()
    kls = []
    for r in range(R):
        j = steps[where[:, r]]  # each trajectory's r-th scored step, (k,)
        x_t = samples.latents[idx, j].to(run.device)  # (k, C, H, W)
        t = samples.timesteps[j].to(run.device)  # (k,)
        mean, sigma = policy_mean(model.unet, x_t, t)
        with loading.pretrained_unet(model.unet, run.reference) as pretrained:
            mean_pre, _ = policy_mean(pretrained, x_t, t)
        kls.extend(gaussian_kl(mean, mean_pre, sigma).tolist())
    return plumbing.mean_over_processes(run, kls)


# ==============================================================================================
# train(): the thin loop over the phases above
# ==============================================================================================


def train(cfg: Config) -> Path:
    """Run DDPO (or RWR) for cfg.epochs epochs; returns the run folder. Resumes exactly."""
    cfg = plumbing.run_config(cfg)  # --resume: the saved config; else names a new run folder
    run = Run(cfg)  # the processes, the model, the reward, the RNGs (plumbing.py)
    with plumbing.folder_lock(run):  # one training per run folder at a time
        # phase 3's baseline and phase 4's optimizer
        run.tracker = PerPromptStatTracker(cfg.stat_buffer, cfg.stat_min_count)
        run.optimizer = torch.optim.AdamW(run.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          betas=(cfg.adam_beta1, cfg.adam_beta2))
        say = run.accelerator.print  # prints on the main process only
        if plumbing.has_checkpoint(run.dir):
            plumbing.load_checkpoint(run)
            say(f"resumed {run.dir} at epoch {run.state.epoch} (optimizer step {run.state.step})")
            if run.state.epoch > cfg.epochs:  # --epochs is the total, not how many more
                raise ConfigError(f"{run.dir} is at epoch {run.state.epoch} already: --epochs "
                                  "counts all epochs, so pass more than "
                                  f"{run.state.epoch} to go on")
        plumbing.check_same_start(run)  # N processes: all from the same checkpoint, or all fresh
        run.model.scheduler.set_timesteps(cfg.num_steps)  # the sampling grid, on every process
        if cfg.algo.startswith("ddpo") and not len(trainable_steps(
                run.model.scheduler, run.model.scheduler.timesteps, cfg.eta, 1.0)[0]):
            raise ConfigError(f"--num-steps {cfg.num_steps}: no step of this sampler is "
                              "stochastic (its last one is deterministic), so DDPO has nothing "
                              "to train on; use --num-steps 2 or more")
        folder = plumbing.RunFolder(run)  # config.json, metrics.jsonl, grids, curve, logger
        pool = plumbing.reward_executor(run.device)  # on a GPU: rewards overlap the next sampling
        started = time.perf_counter()
        try:
            while run.state.epoch < cfg.epochs:
                late = time.perf_counter() - started > 60 * cfg.max_minutes
                if cfg.max_minutes and plumbing.any_process(run, late):  # all stop together
                    say(f"--max-minutes {cfg.max_minutes} reached after epoch "
                        f"{run.state.epoch - 1}")
                    plumbing.save_checkpoint(run)
                    break
                epoch, t0 = run.state.epoch, time.perf_counter()
                samples, timing = sample_epoch(run, pool)  # 1-2. sample with log-probs, rewards
                if not np.all(np.isfinite(samples.all_rewards)):
                    raise TrainingDiverged(f"epoch {epoch}, phase reward: non-finite reward from "
                                           f"{cfg.reward!r}")
                adv = compute_advantages(run, samples)  # 3. per-prompt advantages
                t1 = time.perf_counter()
                losses = train_epoch(run, samples, adv)  # 4. policy-gradient steps
                t_train = time.perf_counter() - t1
                kl = kl_to_pretrained(run, samples)  # a diagnostic, after the update
                t_kl = time.perf_counter() - t1 - t_train
                metrics = {
                    "epoch": epoch, "step": run.state.step,
                    "reward/mean": float(samples.all_rewards.mean()),
                    "reward/std": float(samples.all_rewards.std()),
                    **losses, "kl/pretrained": kl,
                    **timing, "time/train": t_train, "time/kl": t_kl,
                    "time/epoch": time.perf_counter() - t0,
                    "samples_per_second": len(samples.all_rewards) / (time.perf_counter() - t0),
                }  # fmt: skip
                run.state.history.append(metrics)
                run.state.epoch += 1
                folder.epoch(samples, metrics)
                if run.state.epoch % cfg.save_every == 0 or run.state.epoch == cfg.epochs:
                    plumbing.save_checkpoint(run)
                say(plumbing.format_metrics(metrics))
                del samples, adv  # this epoch's trajectories, off the GPU before the next one
        except KeyboardInterrupt:
            # The checkpoint on disk is the end of the last saved epoch (every --save-every):
            # resuming from it repeats the epochs since exactly. The half-trained weights are
            # exported too.
            folder.interrupted()
            raise
        finally:
            pool.shutdown(wait=True)
        folder.finished()
    run.accelerator.wait_for_everyone()
    return run.dir


def main(argv: list[str] | None = None) -> None:
    try:
        train(parse_args(argv))
    except (ConfigError, TrainingDiverged) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
