"""`python -m tools.bench compare` at toy size: every stage runs, stops at its deadline, continues
where it stopped, and its report reads the finished runs."""

from __future__ import annotations

import json

import tiny
from tools import compare


def test_compare_stops_continues_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "OUT", tmp_path / "assets" / "compare")
    monkeypatch.setattr(compare, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(compare, "REPORT", tmp_path / "assets" / "compare.json")
    monkeypatch.setattr(compare, "REWARDS", ("compressibility",))
    monkeypatch.setattr(compare, "ALGOS", ("ddpo_sf", "rwr"))  # one of each kind
    monkeypatch.setattr(compare, "LRS", (1e-4, 1e-3))
    monkeypatch.setattr(compare, "MAX_EXTENSIONS", 0)  # the grid's growth: the test below
    monkeypatch.setattr(compare, "SEEDS", (0, 1))
    monkeypatch.setattr(compare, "EPOCHS", 2)
    monkeypatch.setattr(compare, "EVAL_EVERY", 1)
    monkeypatch.setattr(compare, "EVAL_SETS", {"trained": (compare.TRAIN_ANIMALS[:2], 1),
                                               "unseen_animals": (compare.HELD_OUT_ANIMALS[:2], 1),
                                               "objects": (tiny.generalisation_prompts()[:2], 1)})
    monkeypatch.setattr(compare, "OVERRIDES", dict(
        num_steps=3, sample_batch_size=4, sample_batches=2, samples_per_prompt=2,
        train_batch_size=4, grid_size=4, device="cpu", kl_samples=2))
    runs = compare.OUT / "runs"

    compare.compare(max_minutes=1e-9)  # the deadline passes at once: no run finishes
    assert not runs.exists() or not list(runs.glob("*.json"))
    compare.compare()  # continues: the sweep (2 algorithms x 2 rates), seed 1, the control
    names = sorted(p.stem for p in runs.glob("*.json"))
    assert len(names) == 2 * 2 + 2 + 2  # seed 0 of the picked rate is the sweep's run
    summary = json.loads(compare.REPORT.read_text())
    assert set(summary["picked_lr"]) == set(compare.ALGOS)
    results = summary["results"]["compressibility"]
    assert set(results) == {*compare.ALGOS, compare.CONTROL}
    for algo, res in results.items():
        picked = summary["picked_lr"][compare.CONTROL_OF if algo == compare.CONTROL else algo]
        assert res["lr"] == picked and res["seeds"] == [0, 1]
        assert res["queries"] == [0, 8] and res["eval_queries"] == [8, 16]
        assert all(v > 0 for v in res["kl_pretrained"]["mean"])  # every algorithm moved
    assert compare.REPORT.with_suffix(".png").is_file()
    rwr_lr = summary["picked_lr"][compare.CONTROL_OF]
    name = compare.run_name("compressibility", compare.CONTROL, rwr_lr, 1)
    control = json.loads((runs / f"{name}.json").read_text())
    assert (control["algo"], control["rwr_beta"]) == ("rwr", 0.0)  # RWR with every weight 1
    # a finished run is never trained again
    stamp = {p: p.stat().st_mtime for p in runs.glob("*.json")}
    compare.compare()
    assert {p: p.stat().st_mtime for p in runs.glob("*.json")} == stamp


def test_the_sweep_grows_beyond_an_edge_pick(tmp_path, monkeypatch):
    """A pick on the grid's edge adds the next rate, 4x further, until the pick is inside (or
    MAX_EXTENSIONS rates were added); the pick is made only once every rate of the grid has run."""
    monkeypatch.setattr(compare, "OUT", tmp_path)
    monkeypatch.setattr(compare, "MAX_EXTENSIONS", 2)
    (tmp_path / "runs").mkdir()

    def finish(algo, lr, reward):
        name = compare.run_name(compare.SWEEP_REWARD, algo, lr, compare.SWEEP_SEED)
        (tmp_path / "runs" / f"{name}.json").write_text(
            json.dumps(dict(lr=lr, history={"reward/mean": [-2.0, reward, reward, reward]})))

    for lr, reward in zip(compare.LRS, (-1.3, -1.2, -1.1)):  # best at the largest rate
        finish("ddpo_sf", lr, reward)
        finish("ddpo_is", lr, {2e-4: -1.0}.get(lr, -1.2))  # best inside: no growth
    assert compare.sweep_lrs("ddpo_is") == list(compare.LRS)
    assert compare.picked_lr("ddpo_is") == 2e-4
    assert compare.sweep_lrs("ddpo_sf") == [*compare.LRS, 3.2e-3]
    assert compare.picked_lr("ddpo_sf") is None  # 3.2e-3 has not run yet
    finish("ddpo_sf", 3.2e-3, -1.0)  # the edge again: one more
    assert compare.sweep_lrs("ddpo_sf") == [*compare.LRS, 3.2e-3, 1.28e-2]
    finish("ddpo_sf", 1.28e-2, -1.05)
    assert compare.picked_lr("ddpo_sf") == 3.2e-3
    for lr, reward in zip(compare.LRS, (-1.0, -1.2, -1.3)):  # best at the smallest rate
        finish("rwr", lr, reward)
    assert compare.sweep_lrs("rwr") == [1.25e-5, *compare.LRS]
    finish("rwr", 1.25e-5, -0.9)
    assert compare.sweep_lrs("rwr") == [3.13e-6, 1.25e-5, *compare.LRS]
    finish("rwr", 3.13e-6, -0.8)  # still the edge, but MAX_EXTENSIONS = 2 rates were added
    assert compare.picked_lr("rwr") == 3.13e-6


def test_the_committed_report_is_the_commands_output(tmp_path, monkeypatch):
    """assets/compare.json is what `python -m tools.bench compare --report` makes of the committed
    run files (assets/compare/runs): none of them is missing, and no number was edited by hand."""
    committed = json.loads(compare.REPORT.read_text())
    monkeypatch.setattr(compare, "REPORT", tmp_path / "compare.json")
    assert json.loads(json.dumps(compare.report())) == committed  # tuples become lists


def test_the_control_ignores_the_reward():
    """The control (RWR with beta = 0, every weight 1) never reads the reward, so its committed runs
    on compressibility and incompressibility, same seed, must be the same training: the same
    held-out images (JPEG sizes, captions) and KL at every checkpoint, and opposite
    on-policy rewards. Checks the README's claim and that a run repeats from its seed."""
    lr = compare.picked_lr(compare.CONTROL_OF)

    def run(reward: str, seed: int) -> dict:
        name = compare.run_name(reward, compare.CONTROL, lr, seed)
        return json.loads((compare.OUT / "runs" / f"{name}.json").read_text())

    assert len(compare.SEEDS) >= 3
    for seed in compare.SEEDS:
        compress, incompress = run("compressibility", seed), run("incompressibility", seed)
        assert compress["evals"] == incompress["evals"]
        assert compress["history"]["kl/pretrained"] == incompress["history"]["kl/pretrained"]
        rewards = incompress["history"]["reward/mean"]
        assert compress["history"]["reward/mean"] == [-r for r in rewards]
