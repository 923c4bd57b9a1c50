"""The paper's comparison at tiny scale: DDPO_IS vs DDPO_SF vs RWR vs sparse RWR (Sec. 6.1, Fig. 4).

    python -m tools.bench compare                  # run (or continue) every run, then the report
    python -m tools.bench compare --max-minutes 60 # stop starting new chunks after an hour
    python -m tools.bench compare --report         # only rebuild the JSON and figure

The protocol, the same for every algorithm:
- the same sample budget: EPOCHS epochs of the tiny defaults' 64 samples, so every run makes the
  same number of reward queries (the x axis of the paper's Fig. 4);
- its own learning rate: a sweep over LRS on compressibility, seed 0, picks each algorithm's rate
  by its mean on-policy reward over the last 3 epochs; when the pick is the grid's largest or
  smallest rate, the grid grows by one more factor of 4 on that side (at most MAX_EXTENSIONS times),
  so that no algorithm is held back by the grid's edge; the picked rate then runs for every reward
  and seed (the sweep's seed-0 run at the picked rate is reused);
- SEEDS seeds per (reward, algorithm);
- training on 36 of the 45 animals; every EVAL_EVERY epochs the policy samples a fixed held-out
  noise set on three prompt sets: the trained animals, the 9 held-out animals and 32 everyday
  emoji (objects, food, ...) never trained on. Each set is scored with the JPEG size and the tiny
  captioner's top-1 ("is it still the animal?": over-optimisation, Sec. 6.4);
- the KL to the pretrained policy, logged by the loop every epoch;
- a control, after the main runs: RWR with uniform weights (beta = 0: plain fine-tuning on the
  model's own samples, the reward unused) at RWR's picked rate, the same seeds and rewards. Whatever
  it gains, RWR's gain owes to fine-tuning on its own samples, not to the reward.

Each run trains in chunks between evaluations and checkpoints every epoch, so the whole
comparison can be stopped at any point and continued by running the command again. A finished
run's figures go to assets/compare/runs/<name>.json (committed: the report needs only those);
the report is assets/compare.json and assets/compare.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import config
import ddpo_min
import plumbing
import rewards as R
import tiny
from tools.tiny_report import sample_prompts

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "assets" / "compare"  # pretrained.json, runs/<name>.json (committed)
RUNS = ROOT / "runs" / "compare"  # the run folders with their checkpoints (not committed)
REPORT = ROOT / "assets" / "compare.json"  # and compare.png beside it
OVERRIDES: dict = {}  # config overrides for every run (the tests' toy size)

ALGOS = ("ddpo_is", "ddpo_sf", "rwr", "rwr_sparse")
CONTROL, CONTROL_OF = "rwr_uniform", "rwr"  # RWR with beta = 0 (every weight 1), at RWR's rate
REWARDS = ("compressibility", "incompressibility")
LRS = (5e-5, 2e-4, 8e-4)  # the sweep: the tiny default 2e-4, and 4x either side
MAX_EXTENSIONS = 2  # extra rates, 4x beyond the edge, when the sweep picks an edge
SWEEP_REWARD, SWEEP_SEED = "compressibility", 0
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


def run_name(reward: str, algo: str, lr: float, seed: int) -> str:
    return f"{reward}-{algo}-lr{lr:g}-seed{seed}"


@torch.no_grad()
def evaluate(model, cfg: config.Config) -> dict:
    """JPEG size and captioner top-1 on each held-out set (fixed prompts and noise)."""
    captioner = tiny.load_captioner()
    model.unet.eval()
    out = {}
    for name, (prompts, per_prompt) in EVAL_SETS.items():
        prompts = [p for p in prompts for _ in range(per_prompt)]
        images = sample_prompts(model, prompts, steps=cfg.num_steps, guidance=cfg.guidance_scale,
                                eta=cfg.eta, seed=EVAL_SEED, desc=f"eval {name}")
        top1 = np.mean([c == p for c, p in zip(captioner.caption(images), prompts)])
        out[name] = dict(jpeg_kb=float(np.mean(R.jpeg_size_kb(images))), caption_top1=float(top1))
    return out


def base_config(reward: str, algo: str, lr: float, seed: int) -> config.Config:
    RUNS.mkdir(parents=True, exist_ok=True)
    prompts = RUNS / "train_animals.txt"
    prompts.write_text("\n".join(TRAIN_ANIMALS) + "\n")
    control = dict(algo=CONTROL_OF, rwr_beta=0.0) if algo == CONTROL else dict(algo=algo)
    return config.Config.tiny(reward=reward, lr=lr, seed=seed, epochs=EPOCHS, prompts=str(prompts),
                              output_dir=str(RUNS / run_name(reward, algo, lr, seed)),
                              **control, **OVERRIDES)


def pretrained_scores(cfg: config.Config) -> dict:
    """The pretrained model's held-out scores (the same for every run: computed once)."""
    path = OUT / "pretrained.json"
    if path.is_file():
        return json.loads(path.read_text())
    scores = evaluate(tiny.load_tiny(), cfg)
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scores, indent=1))
    return scores


