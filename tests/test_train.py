"""The training loop end to end: paper-scale code on a tiny random SD pipeline, exact resume,
guards.

Everything here runs on CPU with no network: the "Stable Diffusion" is built from configs (same
classes as SD v1.4: UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer) and saved to
a local folder, which is exactly the `--model /local/folder` path a user without the hub takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_sd import save_tiny_sd_pipeline
from toy import history, tiny_config

import config
import ddpo_min
import plumbing
import rewards
import tiny
from config import Config, ConfigError, TrainingDiverged, parse_args
from ddpo_min import train

# ----------------------------------------------------------------------------------------------
# A tiny random Stable Diffusion pipeline, saved like a real one
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory) -> Path:
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"))


def _sd_config(folder: Path, out: Path, **kw) -> Config:
    base = dict(model=str(folder), reward="compressibility", prompts="simple_animals",
                num_steps=3, guidance_scale=5.0, sample_batch_size=2, sample_batches=2,
                train_batch_size=2, minibatches=2, lora_rank=4, epochs=1, output_dir=str(out),
                device="cpu", mixed_precision="no", grid_size=4)
    base.update(kw)
    return Config(**base)


def test_paper_scale_epoch_with_lora_and_cfg(tiny_sd_folder, tmp_path):
    """One full epoch of the SD code path (LoRA + CFG) on CPU; the saved LoRA loads into a
    pipeline."""
    from diffusers import StableDiffusionPipeline

    run_dir = train(_sd_config(tiny_sd_folder, tmp_path / "run"))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1
    m = metrics[0]
    for key in ("reward/mean", "reward/std", "loss/policy", "loss/approx_kl", "loss/clipfrac",
                "time/sample", "time/reward", "time/train", "samples_per_second"):
        assert key in m and np.isfinite(m[key]), key
    assert m["step"] == 2  # 2 minibatches -> 2 optimizer steps
    assert ((run_dir / "samples_epoch0000.png").is_file()
            and (run_dir / "reward_curve.png").is_file())
    assert json.loads((run_dir / "config.json").read_text())["lora_rank"] == 4

    # the LoRA file is what StableDiffusionPipeline.load_lora_weights reads, and it changes the
    # output
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, safety_checker=None)

    def render():
        g = torch.Generator().manual_seed(0)
        return pipe("a cat", num_inference_steps=3, generator=g, output_type="np",
                    guidance_scale=5.0).images

    before = render()
    pipe.load_lora_weights(run_dir / "weights")
    after = render()
    assert np.abs(after - before).max() > 1e-6


def test_lora_trains_only_adapter_weights(tiny_sd_folder, tmp_path):
    cfg = _sd_config(tiny_sd_folder, tmp_path / "run")
    run = ddpo_min.Run(cfg)
    names = [n for n, p in run.model.unet.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    targets = {n.split(".lora")[0].rsplit(".", 1)[-1] for n in names}
    assert targets <= {"to_q", "to_k", "to_v", "0"}  # to_out.0 ends in "0"
    assert all(p.dtype == torch.float32 for p in run.params)


def test_cross_attention_lora_targets_only_attn2_and_loads(tiny_sd_folder, tmp_path):
    """--trainable cross_attention with LoRA: adapters on the attn2 projections only; the file still
    loads."""
    from diffusers import StableDiffusionPipeline

    cfg = _sd_config(tiny_sd_folder, tmp_path / "run", trainable="cross_attention")
    names = [n for n, p in ddpo_min.Run(cfg).model.unet.named_parameters() if p.requires_grad]
    assert names and all("lora" in n and ".attn2." in n for n in names)
    every = [n for n, p in ddpo_min.Run(_sd_config(tiny_sd_folder, tmp_path / "all"))
             .model.unet.named_parameters() if p.requires_grad]
    assert set(names) == {n for n in every if ".attn2." in n} and len(names) < len(every)
    run_dir = train(cfg)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, safety_checker=None)
    pipe.load_lora_weights(run_dir / "weights")
    adapted = [n for n, _ in pipe.unet.named_parameters() if "lora" in n]
    assert adapted and all(".attn2." in n for n in adapted)


def test_first_minibatch_is_on_policy(tiny_sd_folder, tmp_path):
    """At theta = theta_old the recomputed log-probs equal the sampled ones: approx_kl 0, clipfrac
    0."""
    run_dir = train(_sd_config(tiny_sd_folder, tmp_path / "run", minibatches=1, sample_batches=1))
    m = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert m["loss/approx_kl"] < 1e-12 and m["loss/clipfrac"] == 0.0  # |log rho| < 1.4e-6


# ----------------------------------------------------------------------------------------------
# Tiny scale: exact resume, guards
# ----------------------------------------------------------------------------------------------


def test_resume_after_kill_mid_epoch_is_exact(random_tiny_weights, tmp_path, monkeypatch):
    straight = history(train(tiny_config(tmp_path / "straight")))

    calls = {"n": 0}
    real = ddpo_min.policy_loss

    def killed_in_epoch_1(*args, **kwargs):  # Ctrl-C in the middle of epoch 1's training phase
        calls["n"] += 1
        # each epoch makes 2 minibatches x 1 chunk x 1 timestep (half of the 2 stochastic steps of
        # 3) = 2 calls; call 4 is in epoch 1's second minibatch, after epoch 1 has already taken one
        # optimizer step
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ddpo_min, "policy_loss", killed_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "killed"))
    assert len(history(tmp_path / "killed")) == 1  # epoch 0 finished, epoch 1 did not
    assert (tmp_path / "killed" / "interrupted_weights" / "unet.safetensors").is_file()
    monkeypatch.setattr(ddpo_min, "policy_loss", real)

    resumed = history(train(Config(resume=str(tmp_path / "killed"), epochs=0)))
    assert [h["epoch"] for h in resumed] == [0, 1, 2]
    for a, b in zip(straight, resumed):
        assert a["reward/mean"] == b["reward/mean"]
        assert a["loss/policy"] == pytest.approx(b["loss/policy"], rel=1e-6, abs=1e-9)


def test_cross_attention_full_fine_tuning_moves_only_attn2(random_tiny_weights, tmp_path):
    """--trainable cross_attention without LoRA: attn2 weights change, every other weight stays
    bit-identical."""
    from safetensors.torch import load_file

    before = load_file(str(random_tiny_weights))
    run_dir = train(tiny_config(tmp_path / "run", trainable="cross_attention", epochs=1))
    after = load_file(str(run_dir / "weights" / "unet.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    attn2 = {k for k in before if ".attn2." in k}
    assert attn2 and changed == attn2


def test_nan_reward_stops_with_epoch_and_phase(random_tiny_weights, tmp_path, monkeypatch):
    real = plumbing.make_reward

    def nan_reward(*args, **kwargs):
        real(*args, **kwargs)  # still validates the name
        return lambda images, prompts: (np.full(len(prompts), np.nan, np.float32), {})

    monkeypatch.setattr(plumbing, "make_reward", nan_reward)
    with pytest.raises(TrainingDiverged, match="epoch 0, phase reward"):
        train(tiny_config(tmp_path / "nan", epochs=1))


def test_a_reward_of_the_wrong_shape_is_one_line(random_tiny_weights, tmp_path, monkeypatch):
    real = plumbing.make_reward

    def per_pixel(*args, **kwargs):
        real(*args, **kwargs)
        return lambda images, prompts: (np.zeros((len(prompts), 2), np.float32), {})

    monkeypatch.setattr(plumbing, "make_reward", per_pixel)
    with pytest.raises(ConfigError, match=r"shape \(4, 2\) for 4 images: it must return one"):
        train(tiny_config(tmp_path / "shape", epochs=1))


def test_nan_loss_stops_and_keeps_last_checkpoint(random_tiny_weights, tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "nanloss", epochs=1)
    train(cfg)
    before = torch.load(tmp_path / "nanloss" / "checkpoint.pt", weights_only=False)
    real = ddpo_min.policy_loss

    def nan_loss(*args, **kwargs):
        loss, info = real(*args, **kwargs)
        return loss * float("nan"), info

    monkeypatch.setattr(ddpo_min, "policy_loss", nan_loss)
    with pytest.raises(TrainingDiverged, match="epoch 1, phase train"):
        train(Config(resume=str(tmp_path / "nanloss"), epochs=2))
    after = torch.load(tmp_path / "nanloss" / "checkpoint.pt", weights_only=False)
    assert after["epoch"] == before["epoch"] == 1


def test_samples_per_prompt_repeats_each_drawn_prompt(random_tiny_weights, tmp_path, monkeypatch):
    seen = []
    real = ddpo_min.compute_advantages

    def spy(run, samples):
        seen.append(list(samples.prompts))
        return real(run, samples)

    monkeypatch.setattr(ddpo_min, "compute_advantages", spy)
    train(tiny_config(tmp_path / "grouped", epochs=1, samples_per_prompt=2))
    (prompts,) = seen  # 2 batches of 4 = 2 drawn prompts per batch, each twice, in place
    assert len(prompts) == 8
    assert all(prompts[i] == prompts[i + 1] for i in range(0, 8, 2))


def test_training_skips_the_deterministic_last_step(random_tiny_weights, tmp_path, monkeypatch):
    # the tiny scheduler has set_alpha_to_one=True: its last step has sigma_t = 0, no density, no
    # gradient
    trained = []
    real = ddpo_min.policy_loss

    def spy(run, samples, idx, j, adv):
        trained.extend(j.tolist())
        return real(run, samples, idx, j, adv)

    monkeypatch.setattr(ddpo_min, "policy_loss", spy)
    train(tiny_config(tmp_path / "steps", epochs=1, timestep_fraction=1.0))
    assert sorted(set(trained)) == [0, 1]  # steps 0 and 1 of 3; never step 2
    assert len(trained) == 8 * 2  # every sample trains on both stochastic steps


def test_ddpo_sf_takes_one_optimizer_step_per_epoch(random_tiny_weights, tmp_path):
    assert parse_args(["--algo", "ddpo_sf"]).minibatches == 1
    assert parse_args(["--model", "tiny", "--algo", "ddpo_sf"]).minibatches == 1
    with pytest.raises(ConfigError, match="ddpo_sf takes one optimizer step per epoch"):
        config.check_config(Config(algo="ddpo_sf", minibatches=4))
    with pytest.raises(SystemExit):  # an explicit --minibatches 4 is refused, not obeyed
        ddpo_min.main(["--model", "tiny", "--algo", "ddpo_sf", "--minibatches", "4",
                       "--output-dir", str(tmp_path / "refused")])
    run_dir = train(tiny_config(tmp_path / "sf", algo="ddpo_sf", minibatches=1, epochs=2))
    assert [h["step"] for h in history(run_dir)] == [1, 2]  # one step per epoch, through the loop


def test_sparse_rwr_weights_every_kept_sample_equally(random_tiny_weights, tmp_path, monkeypatch):
    """Kept samples split into chunks of 2 and 1: each sample's term must weigh 1/3, not 1/4 and
    1/2 (a mean over chunk means)."""
    weights = []
    real = ddpo_min.rwr_loss

    def spy(run, samples, idx, w, t, noise):
        loss = real(run, samples, idx, w, t, noise)
        weights.append(len(idx))
        return loss

    monkeypatch.setattr(ddpo_min, "rwr_loss", spy)
    seen = []
    real_backward = plumbing.backward
    monkeypatch.setattr(plumbing, "backward",
                        lambda run, loss, weight: (seen.append(weight), real_backward(run, loss,
                                                                                      weight)))
    guidance = []
    real_loss = ddpo_min.diffusion_mse_loss
    monkeypatch.setattr(ddpo_min, "diffusion_mse_loss",
                        lambda *a: (guidance.append(a[-1]), real_loss(*a))[1])
    # 8 samples, the top 3 kept (percentile 70), one minibatch, chunks of 2
    train(tiny_config(tmp_path / "rwr", algo="rwr_sparse", rwr_percentile=70.0, minibatches=1,
                       train_batch_size=2, epochs=1))
    assert weights == [2, 1]
    assert seen == pytest.approx([2 / 3, 1 / 3])  # the chunk's share of the kept samples
    assert guidance == [3.0, 3.0]  # RWR trains the guided prediction, as it samples (tiny: w = 3)


def test_non_finite_latents_stop_the_run_in_the_sampling_phase(random_tiny_weights, tmp_path,
                                                                monkeypatch):
    real = ddpo_min.sample_with_logprob

    def nan_latents(*args, **kwargs):
        traj = real(*args, **kwargs)
        traj.latents[0, -1] = float("nan")
        return traj

    monkeypatch.setattr(ddpo_min, "sample_with_logprob", nan_latents)
    with pytest.raises(TrainingDiverged, match="epoch 0, phase sample: non-finite latents in 1 "):
        train(tiny_config(tmp_path / "nan", epochs=1))


def test_non_finite_decoded_images_stop_the_run_before_any_reward(random_tiny_weights, tmp_path,
                                                                   monkeypatch):
    """Finite latents that the VAE decode overflows (fp16): cast to uint8 a NaN would become a
    pixel value and get a reward like any other image."""
    real_load, rewarded = plumbing.loading.load_model, []

    def overflowing_decode(*args, **kwargs):
        model = real_load(*args, **kwargs)
        decode = model.decode
        model.decode = lambda x0: decode(x0).index_fill_(0, torch.tensor([0]), float("inf"))
        return model

    real_reward = plumbing.make_reward
    monkeypatch.setattr(plumbing.loading, "load_model", overflowing_decode)
    monkeypatch.setattr(plumbing, "make_reward", lambda *a, **k: (
        lambda fn: lambda images, prompts: (rewarded.append(1), fn(images, prompts))[1])(
            real_reward(*a, **k)))
    with pytest.raises(TrainingDiverged, match="non-finite latents in 0 and non-finite decoded "
                                               "images in 1 "):
        train(tiny_config(tmp_path / "inf", epochs=1))
    assert not rewarded
    with pytest.raises(ValueError, match="NaN or inf"):  # and a reward refuses such images
        rewards.to_uint8_images(torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="NaN or inf"):
        rewards.to_uint8_images(np.full((1, 3, 4, 4), np.inf))


def _spy_kl(monkeypatch) -> dict:
    """Record the run, the samples and the value of each epoch's KL diagnostic."""
    seen: dict = {}
    real = ddpo_min.kl_to_pretrained

    def spy(run, samples):
        seen.update(run=run, samples=samples, value=real(run, samples))
        return seen["value"]

    monkeypatch.setattr(ddpo_min, "kl_to_pretrained", spy)
    return seen


