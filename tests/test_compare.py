"""`python -m tools.bench compare` at toy size: every stage runs, stops at its deadline, continues
where it stopped, and its report reads the finished runs; a reward-blind control does not depend on
the reward; each algorithm is reported at one rate for both rewards, picked where the
self-training drift cancels."""

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
        best = summary["selection"][algo]["lr"]
        finals = {float(lr): c["trained/gain"]["mean"][-1] for lr, c in grid.items()}
        assert best == max(finals, key=finals.get)  # one reward here: its largest mean gain
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
    # two algorithms at each shared rate (this toy grid has no DDPO_IS: SF against RWR), and the
    # markdown tables carry the JSON's numbers
    assert summary["same_rate"]["compressibility"] == {}
    assert set(compare.same_rate(grid_c := summary["grid"]["compressibility"], "ddpo_sf", "rwr")
               ) == {"0.0001", "0.001"}
    md = compare.REPORT.with_suffix(".md").read_text()
    res = summary["results"]["compressibility"]["ddpo_sf"]
    assert f"| DDPO_SF | {res['lr']:g} | {compare._md(res['trained/gain'])} |" in md
    assert f"| RWR | {compare._md(grid_c['rwr']['0.0001']['trained/gain_over_control'])} |" in md
    assert "not yet" not in md
    # beside it, the gain over the pretrained model of the algorithm and of its control, by rate
    assert (f"| RWR | {compare._md(grid_c['rwr']['0.0001']['trained/gain'])} |" in md
            and f"| *its control (RWR, every weight 1)* | "
                f"{compare._md(grid_c['rwr']['0.0001']['trained/control_gain'])} |" in md)
    # a finished run is never trained again
    stamp = {p: p.stat().st_mtime for p in runs.glob("*.json")}
    compare.compare()
    assert {p: p.stat().st_mtime for p in runs.glob("*.json")} == stamp


@pytest.mark.parametrize("algo", ["ddpo_is", "rwr", "rwr_sparse"])
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


def _finish(folder, algo, lr, seed, jpeg, top1=0.5, reward="compressibility"):
    """A finished run's file with one checkpoint (epoch 2) of the given held-out figures."""
    run = dict(samples_per_epoch=64, epochs=2, history={"reward/mean": [0, 0],
                                                        "kl/pretrained": [1, 1]},
               evals={"2": {k: dict(jpeg_kb=jpeg, caption_top1=top1) for k in compare.EVAL_SETS}})
    reward = None if compare.is_control(algo) else reward
    (folder / "runs").mkdir(exist_ok=True)
    (folder / "runs" / f"{compare.run_name(reward, algo, lr, seed)}.json").write_text(
        json.dumps(run))


def test_one_rate_per_algorithm_picked_on_both_rewards_where_the_drift_cancels(tmp_path,
                                                                             monkeypatch):
    """At 8e-4 the control drifts to files 40% larger: over the control the run gains +46.5 on
    compressibility, over the pretrained model +31.5 on incompressibility, and a pick on
    either alone would take 8e-4. Averaged over the two rewards (over the pretrained model, or
    over the control: the same, since one control serves both with opposite signs) 2e-4 wins."""
    monkeypatch.setattr(compare, "OUT", tmp_path)
    monkeypatch.setattr(compare, "SEEDS", (0, 1))
    monkeypatch.setattr(compare, "GRID", (2e-4, 8e-4))
    pretrained = {k: dict(jpeg_kb=1.0, caption_top1=0.5) for k in compare.EVAL_SETS}
    kb = {  # rate: (control, compressibility run, incompressibility run), per seed a little apart
        2e-4: (1.00, 0.80, 1.20), 8e-4: (1.40, 0.95, 1.30)}
    for lr, (ctl, down, up) in kb.items():
        for seed in (0, 1):
            _finish(tmp_path, "ddpo_is/blind", lr, seed, ctl + 0.01 * seed)
            _finish(tmp_path, "ddpo_is", lr, seed, down - 0.02 * seed)
            _finish(tmp_path, "ddpo_is", lr, seed, up + 0.03 * seed, reward="incompressibility")
    grids = {r: {lr: compare.cell(r, "ddpo_is", lr, pretrained) for lr in (2e-4, 8e-4)}
             for r in compare.REWARDS}

    def final(reward, lr, key="trained/gain"):
        return grids[reward][lr][key]["mean"][-1]

    assert final("compressibility", 8e-4, "trained/gain_over_control") > final(
        "compressibility", 2e-4, "trained/gain_over_control")  # +46.5 against +21.5
    assert final("incompressibility", 8e-4) > final("incompressibility", 2e-4)  # 31.5 vs 21.5
    assert compare.best_lr(grids) == 2e-4
    assert compare.score(grids, 2e-4, (0, 1)) == pytest.approx(21.25)  # (21 + 21.5) / 2
    for lr in (2e-4, 8e-4):  # the identity that makes the drift cancel
        over = np.mean([final(r, lr, "trained/gain_over_control") for r in compare.REWARDS])
        assert compare.score(grids, lr, (0, 1)) == pytest.approx(over)
    # an incomplete grid picks nothing
    assert compare.best_lr({r: {2e-4: g[2e-4]} for r, g in grids.items()}) is None


