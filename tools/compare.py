"""The paper's comparison at tiny scale: DDPO_IS vs DDPO_SF vs RWR vs sparse RWR (Sec. 6.1, Fig. 4),
each measured against a control that sees no reward.

    python -m tools.bench compare                  # run (or continue) every run, then the report
    python -m tools.bench compare --max-minutes 60 # stop starting new chunks after an hour
    python -m tools.bench compare --report         # only rebuild the JSON and figure

The protocol, the same for every algorithm:
- the same sample budget: EPOCHS epochs of the tiny defaults' 64 samples, so every run makes the
  same number of reward queries (the x axis of the paper's Fig. 4);
- one grid of learning rates for every algorithm (GRID), every rate run with SEEDS seeds on both
  rewards: no rate is picked on one seed, and any two algorithms can be compared at the same rate;
- a control for every algorithm at every rate and seed: the same algorithm trained on N(0, 1)
  draws in place of the rewards (`--reward-blind`), so that what it gains comes from fine-tuning on
  its own samples, not from the reward; for RWR, RWR with every weight 1 (beta = 0). A control
  does not depend on the reward, so one run serves both rewards;
- each algorithm is reported at one rate for both rewards, as the paper uses one setting per
  algorithm: the rate with the largest gain over the pretrained model averaged over the two
  rewards and the seeds (`score`). The self-training drift moves JPEG size one way whatever the
  reward, so it counts for one reward and against the other and cancels in that mean, which
  equals the mean gain over the control. (A pick per reward on the gain over the pretrained
  model rewards the drift; one on the gain over the control rewards a control that breaks down
  at a large rate.) The whole grid is in the report beside it, so a reader sees how much the
  pick matters. A pick made on the seeds it is then reported on is optimistic (the winner's
  curse), so the report also gives a leave-one-seed-out figure: each seed scored at the rate
  the other seeds pick;
- training on 36 of the 45 animals; every EVAL_EVERY epochs the policy samples a fixed held-out
  noise set on three prompt sets: the trained animals, the 9 held-out animals and 32 everyday
  emoji never trained on. Each is scored with the JPEG size and the tiny captioner's top-1 ("is it
  still the animal?": over-optimisation, Sec. 6.4); every figure is also given over the control;
- the KL to the pretrained policy, logged by the loop every epoch.

Each run trains in chunks between evaluations and checkpoints every epoch, so the whole comparison
can be stopped at any point and continued by running the command again; seed 0 of everything runs
first, so a partial comparison is already a complete one-seed grid. A finished run's figures go to
assets/comparison/runs/<name>.json (committed: the report needs only those); the report is
assets/comparison.json, its tables assets/comparison.md and its figure assets/comparison.png.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import config
import ddpo_min
import plumbing
import tiny
from tools import write_json
from tools.tiny_report import held_out

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "assets" / "comparison"  # pretrained.json, runs/<name>.json (committed)
RUNS = ROOT / "runs" / "comparison"  # the run folders with their checkpoints (not committed)
REPORT = ROOT / "assets" / "comparison.json"  # and comparison.png beside it
OVERRIDES: dict = {}  # config overrides for every run (the tests' toy size)

ALGOS = ("ddpo_is", "ddpo_sf", "rwr", "rwr_sparse")
BLIND = "blind"  # a reward-blind twin: "<algo>/blind"
UNIFORM = "rwr_uniform"  # RWR with beta = 0: every weight 1
REWARDS = ("compressibility", "incompressibility")
SIGN = {"compressibility": -1, "incompressibility": +1}  # the direction the reward moves JPEG size
GRID = (5e-5, 2e-4, 8e-4)  # the tiny default 2e-4, and 4x either side
SEEDS = (0, 1, 2)
EPOCHS, EVAL_EVERY = 12, 4  # 12 x 64 = 768 reward queries per run

HELD_OUT_ANIMALS = tiny.ANIMAL_PROMPTS[4::5]  # 9 animals never trained on
TRAIN_ANIMALS = [p for p in tiny.ANIMAL_PROMPTS if p not in HELD_OUT_ANIMALS]  # 36
EVAL_SEED = 1234
EVAL_SETS = {  # name: (prompts, noise seeds per prompt)
    "trained": (TRAIN_ANIMALS, 2),
    "unseen_animals": (HELD_OUT_ANIMALS, 4),
    "objects": (tiny.generalisation_prompts(), 2),
}


def control_of(algo: str) -> str:
    """An algorithm's control. RWR's is RWR with every weight 1, which uses no reward already
    (a reward-blind RWR would only add noise to the weights); every other algorithm's is its
    reward-blind twin."""
    return UNIFORM if algo == "rwr" else f"{algo}/{BLIND}"


def run_name(reward: str | None, algo: str, lr: float, seed: int) -> str:
    """The run's file name. A control does not depend on the reward: one name serves both."""
    if is_control(algo):
        return f"control-{algo.replace('/', '-')}-lr{lr:g}-seed{seed}"
    return f"{reward}-{algo}-lr{lr:g}-seed{seed}"


