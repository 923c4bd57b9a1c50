"""The diffusion model as a policy: DDIM steps with log-probabilities.

DDPO treats denoising as a T-step MDP (arXiv 2305.13301, Sec. 4.3): state s_t = (c, t, x_t),
action a_t = x_{t-1}, policy pi(a_t | s_t) = p_theta(x_{t-1} | x_t, c), and the reward r(x_0, c)
arrives only after the last step. With a DDIM sampler at eta > 0 every step is an isotropic
Gaussian (Sec. 3.1, Eq. 2):

    p_theta(x_{t-1} | x_t, c) = N(x_{t-1} | mu_theta(x_t, t, c), sigma_t^2 I)              (Eq. 2)

so its log-density, and the gradient of that log-density, are cheap to compute. This file
computes them. DDIM with eta = 1 on the strided T-step grid is the ancestral sampler the paper
uses (sigma_t is then the DDPM posterior's standard deviation between grid steps).

Notation (code name -> symbol in the paper / the DDIM paper):

    | code            | symbol               | meaning                                          |
    |-----------------|----------------------|--------------------------------------------------|
    | x_t, sample     | x_t                  | the noisy latent at step t (the MDP state, + c, t)|
    | x_prev          | x_{t-1}              | the next latent (the MDP action)                 |
    | prompt_embeds   | c                    | the context: text-encoder output for the prompt  |
    | t, timestep     | t                    | a training timestep in [0, num_train_timesteps)  |
    | t_prev          | t - 1                | the next timestep on the grid: t - 1000 // T     |
    | abar_t          | alphā_t              | scheduler.alphas_cumprod[t]                      |
    | abar_prev       | alphā_{t-1}          | alphas_cumprod[t_prev], final_alpha_cumprod if <0|
    | model_output    | eps_theta / v / x_0  | the UNet's prediction (after guidance)           |
    | eps_hat         | eps_theta(x_t, t, c) | the predicted noise                              |
    | x0_hat          | x̂_0                  | the predicted clean sample (DDIM "predicted x_0")|
    | mean            | mu_theta(x_t, t, c)  | the mean of the Gaussian policy, Eq. 2           |
    | sigma           | sigma_t              | its standard deviation, a constant (no gradient) |
    | eta             | eta                  | DDIM noise scale; 0 deterministic, 1 the paper's |
    | guidance_scale  | w                    | classifier-free guidance weight (paper: 5)       |
    | num_steps       | T                    | number of denoising steps (paper: 50)            |
    | log_prob        | log p_theta(x_{t-1} | x_t, c) | averaged over C*H*W (see DEVIATION)     |

Shape letters used in comments: B batch, T denoising steps, C,H,W latent channels/height/width,
L prompt tokens, D text-embedding width.

All step math is done in float32 whatever the UNet's dtype; latents and log-probs come back in
float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm


@dataclass
class TextToImage:
    """Everything the training loop needs from a text-to-image diffusion model, at either scale.

    Code downstream of loading never branches on scale: it only touches these fields.
    """

    # eps/v/x0 predictor: unet(x_t (B,C,H,W), t, encoder_hidden_states=(B,L,D)).sample
    unet: torch.nn.Module
    scheduler: DDIMScheduler  # holds alphas_cumprod and the timestep grid
    encode_prompts: Callable[[list[str]], torch.Tensor]  # prompts -> (B, L, D) embeddings, no grad
    decode: Callable[[torch.Tensor], torch.Tensor]  # x_0 (B,C,H,W) -> images (B,3,H',W') in [0,1]
    latent_shape: tuple[int, int, int]  # (C, H, W) of x_T
    name: str = ""  # hub id, folder or "tiny"; for logs


# ----------------------------------------------------------------------------------------------
# One policy step: the DDIM update as a Gaussian, with its log-density
# ----------------------------------------------------------------------------------------------

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


Generators = torch.Generator | list[torch.Generator] | None


def _randn(shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """Standard normal noise in float32, drawn on the generator's device (reproducible anywhere).

    With a list of generators, one per sample, row b is drawn from generator[b]: a sample's noise
    then does not depend on which batch (or which process) it is drawn in.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([_randn((1, *shape[1:]), g, device) for g in generator])
    draw_on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_on, dtype=torch.float32).to(device)


def _per_sample_timesteps(timestep: int | torch.Tensor, batch: int,
                          device: torch.device) -> torch.Tensor:
    """A python int, a 0-d tensor or a (B,) tensor -> a (B,) long tensor."""
    t = torch.as_tensor(timestep, device=device).long().reshape(-1)  # (1,) or (B,)
    if t.numel() not in (1, batch):
        raise ValueError(f"timestep must be a scalar or have one entry per sample ({batch}), "
                         f"got {t.numel()}")
    return t.expand(batch)  # (B,)


