"""Pretraining the tiny world's models: the diffusion model and the captioner.

    python -m tools.tiny_train pretrain-shipped   # re-create assets/tiny_unet.safetensors (~2 h)
    python -m tools.tiny_train pretrain [--steps N --lr X ...]   # one stage; resumes from --dir
    python -m tools.tiny_train captioner [--steps N]   # train the captioner; weights to assets/

Both train on fresh augmented renders of the shipped emoji atlas (tools/tiny_data.py); each is
deterministic from its seed. Pretraining checkpoints go to cache/ and resume after a kill.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tiny
from tiny import (
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    Captioner,
    CaptionerNet,
    PromptEncoder,
    class_prompts,
    make_scheduler,
    make_unet,
    to_model_space,
)
from tools import write_json
from tools.tiny_data import load_sprites, sample_batch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
CACHE = ROOT / "cache"

# ----------------------------------------------------------------------------------------------
# 1. Pretraining the diffusion model (resumable)
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
    dir: str = str(CACHE / "pretrain-custom")  # not the shipped stages' folders
    # start from these UNet weights (e.g. assets/tiny_unet.safetensors) instead of random init
    init: str = ""
    # share of each batch drawn from the 45 animals (0: uniform over all sprites)
    animal_frac: float = 0.0
    # which weights are written to `out`: "ema" (the average) or "raw" (the last iterate)
    ship: str = "ema"
    # where the weights go; the model card goes beside them (the shipped weights only through
    # pretrain-shipped, whose last stage names them)
    out: str = str(CACHE / "pretrain-custom" / "tiny_unet.safetensors")


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
        saved = s.get("config", {})  # (checkpoints before the config was saved: taken as they are)
        differ = [k for k, v in saved.items() if k not in ("out", "ckpt_every", "dir")
                  and hasattr(cfg, k) and getattr(cfg, k) != v]
        if differ:
            raise SystemExit(f"{ckpt} is a stage trained with other settings (--"
                             f"{differ[0].replace('_', '-')} {saved[differ[0]]!r} there, "
                             f"{getattr(cfg, differ[0])!r} here): name another --dir, or resume "
                             "it with its own settings")
        unet.load_state_dict(s["unet"])
        ema.load_state_dict(s["ema"])
        opt.load_state_dict(s["opt"])
        g.set_state(s["gen"])
        torch.set_rng_state(s["torch_rng"])
        step, t0, losses = s["step"], s["seconds"], s["losses"]
        print(f"resumed from {ckpt} at step {step}")
    elif cfg.init:  # continue earlier weights (a fresh optimizer and schedule; steps count from 0)
        from safetensors.torch import load_file

        unet.load_state_dict(load_file(cfg.init), strict=True)
        ema.load_state_dict(unet.state_dict())
        print(f"initialised from {cfg.init}")
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"tiny UNet: {n_params / 1e6:.2f}M parameters, {len(prompts)} classes, "
          f"{len(sprites)} sprites")

    def save():
        torch.save(dict(unet=unet.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                        gen=g.get_state(), torch_rng=torch.get_rng_state(), step=step,
                        seconds=t0 + time.time() - start, losses=losses, config=asdict(cfg)),
                   ckpt.with_suffix(".tmp"))
        os.replace(ckpt.with_suffix(".tmp"), ckpt)  # atomic: a kill mid-save keeps the old one

    start = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain", dynamic_ncols=True)
    unet.train()
    while step < cfg.steps:
        lr = (cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5
              * (1 + math.cos(math.pi * step / cfg.steps)))  # warm-up, then cosine decay
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
    tmp = weights.with_suffix(".tmp")  # written whole, then renamed: a kill keeps the old file
    save_file({k: v.contiguous() for k, v in shipped.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    seconds = t0 + time.time() - start
    card = dict(steps=step, batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup,
                ema_decay=cfg.ema_decay, shipped=cfg.ship, init=cfg.init,
                animal_frac=cfg.animal_frac, cond_dropout=cfg.cond_dropout, seed=cfg.seed,
                final_loss_last100=float(np.mean(losses[-100:])), wall_seconds=round(seconds),
                hardware=f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
                parameters=n_params, classes=len(prompts), unet_config=UNET_CONFIG,
                scheduler_config=SCHEDULER_CONFIG)
    if cfg.init and Path(cfg.init).with_suffix(".json").exists():
        # the card of the weights we started from
        card["init_card"] = json.loads(Path(cfg.init).with_suffix(".json").read_text())
    write_json(weights.with_suffix(".json"), card)
    np.save(out / "losses.npy", np.array(losses))
    print(f"wrote {weights} ({seconds / 60:.1f} min, final loss {card['final_loss_last100']:.4f})")


# The recipe of the shipped weights: two stages, about 2 hours on 2 CPU cores, each resumable.
# Stage 1 learns all 300 emoji (lr 1e-3, uniform over sprites); its last iterate starts stage 2,
# which spends half of each batch on the 45 animals DDPO trains on, at half the learning rate, and
# ships the EMA. Measured on the stage-1 weights: the EMA (decay 0.999) recognised 8% of animal
# samples, the raw last iterate 22%; after stage 2, 59% (45 animals x 4 samples, guidance 3).
SHIPPED_STAGES = (
    dict(steps=3000, lr=1e-3, dir=str(CACHE / "pretrain"), ship="raw",
         out=str(CACHE / "pretrain" / "stage1.safetensors")),
    dict(steps=3200, lr=5e-4, animal_frac=0.5, ema_decay=0.998, dir=str(CACHE / "pretrain2"),
         init=str(CACHE / "pretrain" / "stage1.safetensors"),
         out=str(ASSETS / "tiny_unet.safetensors")),
)  # fmt: skip


def pretrain_shipped() -> None:
    """Re-create assets/tiny_unet.safetensors: SHIPPED_STAGES in order. Each resumes from its
    checkpoint, so a finished stage only rewrites its output."""
    for k, stage in enumerate(SHIPPED_STAGES, 1):
        cfg = PretrainConfig(**stage)
        print(f"stage {k}/{len(SHIPPED_STAGES)}: {stage}")
        pretrain(cfg)


# ----------------------------------------------------------------------------------------------
# 2. The tiny captioner: the stand-in for LLaVA in the alignment reward
# ----------------------------------------------------------------------------------------------


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
    weights = tiny.CAPTIONER_WEIGHTS
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    held_out = captioner_accuracy(Captioner(net, class_prompts()), n=2000, seed=12345)
    write_json(weights.with_suffix(".json"), dict(
        steps=steps, batch_size=batch_size, seed=seed, held_out_accuracy=held_out,
        held_out_renders=2000, classes=len(class_prompts())))
    print(f"wrote {weights}; held-out accuracy on fresh renders: {held_out:.3f}")


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
# CLI
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.tiny_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("pretrain-shipped",
                   help="re-create the shipped weights: both pretraining stages (~2 h)")
    pp = sub.add_parser("pretrain", help="one pretraining stage (resumes from its --dir)")
    for f, v in vars(PretrainConfig()).items():
        pp.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    pc = sub.add_parser("captioner", help="train the tiny captioner")
    pc.add_argument("--steps", type=int, default=2000)
    args = p.parse_args(argv)
    try:
        if args.cmd == "pretrain-shipped":
            pretrain_shipped()
        elif args.cmd == "pretrain":
            pretrain(PretrainConfig(**{k: v for k, v in vars(args).items() if k != "cmd"}))
        elif args.cmd == "captioner":
            train_captioner(steps=args.steps)
    except (FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