def is_control(algo: str) -> bool:
    return algo.endswith("/" + BLIND) or algo == UNIFORM


@torch.no_grad()
def evaluate(model, cfg: config.Config) -> dict:
    """JPEG size and captioner top-1 on each held-out set (fixed prompts and noise)."""
    return {name: held_out(model, cfg, [p for p in prompts for _ in range(per_prompt)], EVAL_SEED,
                           desc=f"eval {name}")[0]
            for name, (prompts, per_prompt) in EVAL_SETS.items()}


def base_config(reward: str | None, algo: str, lr: float, seed: int) -> config.Config:
    RUNS.mkdir(parents=True, exist_ok=True)
    prompts, text = RUNS / "train_animals.txt", "\n".join(TRAIN_ANIMALS) + "\n"
    if not prompts.is_file() or prompts.read_text() != text:  # whole or not at all: a second
        tmp = prompts.with_name(f"{prompts.name}.{os.getpid()}.tmp")  # shard may be reading it
        tmp.write_text(text)
        os.replace(tmp, prompts)
    if algo == UNIFORM:
        kind = dict(algo="rwr", rwr_beta=0.0)
    elif is_control(algo):
        kind = dict(algo=algo.split("/")[0], reward_blind=True)
    else:
        kind = dict(algo=algo)
    return config.Config.tiny(reward=reward or REWARDS[0], lr=lr, seed=seed, epochs=EPOCHS,
                              prompts=str(prompts),
                              output_dir=str(RUNS / run_name(reward, algo, lr, seed)),
                              **kind, **OVERRIDES)


def pretrained_scores(cfg: config.Config) -> dict:
    """The pretrained model's held-out scores (the same for every run: computed once)."""
    path = OUT / "pretrained.json"
    if path.is_file():
        return json.loads(path.read_text())
    scores = evaluate(tiny.load_tiny(), cfg)
    write_json(path, scores)
    return scores


