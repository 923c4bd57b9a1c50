"""Self-checks for the exercise notebooks: compare a student's function with the project's reference
on random inputs and, when they differ, say *what* is wrong.

Each `check_*` prints its findings, ends with `match: True` when everything agrees, and raises
`ExerciseError` (an AssertionError, so a notebook cell fails) with the first diagnosis otherwise.

How the diagnoses work: besides the reference, each check computes a few *known-wrong variants* of
the same quantity (summed instead of averaged, sign flipped, the max forgotten, ...). If the
student's output equals one of them, the message names that mistake. The variants are deliberately
wrong formulas; the right answer always comes from the project's code (sampler.py, ddpo_min.py) or
from diffusers. In the student release every reference value and every variant's output is read from
fixtures.pt instead: `tools/student_copy.py` strips the formulas from its copy of this file.

`hidden_inputs(seed)` draws other random inputs of the same shapes: the autograder's.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets
from diffusers import DDIMScheduler  # noqa: E402

# The reference values come from the project's code (sampler.py, ddpo_min.py) when this file sits in
# the repository. In the student release (`python -m tools.student_copy`) they come from fixtures.pt
# beside this file: the same values, recorded from the project on the same inputs.
FIXTURES = Path(__file__).with_name("fixtures.pt")
_ROOT = next((p for p in Path(__file__).resolve().parents if (p / "ddpo_min.py").exists()), None)
FROZEN = _ROOT is None or os.environ.get("DDPO_CHECKS_FROZEN") == "1"
if FROZEN:
    _FIXTURES: dict = torch.load(FIXTURES, weights_only=False)
else:
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    import ddpo_min
    import sampler
_TAPE: dict = {}  # what reference() computed, for tools/student_copy.py to save as fixtures


_seed_offset = 0  # 0: the inputs every student sees; other values: the autograder's hidden inputs


def _gen(seed: int) -> torch.Generator:
    """The generator of one random input of the checks (shifted under `hidden_inputs`)."""
    return torch.Generator().manual_seed(seed + 7919 * _seed_offset)


@contextlib.contextmanager
def hidden_inputs(seed: int):
    """Run the checks on other random inputs than the notebooks show (the autograder's). The
    reference values are then computed by the project, so this needs the repository."""
    global _seed_offset
    if FROZEN and seed != 0:
        raise RuntimeError("hidden inputs need the project's reference functions, not fixtures.pt")
    previous, _seed_offset = _seed_offset, seed
    try:
        yield
    finally:
        _seed_offset = previous


def _hidden_uniform(visible: float, low: float, high: float, seed: int) -> float:
    """A constant of a check: `visible` on the inputs every student sees, a draw in [low, high]
    under `hidden_inputs` (so that code with the notebook's constant written in fails there)."""
    if _seed_offset == 0:
        return visible
    return low + (high - low) * float(torch.rand((), generator=_gen(seed), dtype=torch.float64))


def reference(key: str, compute: Callable):
    """The reference value named `key`: computed by the project, or read from the fixtures."""
    if FROZEN:
        if key not in _FIXTURES:
            raise KeyError(f"fixtures.pt has no {key!r}: rebuild the student release")
        return _FIXTURES[key]
    value = compute()
    if _seed_offset == 0:
        _TAPE[key] = value
    return value


def _grad_of(loss_fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """d loss_fn(x) / dx (for reference gradients)."""
    x = x.detach().clone().requires_grad_(True)
    loss_fn(x).backward()
    return x.grad


class ExerciseError(AssertionError):
    """The student's function disagrees with the reference; the message says how."""


def _close(a, b, tol: float = 1e-5) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=tol, atol=tol))


def _call(fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise ExerciseError("not implemented yet: "
                            "replace `raise NotImplementedError` with your code") from None


def _fail(message: str) -> None:
    print(f"✗ {message}\nmatch: False")
    raise ExerciseError(message)


def _diagnose(got, variants: dict[str, object], what: str, tol: float = 1e-5) -> None:
    """Fail with the message of the first known-wrong variant that `got` equals, or a generic
    one."""
    for message, value in variants.items():
        if value is not None and _close(got, value, tol):
            _fail(f"{what}: {message}")
    _fail(f"{what} differs from the reference and matches none of the usual mistakes; "
          "compare your formula with the markdown above line by line")


def _ok(what: str) -> None:
    print(f"✓ {what}")


# --------------------------------------------------------------------------------------------------
# Exercise 1: one DDIM step with its log-probability
# --------------------------------------------------------------------------------------------------

SHAPE = (3, 4, 8, 8)  # (B, C, H, W)


def sd_scheduler(num_steps: int = 50) -> DDIMScheduler:
    """A DDIMScheduler configured like Stable Diffusion v1.4's (epsilon prediction, no clipping)."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    scheduler.set_timesteps(num_steps)
    return scheduler


def _step_pieces(scheduler: DDIMScheduler, eps: torch.Tensor, t: int, x_t: torch.Tensor,
                 eta: float):
    """mu and sigma_t of the DDIM step read off diffusers (mu: z = 0; sigma: the response to z),
    plus the alphas a wrong-variant formula needs."""
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1234))
    mean = scheduler.step(eps, t, x_t, eta=eta, variance_noise=torch.zeros_like(x_t)).prev_sample
    noisy = scheduler.step(eps, t, x_t, eta=eta, variance_noise=z).prev_sample
    sigma = ((noisy - mean) / z).mean().item()
    gap = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar = scheduler.alphas_cumprod.double()
    a_t = abar[t].item()
    a_prev = abar[t - gap].item() if t - gap >= 0 else scheduler.final_alpha_cumprod.item()
    a_prev_literal = abar[t - 1].item() if t >= 1 else scheduler.final_alpha_cumprod.item()
    a_prev_wrapped = abar[t - gap].item()  # a negative index wraps to the end of the schedule
    return mean.double(), sigma, a_t, a_prev, a_prev_literal, a_prev_wrapped


def _sigma(a_t: float, a_prev: float, eta: float) -> float:
    """sigma_t (DDIM Eq. 16) from alphas a student may have picked wrongly (for variants)."""
    return eta * math.sqrt(max((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev), 0.0))


def _ddim_variant(eps, x_t, a_t, a_prev, sigma, z, *, direction_sigma: bool = True) -> torch.Tensor:
    """A DDIM update x_{t-1} = sqrt(a_prev) x0_hat + sqrt(1 - a_prev [- sigma^2]) eps + sigma z
    (for variants)."""
    eps, x_t, z = eps.double(), x_t.double(), z.double()
    x0_hat = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    direction = math.sqrt(max(1 - a_prev - (sigma**2 if direction_sigma else 0.0), 0.0)) * eps
    return math.sqrt(a_prev) * x0_hat + direction + sigma * z


def _gauss_mean_log_prob(x, mean, sigma) -> torch.Tensor:
    return torch.distributions.Normal(mean.double(), sigma).log_prob(x.double()).mean(dim=(1, 2, 3))


def tiny_scheduler(num_steps: int = 20) -> DDIMScheduler:
    """A DDIMScheduler configured like the tiny model's (tiny.SCHEDULER_CONFIG: v-prediction,
    x̂_0 clipped to [-1, 1], alphā = 1 after the last step, so that step has sigma_t = 0)."""
    scheduler = DDIMScheduler(**TINY_SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_steps)
    return scheduler


# tiny.SCHEDULER_CONFIG, written out so that the student release needs no project (a test keeps
# the two equal)
TINY_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
    clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
    timestep_spacing="trailing",
)  # fmt: skip

# (scheduler, sampling-step index j, eta) of every case: Stable Diffusion's first, a middle and a
# late step and its last one (t = 1, where t_prev < 0); the tiny model's first step (t = 999, where
# clipping x̂_0 matters most), a middle one and its last (t = 49, sigma_t = 0)
STEP_CASES = (("sd", 0, 1.0), ("sd", 25, 1.0), ("sd", 40, 0.5), ("sd", 49, 1.0),
              ("tiny", 0, 1.0), ("tiny", 10, 1.0), ("tiny", 19, 1.0))


def _diffusers_step(scheduler: DDIMScheduler, model_output, t: int, x_t, eta: float, z,
                    use_clipped_model_output: bool = False, **config_changes) -> torch.Tensor:
    """diffusers' DDIM step with the noise z, on a copy of `scheduler` with some settings changed
    (for the variants: what a student who ignores one setting computes)."""
    if config_changes:
        changed = DDIMScheduler.from_config({**scheduler.config, **config_changes})
        changed.set_timesteps(scheduler.num_inference_steps)
        scheduler = changed
    return scheduler.step(model_output, t, x_t, eta=eta, variance_noise=z,
                          use_clipped_model_output=use_clipped_model_output).prev_sample.double()


def _tiny_variants(scheduler, out, t, x_t, eta, z) -> dict[str, torch.Tensor]:
    """The mistakes of a step written for an epsilon-predicting scheduler only, on the tiny one."""
    v_hint = ("scheduler.config.prediction_type is 'v_prediction' here: the model output is v, so "
              "x̂_0 = sqrt(alphā_t) x_t - sqrt(1 - alphā_t) v and "
              "eps_hat = sqrt(alphā_t) v + sqrt(1 - alphā_t) x_t")
    return {
        f"{v_hint} (you read it as epsilon and did not clip x̂_0 either)":
            _diffusers_step(scheduler, out, t, x_t, eta, z, prediction_type="epsilon",
                            clip_sample=False),
        f"{v_hint} (you read it as epsilon)":
            _diffusers_step(scheduler, out, t, x_t, eta, z, prediction_type="epsilon"),
        "x̂_0 is not clipped: with scheduler.config.clip_sample, clamp it to "
        "[-clip_sample_range, clip_sample_range] before the mean":
            _diffusers_step(scheduler, out, t, x_t, eta, z, clip_sample=False),
        "eps_hat comes from the model output and x_t, before clipping; you recomputed it from the "
        "clipped x̂_0":
            _diffusers_step(scheduler, out, t, x_t, eta, z, use_clipped_model_output=True),
    }


def _expected_step(kind: str, scheduler: DDIMScheduler, eps, t: int, x_t, eta: float,
                   seed: int, last: bool) -> dict:
    """What the check of one step compares with: the reference's sampled action and log-prob,
    the policy's mean and sigma_t, and the outputs of the usual mistakes (x_prev and log-prob)."""
    x, log_prob = sampler.ddim_step_with_logprob(scheduler, eps, t, x_t, eta=eta,
                                                 generator=_gen(seed))
    mean, sigma, a_t, a_prev, a_prev_lit, a_prev_wrap = _step_pieces(scheduler, eps, t, x_t, eta)
    z = torch.randn(SHAPE, generator=_gen(seed))  # the noise the reference drew
    if sigma == 0:  # deterministic: no mistake in the noise or the density can show
        x_variants = dict(_tiny_variants(scheduler, eps, t, x_t, eta, z))
        return dict(x=x, log_prob=log_prob, mean=mean, sigma=sigma, x_variants=x_variants,
                    lp_variants={})
    if kind == "tiny":
        x_variants = {**_tiny_variants(scheduler, eps, t, x_t, eta, z),
                      "you returned the mean: add the noise sigma_t * z": mean}
    else:
        sigma_eta1 = _step_pieces(scheduler, eps, t, x_t, 1.0)[1]
        x_variants = {
            "you added sigma_t^2 * z; the noise is scaled by the standard deviation sigma_t":
                mean + sigma**2 * z,
            "you returned the mean: add the noise sigma_t * z": mean,
            "eta is ignored: sigma_t = eta * sqrt(...)":
                _ddim_variant(eps, x_t, a_t, a_prev, sigma_eta1, z),
            "the direction term must be sqrt(1 - abar_prev - sigma_t^2) * eps_hat "
            "(you left out -sigma_t^2)":
                _ddim_variant(eps, x_t, a_t, a_prev, sigma, z, direction_sigma=False),
            "t_prev is the next timestep on the sampling grid "
            "(t - 1000 // num_inference_steps), not t - 1":
                _ddim_variant(eps, x_t, a_t, a_prev_lit, sigma, z),
            "t_prev is the next timestep on the sampling grid "
            "(t - 1000 // num_inference_steps), not t - 1 (for sigma_t too)":
                _ddim_variant(eps, x_t, a_t, a_prev_lit, _sigma(a_t, a_prev_lit, eta), z),
        }
        if last:
            x_variants["at the last step t_prev < 0: alphā_{t-1} is "
                       "scheduler.final_alpha_cumprod (alphas_cumprod[t_prev] with a negative "
                       "index wraps to the end of the schedule)"] = _ddim_variant(
                eps, x_t, a_t, a_prev_wrap, _sigma(a_t, a_prev_wrap, eta), z)
    xd, lp = x.double(), log_prob.double()
    D = SHAPE[1] * SHAPE[2] * SHAPE[3]
    lp_variants = {
        "your log-prob is summed, not averaged, over C,H,W (it is D times too large)": lp * D,
        "the sign is flipped: "
        "log N(x | mu, sigma^2) = -(x-mu)^2/(2 sigma^2) - log sigma - log sqrt(2 pi)": -lp,
        "the normalising terms -log sigma_t - 0.5 log(2 pi) are missing":
            lp + math.log(sigma) + 0.5 * math.log(2 * math.pi),
        "you used the variance sigma_t^2 where the standard deviation sigma_t belongs":
            _gauss_mean_log_prob(xd, mean, sigma**2),
        "the quadratic term is missing its 1/2: -(x-mu)^2 / (2 sigma^2)":
            lp - ((xd - mean) ** 2).mean(dim=(1, 2, 3)) / (2 * sigma**2),
    }
    return dict(x=x, log_prob=log_prob, mean=mean, sigma=sigma, x_variants=x_variants,
                lp_variants=lp_variants)


def check_logprob_step(fn: Callable) -> None:
    """fn(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None, generator=None)
    -> (x_{t-1} (B,C,H,W), log_prob (B,)), like sampler.ddim_step_with_logprob, on Stable
    Diffusion's scheduler (epsilon prediction) and the tiny model's (v-prediction, clipped x̂_0,
    sigma_t = 0 at the last step)."""
    schedulers = {"sd": sd_scheduler(50), "tiny": tiny_scheduler(20)}
    for case, (kind, j, eta) in enumerate(STEP_CASES):
        scheduler = schedulers[kind]
        t = int(scheduler.timesteps[j])
        g = _gen(10 + case)
        x_t, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        where = f"[{kind} scheduler, t={t}, eta={eta}]"
        seed = 100 + case
        last = j == len(scheduler.timesteps) - 1
        exp = reference(f"ex1_step_{case}", lambda k=kind, sch=scheduler, e=eps, t=t, x=x_t,
                        eta=eta, s=seed, last=last: _expected_step(k, sch, e, t, x, eta, s, last))
        ref_x, ref_lp, mean, sigma = exp["x"], exp["log_prob"], exp["mean"], exp["sigma"]
        deterministic = sigma == 0  # the tiny model's last step
        got = _call(fn, scheduler, eps.clone(), t, x_t.clone(), eta=eta, generator=_gen(seed))
        if not (isinstance(got, tuple) and len(got) == 2):
            _fail("return a pair (x_prev, log_prob)")
        got_x, got_lp = got

        # --- the sampled action x_{t-1} = mu + sigma z
        if tuple(got_x.shape) != SHAPE:
            _fail(f"{where} x_prev has shape {tuple(got_x.shape)}, expected {SHAPE} (B, C, H, W)")
        if not torch.isfinite(torch.as_tensor(got_x)).all():
            _fail(f"{where} x_prev is not finite"
                  + (": sigma_t = 0 at this step (alphā_{t-1} = final_alpha_cumprod = 1), so the "
                     "step is deterministic: x_{t-1} = mu, with nothing to divide by sigma_t"
                     if deterministic else
                     ": at the last step t_prev < 0, and alphā_{t-1} is "
                     "scheduler.final_alpha_cumprod (alphas_cumprod[t_prev] with a negative index "
                     "wraps to the end of the schedule, and sigma_t becomes the root of a negative "
                     "number)" if last else ""))
        if not _close(got_x, ref_x, 1e-4):
            variants = exp["x_variants"]
            if not deterministic:
                residual = (got_x.double() - mean) / sigma  # should be exactly the reference's z
                if (not any(v is not None and _close(got_x, v, 1e-4) for v in variants.values())
                        and abs(residual.std().item() - 1) < 0.1):
                    _fail(f"{where} x_prev = mu + sigma_t * (noise), but not the reference's "
                          "noise: draw it with torch.randn(sample.shape, generator=generator), "
                          "once, after computing the mean")
            _diagnose(got_x, variants, f"{where} x_prev", tol=1e-4)
        _ok(f"{where} x_prev matches the reference (same noise)")

        # --- the log-probability, sampled and scored
        for mode, lp in (("sampling", got_lp), ("scoring", None)):
            if mode == "scoring":
                scored = _call(fn, scheduler, eps.clone(), t, x_t.clone(), eta=eta,
                               prev_sample=ref_x.clone())
                if not _close(scored[0], ref_x):
                    _fail(f"{where} with prev_sample given, return it unchanged: "
                          "the action is scored, not re-sampled")
                lp = scored[1]
            if lp.shape == SHAPE:
                _fail(f"{where} log_prob has one value per element; "
                      "average it over C, H, W to get shape (B,)")
            if lp.dim() == 0:
                _fail(f"{where} log_prob is a scalar: "
                      "keep one log-prob per sample (average over C, H, W only)")
            if deterministic and not _close(lp, ref_lp):
                _fail(f"{where} log_prob ({mode} mode) must be 0 for every sample here: "
                      "sigma_t = 0, so the step is deterministic and has no density (the "
                      "training loop never trains on it); return torch.zeros(B) instead of "
                      "dividing by sigma_t "
                      f"(yours: {lp.flatten()[:3].tolist()})")
            if not _close(lp, ref_lp, 1e-4):
                _diagnose(lp, exp["lp_variants"], f"{where} log_prob ({mode} mode)", tol=1e-4)
        _ok(f"{where} log_prob matches, sampled and scored")

    # --- gradients reach theta through the mean only; the action is data. On the tiny scheduler's
    # first step half of x̂_0 is clipped: no gradient flows through the clipped elements of x̂_0
    for key, kind, j in (("ex1_grad", "sd", 10), ("ex1_grad_tiny", "tiny", 0)):
        scheduler = schedulers[kind]
        t = int(scheduler.timesteps[j])
        g = _gen(7)
        x_t, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        x_prev = torch.randn(SHAPE, generator=g) * 0.3 + x_t
        eps_got = eps.clone().requires_grad_(True)
        ref_grad = reference(key, lambda sch=scheduler, t=t, x=x_t, xp=x_prev, e0=eps: _grad_of(
            lambda e: sampler.ddim_step_with_logprob(sch, e, t, x, prev_sample=xp)[1].sum(), e0))
        got_x, got_lp = _call(fn, scheduler, eps_got, t, x_t, prev_sample=x_prev)
        sampled_x, _ = _call(fn, scheduler, eps_got, t, x_t, generator=_gen(0))
        if sampled_x.requires_grad:
            _fail("the returned x_prev carries gradient: "
                  "detach it (the action is data, not a function of theta)")
        if not got_lp.requires_grad:
            _fail("log_prob has no gradient w.r.t. the model output: "
                  "do not detach the mean or wrap it in no_grad")
        got_lp.sum().backward()
        if not _close(eps_got.grad, ref_grad, 1e-4):
            _fail(f"[{kind} scheduler, t={t}] d log_prob / d model_output differs from the "
                  "reference (is sigma_t a constant? is x_prev detached? is x̂_0 clamped with "
                  "torch.clamp, which passes no gradient where it clips?)")
    _ok("gradient w.r.t. the model output matches")
    print("match: True")


# --------------------------------------------------------------------------------------------------
# Exercise 2: the score-function loss
# --------------------------------------------------------------------------------------------------


def check_sf_loss(fn: Callable) -> None:
    """fn(log_prob (B,), advantages (B,)) -> scalar loss, like ddpo_min.ddpo_sf_loss."""
    g = _gen(0)
    B = 16
    base_lp = torch.randn(B, generator=g, dtype=torch.float64) - 1.0
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    exp = reference("ex2_loss", lambda: dict(
        loss=ddpo_min.ddpo_sf_loss(base_lp, adv),
        grad=_grad_of(lambda x: ddpo_min.ddpo_sf_loss(x, adv), base_lp),
        variants={
            "sign of the loss is flipped: the optimiser minimises, so the loss is -mean(A * log p)":
                -ddpo_min.ddpo_sf_loss(base_lp, adv),
            "you summed over the batch; use the mean (the learning rate assumes a mean)":
                ddpo_min.ddpo_sf_loss(base_lp, adv) * B,
            "you multiplied the means, mean(A) * mean(log p); "
            "the estimator is the mean of the products":
                -(adv.mean() * base_lp.mean()),
            "use the log-probability, not the probability exp(log p)":
                -(adv * base_lp.exp()).mean(),
        }))
    ref = exp["loss"]

    lp = base_lp.clone().requires_grad_(True)
    a = adv.clone().requires_grad_(True)  # a student who forgets .detach() will send gradient here
    loss = _call(fn, lp, a)
    if not isinstance(loss, torch.Tensor):
        _fail("return a torch tensor (a scalar loss), so that autograd can differentiate it")
    if loss.shape == (B,):
        _fail("the loss has one value per sample: take the mean over the batch to get a scalar")
    if not _close(loss, ref):
        _diagnose(loss, exp["variants"], "loss value")
    _ok("loss value matches")
    loss.backward()
    if a.grad is not None and a.grad.abs().sum() > 0:
        _fail("gradient flows into the advantages: "
              "detach them (A is a constant weight, not a function of theta)")
    if lp.grad is None or not _close(lp.grad, exp["grad"]):
        _fail("d loss / d log_prob should be -A / B for each sample")
    _ok("gradient: d loss / d log_prob = -A / B, none into A")
    print("match: True")


# --------------------------------------------------------------------------------------------------
# Exercise 3: the clipped importance-sampling loss
# --------------------------------------------------------------------------------------------------


def _expected_clipped_loss(new, old, adv, eps: float) -> dict:
    """The reference's loss and diagnostics, and the outputs of the usual mistakes."""
    loss, info = ddpo_min.ddpo_is_loss(new, old, adv, eps)
    log_ratio = new - old
    rho = log_ratio.exp()
    clipped = rho.clamp(1 - eps, 1 + eps)
    return dict(loss=loss, info=info, loss_variants={
        "you clipped the ratio but forgot the max: loss = mean(max(-A rho, -A clip(rho)))":
            (-adv * clipped).mean(),
        "max and min are swapped: "
        "the loss keeps the larger (pessimistic) of -A rho and -A clip(rho)":
            torch.minimum(-adv * rho, -adv * clipped).mean(),
        "there is no clipping: "
        "add the clipped branch -A clip(rho, 1-eps, 1+eps) and take the max":
            (-adv * rho).mean(),
        "sign of the loss is flipped": -loss,
        "rho must be exp(log_prob - old_log_prob), not the log-ratio itself":
            torch.maximum(-adv * log_ratio, -adv * log_ratio.clamp(1 - eps, 1 + eps)).mean(),
        "the ratio is p_new / p_old = exp(log_prob - old_log_prob); yours is inverted":
            torch.maximum(-adv / rho, -adv * (1 / rho).clamp(1 - eps, 1 + eps)).mean(),
        "clip the ratio, not the advantages":
            torch.maximum(-adv * rho, -adv.clamp(1 - eps, 1 + eps) * rho).mean(),
    }, kl_variants={
        "approx_kl is 0.5 * mean(log_ratio^2): you left out the 0.5": 2 * info["approx_kl"],
        "approx_kl is 0.5 * mean(log_ratio^2), a mean of squares, not a square of the mean":
            0.5 * log_ratio.mean() ** 2,
        "approx_kl uses the log-ratio, 0.5 * mean((log p - log p_old)^2), not rho - 1":
            0.5 * ((rho - 1) ** 2).mean(),
        "mean(log_ratio) is not a KL estimate (it can be negative); "
        "use 0.5 * mean(log_ratio^2)":
            log_ratio.mean(),
        "that is the k1 estimator mean(log p_old - log p) (Spinning Up's approx_kl): unbiased "
        "for KL(old || new) in expectation but noisy and often negative on one batch; this loop "
        "logs 0.5 * mean(log_ratio^2), always >= 0":
            -log_ratio.mean(),
    }, clipfrac_variants={
        "clipfrac counts |rho - 1| > eps on both sides, not only rho > 1 + eps":
            (rho > 1 + eps).double().mean(),
        "clipfrac is a fraction of samples (a mean), not a count":
            (rho - 1).abs().gt(eps).double().sum(),
        "clipfrac is the share of samples OUTSIDE 1 ± eps":
            (rho - 1).abs().le(eps).double().mean(),
    })


def check_clipped_loss(fn: Callable) -> None:
    """fn(log_prob, old_log_prob, advantages, clip_range) -> (loss, {"approx_kl", "clipfrac"}), like
    ddpo_min.ddpo_is_loss."""
    eps = _hidden_uniform(0.1, 0.03, 0.25, seed=1)  # the hidden inputs vary the clip range too
    g = _gen(0)
    B = 64
    old = torch.randn(B, generator=g, dtype=torch.float64)
    # ratios in [0.74, 1.35]
    log_ratio = (torch.rand(B, generator=g, dtype=torch.float64) - 0.5) * 0.6
    new = old + log_ratio
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    exp = reference("ex3_loss", lambda: _expected_clipped_loss(new, old, adv, eps))
    ref_loss, ref_info = exp["loss"], exp["info"]

    lp, lp_old, a = new.clone().requires_grad_(True), old.clone().requires_grad_(True), adv.clone()
    got = _call(fn, lp, lp_old, a, eps)
    if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict)):
        _fail('return (loss, {"approx_kl": ..., "clipfrac": ...})')
    loss, info = got
    if loss.shape != ():
        _fail("the loss must be a scalar: the mean over the batch")
    if not _close(loss, ref_loss):
        _diagnose(loss, exp["loss_variants"], "loss value")
    _ok("loss value matches")
    loss.backward()
    if lp_old.grad is not None and lp_old.grad.abs().sum() > 0:
        _fail("gradient flows into old_log_prob: detach it (theta_old is fixed)")
    ref_grad = reference("ex3_grad", lambda: _grad_of(
        lambda x: ddpo_min.ddpo_is_loss(x, old, adv, eps)[0], new))
    if lp.grad is None or not _close(lp.grad, ref_grad):
        _fail("d loss / d log_prob differs from the reference: "
              "it must be 0 exactly where the clipped branch wins")
    _ok("gradient matches, including the zero-gradient (clipped) samples")

    for key in ("approx_kl", "clipfrac"):
        if key not in info:
            _fail(f'info has no "{key}"')
    if not _close(info["approx_kl"], ref_info["approx_kl"]):
        _diagnose(info["approx_kl"], exp["kl_variants"], "approx_kl")
    if not _close(info["clipfrac"], ref_info["clipfrac"]):
        _diagnose(info["clipfrac"], exp["clipfrac_variants"], "clipfrac")
    for key in ("approx_kl", "clipfrac"):
        if torch.as_tensor(info[key]).requires_grad:
            _fail(f"{key} is a diagnostic: detach it (it should not be part of the graph)")
    _ok("approx_kl and clipfrac match")
    print("match: True")