def step_constants(scheduler, t: torch.Tensor, eta: float):
    """alphā_t, alphā_{t-1} and sigma_t (DDIM Eq. 16) for integer timesteps t (B,) on the grid."""
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.num_inference_steps is None: call "
                         "scheduler.set_timesteps(T) first")
    config, device = scheduler.config, t.device
    # the timestep pair (t, t_prev), exactly as diffusers' DDIM step computes it. It is the next
    # grid point when T divides 1000 (SD's 50, tiny's 20) or with "leading" spacing (SD's); with
    # "trailing" spacing (tiny's) and a T that does not, it can be one off the grid (T = 30: 966 ->
    # 933, while the grid's next point is 932): diffusers' behaviour, kept for the oracle tests
    t_prev = t - config.num_train_timesteps // scheduler.num_inference_steps  # t - 1, grid (B,)
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)  # (1000,)
    final_alpha = scheduler.final_alpha_cumprod.to(device=device, dtype=torch.float32)  # t = -1
    abar_t = alphas_cumprod[t]  # alphā_t, (B,)
    abar_prev = torch.where(t_prev >= 0, alphas_cumprod[t_prev.clamp(min=0)],
                            final_alpha)  # alphā_{t-1}, (B,)
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)  # sigma_t^2 / eta^2, (B,)
    return abar_t, abar_prev, eta * variance.sqrt()  # sigma_t = eta * sqrt(variance), (B,)


