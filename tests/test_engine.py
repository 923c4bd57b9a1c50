"""The engine: N processes give the result of one, and half precision keeps its gradients.

- Two CPU processes under torchrun (gloo) hold bitwise-identical weights after every optimizer
  step, and after an epoch equal a one-process run with the same seed and total batch, to float
  tolerance (the processes' forward chunks differ, so their sums round differently).
- fp16 frozen weights under LoRA: the DDPO gradient reaching the UNet is ~1e-8 per element, below
  fp16's normal range; with the GradScaler the LoRA gradient matches fp32's, without it, it is 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_sd import save_tiny_sd_pipeline

import ddpo_min
import plumbing
from config import Config
from sampler import ddim_step_with_logprob, guided_model_output

ROOT = Path(__file__).resolve().parents[1]

# Runs a tiny epoch and records a hash of the trainable weights after every optimizer step.
RUN_ONE = """
import hashlib, json, os, sys
sys.path.insert(0, {root!r})
import ddpo_min
import plumbing
from config import Config

real, hashes = plumbing.optimizer_step, []

def recording(run, nonfinite):
    out = real(run, nonfinite)
    h = hashlib.sha256()
    for p in run.params:
        h.update(p.detach().cpu().numpy().tobytes())
    hashes.append(h.hexdigest())
    return out

plumbing.optimizer_step = recording
cfg = Config.tiny(num_steps=3, sample_batch_size=4, sample_batches=2, samples_per_prompt=2,
                  train_batch_size=2, minibatches=2, epochs=1, device="cpu", grid_size=4,
                  threads=1, output_dir=sys.argv[1])
ddpo_min.train(cfg)
with open(os.path.join(sys.argv[1], f"hashes_rank{{os.environ.get('RANK', '0')}}.json"), "w") as f:
    json.dump(hashes, f)
"""


def _launch(tmp_path: Path, processes: int) -> Path:
    script = tmp_path / "run_one.py"
    script.write_text(RUN_ONE.format(root=str(ROOT)))
    out = tmp_path / f"run{processes}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", str(script), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_two_processes_train_exactly_as_one(tmp_path):
    one, two = _launch(tmp_path, 1), _launch(tmp_path, 2)
    rank0 = json.loads((two / "hashes_rank0.json").read_text())
    rank1 = json.loads((two / "hashes_rank1.json").read_text())
    assert len(rank0) == 2 and rank0 == rank1  # identical weights after every optimizer step
    assert not (two / "hashes_rank1.json").samefile(two / "hashes_rank0.json")

    # the same samples: a sample's prompt and noise depend on its number, not on its process
    m1 = json.loads((one / "metrics.jsonl").read_text())
    m2 = json.loads((two / "metrics.jsonl").read_text())
    assert m1["reward/mean"] == m2["reward/mean"] and m1["reward/std"] == m2["reward/std"]
    assert m2["step"] == m1["step"] == 2

    # the same update, to float tolerance
    start = load_file(str(ROOT / "assets" / "tiny_unet.safetensors"))
    w1 = load_file(str(one / "weights" / "unet.safetensors"))
    w2 = load_file(str(two / "weights" / "unet.safetensors"))
    d1 = torch.cat([(w1[k] - start[k]).flatten() for k in start])
    d2 = torch.cat([(w2[k] - start[k]).flatten() for k in start])
    assert d1.norm() > 0
    assert (d1 - d2).norm() / d1.norm() < 1e-3, ((d1 - d2).norm() / d1.norm()).item()


def test_batch_arithmetic_over_processes_is_one_clear_error():
    from config import ConfigError, check_config

    cfg = Config.tiny(sample_batches=3, minibatches=3)
    check_config(cfg, num_processes=1)
    with pytest.raises(ConfigError, match="--sample-batches 3 must split evenly over 2 processes"):
        check_config(cfg, num_processes=2)


# ----------------------------------------------------------------------------------------------
# Half precision
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd64(tmp_path_factory) -> Path:
    """An SD-class random pipeline with 64x64x4 latents, SD v1.4's latent size at 512 px."""
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd64"), latent_size=64,
                                 attention_first=False)