@pytest.mark.parametrize("num_steps, kl_steps, pairs", [
    # 3 steps, 2 stochastic: kl_steps 4 >= 2 scores every step of each trajectory
    (3, 4, {0: [0, 1], 4: [0, 1], 7: [0, 1]}),
    # 6 steps, all stochastic (the last one's prev is t = 0, not past it), 2 per trajectory,
    # staggered by a third of the spacing 6/2: positions floor((r + k/3) * 6/2), r = 0, 1
    (6, 2, {0: [0, 3], 4: [1, 4], 7: [2, 5]}),
])
def test_kl_to_pretrained_matches_an_independent_computation(random_tiny_weights, tmp_path,
                                                             monkeypatch, num_steps, kl_steps,
                                                             pairs):
    """Full fine-tuning: the diagnostic against the pretrained weights reloaded from disk, with
    diffusers' noiseless DDIM step for both means and its own variance for sigma_t, on the
    (trajectory, step) pairs the docstring names (kl_samples = 3 evenly spaced over 8 samples)."""
    seen = _spy_kl(monkeypatch)
    run_dir = train(tiny_config(tmp_path / "kl", epochs=1, lr=1e-3, kl_samples=3,
                                 num_steps=num_steps, kl_steps=kl_steps))
    run, samples, value = seen["run"], seen["samples"], seen["value"]
    assert history(run_dir)[0]["kl/pretrained"] == pytest.approx(value)
    pretrained, scheduler, w = tiny.load_tiny().unet, run.model.scheduler, run.cfg.guidance_scale
    kls = []
    with torch.no_grad():
        for row, steps in pairs.items():
            for j in steps:
                t = int(samples.timesteps[j])
                sigma2 = scheduler._get_variance(t, t - 1000 // num_steps)  # eta = 1
                assert sigma2 > 0  # a stochastic step
                x = samples.latents[[row], j]
                context = torch.cat([run.negative_embeds, samples.prompt_embeds[[row]]])
                means = []
                for unet in (run.model.unet, pretrained):
                    pair = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample
                    uncond, cond = pair.chunk(2)
                    out = uncond + w * (cond - uncond)
                    means.append(scheduler.step(out, t, x, eta=1.0,
                                                variance_noise=torch.zeros_like(x)).prev_sample)
                kls.append(((means[0] - means[1]) ** 2).mean() / (2 * sigma2))
    oracle = torch.stack(kls).mean().item()
    assert value > 0 and value == pytest.approx(oracle, rel=1e-3)


def test_kl_to_pretrained_with_lora_switches_the_adapters_off_and_on(tiny_sd_folder, tmp_path,
                                                                      monkeypatch):
    seen = _spy_kl(monkeypatch)
    train(_sd_config(tiny_sd_folder, tmp_path / "run", kl_samples=2))
    run, samples = seen["run"], seen["samples"]
    assert run.reference is None and seen["value"] > 0  # LoRA keeps no copy of the UNet
    lora_b = [p for n, p in run.model.unet.named_parameters() if "lora_B" in n]
    saved = [p.detach().clone() for p in lora_b]
    with torch.no_grad():
        for p in lora_b:
            p.zero_()  # LoRA's output is B A x: with B = 0 the policy is the pretrained one
    assert ddpo_min.kl_to_pretrained(run, samples) == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        for p, v in zip(lora_b, saved):
            p.copy_(v)
    # the adapters are on again after each call: the same value as in the loop
    assert ddpo_min.kl_to_pretrained(run, samples) == pytest.approx(seen["value"], rel=1e-5)


def test_tiny_rwr_weighs_advantages_not_raw_rewards(random_tiny_weights, tmp_path, monkeypatch):
    """At tiny scale exp(r / 5) of JPEG sizes (~0.1 kB apart) would leave every weight at ~1:
    RWR there weighs the loop's advantage, exp(A): the very advantages DDPO would train on
    (per-prompt once a prompt's buffer fills; at this toy size, over the batch)."""
    signals, advantages = [], []
    real, real_adv = ddpo_min.rwr_weights, ddpo_min.compute_advantages
    monkeypatch.setattr(ddpo_min, "rwr_weights",
                        lambda r, beta: (signals.append(r.clone()), real(r, beta))[1])
    monkeypatch.setattr(ddpo_min, "compute_advantages",
                        lambda run, s: (advantages.append(real_adv(run, s)), advantages[-1])[1])
    assert Config.tiny(algo="rwr").rwr_signal == "advantage" and Config().rwr_signal == "reward"
    run_dir = train(tiny_config(tmp_path / "adv", algo="rwr", epochs=1))
    (r,) = signals
    assert torch.equal(r, advantages[0])  # the loop's advantages themselves
    assert abs(r.mean().item()) < 1e-5  # A: standardised (over the batch: buffers not yet full)
    assert r.std(unbiased=False).item() == pytest.approx(1, rel=1e-3)
    weights = real(r, Config.tiny(algo="rwr").rwr_beta)
    assert weights.max() / weights.min() > 2
    assert history(run_dir)[0]["reward/mean"] < -0.1  # compressibility: minus the JPEG kB
    run_dir = train(tiny_config(tmp_path / "raw", algo="rwr", epochs=1, rwr_signal="reward",
                                 rwr_beta=0.2))
    assert signals[1].mean().item() == pytest.approx(history(run_dir)[0]["reward/mean"])