def run_one(cfg: config.Config, deadline: float, out: Path | None = None) -> bool:
    """Train and evaluate one run in chunks; True once it is finished (its JSON written to
    out/runs, by default the comparison's)."""
    name = Path(cfg.output_dir).name
    result_path = (out or OUT) / "runs" / f"{name}.json"
    if result_path.is_file():
        return True
    folder = Path(cfg.output_dir)
    evals_path = folder / "evals.json"
    evals = json.loads(evals_path.read_text()) if evals_path.is_file() else {}
    while True:
        done = _epochs_done(folder)
        if done >= EPOCHS and str(EPOCHS) in evals:
            break
        if time.time() > deadline:
            return False
        if done % EVAL_EVERY == 0 and done > 0 and str(done) not in evals:
            evals[str(done)] = evaluate(_checkpointed_model(folder), cfg)
            write_json(evals_path, evals)
            continue
        target = (done // EVAL_EVERY + 1) * EVAL_EVERY
        resume = str(folder) if plumbing.has_checkpoint(folder) else ""
        print(f"\n== {name}: epochs {done} -> {target}", flush=True)
        ddpo_min.train(replace(cfg, epochs=target, resume=resume))
    history = _checkpoint(folder)["history"]
    keep = ("reward/mean", "reward/std", "kl/pretrained", "loss/approx_kl", "loss/clipfrac",
            "grad_norm", "time/epoch")
    result = dict(name=name, reward=None if cfg.reward_blind or cfg.rwr_beta == 0 and
                  cfg.algo == "rwr" else cfg.reward, algo=cfg.algo, reward_blind=cfg.reward_blind,
                  rwr_beta=cfg.rwr_beta, kl_coef=cfg.kl_coef, lr=cfg.lr, seed=cfg.seed,
                  epochs=EPOCHS,
                  samples_per_epoch=config.samples_per_epoch(cfg),
                  wall_seconds=float(sum(h["time/epoch"] for h in history)),
                  history={k: [h.get(k) for h in history] for k in keep},
                  evals={int(k): v for k, v in evals.items()},
                  torch_threads=torch.get_num_threads())
    write_json(result_path, result)
    return True


def _checkpoint(folder: Path) -> dict:
    """The run's last readable checkpoint, by the loop's own rule (a damaged checkpoint.pt falls
    back to the one saved before it; the loop reports it when it resumes)."""
    return plumbing.read_checkpoint(folder, say=lambda message: None)


def _epochs_done(folder: Path) -> int:
    """Epochs the run's checkpoint holds (0 before the first)."""
    return int(_checkpoint(folder)["epoch"]) if plumbing.has_checkpoint(folder) else 0


def _checkpointed_model(folder: Path):
    """The tiny model with the weights of the run's checkpoint (not the exported weights, which
    a kill between the two writes could leave one chunk behind)."""
    model = tiny.load_tiny()
    model.unet.load_state_dict(_checkpoint(folder)["trainable"], strict=False)
    return model


def _load(name: str) -> dict | None:
    path = OUT / "runs" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def schedule() -> list[tuple[str | None, str, float, int]]:
    """Every run, (reward or None, algo, lr, seed), seed-major: seed 0 of the whole grid first."""
    runs = []
    for seed in SEEDS:
        for lr in GRID:
            for algo in ALGOS:
                runs.append((None, control_of(algo), lr, seed))
                runs += [(reward, algo, lr, seed) for reward in REWARDS]
    return runs


def compare(max_minutes: float = 0.0, shard: tuple[int, int] = (0, 1),
            threads: int | None = None) -> None:
    """Run (or continue) every run of the schedule, then the report. shard (k, n): only the runs
    at positions k, k + n, k + 2n, ... of the schedule, so that n processes can share the work
    without training one run twice; threads: torch's CPU threads for each run (None: the loop's
    default). On 2 cores, two shards of one thread each did more runs per hour than one of two
    threads (NOTES.md); a run records its thread count, and a different count changes float
    rounding, not the protocol."""
    global OVERRIDES
    if threads:
        OVERRIDES = {**OVERRIDES, "threads": threads}
    k, n = shard
    deadline = time.time() + 60 * max_minutes if max_minutes else float("inf")
    pretrained_scores(base_config(REWARDS[0], ALGOS[0], GRID[0], 0))
    for reward, algo, lr, seed in schedule()[k::n]:
        if not run_one(base_config(reward, algo, lr, seed), deadline):
            break
    report()


# ---- the report -------------------------------------------------------------------------------


def _gain_curve(run: dict, eval_set: str, pretrained: dict, reward: str) -> list[float]:
    """The held-out JPEG change toward `reward` at each checkpoint, in percent of the pretrained
    model's size."""
    base = pretrained[eval_set]["jpeg_kb"]
    return [SIGN[reward] * 100 * (run["evals"][e][eval_set]["jpeg_kb"] / base - 1)
            for e in sorted(run["evals"], key=int)]


def _top1_curve(run: dict, eval_set: str) -> list[float]:
    return [100 * run["evals"][e][eval_set]["caption_top1"] for e in sorted(run["evals"], key=int)]


def _band(values: list[list[float]]) -> dict:
    """Per checkpoint: the mean, min and max over the seeds, and each seed's value (seeds x
    checkpoints)."""
    a = np.array(values, dtype=float)
    return dict(mean=a.mean(0).tolist(), min=a.min(0).tolist(), max=a.max(0).tolist(),
                values=a.tolist())


def cell(reward: str, algo: str, lr: float, pretrained: dict) -> dict | None:
    """One (reward, algorithm, rate): bands over the seeds whose run and control both finished,
    of the held-out gain and top-1, over the pretrained model and over the control (the same
    seed's control, so the difference pairs the same sampling noise)."""
    pairs = []
    for seed in SEEDS:
        run, ctl = _load(run_name(reward, algo, lr, seed)), _load(run_name(
            None, control_of(algo), lr, seed))
        if run and ctl:
            pairs.append((seed, run, ctl))
    if not pairs:
        return None
    n = pairs[0][1]["samples_per_epoch"]
    epochs = sorted(pairs[0][1]["evals"], key=int)
    out = dict(seeds=[s for s, _, _ in pairs], lr=lr, eval_queries=[n * int(e) for e in epochs],
               queries=[n * e for e in range(pairs[0][1]["epochs"])],
               kl_queries=[n * (e + 1) for e in range(pairs[0][1]["epochs"])],
               train_reward=_band([r["history"]["reward/mean"] for _, r, _ in pairs]),
               kl_pretrained=_band([r["history"]["kl/pretrained"] for _, r, _ in pairs]),
               control_kl_pretrained=_band([c["history"]["kl/pretrained"] for _, _, c in pairs]))
    for name in EVAL_SETS:
        gain = [_gain_curve(r, name, pretrained, reward) for _, r, _ in pairs]
        ctl = [_gain_curve(c, name, pretrained, reward) for _, _, c in pairs]
        out[f"{name}/gain"] = _band(gain)
        out[f"{name}/control_gain"] = _band(ctl)
        out[f"{name}/gain_over_control"] = _band([list(np.subtract(g, c))
                                                  for g, c in zip(gain, ctl)])
        top = [_top1_curve(r, name) for _, r, _ in pairs]
        top_ctl = [_top1_curve(c, name) for _, _, c in pairs]
        out[f"{name}/top1"] = _band(top)
        out[f"{name}/control_top1"] = _band(top_ctl)
        out[f"{name}/top1_over_control"] = _band([list(np.subtract(t, c))
                                                  for t, c in zip(top, top_ctl)])
    return out


def _final(c: dict, seeds, key: str = "trained/gain") -> float:
    """A cell's final held-out figure on the trained animals (by default the gain over the
    pretrained model), mean over `seeds`."""
    per_seed = dict(zip(c["seeds"], c[key]["values"]))
    return float(np.mean([per_seed[s][-1] for s in seeds]))


def score(grids: dict, lr: float, seeds) -> float:
    """The selection criterion at one rate: the final held-out gain over the pretrained model on
    the trained animals, mean over the rewards and `seeds` (grids: {reward: {rate: cell}}).

    One rate per algorithm for both rewards, as the paper uses one setting per algorithm. The
    self-training drift cancels in it: the drift moves JPEG size the same way whatever the
    reward, so it counts for one JPEG reward and against the other; and as one control run
    serves both rewards with opposite signs, this mean equals the mean gain over the control."""
    return float(np.mean([_final(grid[lr], seeds) for grid in grids.values()]))


def _complete(grids: dict, rates=None) -> bool:
    """Whether every rate (default: the grid's) has finished with every seed on every reward."""
    return all(g.get(lr) and len(g[lr]["seeds"]) == len(SEEDS) for g in grids.values()
               for lr in (GRID if rates is None else rates))


def best_lr(grids: dict, seeds=None) -> float | None:
    """The rate with the largest `score` over `seeds` (default: all). None until every rate has
    finished with every seed on every reward: a pick among the rates that happen to be done
    would not be the protocol's."""
    seeds = SEEDS if seeds is None else seeds
    if not _complete(grids):
        return None
    return max(GRID, key=lambda lr: score(grids, lr, seeds))


def leave_one_seed_out(grids: dict) -> dict | None:
    """The pick's honest figure: for each seed, the rate the *other* seeds pick, and this seed's
    figures at it (the criterion, and each reward's gain over the pretrained model and over the
    control). The in-sample best is biased upward (the rate was chosen for doing well on those
    very seeds); these are not."""
    if best_lr(grids) is None:
        return None
    picks, scores = [], []
    per_reward = {r: dict(gain=[], gain_over_control=[]) for r in grids}
    for seed in SEEDS:
        lr = best_lr(grids, [s for s in SEEDS if s != seed])
        picks.append(lr)
        scores.append(score(grids, lr, [seed]))
        for r, grid in grids.items():
            per_reward[r]["gain"].append(_final(grid[lr], [seed]))
            per_reward[r]["gain_over_control"].append(
                _final(grid[lr], [seed], "trained/gain_over_control"))
    return dict(seeds=list(SEEDS), picked_lr=picks, **_spread(scores), per_reward={
        r: {k: _spread(v) for k, v in d.items()} for r, d in per_reward.items()})


def _spread(values: list[float]) -> dict:
    return dict(values=values, mean=float(np.mean(values)), min=float(min(values)),
                max=float(max(values)))


def report() -> dict:
    """assets/comparison.json and assets/comparison.png from the finished runs."""
    pretrained = json.loads((OUT / "pretrained.json").read_text())
    summary: dict = dict(
        protocol=dict(epochs=EPOCHS, eval_every=EVAL_EVERY, grid=GRID, seeds=SEEDS,
                      selection="one rate per algorithm for both rewards: the largest final "
                                "held-out gain over the pretrained model (trained animals), mean "
                                "over both rewards and all seeds (equal to the mean gain over the "
                                "control: the self-training drift cancels); optimistic, as any "
                                "pick reported on the seeds it was made on: selection[algo]"
                                "['leave_one_seed_out'] scores each seed at the rate the other "
                                "seeds pick",
                      control="the same algorithm trained on N(0, 1) draws in place of the "
                              "rewards (--reward-blind true); for RWR, RWR with every weight 1 "
                              "(--rwr-beta 0); one control run serves both rewards",
                      controls={a: control_of(a) for a in ALGOS},
                      eval_sets={k: dict(prompts=len(p), per_prompt=n)
                                 for k, (p, n) in EVAL_SETS.items()},
                      held_out_animals=HELD_OUT_ANIMALS),
        pretrained=pretrained, grid={}, selection={}, results={})
    for algo in ALGOS:
        grids = {reward: {lr: cell(reward, algo, lr, pretrained) for lr in GRID}
                 for reward in REWARDS}
        for reward in REWARDS:
            summary["grid"].setdefault(reward, {})[algo] = {
                f"{lr:g}": c for lr, c in grids[reward].items() if c}
        lr = best_lr(grids)
        summary["selection"][algo] = dict(
            lr=lr, leave_one_seed_out=leave_one_seed_out(grids),
            by_rate={f"{x:g}": _spread([score(grids, x, [s]) for s in SEEDS])
                     for x in GRID if _complete(grids, [x])})
        if lr is not None:
            for reward in REWARDS:
                summary["results"].setdefault(reward, {})[algo] = grids[reward][lr]
    summary["same_rate"] = {reward: same_rate(summary["grid"][reward]) for reward in REWARDS}
    finished = [json.loads(p.read_text()) for p in sorted((OUT / "runs").glob("*.json"))]
    summary["finished_runs"] = len(finished)
    summary["planned_runs"] = len(schedule())
    summary["training_hours"] = sum(r["wall_seconds"] for r in finished) / 3600  # w/o evals
    write_json(REPORT, summary)
    REPORT.with_suffix(".md").write_text(markdown(summary))
    if summary["results"]:
        _figure(summary, REPORT.with_suffix(".png"))
    print_summary(summary)
    return summary


def same_rate(grid: dict, a: str = "ddpo_is", b: str = "ddpo_sf") -> dict:
    """{rate: a's final gain over the pretrained model minus b's, per seed, and its mean
    [min, max]} at every rate, over the seeds both finished: the two estimators compared at one
    learning rate, so that a difference is not a difference of rates. Their gains over the
    pretrained model, not over their controls: the runs share the model, the rate, each epoch's
    sampling seeds and the evaluation noise, while their controls differ (a difference of gains
    over two controls would carry the difference of the controls' drifts)."""
    out = {}
    for lr, ca in grid.get(a, {}).items():
        cb = grid.get(b, {}).get(lr)
        seeds = sorted(set(ca["seeds"]) & set(cb["seeds"])) if cb else []
        if not seeds:
            continue
        out[lr] = dict(seeds=seeds, **_spread([_final(ca, [s]) - _final(cb, [s])
                                               for s in seeds]))
    return out


def _md(band: dict, i: int = -1, sign: str = "+") -> str:
    """mean [min, max] over seeds, of checkpoint i."""
    f = f"{sign}.1f"
    return f"{band['mean'][i]:{f}} [{band['min'][i]:{f}}, {band['max'][i]:{f}}]"


def _seeds_note(c: dict, n: int) -> str:
    return "" if len(c["seeds"]) == n else f" ({len(c['seeds'])} of {n} seeds)"


def markdown(summary: dict) -> str:
    """The report's tables in markdown (assets/comparison.md): RESULTS.md quotes them as written
    here, so every number there comes from the run files by this command."""
    p, pre = summary["protocol"], summary["pretrained"]
    n, rates = len(p["seeds"]), [f"{x:g}" for x in p["grid"]]
    rows = "| " + " | ".join(rates) + " |"
    lines = [f"{summary['finished_runs']} of {summary['planned_runs']} runs; {p['epochs']} epochs "
             f"each (the tiny defaults' samples), {n} seeds, learning rates {', '.join(rates)}. "
             "Figures are the final held-out change in JPEG size toward the reward on the trained "
             "animals unless a column says otherwise, in % of the pretrained model's size "
             "(points), mean [min, max] over seeds; 'over the control' is the paired difference "
             "with the same seed's control.", "",
             "**The pick**: one rate per algorithm for both rewards, the largest gain over the "
             "pretrained model averaged over the two rewards (equal to the average gain over the "
             "control: the self-training drift cancels); leave-one-seed-out: each seed scored at "
             "the rate the other two pick.", "",
             "| algorithm " + rows + " picked | leave-one-seed-out (rates) |",
             "|---" * (len(rates) + 3) + "|"]
    for algo, sel in summary["selection"].items():
        loo = sel["leave_one_seed_out"]
        lines.append(f"| {LABELS[algo]} | " + " | ".join(
            _md1(sel["by_rate"][r]) if r in sel["by_rate"] else "" for r in rates) + " | "
            + (f"{sel['lr']:g}" if sel["lr"] else "not yet") + " | "
            + (f"{_md1(loo)} ({', '.join(f'{x:g}' for x in loo['picked_lr'])})" if loo else "")
            + " |")
    for reward, algos in summary["grid"].items():
        lines += ["", f"**{reward}**: gain over the pretrained model by rate, of each algorithm "
                  "and of its control (a control drifting against the reward inflates the gain "
                  "over it)", "", "| run " + rows, "|---" * (len(rates) + 1) + "|"]
        for algo, grid in algos.items():
            for key, label in (("trained/gain", LABELS[algo]),
                               ("trained/control_gain", f"*its control ({CONTROL_LABELS[algo]})*")):
                lines.append(f"| {label} | " + " | ".join(
                    _md(grid[r][key]) + _seeds_note(grid[r], n) if r in grid else ""
                    for r in rates) + " |")
        lines += ["", f"**{reward}**: gain over the control by rate", "",
                  "| algorithm " + rows, "|---" * (len(rates) + 1) + "|"]
        for algo, grid in algos.items():
            lines.append(f"| {LABELS[algo]} | " + " | ".join(
                _md(grid[r]["trained/gain_over_control"]) + _seeds_note(grid[r], n)
                if r in grid else "" for r in rates) + " |")
        if summary["results"].get(reward):
            lines += ["", f"**{reward}**, each algorithm at its picked rate (top-1: the "
                      f"captioner's on the trained animals; pretrained "
                      f"{100 * pre['trained']['caption_top1']:.1f}%)", "",
                      "| algorithm | rate | gain | its control | over the control | "
                      "leave-one-seed-out: gain | unseen animals: gain, over the control | "
                      "objects: gain, over the control | top-1 | control's top-1 | "
                      "KL to pretrained (control's) |", "|---" * 11 + "|"]
            for algo, res in summary["results"][reward].items():
                loo = summary["selection"][algo]["leave_one_seed_out"]["per_reward"][reward]
                lines.append(
                    f"| {LABELS[algo]} | {res['lr']:g} | {_md(res['trained/gain'])} | "
                    f"{_md(res['trained/control_gain'])} | "
                    f"{_md(res['trained/gain_over_control'])} | {_md1(loo['gain'])} | "
                    f"{_md(res['unseen_animals/gain'])}, "
                    f"{_md(res['unseen_animals/gain_over_control'])} | "
                    f"{_md(res['objects/gain'])}, {_md(res['objects/gain_over_control'])} | "
                    f"{_md(res['trained/top1'], sign='')} | "
                    f"{_md(res['trained/control_top1'], sign='')} | "
                    f"{res['kl_pretrained']['mean'][-1]:.1e} "
                    f"({res['control_kl_pretrained']['mean'][-1]:.1e}) |")
        if summary.get("same_rate", {}).get(reward):
            lines += ["", f"**{reward}**, DDPO_IS minus DDPO_SF at the same rate (gain over the "
                      "pretrained model; the same seed's runs share the sampling seeds and the "
                      "evaluation noise)", "", "| rate | per seed | mean [min, max] |",
                      "|---|---|---|"]
            for lr, d in summary["same_rate"][reward].items():
                lines.append(f"| {lr} | " + ", ".join(f"{v:+.1f} (seed {s})" for s, v in
                                                      zip(d["seeds"], d["values"]))
                             + f" | {_md1(d)} |")
    return "\n".join(lines) + "\n"


def _md1(d: dict) -> str:
    """mean [min, max] of one figure per seed."""
    return f"{d['mean']:+.1f} [{d['min']:+.1f}, {d['max']:+.1f}]"


COLOURS = {"ddpo_is": "C0", "ddpo_sf": "C1", "rwr": "C2", "rwr_sparse": "C3"}
LABELS = {"ddpo_is": "DDPO_IS", "ddpo_sf": "DDPO_SF", "rwr": "RWR", "rwr_sparse": "sparse RWR"}
CONTROL_LABELS = {"ddpo_is": "reward-blind DDPO_IS", "ddpo_sf": "reward-blind DDPO_SF",
                  "rwr": "RWR, every weight 1", "rwr_sparse": "reward-blind sparse RWR"}


def _figure(summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    rewards = list(summary["results"])
    fig = Figure(figsize=(20, 3.6 * len(rewards)), dpi=100)
    axes = fig.subplots(len(rewards), 5, squeeze=False)
    handles = {}
    pre_top1 = 100 * summary["pretrained"]["trained"]["caption_top1"]
    for row, reward in zip(axes, rewards):
        for algo, res in summary["results"][reward].items():
            c = COLOURS[algo]
            xe = [0] + res["eval_queries"]

            handles[algo] = _plot_band(row[0], xe, _starting(res["trained/gain"]), c)
            _plot_band(row[0], xe, _starting(res["trained/control_gain"]), c, ":", 0.05)
            _plot_band(row[1], xe, _starting(res["trained/gain_over_control"]), c)
            for name, style in (("unseen_animals", "--"), ("objects", ":")):
                _plot_band(row[1], xe, _starting(res[f"{name}/gain_over_control"]), c, style,
                           0.05)
            grid = summary["grid"][reward][algo]
            lrs = sorted(grid, key=float)
            for key, style in (("trained/gain", "-"), ("trained/control_gain", ":")):
                means = [grid[lr][key]["mean"][-1] for lr in lrs]
                spread = [np.subtract(means, [grid[lr][key]["min"][-1] for lr in lrs]),
                          np.subtract([grid[lr][key]["max"][-1] for lr in lrs], means)]
                row[2].errorbar([float(lr) for lr in lrs], means, yerr=spread, capsize=3,
                                marker="o" if style == "-" else ".", ls=style, color=c,
                                alpha=1.0 if style == "-" else 0.5)
            row[2].plot([res["lr"]], [res["trained/gain"]["mean"][-1]], "o", ms=11, mfc="none",
                        color=c)  # the picked rate, ringed
            _plot_band(row[3], xe, _starting(res["trained/top1"], pre_top1), c)
            _plot_band(row[3], xe, _starting(res["trained/control_top1"], pre_top1), c, ":", 0.05)
            _plot_band(row[4], res["kl_queries"], res["kl_pretrained"], c)
            _plot_band(row[4], res["kl_queries"], res["control_kl_pretrained"], c, ":", 0.05)
        row[3].axhline(pre_top1, color="k", lw=0.8, ls="--")
        row[0].set(title=f"{reward}: gain over the pretrained model\n(held out, trained animals; "
                         "its control dotted)", xlabel="reward queries",
                   ylabel="JPEG change toward the reward (%)")
        row[1].set(title="held-out gain over the control\n(trained -, unseen animals --, "
                         "objects :)", xlabel="reward queries", ylabel="percentage points")
        row[2].set(title="final gain over the pretrained model, every rate\n(trained animals; "
                         "controls dotted; the pick ringed)", xlabel="learning rate",
                   ylabel="JPEG change toward the reward (%)", xscale="log")
        row[2].set_xticks(list(summary["protocol"]["grid"]),
                          [f"{x:g}" for x in summary["protocol"]["grid"]])
        row[2].minorticks_off()
        row[3].set(title="captioner top-1 on the trained animals\n(control dotted, pretrained "
                         "dashed)", xlabel="reward queries", ylabel="top-1 (%)")
        row[4].set(title="KL to the pretrained policy\n(control dotted)", xlabel="reward queries",
                   ylabel="KL per latent dim", yscale="log")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.title.set_fontsize(10)
        for ax in row[:3]:
            ax.axhline(0, color="k", lw=0.6)
    labels = [f"{LABELS[a]}" for a in handles]
    fig.legend(list(handles.values()), labels, loc="lower center", ncol=len(handles), fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1))
    fig.savefig(path)


def _starting(band: dict, first: float = 0.0) -> dict:
    """A band's mean, min and max with the value before training (`first`) in front."""
    return {k: [first] + band[k] for k in ("mean", "min", "max")}


def _plot_band(ax, x, b: dict, colour: str, style: str = "-", alpha: float = 0.15):
    """The mean as a line, the min-max over seeds as a shaded band; returns the line."""
    ax.fill_between(x, b["min"], b["max"], color=colour, alpha=alpha)
    return ax.plot(x, b["mean"], style, color=colour)[0]


def _fmt(band: dict, i: int = -1, sign: str = "+") -> str:
    f = f"{sign}5.1f"
    return f"{band['mean'][i]:{f}} [{band['min'][i]:{f}}, {band['max'][i]:{f}}]"


def print_summary(summary: dict) -> None:
    """The report's numbers: the pick per algorithm, then per reward the grid and each algorithm
    at its rate, every figure over the pretrained model and over the control (mean [min, max]
    over seeds)."""
    p, pre = summary["protocol"], summary["pretrained"]
    print(f"protocol: {p['epochs']} epochs of 64 samples per run, held-out checkpoints every "
          f"{p['eval_every']} epochs; {summary['finished_runs']} of {summary['planned_runs']} "
          f"runs finished, {summary['training_hours']:.1f} h of training (evaluations not counted)")
    print("\nthe pick: final held-out gain over the pretrained model (trained animals), mean over "
          "both rewards, by learning rate")
    for algo, sel in summary["selection"].items():
        loo = sel["leave_one_seed_out"]
        print(f"  {algo:<11} " + "  ".join(f"{lr}: {_md1(d)}" for lr, d in sel["by_rate"].items())
              + (f"  -> {sel['lr']:g}; leave-one-seed-out {_md1(loo)} (rates "
                 f"{', '.join(f'{x:g}' for x in loo['picked_lr'])})" if loo else ""))
    for reward in summary["grid"]:
        print(f"\n{reward}: final held-out gain on the trained animals over the pretrained model "
              "| over the control, mean [min, max] over seeds, by learning rate")
        for algo, grid in summary["grid"][reward].items():
            print(f"  {algo:<11} " + "  ".join(
                f"{lr}: {_fmt(c['trained/gain'])} | {_fmt(c['trained/gain_over_control'])} "
                f"({len(c['seeds'])}s)" for lr, c in grid.items()))
        if summary["results"].get(reward):
            print(f"{reward}, each algorithm at its rate: held-out JPEG change toward the reward "
                  "(%) and top-1 (%), the control's, and the difference (points)")
        for algo, res in summary["results"].get(reward, {}).items():
            print(f"  {algo} at lr {res['lr']:g}, seeds {res['seeds']}")
            for name in EVAL_SETS:
                print(f"    {name:<15} gain {_fmt(res[f'{name}/gain'])}  control "
                      f"{_fmt(res[f'{name}/control_gain'])}  over it "
                      f"{_fmt(res[f'{name}/gain_over_control'])}  | top-1 "
                      f"{_fmt(res[f'{name}/top1'], sign='')} (pretrained "
                      f"{100 * pre[name]['caption_top1']:.1f}, control "
                      f"{_fmt(res[f'{name}/control_top1'], sign='')}), over the control "
                      f"{_fmt(res[f'{name}/top1_over_control'])}")
            print(f"    KL to the pretrained policy {res['kl_pretrained']['mean'][-1]:.2e}, "
                  f"control {res['control_kl_pretrained']['mean'][-1]:.2e}")