def _lora_gradient(folder: Path, precision: str, tmp_path: Path, scaled: bool = True):
    """The LoRA gradient of one DDPO_IS term at the paper's batch arithmetic, through the loop's
    own functions: 256 samples, 4 minibatches of 64, chunks of 2, 50 steps -> weight 1/1600."""
    cfg = Config(model=str(folder), reward="compressibility", device="cpu",
                 output_dir=str(tmp_path), mixed_precision=precision, num_steps=50)
    torch.manual_seed(0)
    run = ddpo_min.Run(cfg)
    with torch.no_grad():  # LoRA's B starts at 0, which zeroes A's gradient: move off the start
        g = torch.Generator().manual_seed(1)
        for p in run.params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    if not scaled:  # what the loop did before loss scaling
        run.scaler = torch.amp.GradScaler("cpu", enabled=False)
    scheduler = run.model.scheduler
    scheduler.set_timesteps(50)
    prompts, j = ["a cat", "a dog"], 10
    embeds = run.model.encode_prompts(prompts)  # (2, L, D)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 64, 64, generator=g)
    t = scheduler.timesteps[j]
    with torch.no_grad(), run.autocast:  # theta_old = theta, recorded in the run's precision
        out = guided_model_output(run.model.unet, x_t, t, embeds, run.negative_embeds, 5.0)
        x_prev, old = ddim_step_with_logprob(scheduler, out, t, x_t, eta=1.0, generator=g)
    latents = torch.zeros(2, 51, 4, 64, 64)
    latents[:, j], latents[:, j + 1] = x_t, x_prev
    log_probs = torch.zeros(2, 50)
    log_probs[:, j] = old
    samples = ddpo_min.Samples(
        index=torch.arange(2), latents=latents, log_probs=log_probs,
        timesteps=scheduler.timesteps.long(), prompt_embeds=embeds, prompts=prompts,
        images=torch.zeros(2, 3, 8, 8), rewards=np.zeros(2, np.float32), extras={},
        all_prompts=prompts * 32, all_rewards=np.zeros(64, np.float32))  # fmt: skip
    idx, steps = torch.arange(2), torch.full((2,), j)
    loss, _ = ddpo_min.policy_loss(run, samples, idx, steps, torch.tensor([1.0, -1.0]),
                                   ddpo_min.is_objective)
    plumbing.backward(run, loss, 2 / (64 * 50))  # chunk of 2 of a 64-sample minibatch, 50 steps
    run.scaler.unscale_(run.optimizer)  # as optimizer_step does before the clip
    return torch.cat([p.grad.flatten().float() for p in run.params])


def test_fp16_lora_gradient_survives_with_loss_scaling(sd64, tmp_path):
    reference = _lora_gradient(sd64, "no", tmp_path / "fp32")
    fp16 = _lora_gradient(sd64, "fp16", tmp_path / "fp16")
    cosine = torch.nn.functional.cosine_similarity(fp16, reference, dim=0).item()
    zeros = (fp16 == 0).float().mean().item()
    print(f"fp16 + loss scaling: cosine to fp32 {cosine:.5f}, zero entries {zeros:.2%} "
          f"(fp32: {(reference == 0).float().mean().item():.2%}); "
          f"gradient norm {reference.norm().item():.2e}")
    assert (reference == 0).float().mean() < 0.01
    assert cosine > 0.99 and zeros < 0.05
    # without the scaler the same gradient underflows: the check can fail
    unscaled = _lora_gradient(sd64, "fp16", tmp_path / "fp16raw", scaled=False)
    assert (unscaled == 0).float().mean() > 0.5


def test_fp16_on_cpu_trains_in_the_direction_of_fp32(tmp_path):
    """The tiny model (fp32 weights) trained one epoch under fp16 autocast with loss scaling moves
    its weights where an fp32 epoch moves them."""
    start = load_file(str(ROOT / "assets" / "tiny_unet.safetensors"))
    updates = {}
    for precision in ("no", "fp16"):
        cfg = Config.tiny(num_steps=3, sample_batch_size=8, sample_batches=1, samples_per_prompt=2,
                          train_batch_size=8, minibatches=1, epochs=1, device="cpu", grid_size=4,
                          mixed_precision=precision, output_dir=str(tmp_path / precision))
        run_dir = ddpo_min.train(cfg)
        weights = load_file(str(run_dir / "weights" / "unet.safetensors"))
        updates[precision] = torch.cat([(weights[k] - start[k]).flatten() for k in start])
        history = json.loads((run_dir / "metrics.jsonl").read_text())
        assert history["skipped_steps"] == 0
    cosine = torch.nn.functional.cosine_similarity(updates["fp16"], updates["no"], dim=0).item()
    print(f"cosine of the fp16 and fp32 updates: {cosine:.4f}")
    assert updates["fp16"].norm() > 0 and cosine > 0.9
