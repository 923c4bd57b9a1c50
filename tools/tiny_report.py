"""The report: is the pretrained tiny model a good starting point for DDPO?

    python -m tools.tiny_report [--guidance W --per-prompt N --seed S --weights PATH ...]

It measures the bars: the captioner can tell the emoji apart, the model draws the 45 animals
recognisably, a batch is quick enough for a CPU training loop, and the rewards leave room to learn.
Writes assets/tiny_report.json and the sample grids assets/tiny_samples*.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import rewards as R
import tiny
from tiny import ANIMAL_PROMPTS, GUIDANCE, IMAGE, Captioner, generalisation_prompts, load_captioner
from tools import write_json
from tools.tiny_data import render_prompt_images
from tools.tiny_train import captioner_accuracy

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"

REPORT_STEPS = 20  # T, DDIM steps of the report's samples
REPORT_ETA = 1.0  # eta = 1, the paper's (stochastic) DDIM policy
# The bars: the captioner can tell the animals apart, the model draws them recognisably, and a
# batch is quick enough for a CPU training loop.
BAR_RECOGNISABLE = 0.50  # mean over the 45 animals of P(captioner names the prompt's animal)
BAR_CAPTIONER = 0.95  # captioner top-1 accuracy on fresh renders
BAR_SECONDS = 10.0  # wall time of 64 images x 20 steps (with CFG: 128 UNet rows per step)


@torch.no_grad()
def sample_prompts(model, prompts: list[str], *, steps: int = REPORT_STEPS,
                   guidance: float = GUIDANCE, eta: float = REPORT_ETA, seed: int = 0,
                   batch_size: int = 64, desc: str = "sampling") -> torch.Tensor:
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
            traj = sample_with_logprob(model.unet, model.scheduler, model.encode_prompts(chunk),
                                       negative, num_steps=steps, guidance_scale=guidance,
                                       eta=eta, latent_shape=model.latent_shape, generator=g)
            images.append(model.decode(traj.x0).cpu())  # (b, 3, 32, 32)
            bar.update(len(chunk))
    return torch.cat(images)  # (B, 3, 32, 32)


@torch.no_grad()
def held_out(model, cfg, prompts: list[str], seed: int, *, alignment: bool = False,
             desc: str = "held-out") -> tuple[dict, torch.Tensor]:
    """The policy on fixed noise, the one held-out evaluation of the tools (learning rows, the
    comparison, exercise 5): one image per prompt (repeat a prompt for several), sampled with the
    run's sampler settings (cfg: num_steps, guidance_scale, eta) and fixed by (prompts, seed).

    Returns ({"jpeg_kb": mean JPEG size, "caption_top1": the share of images the captioner names
    as their prompt ("is it still the animal?"), and with `alignment` the mean tiny alignment
    reward}, the images (N, 3, 32, 32)).
    """
    model.unet.eval()
    images = sample_prompts(model, prompts, steps=cfg.num_steps, guidance=cfg.guidance_scale,
                            eta=cfg.eta, seed=seed, desc=desc)  # (N, 3, 32, 32)
    captions = load_captioner().caption(images)
    out = dict(jpeg_kb=float(np.mean(R.jpeg_size_kb(images))),
               caption_top1=float(np.mean([c == p for c, p in zip(captions, prompts)])))
    if alignment:
        scores, _ = R.make_reward("alignment", scale="tiny")(images, prompts)
        out["alignment"] = float(np.mean(scores))
    return out, images


def recognition_rates(captioner: Captioner, images: torch.Tensor,
                      prompts: list[str]) -> dict[str, float]:
    """For each distinct prompt: the fraction of its images whose top-1 caption is that prompt."""
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(prompts), 256):
        for p, c in zip(prompts[i : i + 256], captioner.caption(images[i : i + 256])):
            hits.setdefault(p, []).append(c == p)
    return {p: float(np.mean(h)) for p, h in hits.items()}


def labelled_grid(images: torch.Tensor, labels: list[str], cols: int = 9, scale: int = 3):
    """A PIL image: each (3, 32, 32) image upscaled `scale`x (nearest), its label wrapped above."""
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
    pixels = images.clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (B, 32, 32, 3)
    pixels = (pixels * 255).round().astype(np.uint8)
    for k, (im, lines) in enumerate(zip(pixels, wrapped)):
        x, y = pad + (k % cols) * (cell + pad), pad + (k // cols) * (head + cell + pad)
        for j, line in enumerate(lines):
            draw.text((x, y + j * line_h), line, fill="black", font=font)
        grid.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST), (x, y + head))
    return grid


@torch.no_grad()
def time_sampling(model, n: int = 64, steps: int = REPORT_STEPS, guidance: float = GUIDANCE,
                  repeats: int = 3) -> list[float]:
    """Wall seconds of `repeats` runs of sample_with_logprob + decode of n images (after a warm-up
    step)."""
    from sampler import sample_with_logprob

    prompts = [ANIMAL_PROMPTS[i % len(ANIMAL_PROMPTS)] for i in range(n)]
    # fill the prompt cache (a training loop encodes its prompts once)
    model.encode_prompts(prompts + [""])

    def run(num_steps: int) -> None:
        negative = model.encode_prompts([""]) if guidance != 1.0 else None
        traj = sample_with_logprob(model.unet, model.scheduler, model.encode_prompts(prompts),
                                   negative, num_steps=num_steps, guidance_scale=guidance,
                                   eta=REPORT_ETA, latent_shape=model.latent_shape,
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


def report(weights: Path | None = None, guidance: float = GUIDANCE, per_prompt: int = 8,
           seed: int = 0, threads: int | None = None, repeats: int = 3,
           out: Path = ASSETS) -> dict:
    """Measure the tiny model against the bars; write out/tiny_report.json and the sample grids."""
    import rewards as R

    weights = Path(weights or tiny.UNET_WEIGHTS)
    model = tiny.load_tiny(weights=weights)  # fail early, before sampling, if weights are missing
    captioner = load_captioner()
    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    card_path = weights.with_suffix(".json")
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    run_info = dict(weights=str(weights), pretrain_steps=card.get("steps"), guidance=guidance,
                    steps=REPORT_STEPS, eta=REPORT_ETA, samples_per_prompt=per_prompt, seed=seed,
                    threads=threads, torch=torch.__version__, cpu_count=os.cpu_count())
    print(f"tiny report: weights {weights} (pretrain steps: {card.get('steps', '?')}), "
          f"guidance {guidance}, {REPORT_STEPS} DDIM steps, eta {REPORT_ETA}, "
          f"{per_prompt} samples/prompt, seed {seed}")
    print(f"torch {torch.__version__}, {threads} threads ({os.cpu_count()} CPUs)")

    # 1. the captioner: the judge of recognisability and of the alignment reward
    acc = captioner_accuracy(captioner, n=2000, seed=12345)
    print(f"\n[captioner] top-1 on 2000 fresh renders: {acc:.1%}  (bar >= {BAR_CAPTIONER:.0%}: "
          f"{'PASS' if acc >= BAR_CAPTIONER else 'FAIL'})")

    # 2. recognisable: does the captioner name the prompt's animal in the model's samples?
    prompts = [p for p in ANIMAL_PROMPTS for _ in range(per_prompt)]
    images = sample_prompts(model, prompts, guidance=guidance, seed=seed,
                            desc="animals")  # (45 n, 3, 32, 32)
    rates = recognition_rates(captioner, images, prompts)
    mean_rate = float(np.mean(list(rates.values())))
    print(f"\n[recognisable] captioner names the prompt's animal (top-1), over {per_prompt} "
          "samples each:")
    items = [f"{p.split()[-1]:>9} {rates[p]:4.0%}" for p in ANIMAL_PROMPTS]
    for i in range(0, len(items), 5):
        print("  " + "   ".join(items[i : i + 5]))
    print(f"  mean {mean_rate:.1%}  (bar >= {BAR_RECOGNISABLE:.0%}: "
          f"{'PASS' if mean_rate >= BAR_RECOGNISABLE else 'FAIL'})")
    gen_prompts = generalisation_prompts()
    gen_all = [p for p in gen_prompts for _ in range(per_prompt)]
    gen_images = sample_prompts(model, gen_all, guidance=guidance, seed=seed + 1000,
                                desc="generalisation")
    gen_rates = recognition_rates(captioner, gen_images, gen_all)
    gen_mean = float(np.mean(list(gen_rates.values())))
    print(f"  generalisation prompts ({len(gen_prompts)} non-animal emoji, never RL-trained): "
          f"{gen_mean:.1%}")

    # 3. grids: the first sample of each prompt
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labelled_grid(images[::per_prompt], ANIMAL_PROMPTS).save(out / "tiny_samples.png")
    labelled_grid(gen_images[::per_prompt], gen_prompts, cols=8).save(
        out / "tiny_samples_generalisation.png")

    # 4. fast: one sampling batch of a CPU training run
    # other processes on the machine make the timing pessimistic (no load average on Windows)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    seconds = time_sampling(model, n=64, steps=REPORT_STEPS, guidance=guidance, repeats=repeats)
    median = float(np.median(seconds))
    rows = 128 if guidance != 1.0 else 64
    print(f"\n[fast] 64 images x {REPORT_STEPS} steps (guidance {guidance}: {rows} UNet rows per "
          f"step), {threads} threads: " + ", ".join(f"{s:.2f}" for s in seconds)
          + f" s; median {median:.2f} s  (bar <= {BAR_SECONDS:.0f} s: "
          f"{'PASS' if median <= BAR_SECONDS else 'FAIL'})")
    if load > 0.5:
        print(f"  note: load average {load:.1f} before timing: other processes were running, so "
              "this is slow")

    # 5. room to learn: the pretrained model's rewards next to real renders and the extremes
    reward_fns = {name: R.make_reward(name, scale="tiny") for name in
                  ("compressibility", "incompressibility", "alignment")}
    model_r = _mean_rewards(reward_fns, images, prompts)
    render_r = _mean_rewards(reward_fns, render_prompt_images(prompts, seed=seed), prompts)
    g = torch.Generator().manual_seed(seed)
    flat_kb = float(R.jpeg_size_kb(torch.full((1, 3, IMAGE, IMAGE), 0.5))[0])  # a flat grey image
    noise = torch.rand(64, 3, IMAGE, IMAGE, generator=g)  # uniform noise in [0, 1]
    noise_kb = float(np.mean(R.jpeg_size_kb(noise)))
    # each channel 0 or 1: harder still
    binary_kb = float(np.mean(R.jpeg_size_kb((noise > 0.5).float())))
    extremes = {"compressibility": -flat_kb, "incompressibility": max(noise_kb, binary_kb)}
    scorer = getattr(reward_fns["alignment"], "scorer", None)
    if scorer is not None:  # alignment if the caption were always right / always another animal
        refs = [reward_fns["alignment"].reference.format(prompt=p) for p in ANIMAL_PROMPTS]
        extremes["alignment"] = float(scorer.score(ANIMAL_PROMPTS, refs)["recall"].mean())
        extremes["alignment_wrong_animal"] = float(
            scorer.score(ANIMAL_PROMPTS[1:] + ANIMAL_PROMPTS[:1], refs)["recall"].mean())
    print(f"\n[room to learn] mean reward on the 45 animal prompts ({len(prompts)} images each "
          "column)")
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
        recognisable=dict(mean=mean_rate,
                          per_animal={p.split()[-1]: rates[p] for p in ANIMAL_PROMPTS},
                          bar=BAR_RECOGNISABLE, passed=mean_rate >= BAR_RECOGNISABLE,
                          generalisation_mean=gen_mean, generalisation=gen_rates),
        fast=dict(seconds=seconds, median=median, images=64, steps=REPORT_STEPS, unet_rows=rows,
                  threads=threads, torch=torch.__version__, load_average=load, bar=BAR_SECONDS,
                  passed=median <= BAR_SECONDS),
        rewards=dict(pretrained=model_r, renders=render_r, extremes=extremes,
                     jpeg_kb=dict(flat=flat_kb, uniform_noise=noise_kb, binary_noise=binary_kb)),
        files=dict(samples="tiny_samples.png", generalisation="tiny_samples_generalisation.png"),
    )
    write_json(out / "tiny_report.json", result)
    print(f"\nwrote {out / 'tiny_report.json'}, {out / 'tiny_samples.png'}, "
          f"{out / 'tiny_samples_generalisation.png'}")
    return result



def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.tiny_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guidance", type=float, default=GUIDANCE,
                   help="classifier-free guidance weight w")
    p.add_argument("--per-prompt", type=int, default=8, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", type=Path, default=None,
                   help=f"UNet safetensors (default {tiny.UNET_WEIGHTS})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    p.add_argument("--repeats", type=int, default=3, help="timing runs (the median is reported)")
    p.add_argument("--out", type=Path, default=ASSETS, help="folder for the json and the grids")
    args = p.parse_args(argv)
    try:
        report(weights=args.weights, guidance=args.guidance, per_prompt=args.per_prompt,
               seed=args.seed, threads=args.threads, repeats=args.repeats, out=args.out)
    except (FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