def step_sigmas(scheduler, timesteps: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t of each sampling step, (T,) float32, for the timesteps of a trajectory (DDIM Eq. 16):

        sigma_t = eta * sqrt((1 - alphā_{t-1}) / (1 - alphā_t) * (1 - alphā_t / alphā_{t-1}))

    A step with sigma_t = 0 (the last one when set_alpha_to_one=True) is deterministic: it has no
    density and no policy gradient, so the training loop leaves it out of the steps it trains on.
    """
    return step_constants(scheduler, torch.as_tensor(timesteps).long().cpu(), eta)[2]


def predicted_x0_and_eps(
    config, model_output: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂_0 and eps_theta from whatever the network predicts (DDIM paper, Eq. 12's x̂_0):

        epsilon:       x̂_0 = (x_t - sqrt(1 - alphā_t) eps) / sqrt(alphā_t)
        sample:        eps = (x_t - sqrt(alphā_t) x̂_0) / sqrt(1 - alphā_t)
        v_prediction:  x̂_0 = sqrt(alphā_t) x_t - sqrt(1 - alphā_t) v,
                       eps = sqrt(alphā_t) v + sqrt(1 - alphā_t) x_t

    then x̂_0 is clipped to [-r, r] if the scheduler has clip_sample. abar_t: (B, 1, 1, 1).
    """
    beta_t = 1 - abar_t  # 1 - alphā_t
    if config.prediction_type == "epsilon":
        eps_hat = model_output  # eps_theta(x_t, t, c)
        x0_hat = (x_t - beta_t.sqrt() * eps_hat) / abar_t.sqrt()
    elif config.prediction_type == "sample":
        x0_hat = model_output  # x̂_0
        eps_hat = (x_t - abar_t.sqrt() * x0_hat) / beta_t.sqrt()
    elif config.prediction_type == "v_prediction":
        x0_hat = abar_t.sqrt() * x_t - beta_t.sqrt() * model_output
        eps_hat = abar_t.sqrt() * model_output + beta_t.sqrt() * x_t
    else:
        raise ValueError(f"unknown prediction_type {config.prediction_type!r}")
    if config.clip_sample:
        x0_hat = x0_hat.clamp(-config.clip_sample_range, config.clip_sample_range)  # clipped x̂_0
    return x0_hat, eps_hat


def ddim_mean(
    x0_hat: torch.Tensor, eps_hat: torch.Tensor, abar_prev: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The policy's mean (DDIM paper, Eq. 12):

        mu_theta(x_t, t, c) = sqrt(alphā_{t-1}) x̂_0 + sqrt(1 - alphā_{t-1} - sigma_t^2) eps_theta

    abar_prev, sigma: (B, 1, 1, 1). The clamp only guards float rounding: the bracket is >= 0 in
    exact arithmetic for eta <= 1 (diffusers would return nan where this returns 0).
    """
    direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps_hat  # "pointing to x_t"
    return abar_prev.sqrt() * x0_hat + direction  # mu_theta, (B, C, H, W)


def gaussian_log_prob(x_prev: torch.Tensor, mean: torch.Tensor,
                      sigma: torch.Tensor) -> torch.Tensor:
    """log N(x_{t-1} | mu_theta, sigma_t^2 I) (Eq. 2), averaged over the C*H*W dimensions, (B,).

        log N = -(x_{t-1} - mu)^2 / (2 sigma_t^2) - log sigma_t - log sqrt(2 pi)   (per element)

    sigma: (B,). Where sigma_t = 0 (a deterministic step) there is no density: 0, no gradient.
    """
    stochastic = sigma > 0  # False only where alphā_{t-1} = 1 (last step, set_alpha_to_one), (B,)
    bcast = (-1,) + (1,) * (mean.ndim - 1)  # (B, 1, 1, 1)
    safe_sigma = torch.where(stochastic, sigma, torch.ones_like(sigma)).view(bcast)  # no 0/0
    log_prob = (
        -((x_prev - mean) ** 2) / (2 * safe_sigma**2)  # -(x_{t-1} - mu)^2 / (2 sigma_t^2)
        - safe_sigma.log()  # - log sigma_t
        - _HALF_LOG_2PI  # - log sqrt(2 pi)
    )  # (B, C, H, W)
    # DEVIATION: log p is *averaged* over the C*H*W dimensions (as the authors' code does)
    # instead of summed (Eq. 2's density). Why: a sum over 16384 latent dims (SD at 512 px)
    # makes ratios exp(log p - log p_old) explode. Effect: with n = C*H*W, log-probs are 1/n of
    # the true ones, so ratios are rho^(1/n) and approx_kl is about KL/n^2 for a small step; SF
    # gradients only rescale (README, "Deviations").
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))  # (B,)
    return torch.where(stochastic, log_prob, torch.zeros_like(log_prob))


def ddim_step_mean(scheduler: DDIMScheduler, model_output: torch.Tensor,
                   timestep: int | torch.Tensor, sample: torch.Tensor,
                   eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian policy of one step (Eq. 2): mu_theta(x_t, t, c), (B, C, H, W), and sigma_t,
    (B,), both float32, from the (guided) prediction `model_output` at x_t = `sample`."""
    if eta <= 0:
        raise ValueError(
            f"eta={eta}: DDIM with eta=0 is deterministic and has no density, so there is no "
            "log-prob to optimise. DDPO needs eta > 0 (the paper uses eta = 1)."
        )
    if scheduler.config.thresholding:
        raise ValueError(
            "DDIMScheduler(thresholding=True) is not implemented here (dynamic thresholding is "
            "meant for pixel-space models); use clip_sample or thresholding=False."
        )
    x_t = sample.float()  # x_t, (B, C, H, W)
    batch, device = x_t.shape[0], x_t.device
    bcast = (batch,) + (1,) * (x_t.ndim - 1)  # (B, 1, 1, 1): per-sample scalars over C, H, W

    t = _per_sample_timesteps(timestep, batch, device)  # (B,)
    abar_t, abar_prev, sigma = step_constants(scheduler, t, eta)  # (B,) each; no gradient
    x0_hat, eps_hat = predicted_x0_and_eps(scheduler.config, model_output.float(), x_t,
                                           abar_t.view(bcast))  # x̂_0, eps_theta
    mean = ddim_mean(x0_hat, eps_hat, abar_prev.view(bcast), sigma.view(bcast))  # mu_theta
    return mean, sigma


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, sigma_t^2 I) || N(mean_q, sigma_t^2 I)) = (mean_p - mean_q)^2 / (2 sigma_t^2),
    averaged over C*H*W as the log-probs are, (B,). Two policies with the same sigma_t differ
    only in their means. sigma: (B,), all > 0 (a deterministic step has no density)."""
    bcast = (-1,) + (1,) * (mean_p.ndim - 1)  # (B, 1, 1, 1)
    kl = (mean_p - mean_q) ** 2 / (2 * sigma.view(bcast) ** 2)  # per element
    return kl.mean(dim=tuple(range(1, kl.ndim)))  # (B,)


def trainable_steps(scheduler, timesteps: torch.Tensor, eta: float,
                    fraction: float) -> tuple[torch.Tensor, int]:
    """The indices of the stochastic sampling steps, (T_s,), and how many each sample trains on
    (`fraction` of them, at least 1). A deterministic last step (sigma_t = 0, set_alpha_to_one)
    has log-prob 0 and no gradient, so training on it would only cost time."""
    steps = (step_sigmas(scheduler, timesteps, eta) > 0).nonzero().flatten()  # (T_s,)
    return steps, max(1, int(round(len(steps) * fraction)))


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: Generators = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step as the Gaussian policy of Eq. 2: returns (x_{t-1}, log p(x_{t-1} | x_t, c)).

        p_theta(x_{t-1} | x_t, c) = N(x_{t-1} | mu_theta(x_t, t, c), sigma_t^2 I)           (Eq. 2)

    built from one function per equation: `step_constants` (alphā_t, alphā_{t-1}, sigma_t; DDIM
    Eq. 16), `predicted_x0_and_eps` (x̂_0, eps_theta), `ddim_mean` (mu_theta; DDIM Eq. 12), the
    three composed in `ddim_step_mean`, and `gaussian_log_prob`. This is exactly
    `DDIMScheduler.step(model_output, t, sample, eta, variance_noise=z)`: given the same
    z ~ N(0, I), x_{t-1} = mu_theta + sigma_t z matches
    diffusers to float32 rounding.

    Args:
        scheduler: a DDIMScheduler after `set_timesteps`. Its prediction_type (epsilon,
            v_prediction, sample), clip_sample(_range), set_alpha_to_one, steps_offset and beta
            schedule are honoured; thresholding is not supported.
        model_output: (B, C, H, W) the (guided) UNet prediction; any dtype, used in float32.
        timestep: t, a python int, a 0-d tensor, or a (B,) tensor of per-sample timesteps
            (training rescores transitions from shuffled steps in one batch).
        sample: (B, C, H, W) x_t.
        eta: DDIM noise scale, must be > 0 (the paper uses 1).
        prev_sample: (B, C, H, W) x_{t-1} to score. If None, x_{t-1} is sampled from the policy.
        generator: RNG for the sampled noise z (ignored when prev_sample is given), or a list
            of one generator per sample.

    Returns:
        prev_sample: (B, C, H, W) float32 x_{t-1}, detached (the action is data, not a function
            of theta).
        log_prob: (B,) float32 log-density of x_{t-1}, averaged over C*H*W. Gradients reach theta
            only through mu_theta; sigma_t is a constant.

    Where sigma_t == 0 (only at the last step with set_alpha_to_one=True) the step is deterministic
    and has no density: x_{t-1} is mu_theta and log_prob is 0 with no gradient, so it adds nothing
    to a policy gradient and its ratio exp(0 - 0) is 1.
    """
    mean, sigma = ddim_step_mean(scheduler, model_output, timestep, sample, eta)  # mu, sigma_t
    bcast = (-1,) + (1,) * (mean.ndim - 1)  # (B, 1, 1, 1): per-sample scalars over C, H, W
    if prev_sample is None:  # the action: sampled, or given to be scored
        z = _randn(tuple(mean.shape), generator, mean.device)  # z ~ N(0, I), (B, C, H, W)
        prev_sample = mean + sigma.view(bcast) * z  # x_{t-1} = mu_theta + sigma_t z
    x_prev = prev_sample.detach().float()  # x_{t-1}: data, only mu_theta carries gradient
    return x_prev, gaussian_log_prob(x_prev, mean, sigma)


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance and whole trajectories
# ----------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """A batch of denoising chains x_T -> ... -> x_0 with the log-prob of every step."""

    latents: torch.Tensor  # (B, T+1, C, H, W) float32: x_T, x_{T-1}, ..., x_0
    # (B, T) float32: log p(latents[:, j+1] | latents[:, j], c) at timesteps[j]
    log_probs: torch.Tensor
    timesteps: torch.Tensor  # (T,) long: the t of each step, descending

    @property
    def x0(self) -> torch.Tensor:
        """The final samples x_0, (B, C, H, W)."""
        return self.latents[:, -1]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of the module's first weight: the (frozen) base's, under LoRA. (diffusers'
    `ModelMixin.dtype` walks every submodule on each call: 3.6% of an epoch at toy size.)"""
    return next(module.parameters()).dtype


def guided_model_output(
    unet: torch.nn.Module,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance: out = out_uncond + w * (out_cond - out_uncond), in float32.

    One batched UNet forward over [uncond; cond]. With w == 1 the guided output is the conditional
    one, so only the conditional forward runs (negative_prompt_embeds may then be None). The
    combination is linear, so it applies to eps, v or x_0 predictions alike.

    Args:
        x_t: (B, C, H, W); t: scalar or (B,); prompt_embeds: (B, L, D);
        negative_prompt_embeds: (1, L, D) (broadcast to B) or (B, L, D), e.g. the empty prompt "".
    Returns:
        (B, C, H, W) float32 guided prediction.
    """
    dtype = _module_dtype(unet)
    batch = x_t.shape[0]
    t = _per_sample_timesteps(t, batch, x_t.device)  # (B,)
    if guidance_scale == 1.0:
        return unet(x_t.to(dtype), t, encoder_hidden_states=prompt_embeds.to(dtype)).sample.float()

    if negative_prompt_embeds is None:
        raise ValueError("guidance_scale != 1 needs negative_prompt_embeds (e.g. the empty prompt)")
    negative = negative_prompt_embeds.expand(batch, -1, -1)  # (B, L, D)
    x_in = torch.cat([x_t, x_t]).to(dtype)  # (2B, C, H, W)
    t_in = torch.cat([t, t])  # (2B,)
    context = torch.cat([negative, prompt_embeds]).to(dtype)  # (2B, L, D)
    out = unet(x_in, t_in, encoder_hidden_states=context).sample.float()  # (2B, C, H, W)
    out_uncond, out_cond = out.chunk(2)  # (B, C, H, W) each
    return out_uncond + guidance_scale * (out_cond - out_uncond)  # eps_u + w (eps_c - eps_u)


