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

# Trains one tiny epoch per case and records, on each process: a hash of the trainable weights
# after every optimizer step, and how many minibatches this process owned none of.
RUN_CASES = """
import hashlib, json, os, sys
sys.path.insert(0, {root!r})
import ddpo_min
import plumbing
from config import Config

real_step, real_chunks, record = plumbing.optimizer_step, ddpo_min.my_chunks, {{}}

def recording_step(run, nonfinite):
    out = real_step(run, nonfinite)
    h = hashlib.sha256()
    for p in run.params:
        h.update(p.detach().cpu().numpy().tobytes())
    record["hashes"].append(h.hexdigest())
    return out

def recording_chunks(samples, minibatch, size):
    chunks = real_chunks(samples, minibatch, size)
    record["empty_shares"] += not chunks
    return chunks

plumbing.optimizer_step, ddpo_min.my_chunks = recording_step, recording_chunks
for case in {cases!r}:
    algo, precision = case.split("-")
    record.update(hashes=[], empty_shares=0)
    out = os.path.join(sys.argv[1], case)
    cfg = Config.tiny(algo=algo, mixed_precision=precision, seed={seed}, num_steps=3,
                      sample_batch_size=4, sample_batches=2, samples_per_prompt=2,
                      train_batch_size=2, minibatches=2, epochs=1, device="cpu", grid_size=4,
                      threads=1, output_dir=out)
    ddpo_min.train(cfg)
    with open(os.path.join(out, f"record_rank{{os.environ.get('RANK', '0')}}.json"), "w") as f:
        json.dump(record, f)
"""
# Seed 36 leaves one of 2 processes none of a DDPO minibatch (8 samples, minibatches of 4: the
# shuffle puts 7, 4, 6, 5 first); sparse RWR keeps the top 10% of 8 samples, one, on one process.
EDGE_SEED = 36
CASES = ("ddpo_is-no", "ddpo_is-fp16", "rwr_sparse-no", "rwr_sparse-fp16")


def _launch(tmp_path: Path, processes: int) -> Path:
    script = tmp_path / "run_cases.py"
    script.write_text(RUN_CASES.format(root=str(ROOT), cases=CASES, seed=EDGE_SEED))
    out = tmp_path / f"run{processes}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", str(script), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _strict_json(line: str) -> dict:
    """json.loads that rejects NaN and Infinity, as jq and JavaScript do."""
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON number {c}"))


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("engine")
    return _launch(tmp, 1), _launch(tmp, 2)


@pytest.mark.parametrize("case", CASES)
def test_two_processes_train_exactly_as_one_with_an_empty_share(one_and_two, case):
    """DDPO_IS and sparse RWR, fp32 and fp16 (loss scaling), on a seed where one of the 2
    processes owns none of a minibatch: both finish, hold identical weights after every optimizer
    step, and equal the 1-process run in weights and in every logged diagnostic."""
    one, two = (folder / case for folder in one_and_two)
    rank0 = json.loads((two / "record_rank0.json").read_text())
    rank1 = json.loads((two / "record_rank1.json").read_text())
    assert rank0["empty_shares"] + rank1["empty_shares"] > 0  # the edge case was reached
    m1 = _strict_json((one / "metrics.jsonl").read_text())
    m2 = _strict_json((two / "metrics.jsonl").read_text())
    # (sparse RWR keeps 1 of 8 samples here: one minibatch, one step)
    assert m2["step"] == m1["step"] == (2 if case.startswith("ddpo") else 1)
    assert len(rank0["hashes"]) == m1["step"] and rank0["hashes"] == rank1["hashes"]

    # the same samples: a sample's prompt and noise depend on its number, not on its process
    assert m1["reward/mean"] == m2["reward/mean"] and m1["reward/std"] == m2["reward/std"]
    assert m1["skipped_steps"] == m2["skipped_steps"]
    # the same diagnostics: sample-weighted over the minibatch, K trajectories in all
    # (relative tolerances only: approx_kl is about 1e-8 here, below any useful absolute one;
    # fp32 sums differ only in their order, fp16 rounds each forward chunk)
    rel = 1e-4 if case.endswith("-no") else 2e-2
    for key in ("loss/policy", "loss/approx_kl", "loss/clipfrac", "kl/pretrained", "grad_norm"):
        assert (m1[key] is None) == (m2[key] is None), key
        if m1[key] is not None:
            assert m2[key] == pytest.approx(m1[key], rel=rel, abs=1e-30), key
    if case.startswith("ddpo"):
        assert m1["loss/approx_kl"] > 0  # the second minibatch's policy has moved

    # the same update, to float tolerance (the ranks' forward chunks differ, so sums round
    # differently; more so in fp16)
    start = load_file(str(ROOT / "assets" / "tiny_unet.safetensors"))
    w1 = load_file(str(one / "weights" / "unet.safetensors"))
    w2 = load_file(str(two / "weights" / "unet.safetensors"))
    d1 = torch.cat([(w1[k] - start[k]).flatten() for k in start])
    d2 = torch.cat([(w2[k] - start[k]).flatten() for k in start])
    tolerance = 1e-3 if case.endswith("-no") else 2e-2
    assert d1.norm() > 0
    assert (d1 - d2).norm() / d1.norm() < tolerance, ((d1 - d2).norm() / d1.norm()).item()


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
    run.optimizer = torch.optim.AdamW(run.params, lr=cfg.lr)  # its unscale_ below
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
    loss, _ = ddpo_min.policy_loss(run, samples, idx, steps, torch.tensor([1.0, -1.0]))
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


