"""What a KL leash buys at tiny scale: `python -m tools.bench kl` (resumable; --report rebuilds).

DDPO_IS on compressibility with `--kl-coef beta` for each beta of BETAS, SEEDS seeds each, with the
comparison's protocol (tools/compare.py: 12 epochs of 64 samples, the 36 trained animals, held-out
evaluations every 4 epochs). The reference points are beta = 0 (plain DDPO_IS) and DDPO_IS's
reward-blind control, both at the same rate: the figure puts each run's held-out reward gain against
the captioner's top-1 on the trained animals ("is it still the animal?"), the trade-off beta moves
along. Runs go to assets/kl_tradeoff/runs (committed), the report to assets/kl_tradeoff.json/.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from tools import compare, write_json

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "assets" / "kl_tradeoff"
REPORT = ROOT / "assets" / "kl_tradeoff.json"
REWARD, ALGO, LR = "compressibility", "ddpo_is", 2e-4  # the tiny default rate
# 0: the paper's objective. A probe (tiny defaults, seed 0, 3 epochs) put the KL to the pretrained
# policy after epoch 3 at 5.1e-3 with beta 0, 8.9e-4 with beta 1 and 4.8e-4 with beta 10: beta 1
# already leashes hard, so the grid spans 0.03-3
BETAS = (0.0, 0.03, 0.3, 3.0)
SEEDS = (0, 1, 2)


def config(beta: float, seed: int):
    """beta = 0 is the comparison's own DDPO_IS run at this rate (shared, not run twice)."""
    cfg = compare.base_config(REWARD, ALGO, LR, seed)
    if not beta:
        return cfg
    name = f"beta{beta:g}-lr{LR:g}-seed{seed}"
    return replace(cfg, kl_coef=beta, output_dir=str(compare.RUNS.parent / "kl_tradeoff" / name))


def control(seed: int):
    """The comparison's reward-blind DDPO_IS run at this rate."""
    return compare.base_config(None, compare.control_of(ALGO), LR, seed)


def _out(cfg) -> Path:
    return OUT if cfg.kl_coef else compare.OUT


def run(max_minutes: float = 0.0) -> dict:
    deadline = time.time() + 60 * max_minutes if max_minutes else float("inf")
    compare.pretrained_scores(config(0.0, 0))
    for seed in SEEDS:
        for cfg in [config(beta, seed) for beta in BETAS] + [control(seed)]:
            if not compare.run_one(cfg, deadline, _out(cfg)):
                return report()
    return report()


def _results() -> list[dict]:
    """Every finished run of the trade-off: its own (beta > 0) and the comparison's."""
    paths = sorted((OUT / "runs").glob("*.json"))
    for seed in SEEDS:
        for cfg in (config(0.0, seed), control(seed)):
            paths.append(compare.OUT / "runs" / f"{Path(cfg.output_dir).name}.json")
    return [json.loads(p.read_text()) for p in paths if p.is_file()]


def _final(result: dict, pretrained: dict) -> dict:
    """The last checkpoint's held-out gain and top-1 on the trained animals, by the comparison's
    own arithmetic, and the last KL to the pretrained policy."""
    return dict(gain=compare._gain_curve(result, "trained", pretrained, REWARD)[-1],
                top1=compare._top1_curve(result, "trained")[-1],
                kl=result["history"]["kl/pretrained"][-1])


def report() -> dict:
    pretrained = json.loads((compare.OUT / "pretrained.json").read_text())
    points: dict = {}
    for result in _results():
        key = "control" if result.get("reward_blind") else f"{result.get('kl_coef', 0.0):g}"
        points.setdefault(key, []).append(dict(seed=result["seed"], **_final(result, pretrained)))
    summary = dict(protocol=dict(reward=REWARD, algo=ALGO, lr=LR, betas=BETAS, seeds=SEEDS,
                                 epochs=compare.EPOCHS),
                   pretrained_top1=100 * pretrained["trained"]["caption_top1"], points=points)
    write_json(REPORT, summary)
    if points:
        _figure(summary, REPORT.with_suffix(".png"))
    for key, runs in points.items():
        g = [r["gain"] for r in runs]
        t = [r["top1"] for r in runs]
        print(f"beta {key:>8}: held-out JPEG gain {np.mean(g):+.1f}% [{min(g):+.1f}, {max(g):+.1f}]"
              f", top-1 {np.mean(t):.1f}% [{min(t):.1f}, {max(t):.1f}], last KL to the pretrained "
              f"policy {np.mean([r['kl'] for r in runs]):.1e} ({len(runs)} seeds)")
    return summary


def _figure(summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5), dpi=100)
    ax = fig.subplots()
    betas = sorted((k for k in summary["points"] if k != "control"), key=float)
    for i, key in enumerate(betas + ["control"] * ("control" in summary["points"])):
        runs = summary["points"][key]
        colour = "0.5" if key == "control" else f"C{i}"
        label = "reward-blind control" if key == "control" else f"beta = {key}"
        gains, top1 = [r["gain"] for r in runs], [r["top1"] for r in runs]
        ax.scatter(gains, top1, color=colour, s=18, alpha=0.6)
        ax.plot(np.mean(gains), np.mean(top1), "X", color=colour, ms=11, label=label)
    ax.axhline(summary["pretrained_top1"], color="k", lw=0.8, ls="--", label="pretrained top-1")
    ax.set_ylim(0, max(65.0, summary["pretrained_top1"] + 5))
    ax.set(xlabel="held-out JPEG size reduction (%)",
           ylabel="captioner top-1 on trained animals (%)",
           title="DDPO_IS with a KL leash (compressibility, 12 epochs)\n"
                 "dots: seeds; crosses: their means")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