@torch.no_grad()
def sample_with_logprob(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    latent_shape: tuple[int, int, int],
    generator: Generators = None,
    latents: torch.Tensor | None = None,
    progress: bool = False,
) -> Trajectory:
    """Roll out the policy: x_T ~ N(0, I), then T steps x_{t-1} ~ p_theta(. | x_t, c) (Eq. 2).

    Returns the whole chain and the log-prob of every step.

    Runs entirely under torch.no_grad(): the training losses rescore the stored transitions with
    `recompute_log_prob`. Calls `scheduler.set_timesteps(num_steps)`, which the rescoring relies on.

    Args:
        prompt_embeds: (B, L, D) c; negative_prompt_embeds: (1 or B, L, D), or None when
            guidance_scale == 1.
        latent_shape: (C, H, W). latents: optional (B, C, H, W) x_T to start from instead of
            fresh noise.
        generator: RNG for x_T and for every step's noise, or a list of one per sample (each
            sample's chain then depends only on its own generator).
    """
    device = prompt_embeds.device
    batch = prompt_embeds.shape[0]
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps  # (T,) descending

    if latents is None:
        noise = _randn((batch, *latent_shape), generator, device)
        latents = noise * scheduler.init_noise_sigma  # x_T
    x = latents.to(device=device, dtype=torch.float32)  # x_T, (B, C, H, W)

    chain, log_probs = [x], []
    for t in tqdm(timesteps, disable=not progress, desc="sampling", leave=False):
        # (DDIM's scale_model_input is the identity, so x_t goes to the UNet as is.)
        out = guided_model_output(unet, x, t, prompt_embeds, negative_prompt_embeds, guidance_scale)
        x, log_prob = ddim_step_with_logprob(scheduler, out, t, x, eta=eta, generator=generator)
        chain.append(x)
        log_probs.append(log_prob)

    return Trajectory(
        latents=torch.stack(chain, dim=1),  # (B, T+1, C, H, W)
        log_probs=torch.stack(log_probs, dim=1),  # (B, T)
        timesteps=timesteps.long(),  # (T,)
    )


def recompute_log_prob(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    x_t: torch.Tensor,
    x_prev: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    guidance_scale: float,
    eta: float,
) -> torch.Tensor:
    """log p_theta(x_{t-1} | x_t, c) (Eq. 2) of stored transitions under the *current* weights.

    This is what the DDPO losses differentiate: the same guided prediction and the same DDIM
    Gaussian as `sample_with_logprob`, evaluated at the recorded actions. With unchanged weights it
    reproduces the recorded log-probs (ratio 1) up to float rounding.

    Args:
        x_t, x_prev: (B, C, H, W) states and recorded actions; timesteps: (B,) per-sample t;
        prompt_embeds: (B, L, D); negative_prompt_embeds: (1 or B, L, D) or None when
            guidance_scale == 1.
    Returns:
        (B,) float32 log-probs, differentiable w.r.t. the UNet parameters.
    """
    out = guided_model_output(unet, x_t, timesteps, prompt_embeds, negative_prompt_embeds,
                              guidance_scale)
    _, log_prob = ddim_step_with_logprob(scheduler, out, timesteps, x_t, eta=eta,
                                         prev_sample=x_prev)
    return log_prob
