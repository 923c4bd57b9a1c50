"""A smoke check of a student's machine in under a minute: `python -m tools.check_setup`.

Checks the Python version, RAM and free disk, imports the libraries, loads the shipped tiny model,
times its guided UNet on one sampling batch, and estimates from that how long a tiny training epoch,
exercise 5 and a 15-epoch run take here. It runs none of the functions the exercises ask for, so it
works in the student release before exercise 1. Exit status 1 if something needed is missing.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One tiny training epoch (64 samples, 20 DDIM steps, DDPO_IS, the tiny defaults) took
# EPOCH_PER_PASS times as long as one pass of BATCH guided samples through the 20 sampling steps
# (UNet calls only), measured on 2 cores by `measure_ratio()` below (13.6 s / 2.41 s); the estimate
# scales that ratio to your machine.
EPOCH_PER_PASS = 5.6
BATCH, STEPS = 32, 20
EX5_EPOCHS, EX5_REWARDS, EVAL_IMAGES = 12, 2, 90


def _ram_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        return None


def guided_pass_seconds(model, repeats: int = 2) -> float:
    """Seconds for BATCH guided samples through STEPS UNet steps (the best of `repeats`)."""
    import torch

    import tiny
    from sampler import guided_model_output

    prompts = list(tiny.ANIMAL_PROMPTS[:BATCH])
    embeds = model.encode_prompts(prompts)
    negative = model.encode_prompts([""])
    x = torch.randn((BATCH, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    model.scheduler.set_timesteps(STEPS)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for t in model.scheduler.timesteps:
                guided_model_output(model.unet, x, t, embeds, negative, tiny.GUIDANCE)
            best = min(best, time.perf_counter() - start)
    return best


def measure_ratio() -> float:
    """EPOCH_PER_PASS on this machine: one tiny training epoch over one guided pass (needs the
    project's reference functions, so it runs in the repository, not in the student release)."""
    import tempfile

    import ddpo_min
    import tiny
    from config import Config

    with tempfile.TemporaryDirectory() as folder:
        ddpo_min.train(Config.tiny(epochs=1, output_dir=folder))  # warm-up: the first epoch
        pass_s = guided_pass_seconds(tiny.load_tiny())
        start = time.perf_counter()
        ddpo_min.train(Config.tiny(epochs=2, output_dir=folder))  # resumes: one more epoch
        epoch_s = time.perf_counter() - start
    print(f"one epoch {epoch_s:.1f} s, one guided pass {pass_s:.2f} s: "
          f"ratio {epoch_s / pass_s:.2f}")
    return epoch_s / pass_s


def main() -> int:
    problems = []
    print(f"python {platform.python_version()} on {platform.platform()}")
    ram = _ram_gb()
    print(f"RAM {ram:.1f} GB" if ram else "RAM: unknown on this system (8 GB is plenty)")
    if ram is not None and ram < 4:
        problems.append(f"{ram:.1f} GB of RAM: 4 GB or more are needed")
    free = shutil.disk_usage(ROOT).free / 2**30
    print(f"free disk {free:.1f} GB")
    if free < 1:
        problems.append(f"{free:.1f} GB free on disk: the runs need about 1 GB")
    try:
        import diffusers
        import numpy  # noqa: F401
        import torch
    except ImportError as e:
        print(f"✗ {e}: run `pip install torch==2.13.0 -r requirements.txt`")
        return 1
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"diffusers {diffusers.__version__}")
    if torch.version.cuda and not torch.cuda.is_available():
        print("  (a CUDA build of torch without a GPU: it works, but `pip install torch==2.13.0` "
              "with the CPU index is 10x smaller)")
    sys.path.insert(0, str(ROOT))
    import tiny

    model = tiny.load_tiny()
    print(f"the tiny model loads: {sum(p.numel() for p in model.unet.parameters()) / 1e6:.2f}M "
          "parameters")
    pass_s = guided_pass_seconds(model)
    epoch_s = EPOCH_PER_PASS * pass_s
    eval_s = EVAL_IMAGES / BATCH * pass_s  # the held-out set: sampling only
    ex5_min = EX5_REWARDS * (EX5_EPOCHS * epoch_s + 2 * eval_s) / 60
    print(f"guided UNet, {BATCH} samples x {STEPS} steps: {pass_s:.2f} s")
    print(f"estimated: one tiny training epoch {epoch_s:.0f} s; exercise 5 {ex5_min:.0f} min; "
          f"`python ddpo_min.py --model tiny` (15 epochs) {15 * epoch_s / 60:.0f} min")
    for problem in problems:
        print(f"✗ {problem}")
    print("setup OK" if not problems else "fix the lines marked ✗ first")
    return 1 if problems else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--measure-ratio"]:
        measure_ratio()
    else:
        sys.exit(main())
