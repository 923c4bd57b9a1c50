"""Exercise 6's planted bugs (tools/mystery.py): each one changes the run in the way its name says,
seen from what the student gets (metrics.jsonl), on a toy run beside the correct one."""

from __future__ import annotations

import contextlib
import json
from unittest import mock

import numpy as np
import pytest

import ddpo_min
from config import Config
from loading import load_prompts
from tools import mystery

TOY = dict(num_steps=4, sample_batch_size=8, sample_batches=1, samples_per_prompt=4,
           stat_buffer=4, stat_min_count=4, train_batch_size=4, minibatches=2, grid_size=4,
           kl_samples=2, device="cpu", epochs=2)


def _run(folder, bug=None, seen: list | None = None) -> list[dict]:
    """A toy run, with `bug` planted; `seen` (if given) collects each epoch's advantages."""
    cfg = Config.tiny(output_dir=str(folder), **TOY)
    with mystery.BUGS[bug]() if bug else contextlib.nullcontext(), _spy(seen):
        ddpo_min.train(cfg)
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def _spy(seen: list | None):
    """Record each epoch's (prompts, rewards as sampled, advantages the loop trains on), around
    whatever compute_advantages is in place (a bug's patch included)."""
    if seen is None:
        yield
        return
    inner = ddpo_min.compute_advantages

    def spy(run, samples):
        prompts, rewards = list(samples.all_prompts), np.array(samples.all_rewards, copy=True)
        adv = inner(run, samples)
        seen.append((prompts, rewards, adv.numpy().copy()))
        return adv

    with mock.patch.object(ddpo_min, "compute_advantages", spy):
        yield


def _per_prompt(prompts, rewards) -> np.ndarray:
    """The correct first-epoch advantages (a fresh tracker), clipped as the loop clips them."""
    tracker = ddpo_min.PerPromptStatTracker(TOY["stat_buffer"], TOY["stat_min_count"])
    return ddpo_min.clip_advantages(tracker.update(prompts, rewards), Config.tiny().adv_clip_max)


@pytest.fixture(scope="module")
def correct(tmp_path_factory):
    seen = []
    return _run(tmp_path_factory.mktemp("correct"), seen=seen), seen


def test_stale_old_log_probs_make_every_ratio_one(tmp_path, correct):
    bugged = _run(tmp_path, "stale-old-log-probs")
    assert all(m["loss/approx_kl"] == 0 and m["loss/clipfrac"] == 0 for m in bugged)
    assert all(m["loss/approx_kl"] > 0 for m in correct[0])


def test_same_noise_repeats_the_first_epoch(tmp_path, correct, monkeypatch):
    drawn = []
    real = ddpo_min.epoch_prompts
    monkeypatch.setattr(ddpo_min, "epoch_prompts", lambda *a: drawn.append(real(*a)) or drawn[-1])
    bugged = _run(tmp_path, "same-noise-every-epoch")
    assert bugged[0]["reward/mean"] == correct[0][0]["reward/mean"]
    assert len(drawn) == 2 and drawn[0] == drawn[1]  # epoch 1 draws epoch 0's prompts again
    cfg = Config.tiny(**TOY)
    assert real(cfg, load_prompts(cfg.prompts), 1) != drawn[0]  # the correct loop does not


@pytest.mark.parametrize("bug", ["shifted-rewards", "raw-rewards"])
def test_reward_bugs_change_the_advantages_not_the_samples(tmp_path, correct, bug):
    seen = []
    bugged = _run(tmp_path, bug, seen)
    # the same first samples (a shifted batch sums in another order: equal to float rounding)
    assert bugged[0]["reward/mean"] == pytest.approx(correct[0][0]["reward/mean"], rel=1e-6)
    prompts, rewards, adv = seen[0]
    assert not np.allclose(adv, _per_prompt(prompts, rewards), atol=1e-3)  # not the right ones
    if bug == "shifted-rewards":  # sample i is scored with sample i-1's reward
        assert np.allclose(adv, _per_prompt(prompts, np.roll(rewards, 1)), atol=1e-5)
    else:  # the rewards themselves, clipped: no per-prompt baseline, no scale
        assert np.allclose(adv, ddpo_min.clip_advantages(rewards, Config.tiny().adv_clip_max))
    assert len(seen) == TOY["epochs"]


def test_the_advantage_spy_sees_the_correct_loop_right(correct):
    """The checks above can pass: on the correct loop the spy sees per-prompt advantages."""
    prompts, rewards, adv = correct[1][0]
    assert np.allclose(adv, _per_prompt(prompts, rewards), atol=1e-5)
    assert not np.allclose(adv, _per_prompt(prompts, np.roll(rewards, 1)), atol=1e-3)
    assert not np.allclose(adv, ddpo_min.clip_advantages(rewards, Config.tiny().adv_clip_max))


def test_the_folder_shows_metrics_and_grids_only(tmp_path, monkeypatch):
    monkeypatch.setattr(mystery, "SETTINGS", {k: v for k, v in TOY.items()})
    monkeypatch.setattr(mystery, "EPOCHS", TOY["epochs"])
    out = mystery.make("raw-rewards", tmp_path / "mystery")
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == ["README.md", "correct/metrics.jsonl", "correct/samples_epoch0000.png",
                     "correct/samples_epoch0001.png", "mystery/metrics.jsonl",
                     "mystery/samples_epoch0000.png", "mystery/samples_epoch0001.png",
                     "settings.json"]
    assert "raw" not in "".join(p.read_text() for p in out.rglob("*.json*"))
    assert "raw" not in (out / "README.md").read_text()