def test_each_seed_is_paired_with_its_own_control_and_incompressibility_counts_growth(
        tmp_path, monkeypatch):
    """Per-seed figures that differ, so that pairing a run with another seed's control, or the
    wrong sign for a reward, changes the min and max (a mean of differences cannot tell)."""
    monkeypatch.setattr(compare, "OUT", tmp_path)
    monkeypatch.setattr(compare, "SEEDS", (0, 1, 2))
    pretrained = {k: dict(jpeg_kb=2.0, caption_top1=0.5) for k in compare.EVAL_SETS}
    runs = {0: (2.2, 0.40), 1: (2.6, 0.30), 2: (2.4, 0.20)}  # seed: (jpeg kB, top-1)
    controls = {0: (2.0, 0.45), 1: (2.1, 0.25), 2: (2.3, 0.50)}
    for seed in (0, 1, 2):
        _finish(tmp_path, "ddpo_is", 1e-4, seed, *runs[seed], reward="incompressibility")
        _finish(tmp_path, "ddpo_is/blind", 1e-4, seed, *controls[seed])
    c = compare.cell("incompressibility", "ddpo_is", 1e-4, pretrained)
    gain = [100 * (runs[s][0] / 2.0 - 1) for s in (0, 1, 2)]  # growth is the gain here
    over = [100 * (runs[s][0] - controls[s][0]) / 2.0 for s in (0, 1, 2)]  # +10, +25, +5
    top1_over = [100 * (runs[s][1] - controls[s][1]) for s in (0, 1, 2)]  # -5, +5, -30
    assert [v for (v,) in c["trained/gain"]["values"]] == pytest.approx(gain)
    band = c["trained/gain_over_control"]
    assert (band["min"][-1], band["max"][-1]) == pytest.approx((min(over), max(over)))
    assert band["mean"][-1] == pytest.approx(np.mean(over))
    top = c["unseen_animals/top1_over_control"]
    assert (top["min"][-1], top["max"][-1]) == pytest.approx((min(top1_over), max(top1_over)))
    assert c["objects/control_top1"]["mean"][-1] == pytest.approx(40.0)
    # the same files read for compressibility: shrinking is the gain there, so every sign flips
    _finish(tmp_path, "ddpo_is", 1e-4, 0, *runs[0])
    down = compare.cell("compressibility", "ddpo_is", 1e-4, pretrained)
    assert down["seeds"] == [0]
    assert down["trained/gain_over_control"]["mean"][-1] == pytest.approx(-over[0])


def test_ddpo_is_and_sf_are_compared_at_each_rate_seed_by_seed(tmp_path, monkeypatch):
    """The difference of the two estimators' gains over the pretrained model (not over their
    controls, which differ), per seed, at every rate, over the seeds both have: a rate where SF
    lacks a seed compares the others only."""
    monkeypatch.setattr(compare, "OUT", tmp_path)
    monkeypatch.setattr(compare, "SEEDS", (0, 1))
    pretrained = {k: dict(jpeg_kb=1.0, caption_top1=0.5) for k in compare.EVAL_SETS}
    jpeg = {("ddpo_is", 1e-4): (0.80, 0.90), ("ddpo_sf", 1e-4): (0.85, 0.70),
            ("ddpo_is", 1e-3): (0.60, 0.70), ("ddpo_sf", 1e-3): (0.75, None)}  # per seed
    for (algo, lr), by_seed in jpeg.items():
        for seed, kb in enumerate(by_seed):
            _finish(tmp_path, f"{algo}/blind", lr, seed,  # controls differ, SF's drifts
                    1.0 - 0.01 * seed + (0.2 if algo == "ddpo_sf" else 0.0))
            if kb is not None:
                _finish(tmp_path, algo, lr, seed, kb)
    grid = {algo: {f"{lr:g}": compare.cell("compressibility", algo, lr, pretrained)
                   for lr in (1e-4, 1e-3)} for algo in ("ddpo_is", "ddpo_sf")}
    d = compare.same_rate(grid)
    # IS 1e-4 seeds 0, 1: +20, +10; SF: +15, +30; IS 1e-3 seed 0: +40, SF +25 (over their
    # controls SF's would be 20 points higher: -15 in place of +5 on seed 0)
    assert d["0.0001"]["seeds"] == [0, 1]
    assert d["0.0001"]["values"] == pytest.approx([5.0, -20.0])
    assert d["0.0001"]["mean"] == pytest.approx(-7.5)
    assert d["0.001"]["seeds"] == [0] and d["0.001"]["values"] == pytest.approx([15.0])