# --------------------------------------------------------------------------------------------------
# Exercise 4: per-prompt advantage normalisation and clipping
# --------------------------------------------------------------------------------------------------


def advantage_inputs() -> tuple[list[str], np.ndarray]:
    """Prompts with very different reward levels, one with identical rewards, one seen only once."""
    rng = np.random.default_rng(_seed_offset)
    prompts, rewards = [], []
    for prompt, level, spread, n in (("a cat", -60.0, 5.0, 6), ("a dog", -20.0, 1.0, 5),
                                     ("a frog", -35.0, 0.0, 3), ("a whale", -5.0, 2.0, 1)):
        prompts += [prompt] * n
        rewards += list(level + spread * rng.standard_normal(n))
    order = rng.permutation(len(prompts))  # interleave the prompts
    return [prompts[i] for i in order], np.asarray(rewards)[order]


def reference_batch_advantages(prompts, rewards) -> np.ndarray:
    """Per-prompt normalisation within one batch: the tracker with every prompt using its own
    statistics."""
    tracker = ddpo_min.PerPromptStatTracker(buffer_size=max(1, len(rewards)), min_count=1)
    return tracker.update(prompts, rewards)


def _expected_advantages(prompts, r) -> dict:
    """The reference's per-prompt advantages and the outputs of the usual mistakes."""
    ref = reference_batch_advantages(prompts, r)
    arr = np.asarray(prompts, dtype=object)

    def per_prompt(f):
        out = np.empty_like(r)
        for p in dict.fromkeys(prompts):
            idx = np.flatnonzero(arr == p)
            out[idx] = f(r[idx])
        return out

    sorted_ref = np.concatenate([ref[np.flatnonzero(arr == p)] for p in dict.fromkeys(prompts)])
    return dict(advantages=ref, variants={
        "you normalised over the whole batch; group the rewards by prompt first":
            (r - r.mean()) / (r.std() + 1e-6),
        "you used the sample std (ddof=1); "
        "the tracker uses the population std (np.std's default, ddof=0)":
            per_prompt(lambda x: (x - x.mean()) / ((x.std(ddof=1) if len(x) > 1 else 0.0) + 1e-6)),
        "you subtracted the per-prompt mean but did not divide by the per-prompt std":
            per_prompt(lambda x: x - x.mean()),
        "divide by the standard deviation, not the variance":
            per_prompt(lambda x: (x - x.mean()) / (x.var() + 1e-6)),
        "you divided by the std but did not subtract the mean first":
            per_prompt(lambda x: x / (x.std() + 1e-6)),
        "the advantages are grouped by prompt: return them in the order of the input rewards":
            sorted_ref,
    })


