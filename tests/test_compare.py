"""`python -m tools.bench compare` at toy size: every stage runs, stops at its deadline, continues
where it stopped, and its report reads the finished runs; a reward-blind control does not depend on
the reward; the rate reported is the one with the largest mean gain over the control."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from safetensors.torch import load_file

import ddpo_min
import tiny
from config import Config
from tools import compare

TOY = dict(num_steps=3, sample_batch_size=4, sample_batches=2, samples_per_prompt=2,
           train_batch_size=4, grid_size=4, device="cpu", kl_samples=2)


def _toy(monkeypatch, tmp_path):
    monkeypatch.setattr(compare, "OUT", tmp_path / "assets" / "compare")
    monkeypatch.setattr(compare, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(compare, "REPORT", tmp_path / "assets" / "compare.json")
    monkeypatch.setattr(compare, "REWARDS", ("compressibility",))
    monkeypatch.setattr(compare, "ALGOS", ("ddpo_sf", "rwr"))  # one of each kind
    monkeypatch.setattr(compare, "GRID", (1e-4, 1e-3))
    monkeypatch.setattr(compare, "SEEDS", (0, 1))
    monkeypatch.setattr(compare, "EPOCHS", 2)
    monkeypatch.setattr(compare, "EVAL_EVERY", 1)
    monkeypatch.setattr(compare, "EVAL_SETS", {"trained": (compare.TRAIN_ANIMALS[:2], 1),
                                               "unseen_animals": (compare.HELD_OUT_ANIMALS[:2], 1),
                                               "objects": (tiny.generalisation_prompts()[:2], 1)})
    monkeypatch.setattr(compare, "OVERRIDES", TOY)


def test_compare_stops_continues_and_reports(tmp_path, monkeypatch):
    _toy(monkeypatch, tmp_path)
    runs = compare.OUT / "runs"
    compare.compare(max_minutes=1e-9)  # the deadline passes at once: no run finishes
    assert not runs.exists() or not list(runs.glob("*.json"))
    compare.compare()  # continues: every algorithm, control and rate, both seeds
    names = sorted(p.stem for p in runs.glob("*.json"))
    # per (seed, rate): 2 algorithms and their 2 controls (RWR's: every weight 1)
    assert len(names) == len(compare.schedule()) == 2 * 2 * (2 + 2)
    summary = json.loads(compare.REPORT.read_text())
    assert summary["finished_runs"] == summary["planned_runs"] == len(names)
    for algo in compare.ALGOS:
        grid = summary["grid"]["compressibility"][algo]
        assert set(grid) == {"0.0001", "0.001"}
        best = summary["best_lr"]["compressibility"][algo]
        finals = {float(lr): c["trained/gain_over_control"]["mean"][-1] for lr, c in grid.items()}
        assert best == max(finals, key=finals.get)  # the largest mean gain over the control
        res = summary["results"]["compressibility"][algo]
        assert res["lr"] == best and res["seeds"] == [0, 1]
        assert res["eval_queries"] == [8, 16] and res["queries"] == [0, 8]
        # the gain over the control is the paired difference, so its mean is the means' difference
        over = np.subtract(res["trained/gain"]["mean"], res["trained/control_gain"]["mean"])
        assert np.allclose(res["trained/gain_over_control"]["mean"], over)
        assert all(v > 0 for v in res["kl_pretrained"]["mean"])
    control = json.loads((runs / f"{compare.run_name(None, 'ddpo_sf/blind', 1e-3, 1)}.json")
                         .read_text())
    assert (control["algo"], control["reward_blind"], control["reward"]) == ("ddpo_sf", True, None)
    uniform = json.loads((runs / f"{compare.run_name(None, compare.UNIFORM, 1e-3, 1)}.json")
                         .read_text())
    assert (uniform["algo"], uniform["rwr_beta"]) == ("rwr", 0.0)
    assert compare.REPORT.with_suffix(".png").is_file()
    # a finished run is never trained again
    stamp = {p: p.stat().st_mtime for p in runs.glob("*.json")}
    compare.compare()
    assert {p: p.stat().st_mtime for p in runs.glob("*.json")} == stamp


@pytest.mark.parametrize("algo", ["ddpo_is", "rwr"])
def test_a_reward_blind_run_does_not_depend_on_the_reward(tmp_path, algo):
    """The control trains on draws that ignore the reward: the same weights whichever reward is
    logged; without --reward-blind the two rewards train different weights (the check can fail)."""
    def weights(reward, blind):
        cfg = Config.tiny(reward=reward, algo=algo, reward_blind=blind, epochs=2,
                          output_dir=str(tmp_path / f"{reward}-{blind}"), **TOY)
        run_dir = ddpo_min.train(replace(cfg, kl_samples=0))
        return load_file(run_dir / "weights" / "unet.safetensors")

    def same(a, b):
        return all((a[k] == b[k]).all() for k in a)

    assert same(weights("compressibility", True), weights("incompressibility", True))
    assert not same(weights("compressibility", False), weights("incompressibility", False))


def test_the_report_picks_the_rate_with_the_largest_gain_over_the_control(tmp_path, monkeypatch):
    """Not the largest gain: a rate whose control drifts as far as the algorithm gains nothing."""
    monkeypatch.setattr(compare, "OUT", tmp_path)
    monkeypatch.setattr(compare, "SEEDS", (0, 1))
    (tmp_path / "runs").mkdir()
    pretrained = {k: dict(jpeg_kb=1.0, caption_top1=0.5) for k in compare.EVAL_SETS}

    def finish(algo, lr, seed, jpeg):
        run = dict(samples_per_epoch=64, epochs=2, history={"reward/mean": [0, 0],
                                                            "kl/pretrained": [1, 1]},
                   evals={"2": {k: dict(jpeg_kb=jpeg, caption_top1=0.5)
                                for k in compare.EVAL_SETS}})
        reward = None if compare.is_control(algo) else "compressibility"
        (tmp_path / "runs" / f"{compare.run_name(reward, algo, lr, seed)}.json").write_text(
            json.dumps(run))

    for seed in (0, 1):
        finish("ddpo_is", 8e-4, seed, 0.70)  # -30% ...
        finish("ddpo_is/blind", 8e-4, seed, 0.72)  # ... but the control drifts -28%
        finish("ddpo_is", 2e-4, seed, 0.80)  # -20% ...
        finish("ddpo_is/blind", 2e-4, seed, 0.95)  # ... against -5%
    grid = {lr: compare.cell("compressibility", "ddpo_is", lr, pretrained) for lr in (2e-4, 8e-4)}
    assert grid[8e-4]["trained/gain"]["mean"][-1] > grid[2e-4]["trained/gain"]["mean"][-1]
    assert compare.best_lr(grid) == 2e-4
    assert grid[2e-4]["trained/gain_over_control"]["mean"][-1] == pytest.approx(15.0)


def test_the_kl_tradeoff_shares_the_comparisons_runs_and_reports_every_beta(tmp_path, monkeypatch):
    """`python -m tools.bench kl` at toy size: beta = 0 and the control are the comparison's own
    run files (not trained twice); each beta > 0 gets its own; the report has a point per beta and
    seed."""
    from tools import kl_tradeoff

    _toy(monkeypatch, tmp_path)
    monkeypatch.setattr(compare, "EPOCHS", 1)
    monkeypatch.setattr(kl_tradeoff, "OUT", tmp_path / "assets" / "kl_tradeoff")
    monkeypatch.setattr(kl_tradeoff, "REPORT", tmp_path / "assets" / "kl_tradeoff.json")
    monkeypatch.setattr(kl_tradeoff, "BETAS", (0.0, 1e4))
    monkeypatch.setattr(kl_tradeoff, "SEEDS", (0,))
    monkeypatch.setattr(kl_tradeoff, "LR", 1e-3)
    summary = kl_tradeoff.run()
    own = sorted(p.stem for p in (kl_tradeoff.OUT / "runs").glob("*.json"))
    assert own == ["beta10000-lr0.001-seed0"]
    shared = sorted(p.stem for p in (compare.OUT / "runs").glob("*.json"))
    assert shared == [compare.run_name("compressibility", "ddpo_is", 1e-3, 0),
                      compare.run_name(None, "ddpo_is/blind", 1e-3, 0)]
    points = summary["points"]
    assert set(points) == {"0", "10000", "control"}
    assert all(len(v) == 1 and {"gain", "top1", "kl"} <= set(v[0]) for v in points.values())
    leashed, free = points["10000"][0], points["0"][0]
    assert leashed["kl"] < free["kl"]  # the leash holds the policy nearer the pretrained one
    assert kl_tradeoff.REPORT.with_suffix(".png").is_file()