# ----------------------------------------------------------------------------------------------
# fp16: skipped steps, the stop after many, the loss scale through a checkpoint
# ----------------------------------------------------------------------------------------------


def _fp16_config(out: Path, **kw) -> Config:
    args = dict(mixed_precision="fp16", num_steps=3, sample_batch_size=4, sample_batches=2,
                samples_per_prompt=2, train_batch_size=4, minibatches=2, epochs=1, device="cpu",
                grid_size=4, kl_samples=2, output_dir=str(out))
    return Config.tiny(**{**args, **kw})


REAL_BACKWARD = plumbing.backward


def _overflow_on_calls(monkeypatch, calls: set[int]) -> None:
    """Make the backward passes numbered in `calls` (from 1) overflow, as an fp16 step can."""
    real, count = plumbing.backward, {"n": 0}

    def backward(run, loss, weight):
        count["n"] += 1
        real(run, loss * (float("inf") if count["n"] in calls else 1.0), weight)

    monkeypatch.setattr(plumbing, "backward", backward)


def test_a_skipped_fp16_step_leaves_the_weights_and_writes_strict_json(tmp_path, monkeypatch):
    _overflow_on_calls(monkeypatch, {1})  # the first minibatch's only term
    weights = {}
    real_step = plumbing.optimizer_step

    def spy(run, nonfinite):
        before = [p.detach().clone() for p in run.params]
        out = real_step(run, nonfinite)
        weights.setdefault("moved", []).append(
            any(not torch.equal(b, p) for b, p in zip(before, run.params)))
        weights["scale"] = run.scaler.get_scale()
        return out

    monkeypatch.setattr(plumbing, "optimizer_step", spy)
    run_dir = ddpo_min.train(_fp16_config(tmp_path / "run"))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    m = _strict_json(lines[0])  # no Infinity from the skipped step
    assert m["skipped_steps"] == 1 and weights["moved"] == [False, True]
    assert weights["scale"] == 2.0**15  # halved once from 2^16
    assert m["grad_norm"] is not None and np.isfinite(m["grad_norm"])  # the step taken
    assert m["step"] == 2  # both rounds are counted as steps; skipped_steps says one was skipped


def test_fp16_stops_after_twenty_skipped_steps_in_a_row(tmp_path):
    run = plumbing.Run(_fp16_config(tmp_path / "run"))
    run.optimizer = torch.optim.AdamW(run.params, lr=run.cfg.lr)
    start = [p.detach().clone() for p in run.params]
    for i in range(1, plumbing.MAX_SKIPS_IN_A_ROW + 1):
        for p in run.params:
            p.grad = torch.full_like(p, float("inf"))
        if i < plumbing.MAX_SKIPS_IN_A_ROW:
            _, skipped = plumbing.optimizer_step(run, 0)
            assert skipped and run.state.skips_in_a_row == i
            assert run.scaler.get_scale() == 2.0 ** (16 - i)  # halved at every skip
        else:
            with pytest.raises(plumbing.TrainingDiverged, match="20 optimizer steps in a row"):
                plumbing.optimizer_step(run, 0)
    assert all(torch.equal(a, p) for a, p in zip(start, run.params))  # no skipped step moved them
    for p in run.params:  # one finite step resets the count
        p.grad = torch.zeros_like(p)
    run.state.skips_in_a_row = 3
    assert plumbing.optimizer_step(run, 0)[1] is False and run.state.skips_in_a_row == 0


def test_fp16_resume_restores_the_loss_scale(tmp_path, monkeypatch):
    """A skip in epoch 0 halves the loss scale; a run stopped after epoch 0 and resumed continues
    with the halved scale and ends bit-identical to a run that never stopped."""
    _overflow_on_calls(monkeypatch, {1})
    straight = ddpo_min.train(_fp16_config(tmp_path / "straight", epochs=2))
    _overflow_on_calls(monkeypatch, {1})
    ddpo_min.train(_fp16_config(tmp_path / "stopped", epochs=1))
    monkeypatch.setattr(plumbing, "backward", REAL_BACKWARD)
    resumed = ddpo_min.train(Config(resume=str(tmp_path / "stopped"), epochs=2))
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert a["scaler"]["scale"] == b["scaler"]["scale"] == 2.0**15
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])