def check_advantages(fn: Callable) -> None:
    """fn(prompts, rewards) -> (B,) advantages (r - mean_c) / (std_c + 1e-6), stats per prompt in
    the batch."""
    prompts, r = advantage_inputs()
    exp = reference("ex4_advantages", lambda: _expected_advantages(prompts, r))
    ref = exp["advantages"]
    got = _call(fn, list(prompts), r.copy())
    got = np.asarray(got.detach().cpu() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
    if got.shape != r.shape:
        _fail(f"return one advantage per sample, shape {r.shape}; got {got.shape}")
    if not np.all(np.isfinite(got)):
        single = np.array([list(prompts).count(p) == 1 for p in prompts])  # 'a whale'
        if np.all(np.isfinite(got[~single])):  # only the one-sample prompt: std over n - 1 = 0
            _fail("non-finite advantage for 'a whale', the prompt with a single reward: its std "
                  "divides by n - 1 = 0, the unbiased std (np.std(ddof=1), or torch.std's "
                  "default); use the population std, ddof=0 (torch.std(x, unbiased=False))")
        _fail("non-finite advantages: "
              "'a frog' has identical rewards (std 0) and 'a whale' a single one; "
              "divide by (std + 1e-6)")
    if not np.allclose(got, ref, atol=1e-4):
        _diagnose(got, exp["variants"], "advantages", tol=1e-4)
    _ok("per-prompt advantages match (incl. a constant-reward prompt and a single-sample prompt)")
    print("match: True")


def check_clip_advantages(fn: Callable) -> None:
    """fn(advantages, max_abs) -> advantages clipped to [-max_abs, max_abs], like
    ddpo_min.clip_advantages."""
    m = _hidden_uniform(5.0, 1.5, 8.0, seed=2)  # max_abs; the hidden inputs vary it
    a = np.array([-9.0, -5.0, -4.9, -0.5, 0.0, 0.7, 4.99, 5.0, 12.0]) * m / 5.0
    exp = reference("ex4_clip", lambda: dict(clipped=ddpo_min.clip_advantages(a, m), variants={
        "clip both sides: values below -max_abs become -max_abs too": np.minimum(a, m),
        "clip, do not rescale: values inside [-max_abs, max_abs] must not change":
            a / np.abs(a).max() * m,
        "clipping keeps the sign: clip(A, -5, 5), not clip(|A|, 0, 5)": np.clip(np.abs(a), 0, m),
    }))
    ref = exp["clipped"]
    got = np.asarray(_call(fn, a.copy(), m), dtype=np.float64)
    if got.shape != a.shape or not np.allclose(got, ref):
        _diagnose(got, exp["variants"], "clipped advantages")
    t = torch.tensor(a)
    got_t = _call(fn, t.clone(), m)
    if not isinstance(got_t, torch.Tensor) or not _close(got_t, torch.as_tensor(ref)):
        _fail("the function must also work on torch tensors and return a tensor "
              "(hint: both have .clip)")
    _ok("clipping matches for numpy arrays and torch tensors")
    print("match: True")


# --------------------------------------------------------------------------------------------------
# Exercise 7: the per-step KL to the pretrained policy
# --------------------------------------------------------------------------------------------------

KL_SHAPE = (5, 3, 4, 6)  # (B, C, H, W): B differs from every other axis, so a sigma of shape (B,)
#                          broadcast against W fails instead of dividing the wrong axis


def _expected_kl(mean, mean_pre, sigma) -> dict:
    """The reference per-step KL and the outputs of the usual mistakes."""
    D = mean[0].numel()
    per_element = (mean - mean_pre) ** 2 / (2 * sigma.view(-1, 1, 1, 1) ** 2)
    return dict(
        kl=sampler.gaussian_kl(mean, mean_pre, sigma),
        grad=_grad_of(lambda m: sampler.gaussian_kl(m, mean_pre, sigma).sum(), mean),
        variants={
            "missing the 1/2: KL = |mu_theta - mu_pre|^2 / (2 sigma_t^2)":
                2 * sampler.gaussian_kl(mean, mean_pre, sigma),
            "divide by sigma_t^2, not sigma_t (a variance, not a standard deviation)":
                ((mean - mean_pre) ** 2 / (2 * sigma.view(-1, 1, 1, 1))).mean(dim=(1, 2, 3)),
            "average over C, H, W (as the log-probs are), do not sum":
                D * sampler.gaussian_kl(mean, mean_pre, sigma),
            "one KL per sample, (B,): average over C, H, W only, not over the batch too":
                per_element.mean().expand(len(mean)),
            "KL(p || q) of two Gaussians with one sigma has no log term here: "
            "log(sigma_q / sigma_p) = 0":
                sampler.gaussian_kl(mean, mean_pre, sigma) + torch.log(sigma),
        })


def check_gaussian_kl(fn: Callable) -> None:
    """fn(mean (B, C, H, W), mean_pre (B, C, H, W), sigma (B,)) -> (B,) KL per step, like
    sampler.gaussian_kl: KL(N(mean, sigma^2 I) || N(mean_pre, sigma^2 I)) averaged over C*H*W."""
    g = _gen(70)
    mean = torch.randn(KL_SHAPE, generator=g, dtype=torch.float64)
    mean_pre = mean + 0.3 * torch.randn(KL_SHAPE, generator=g, dtype=torch.float64)
    sigma = 0.05 + torch.rand(KL_SHAPE[0], generator=g, dtype=torch.float64)
    exp = reference("ex7_kl", lambda: _expected_kl(mean, mean_pre, sigma))
    m = mean.clone().requires_grad_(True)
    try:
        got = _call(fn, m, mean_pre.clone(), sigma.clone())
    except RuntimeError as err:
        _fail(f"your function raised {type(err).__name__}: {str(err)[:120]}; sigma has shape (B,): "
              "give it the shape (B, 1, 1, 1) before dividing (B, C, H, W) tensors by it")
    if not isinstance(got, torch.Tensor):
        _fail("return a torch tensor (the loss is differentiated through it)")
    if got.shape != (KL_SHAPE[0],):
        _fail(f"return one KL per sample, shape ({KL_SHAPE[0]},); got {tuple(got.shape)}")
    if not _close(got, exp["kl"]):
        _diagnose(got, exp["variants"], "the KL")
    _ok("KL per step matches (one sigma_t per sample)")
    if got.requires_grad:
        got.sum().backward()
    if m.grad is None or not _close(m.grad, exp["grad"]):
        _fail("d KL / d mean_theta should be (mean_theta - mean_pre) / (sigma_t^2 D) per element: "
              "keep mean_theta in the graph (no .detach() or .item() on it)")
    _ok("gradient with respect to mu_theta matches")
    # the oracle of the formula: torch.distributions, per coordinate, averaged
    p = torch.distributions.Normal(mean, sigma.view(-1, 1, 1, 1))
    q = torch.distributions.Normal(mean_pre, sigma.view(-1, 1, 1, 1))
    by_torch = torch.distributions.kl_divergence(p, q).mean(dim=(1, 2, 3))
    if not _close(got.detach(), by_torch):
        _fail("the KL differs from torch.distributions.kl_divergence of the two Gaussians")
    _ok("equals torch.distributions.kl_divergence(N(mu_theta, sigma_t), N(mu_pre, sigma_t)), "
        "averaged over C*H*W")
    print("match: True")