def run_one(cfg: config.Config, deadline: float) -> bool:
    """Train and evaluate one run in chunks; True once it is finished (its JSON written)."""
    name = Path(cfg.output_dir).name
    result_path = OUT / "runs" / f"{name}.json"
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
            evals_path.write_text(json.dumps(evals, indent=1))
            continue
        target = (done // EVAL_EVERY + 1) * EVAL_EVERY
        resume = str(folder) if plumbing.has_checkpoint(folder) else ""
        print(f"\n== {name}: epochs {done} -> {target}", flush=True)
        ddpo_min.train(replace(cfg, epochs=target, resume=resume))
    history = _checkpoint(folder)["history"]
    keep = ("reward/mean", "reward/std", "kl/pretrained", "loss/approx_kl", "loss/clipfrac",
            "grad_norm", "time/epoch")
    result = dict(name=name, reward=cfg.reward, algo=cfg.algo, rwr_beta=cfg.rwr_beta, lr=cfg.lr,
                  seed=cfg.seed, epochs=EPOCHS, samples_per_epoch=config.samples_per_epoch(cfg),
                  wall_seconds=float(sum(h["time/epoch"] for h in history)),
                  history={k: [h.get(k) for h in history] for k in keep},
                  evals={int(k): v for k, v in evals.items()},
                  torch_threads=torch.get_num_threads())
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1))
    return True


def _checkpoint(folder: Path) -> dict:
    path = folder / plumbing.CHECKPOINT
    return torch.load(path if path.is_file() else folder / plumbing.PREVIOUS, map_location="cpu",
                      weights_only=False)


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


def _final_reward(result: dict) -> float:
    """The sweep's criterion: the mean on-policy reward of the last 3 epochs."""
    return float(np.mean(result["history"]["reward/mean"][-3:]))


def sweep_lrs(algo: str) -> list[float]:
    """The rates `algo` is swept over: LRS, grown by a factor of 4 beyond an edge while the best
    finished run sits on that edge (at most MAX_EXTENSIONS extra rates). Stops growing at the first
    rate not yet run: the grid's next step depends on it."""
    lrs = list(LRS)
    while True:
        runs = [_load(run_name(SWEEP_REWARD, algo, lr, SWEEP_SEED)) for lr in lrs]
        if any(r is None for r in runs) or len(lrs) >= len(LRS) + MAX_EXTENSIONS:
            return lrs
        best = max(runs, key=_final_reward)["lr"]
        if best == max(lrs):
            lrs.append(float(f"{max(lrs) * 4:.3g}"))
        elif best == min(lrs):
            lrs.insert(0, float(f"{min(lrs) / 4:.3g}"))
        else:
            return lrs


def picked_lr(algo: str) -> float | None:
    """The sweep's pick for `algo`, once all its sweep runs are done."""
    runs = [_load(run_name(SWEEP_REWARD, algo, lr, SWEEP_SEED)) for lr in sweep_lrs(algo)]
    if any(r is None for r in runs):
        return None
    return max(runs, key=_final_reward)["lr"]


def compare(max_minutes: float = 0.0) -> None:
    """Run (or continue) the sweep, then every (reward, seed, algorithm) at its picked rate."""
    deadline = time.time() + 60 * max_minutes if max_minutes else float("inf")
    pretrained_scores(base_config(SWEEP_REWARD, ALGOS[0], LRS[0], 0))
    for algo in ALGOS:  # the sweep, one rate at a time: an edge pick adds the next rate
        while picked_lr(algo) is None:
            todo = [lr for lr in sweep_lrs(algo)
                    if _load(run_name(SWEEP_REWARD, algo, lr, SWEEP_SEED)) is None]
            if not run_one(base_config(SWEEP_REWARD, algo, todo[0], SWEEP_SEED), deadline):
                return report()
    for reward in REWARDS:
        for seed in SEEDS:
            for algo in ALGOS:
                if not run_one(base_config(reward, algo, picked_lr(algo), seed), deadline):
                    return report()
    for reward in REWARDS if CONTROL_OF in ALGOS else ():  # the control, after the comparison
        for seed in SEEDS:
            if not run_one(base_config(reward, CONTROL, picked_lr(CONTROL_OF), seed), deadline):
                return report()
    report()