def test_no_rate_is_picked_before_the_grid_is_finished_and_the_pick_is_checked_out_of_sample(
        tmp_path, monkeypatch):
    """A rate with one seed missing, or a rate not run at all, leaves the pick open; once all are
    done, the leave-one-seed-out figure scores each seed at the rate the other seeds pick, which is
    lower than the in-sample best when one lucky seed made the pick."""
    monkeypatch.setattr(compare, "OUT", tmp_path)
    monkeypatch.setattr(compare, "SEEDS", (0, 1, 2))
    monkeypatch.setattr(compare, "GRID", (1e-4, 1e-3))
    pretrained = {k: dict(jpeg_kb=1.0, caption_top1=0.5) for k in compare.EVAL_SETS}
    # 1e-4: a steady -10% for every seed; 1e-3: -40% on seed 0, -1% on seeds 1 and 2
    steady, lucky = {0: 0.9, 1: 0.9, 2: 0.9}, {0: 0.6, 1: 0.99, 2: 0.99}
    for seed in (0, 1, 2):
        _finish(tmp_path, "ddpo_is/blind", 1e-4, seed, 1.0)
        _finish(tmp_path, "ddpo_is", 1e-4, seed, steady[seed])
        _finish(tmp_path, "ddpo_is/blind", 1e-3, seed, 1.0)

    def grid():
        return {"compressibility": {lr: compare.cell("compressibility", "ddpo_is", lr, pretrained)
                                    for lr in compare.GRID}}

    assert compare.best_lr(grid()) is None  # 1e-3 has no run yet
    for seed in (0, 1):
        _finish(tmp_path, "ddpo_is", 1e-3, seed, lucky[seed])
    assert compare.best_lr(grid()) is None  # 1e-3 has two seeds of three
    _finish(tmp_path, "ddpo_is", 1e-3, 2, lucky[2])
    g = grid()
    assert compare.best_lr(g) == 1e-3  # mean 14.0 against 10.0, on seed 0's luck
    loo = compare.leave_one_seed_out(g)
    # seed 0 left out: seeds 1, 2 pick 1e-4 (10 against 1) and seed 0 scores 10 there; seeds 1
    # and 2 left out: the others' mean favours 1e-3 (20.5 against 10), where they score 1
    assert loo["picked_lr"] == [1e-4, 1e-3, 1e-3]
    assert loo["values"] == pytest.approx([10.0, 1.0, 1.0])
    assert loo["mean"] == pytest.approx(4.0)
    assert loo["per_reward"]["compressibility"]["gain"]["values"] == pytest.approx([10, 1, 1])
    assert loo["mean"] < g["compressibility"][1e-3]["trained/gain"]["mean"][-1]  # 4 against 14


@pytest.mark.parametrize("stop_at", [2, 4], ids=["after-a-chunk", "trained-not-evaluated"])
def test_an_interrupted_run_finishes_as_an_uninterrupted_one(tmp_path, monkeypatch, stop_at):
    """run_one stopped by its deadline after one training chunk, or after the last chunk before
    its evaluation, continues from the checkpoint to the same figures as a run never stopped."""
    _toy(monkeypatch, tmp_path)
    calls = [0]

    def clock():  # passes the deadline at the stop_at-th look
        calls[0] += 1
        return 2.0 if calls[0] >= stop_at else 0.0

    def figures(name):
        result = json.loads((compare.OUT / "runs" / f"{name}.json").read_text())
        history = {k: v for k, v in result["history"].items() if k != "time/epoch"}
        return history, result["evals"]

    whole = compare.base_config("compressibility", "ddpo_sf", 1e-3, 0)
    assert compare.run_one(whole, float("inf"))
    cut = replace(whole, output_dir=whole.output_dir + "-cut")
    monkeypatch.setattr(compare, "time", type("Clock", (), {"time": staticmethod(clock)}))
    assert not compare.run_one(cut, 1.0)  # stopped
    assert not (compare.OUT / "runs" / f"{cut.output_dir.split('/')[-1]}.json").exists()
    assert compare.run_one(cut, float("inf"))  # continued
    assert figures(cut.output_dir.split("/")[-1]) == figures(whole.output_dir.split("/")[-1])


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


def test_shards_share_the_schedule_without_overlap(monkeypatch, tmp_path):
    """N processes on --shard k/N train every run exactly once between them, each with the
    threads asked for; the prompts file they share is rewritten only when its content changes."""
    trained = []
    monkeypatch.setattr(compare, "pretrained_scores", lambda cfg: {})
    monkeypatch.setattr(compare, "report", lambda: None)
    monkeypatch.setattr(compare, "run_one", lambda cfg, deadline: trained.append(
        (cfg.output_dir, cfg.threads)) or True)
    monkeypatch.setattr(compare, "OVERRIDES", {})
    monkeypatch.setattr(compare, "RUNS", tmp_path)
    for k in range(3):
        compare.compare(shard=(k, 3), threads=1)
    names = [name for name, _ in trained]
    everything = [compare.base_config(*run).output_dir for run in compare.schedule()]
    assert sorted(names) == sorted(everything) and len(set(names)) == len(names)
    assert {threads for _, threads in trained} == {1}
    prompts = compare.RUNS / "train_animals.txt"
    before = prompts.stat().st_mtime_ns, prompts.stat().st_ino  # (a rename makes a new inode)
    compare.base_config(None, "ddpo_is/blind", 2e-4, 0)
    assert (prompts.stat().st_mtime_ns, prompts.stat().st_ino) == before  # not rewritten
