"""Exercise 6's planted bugs (tools/mystery.py): each one changes the run in the way its name says,
seen from what the student gets (metrics.jsonl), on a toy run beside the correct one."""

from __future__ import annotations

import json

import pytest

import ddpo_min
from config import Config
from loading import load_prompts
from tools import mystery

TOY = dict(num_steps=4, sample_batch_size=8, sample_batches=1, samples_per_prompt=4,
           stat_buffer=4, stat_min_count=4, train_batch_size=4, minibatches=2, grid_size=4,
           kl_samples=2, device="cpu", epochs=2)


def _run(folder, bug=None) -> list[dict]:
    cfg = Config.tiny(output_dir=str(folder), **TOY)
    if bug is None:
        ddpo_min.train(cfg)
    else:
        with mystery.BUGS[bug]():
            ddpo_min.train(cfg)
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def correct(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("correct"))


def test_stale_old_log_probs_make_every_ratio_one(tmp_path, correct):
    bugged = _run(tmp_path, "stale-old-log-probs")
    assert all(m["loss/approx_kl"] == 0 and m["loss/clipfrac"] == 0 for m in bugged)
    assert all(m["loss/approx_kl"] > 0 for m in correct)


def test_same_noise_repeats_the_first_epoch(tmp_path, correct, monkeypatch):
    drawn = []
    real = ddpo_min.epoch_prompts
    monkeypatch.setattr(ddpo_min, "epoch_prompts", lambda *a: drawn.append(real(*a)) or drawn[-1])
    bugged = _run(tmp_path, "same-noise-every-epoch")
    assert bugged[0]["reward/mean"] == correct[0]["reward/mean"]
    assert len(drawn) == 2 and drawn[0] == drawn[1]  # epoch 1 draws epoch 0's prompts again
    cfg = Config.tiny(**TOY)
    assert real(cfg, load_prompts(cfg.prompts), 1) != drawn[0]  # the correct loop does not


@pytest.mark.parametrize("bug", ["shifted-rewards", "raw-rewards"])
def test_reward_bugs_change_the_update_not_the_samples(tmp_path, correct, bug):
    bugged = _run(tmp_path, bug)
    # the same first samples (a shifted batch sums in another order: equal to float rounding)
    assert bugged[0]["reward/mean"] == pytest.approx(correct[0]["reward/mean"], rel=1e-6)
    assert bugged[0]["loss/policy"] != correct[0]["loss/policy"]  # other advantages


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