def report() -> dict:
    """assets/compare.json and assets/compare.png from the finished runs."""
    pretrained = json.loads((OUT / "pretrained.json").read_text())
    summary: dict = dict(
        protocol=dict(epochs=EPOCHS, eval_every=EVAL_EVERY, lrs=LRS, max_extensions=MAX_EXTENSIONS,
                      sweep=f"{SWEEP_REWARD}, seed {SWEEP_SEED}, criterion: mean on-policy "
                            "reward of the last 3 epochs", seeds=SEEDS,
                      eval_sets={k: dict(prompts=len(p), per_prompt=n)
                                 for k, (p, n) in EVAL_SETS.items()},
                      held_out_animals=HELD_OUT_ANIMALS),
        pretrained=pretrained, sweep={}, picked_lr={}, results={})
    for algo in ALGOS:
        runs = {lr: _load(run_name(SWEEP_REWARD, algo, lr, SWEEP_SEED)) for lr in sweep_lrs(algo)}
        summary["sweep"][algo] = {f"{lr:g}": _final_reward(r) for lr, r in runs.items() if r}
        summary["picked_lr"][algo] = picked_lr(algo)
    for reward in REWARDS:
        for algo in (*ALGOS, CONTROL):
            lr = summary["picked_lr"].get(CONTROL_OF if algo == CONTROL else algo)
            runs = [r for seed in SEEDS if lr and (r := _load(run_name(reward, algo, lr, seed)))]
            if runs:
                summary["results"].setdefault(reward, {})[algo] = _aggregate(runs)
    finished = [json.loads(p.read_text()) for p in sorted((OUT / "runs").glob("*.json"))]
    summary["finished_runs"] = len(finished)
    summary["training_hours"] = sum(r["wall_seconds"] for r in finished) / 3600  # w/o evals
    REPORT.write_text(json.dumps(summary, indent=1))
    if summary["results"]:
        _figure(summary, REPORT.with_suffix(".png"))
    print_summary(summary)
    return summary


def _aggregate(runs: list[dict]) -> dict:
    """Mean and min/max band over seeds of the curves and the held-out checkpoints."""
    def band(values: list[list[float]]) -> dict:
        a = np.array(values, dtype=float)
        return dict(mean=a.mean(0).tolist(), min=a.min(0).tolist(), max=a.max(0).tolist())

    n = runs[0]["samples_per_epoch"]
    # epoch e's samples come from the policy after e updates, i.e. after n * e reward queries;
    # its KL is measured after its own update, n * (e + 1)
    out = dict(seeds=[r["seed"] for r in runs], lr=runs[0]["lr"],
               queries=[n * e for e in range(runs[0]["epochs"])],
               kl_queries=[n * (e + 1) for e in range(runs[0]["epochs"])],
               wall_minutes=float(np.mean([r["wall_seconds"] for r in runs]) / 60),
               train_reward=band([r["history"]["reward/mean"] for r in runs]),
               kl_pretrained=band([r["history"]["kl/pretrained"] for r in runs]), evals={})
    epochs = sorted(runs[0]["evals"], key=int)
    out["eval_queries"] = [n * int(e) for e in epochs]
    for name in EVAL_SETS:
        for metric in ("jpeg_kb", "caption_top1"):
            out["evals"][f"{name}/{metric}"] = band(
                [[r["evals"][e][name][metric] for e in epochs] for r in runs])
    return out


COLOURS = {"ddpo_is": "C0", "ddpo_sf": "C1", "rwr": "C2", "rwr_sparse": "C3", CONTROL: "0.5"}
LABELS = {"ddpo_is": "DDPO_IS", "ddpo_sf": "DDPO_SF", "rwr": "RWR", "rwr_sparse": "sparse RWR",
          CONTROL: "control: RWR, uniform weights"}


