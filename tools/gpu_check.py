"""One-shot check of the paper-scale path on a GPU: SD v1.4's architecture with random weights, no
network (the configs ship in assets/sd_v1_4), through the loop's own functions.

    python -m tools.bench gpu                    # on a GPU machine; JSON to assets/bench_gpu.json
    python -m tools.bench gpu --out /tmp/g.json  # elsewhere
    python -m tools.bench gpu --toy              # the same code at toy size on a CPU (tested in CI)

What it reports, at the paper's defaults for compressibility (aesthetic and alignment need models
from the hub; the UNet work is the same):
1. ratio at theta = theta_old: log-probs recorded while sampling (sample_batch_size prompts, twice
   that with CFG) and recomputed at the training batch (train_batch_size), in fp32, fp16 and bf16.
   Different batch shapes can pick different kernels; in half precision the ratios can then leave
   the clip range 1e-4 before any update. Max |rho - 1|, and the share of transitions past 1e-4.
2. LoRA gradient entries that are exactly 0 after one DDPO_IS term at the paper's weight, in fp16
   with and without loss scaling (the gradient at the UNet output is ~1e-8 per element).
3. Peak GPU memory while sampling one batch (512 px, 50 steps, CFG) and while training.
4. Samples per second in both phases, against the "UNet floor": the same UNet calls alone.
5. One paper-default epoch (256 samples), extrapolated from a shortened epoch of
   `ddpo_min.train` (2 sampling batches).
Random weights change no kernel, shape or byte count, so times and memory are those of SD v1.4;
ratios and gradients are those of a random network (a trained one has other activations).
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import ddpo_min
import loading
import plumbing
from config import Config, samples_per_epoch
from sampler import sample_with_logprob, trainable_steps
from tools import write_json
from tools.sd_random import save_random_sd

ROOT = Path(__file__).resolve().parents[1]
TOY = dict(num_steps=4, sample_batch_size=2, sample_batches=2, train_batch_size=1,
           prompts="simple_animals")  # plus a toy pipeline: seconds on a CPU


def paper_config(model: Path, out: Path, precision: str, toy: bool) -> Config:
    cfg = Config.paper(reward="compressibility", model=str(model), mixed_precision=precision,
                       output_dir=str(out), epochs=1, kl_samples=0)
    return replace(cfg, **TOY, device="cpu") if toy else cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _sample(run, seed: int = 0) -> ddpo_min.Samples:
    """One sampling batch, as sample_epoch draws it, kept on the device (no reward needed)."""
    cfg, model = run.cfg, run.model
    prompts = run.prompts[: cfg.sample_batch_size]
    embeds = model.encode_prompts(prompts)  # (B, L, D)
    gens = [torch.Generator(run.device).manual_seed(seed + i) for i in range(len(prompts))]
    model.unet.eval()
    with torch.no_grad(), run.autocast:
        traj = sample_with_logprob(model.unet, model.scheduler, embeds, run.negative_embeds,
                                   num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                                   eta=cfg.eta, latent_shape=model.latent_shape, generator=gens)
    n = len(prompts)
    return ddpo_min.Samples(index=torch.arange(n), latents=traj.latents, log_probs=traj.log_probs,
                            timesteps=traj.timesteps, prompt_embeds=embeds, prompts=prompts,
                            images=None, rewards=np.zeros(n, np.float32), extras={},
                            all_prompts=prompts, all_rewards=np.zeros(n, np.float32))


def ratio_at_theta_old(cfg: Config) -> dict:
    """Check 1: sample at the sampling batch, rescore at the training batch, same weights."""
    run = plumbing.Run(cfg)
    samples = _sample(run)
    steps, _ = trainable_steps(run.model.scheduler, samples.timesteps, cfg.eta, 1.0)
    dev = torch.zeros(len(samples.index), len(steps))  # |rho - 1| per (sample, step)
    run.model.unet.train()  # rescored as train_epoch rescores: train mode, with gradients (the
    for chunk in samples.index.split(cfg.train_batch_size):  # kernels picked may depend on both)
        idx = chunk.to(run.device)
        for k, j in enumerate(steps.tolist()):
            jj = torch.full((len(chunk),), j, device=run.device)
            with torch.enable_grad():
                log_prob = ddpo_min.rescore(run, samples, idx, jj).detach()
            ratio = torch.exp(log_prob - samples.log_probs[idx, j])
            dev[chunk, k] = (ratio - 1).abs().float().cpu()
    clip = 1e-4  # the paper's clip range
    return dict(max_abs_ratio_minus_1=dev.max().item(), median=dev.median().item(),
                share_past_clip=(dev > clip).float().mean().item(),
                share_past_clip_last_step=(dev[:, -1] > clip).float().mean().item(),
                clip_range=clip, sample_batch=cfg.sample_batch_size,
                train_batch=cfg.train_batch_size)


def zero_lora_gradients(cfg: Config) -> dict:
    """Check 2: one DDPO_IS term at the paper's weight, fp16, with and without loss scaling."""
    run = plumbing.Run(replace(cfg, mixed_precision="fp16"))
    run.optimizer = torch.optim.AdamW(run.params, lr=cfg.lr)  # its unscale_ below
    samples = _sample(run)
    with torch.no_grad():  # LoRA's B starts at 0, which makes A's gradient exactly 0: move it
        g = torch.Generator().manual_seed(1)
        for p in run.params:
            p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p))
    steps, T_train = trainable_steps(run.model.scheduler, samples.timesteps, cfg.eta,
                                     cfg.timestep_fraction)
    idx = samples.index[: cfg.train_batch_size].to(run.device)
    j = torch.full((len(idx),), int(steps[len(steps) // 2]), device=run.device)
    adv = torch.tensor([1.0, -1.0] * len(idx), device=run.device)[: len(idx)]
    weight = len(idx) / (samples_per_epoch(cfg) // cfg.minibatches * T_train)
    out = dict(term_weight=weight)
    for scaled in (True, False):
        run.scaler = torch.amp.GradScaler(run.device.type, enabled=scaled)
        run.optimizer.zero_grad(set_to_none=True)
        loss, _ = ddpo_min.policy_loss(run, samples, idx, j, adv)
        plumbing.backward(run, loss, weight)
        run.scaler.unscale_(run.optimizer)
        grads = torch.cat([p.grad.flatten() for p in run.params if p.grad is not None])
        out["with_scaling" if scaled else "without_scaling"] = dict(
            zero_share=(grads == 0).float().mean().item(), norm=grads.float().norm().item())
    return out


def memory_and_speed(cfg: Config) -> dict:
    """Checks 3-4: one sampling batch and one training chunk, timed, with peak memory, against
    the same UNet calls alone."""
    run = plumbing.Run(cfg)
    run.optimizer = torch.optim.AdamW(run.params, lr=cfg.lr)  # one step, timed
    device, unet = run.device, run.model.unet
    _sample(run)  # warm-up (kernels, allocator)
    before = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    _peak_reset(device)
    _sync(device)
    t0 = time.perf_counter()
    samples = _sample(run, seed=100)
    run.model.decode(samples.latents[:, -1])
    _sync(device)
    t_sample = time.perf_counter() - t0
    peak_sample = _peak_gib(device)

    steps, T_train = trainable_steps(run.model.scheduler, samples.timesteps, cfg.eta,
                                     cfg.timestep_fraction)
    idx = samples.index[: cfg.train_batch_size].to(run.device)
    adv = torch.ones(len(idx), device=device)
    unet.train()
    jj = torch.full((len(idx),), int(steps[0]), device=device)  # warm-up: first backward, kernels
    loss, _ = ddpo_min.policy_loss(run, samples, idx, jj, adv)
    plumbing.backward(run, loss, 1.0)
    run.optimizer.zero_grad(set_to_none=True)
    _peak_reset(device)
    _sync(device)
    t0 = time.perf_counter()
    for j in steps[:T_train].tolist():
        jj = torch.full((len(idx),), j, device=device)
        loss, _ = ddpo_min.policy_loss(run, samples, idx, jj, adv)
        plumbing.backward(run, loss, 1.0 / T_train)
    plumbing.optimizer_step(run, 0)
    _sync(device)
    t_train = time.perf_counter() - t0
    peak_train = _peak_gib(device)

    # the floor: the same UNet calls alone (CFG doubles the batch)
    x = torch.randn(2 * cfg.sample_batch_size, *run.model.latent_shape, device=device)
    ctx = torch.cat([run.negative_embeds.expand(cfg.sample_batch_size, -1, -1),
                     samples.prompt_embeds])
    t = samples.timesteps[0]
    unet.eval()
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), run.autocast:
        for _ in range(cfg.num_steps):
            unet(x, t, encoder_hidden_states=ctx)
    _sync(device)
    floor_sample = time.perf_counter() - t0
    n = 2 * len(idx)
    unet.train()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(T_train):
        with run.autocast:
            out = unet(x[:n], t, encoder_hidden_states=ctx[:n]).sample
        out.float().mean().backward()
    _sync(device)
    floor_train = time.perf_counter() - t0
    run.optimizer.zero_grad(set_to_none=True)
    B, b = cfg.sample_batch_size, len(idx)
    return dict(allocated_gib_before=before,  # the models and optimizer, before either phase
                peak_gib_sampling=peak_sample, peak_gib_training=peak_train,
                sampling=dict(samples_per_s=B / t_sample, floor_samples_per_s=B / floor_sample,
                              ratio_to_floor=t_sample / floor_sample, batch=B),
                training=dict(samples_per_s=b / t_train, floor_samples_per_s=b / floor_train,
                              ratio_to_floor=t_train / floor_train, batch=b,
                              timesteps_per_sample=T_train))


def shortened_epoch(cfg: Config, full: Config) -> dict:
    """Check 5: one epoch of 2 sampling batches through ddpo_min.train, scaled to the default."""
    short = replace(cfg, sample_batches=2, minibatches=2)
    run_dir = ddpo_min.train(short)
    m = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    n, n_full = samples_per_epoch(short), samples_per_epoch(full)
    return dict(samples=n, seconds=m["time/epoch"], sample_seconds=m["time/sample"],
                train_seconds=m["time/train"], default_samples=n_full,
                default_epoch_minutes_extrapolated=m["time/epoch"] / n * n_full / 60)


def gpu_check(toy: bool = False, out: Path | None = None) -> dict:
    """Every check in turn. One that fails (out of memory, a kernel missing) records its error and
    the others still run; the JSON is rewritten after each, so a run cut short keeps what it got."""
    t_start = time.perf_counter()
    out = out or ROOT / "assets" / "bench_gpu.json"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_random_sd(tmp, "toy" if toy else "v1_4")
        cfg = lambda p: paper_config(model, tmp / f"run-{p}", p, toy)  # noqa: E731
        device = loading.resolve_device(cfg("fp16").device)
        result: dict = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda"
                            else str(device), torch=torch.__version__, toy=toy,
                            versions=_versions(), tf32=_tf32(),
                            config={k: getattr(cfg("fp16"), k) for k in (
                                "num_steps", "sample_batch_size", "sample_batches",
                                "train_batch_size", "minibatches", "guidance_scale",
                                "lora_rank", "timestep_fraction")})
        precisions = {"no": "no", "fp16": "fp16", "bf16": "bf16"}
        if device.type == "cuda":  # fp32 with TF32 off: "no" above runs cuDNN's TF32 by default
            precisions = {"no_strict_fp32": "no", **precisions}
        checks = [
            ("ratio_at_theta_old", "ratio", lambda: {
                name: _recorded(lambda n=name, p=p: _strict(n, lambda: ratio_at_theta_old(cfg(p))),
                                device)
                for name, p in precisions.items()}),
            ("zero_lora_gradients_fp16", "grads", lambda: zero_lora_gradients(cfg("fp16"))),
            ("fp16_speed_memory", "speed", lambda: memory_and_speed(cfg("fp16"))),
            ("shortened_epoch_fp16", "epoch", lambda: shortened_epoch(
                cfg("fp16"), cfg("fp16") if toy else Config.paper(reward="compressibility"))),
        ]
        for key, what, check in checks:
            result[key] = _recorded(check, device)
            if "error" in result[key]:
                print(f"{key} failed: {result[key]['error']}", flush=True)
            else:
                _say(result, what)
            result["check_seconds"] = time.perf_counter() - t_start
            write_json(out, result)
    print(f"\n{result['check_seconds']:.0f} s; figures in {out}")
    return result


def _recorded(check, device: torch.device) -> dict:
    """check()'s result, or its error and traceback: one failure (out of memory, a kernel
    missing) must not cost the figures of the others. The GPU's caches are freed first."""
    _free(device)
    try:
        return check()
    except Exception as err:  # noqa: BLE001  (recorded in the JSON; the next check still runs)
        return dict(error=f"{type(err).__name__}: {err}"[:2000],
                    traceback=traceback.format_exc()[-4000:])


def _strict(name: str, check):
    """Run `check` with TF32 off for the strict fp32 row, and as configured otherwise."""
    if name != "no_strict_fp32":
        return check()
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return check()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _free(device: torch.device) -> None:
    """Between checks: the previous check's models and caches, off the GPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _tf32() -> dict:
    return dict(cudnn=torch.backends.cudnn.allow_tf32,
                matmul=torch.backends.cuda.matmul.allow_tf32)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _say(r: dict, what: str) -> None:
    if what == "ratio":
        for p, v in r["ratio_at_theta_old"].items():
            if "error" in v:
                print(f"ratio at theta_old, {p}: failed: {v['error']}", flush=True)
                continue
            print(f"ratio at theta_old, {p:>4}: max |rho-1| {v['max_abs_ratio_minus_1']:.2e}, "
                  f"median {v['median']:.2e}, past clip 1e-4: {100 * v['share_past_clip']:.1f}% "
                  f"(last step {100 * v['share_past_clip_last_step']:.0f}%)", flush=True)
    elif what == "grads":
        g = r["zero_lora_gradients_fp16"]
        print(f"fp16 LoRA gradient entries exactly 0: with loss scaling "
              f"{100 * g['with_scaling']['zero_share']:.2f}%, without "
              f"{100 * g['without_scaling']['zero_share']:.2f}%", flush=True)
    elif what == "speed":
        s = r["fp16_speed_memory"]
        for phase in ("sampling", "training"):
            v = s[phase]
            peak = s[f"peak_gib_{phase}"]
            print(f"{phase}: {v['samples_per_s']:.2f} samples/s (floor "
                  f"{v['floor_samples_per_s']:.2f}, x{v['ratio_to_floor']:.2f}), peak "
                  f"{'n/a' if peak is None else format(peak, '.1f') + ' GiB'}", flush=True)
    else:
        e = r["shortened_epoch_fp16"]
        print(f"shortened epoch: {e['samples']} samples in {e['seconds']:.1f} s -> one epoch of "
              f"{e['default_samples']}: {e['default_epoch_minutes_extrapolated']:.1f} min",
              flush=True)