def _figure(summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    rewards = list(summary["results"])
    fig = Figure(figsize=(16, 3.6 * len(rewards)), dpi=100)
    axes = fig.subplots(len(rewards), 4, squeeze=False)
    pre = summary["pretrained"]
    legend: dict = {}  # algo: (its line, lr, [(reward, seeds)]), one legend under the figure
    for row, reward in zip(axes, rewards):
        sign = -1 if reward == "compressibility" else 1
        for algo, res in summary["results"][reward].items():
            c = COLOURS[algo]
            line = _band(row[0], res["queries"], res["train_reward"], c)
            legend.setdefault(algo, (line, res["lr"], []))[2].append((reward, len(res["seeds"])))
            xe = [0] + res["eval_queries"]
            for name, style in (("trained", "-"), ("unseen_animals", "--"), ("objects", ":")):
                gain = {k: [0.0] + v for k, v in _gain(res, name, pre, sign).items()}
                _band(row[1], xe, gain, c, style)
            top = res["evals"]["trained/caption_top1"]
            top = {k: [100 * pre["trained"]["caption_top1"]] + [100 * v for v in top[k]]
                   for k in top}
            _band(row[2], xe, top, c)
            _band(row[3], res["kl_queries"], res["kl_pretrained"], c)
        row[0].set(title=f"{reward}: on-policy reward", xlabel="reward queries (samples)",
                   ylabel="reward (JPEG kB, signed)")
        row[1].set(title="held-out gain: trained -, unseen animals --, objects :",
                   xlabel="reward queries", ylabel="JPEG change toward the reward (%)")
        row[2].set(title="captioner top-1 on trained animals", xlabel="reward queries",
                   ylabel="top-1 (%)")
        row[3].set(title="KL to the pretrained policy (per step)", xlabel="reward queries",
                   ylabel="KL (per latent dim)", yscale="log")
        for ax in row:
            ax.grid(alpha=0.3)

    def seeds(counts: list[tuple[str, int]]) -> str:  # "3 seeds", or per reward where they differ
        each = [f"{n} seed{'s' * (n != 1)}" for _, n in counts]
        if len(counts) == len(rewards) and len(set(each)) == 1:
            return each[0]
        return ", ".join(f"{reward}: {text}" for (reward, _), text in zip(counts, each))

    labels = [f"{LABELS[a]} (lr {lr:g}, {seeds(n)})" for a, (_, lr, n) in legend.items()]
    columns = 5 if max(map(len, labels)) <= 55 else 3  # per-reward seed counts make longer labels
    fig.legend([line for line, _, _ in legend.values()], labels, loc="lower center",
               ncol=min(len(legend), columns), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.7 / fig.get_figheight(), 1, 1))
    fig.savefig(path)


def _band(ax, x, b: dict, colour: str, style: str = "-"):
    """The mean as a line, the min-max over seeds as a shaded band; returns the line."""
    ax.fill_between(x, b["min"], b["max"], color=colour, alpha=0.15)
    return ax.plot(x, b["mean"], style, color=colour)[0]


def print_summary(summary: dict) -> None:
    """The report's numbers: the sweep, then per reward and algorithm the held-out changes."""
    p = summary["protocol"]
    print(f"protocol: {p['epochs']} epochs of 64 samples per run, held-out checkpoints every "
          f"{p['eval_every']} epochs; {summary['finished_runs']} runs finished, "
          f"{summary['training_hours']:.1f} h of training (evaluations not counted)")
    print("\nlearning-rate sweep (mean on-policy reward, last 3 epochs):")
    for algo, scores in summary["sweep"].items():
        print(f"  {algo:<11} " + "  ".join(f"lr {lr}: {v:+.4f}" for lr, v in scores.items())
              + f"  -> {summary['picked_lr'][algo]}")
    pre = summary["pretrained"]
    for reward, algos in summary["results"].items():
        sign = -1 if reward == "compressibility" else 1
        print(f"\n{reward}: held-out JPEG change toward the reward after {p['epochs']} epochs "
              "(mean over seeds; trained / unseen animals / objects), captioner top-1")
        for algo, res in algos.items():
            gains = [_gain(res, k, pre, sign)["mean"][-1] for k in EVAL_SETS]
            top1 = 100 * res["evals"]["trained/caption_top1"]["mean"][-1]
            print(f"  {algo:<11} {len(res['seeds'])} seed(s): "
                  + " / ".join(f"{g:+.1f}%" for g in gains)
                  + f" | top-1 {100 * pre['trained']['caption_top1']:.0f}% -> {top1:.0f}%"
                  f" | final KL {res['kl_pretrained']['mean'][-1]:.2e}")
        queries = next(iter(algos.values()))["eval_queries"]
        print(f"  trained animals, mean [min, max] over seeds at {queries} reward queries:")
        order = sorted(algos, key=lambda a: -_gain(algos[a], "trained", pre, sign)["mean"][-1])
        for algo in order:
            g = _gain(algos[algo], "trained", pre, sign)
            print(f"  {algo:<11} " + "  ".join(f"{m:+5.1f}% [{lo:+5.1f}, {hi:+5.1f}]"
                                               for m, lo, hi in zip(g["mean"], g["min"], g["max"])))


def _gain(res: dict, eval_set: str, pretrained: dict, sign: int) -> dict:
    """The held-out JPEG change toward the reward, in percent of the pretrained model's size (the
    band's min and max swap for compressibility, where a smaller size is a larger gain)."""
    b = res["evals"][f"{eval_set}/jpeg_kb"]
    base = pretrained[eval_set]["jpeg_kb"]
    g = {k: [sign * 100 * (v / base - 1) for v in b[k]] for k in ("mean", "min", "max")}
    if sign < 0:
        g["min"], g["max"] = g["max"], g["min"]
    return g
