"""Grade a student's submission: `python -m tools.autograde SUBMISSION [--seeds 11 12] [--out F]`.

Run in the repository (it needs the reference functions), on the folder the handout describes:

    SUBMISSION/my_ddpo.py                       the five functions of exercises 1-4
    SUBMISSION/ex5/compressibility/             exercise 5's run folders (config.json,
    SUBMISSION/ex5/incompressibility/             metrics.jsonl, weights/unet.safetensors)

It scores the rubric's automatic items (notebooks/course/RUBRIC.md) and writes them as JSON:

- ex1-ex4, "check passes": the self-checks of the exercises, on the inputs the notebooks show and
  on the hidden inputs of each `--seeds` value (other random draws of the same shapes; pick your own
  seeds for your course: the defaults are public). All or nothing per exercise. A my_ddpo.py that
  imports the project (ddpo_min, sampler, ...) scores none: the rubric asks for the student's own
  code.
- ex5, "the bar": for each reward, the run's config must be the calibrated one (tiny defaults,
  that reward, the calibration's epoch count) and its metrics must have that many epochs; the
  held-out JPEG size is then measured again here, from the run's weights with the reference sampler,
  and must clear the bars of assets/ex5_calibration.json (`tools.ex5.passes`: the JPEG change per
  reward and the clip fraction's median, read from the run's metrics.jsonl).

The student's file is imported and run: grade untrusted code in a container or a throwaway account.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "notebooks" / "exercises"))

import checks  # noqa: E402

import config  # noqa: E402
import tiny  # noqa: E402
from tools import ex5, write_json  # noqa: E402

# rubric item -> (points, the checks it runs on the student's functions)
CODE_ITEMS = {
    "ex1_check": (8, (("check_logprob_step", "my_ddim_step_with_logprob"),)),
    "ex2_check": (3, (("check_sf_loss", "my_sf_loss"),)),
    "ex3_check": (5, (("check_clipped_loss", "my_clipped_loss"),)),
    "ex4_check": (3, (("check_advantages", "my_advantages"),
                      ("check_clip_advantages", "my_clip_advantages"))),
}
EX5_POINTS = 4
PROJECT_MODULES = {"ddpo_min", "sampler", "plumbing", "loading", "config", "rewards", "tiny",
                   "tools", "checks", "_student"}
# settings that do not change what a run trains (where it writes, how often it logs or saves, the
# diagnostics): a student's run may differ from the calibration in these
FREE_FIELDS = {"output_dir", "seed", "resume", "save_every", "device", "threads", "log",
               "grid_size", "kl_samples", "kl_steps"}
DEFAULT_SEEDS = (11, 12)


# ways to reach a module without an import statement naming it
INDIRECT_MODULES = {"importlib", "builtins", "runpy", "imp"}
INDIRECT_CALLS = {"__import__", "exec", "eval", "compile", "globals", "vars"}


def project_imports(path: Path) -> list[str]:
    """The project modules a student's file imports, and the usual ways around an import
    statement (importlib, __import__, exec, sys.modules, ...): any of them forfeits the code
    points. A static check, not a sandbox: INSTRUCTOR.md says what it cannot see."""
    tree = ast.parse(path.read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    found = {n for n in names if n.split(".")[0] in PROJECT_MODULES | INDIRECT_MODULES}
    found |= {f"{n.id}()" for n in ast.walk(tree)
              if isinstance(n, ast.Name) and n.id in INDIRECT_CALLS}
    found |= {f"{n.value.id}.{n.attr}" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
              and isinstance(n.value, ast.Name) and (n.value.id, n.attr) in {("sys", "modules")}}
    return sorted(found)


def load_student(path: Path):
    spec = importlib.util.spec_from_file_location("submitted_my_ddpo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_check(check: str, fn, seed: int) -> tuple[bool, str]:
    """One self-check on one set of inputs: (passed, the last line it printed or its error)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), checks.hidden_inputs(seed):
            getattr(checks, check)(fn)
        return True, "match: True"
    except Exception as e:  # a wrong function fails a check, or crashes inside it
        return False, f"{type(e).__name__}: {e}"[:400]


def grade_code(submission: Path, seeds) -> dict:
    path = submission / "my_ddpo.py"
    items = {}
    if not path.exists():
        return {name: dict(points=0, max=pts, detail=f"no {path.name} in the submission")
                for name, (pts, _) in CODE_ITEMS.items()}
    imported = project_imports(path)
    try:
        student = load_student(path)
    except Exception as e:
        student, error = None, f"{path.name} does not import: {type(e).__name__}: {e}"[:400]
    for name, (pts, pairs) in CODE_ITEMS.items():
        if imported:
            items[name] = dict(points=0, max=pts,
                               detail=f"my_ddpo.py imports the project ({', '.join(imported)})")
            continue
        if student is None:
            items[name] = dict(points=0, max=pts, detail=error)
            continue
        failures = []
        for check, function in pairs:
            fn = getattr(student, function, None)
            if fn is None:
                failures.append(f"no function {function}")
                continue
            for seed in (0, *seeds):
                ok, detail = run_check(check, fn, seed)
                if not ok:
                    failures.append(f"{check}, inputs {seed}: {detail}")
                    break
        items[name] = dict(points=0 if failures else pts, max=pts,
                           detail="; ".join(failures) or
                           f"passes on the notebook's inputs and {len(seeds)} hidden sets")
    return items


def _run_problem(run_dir: Path, reward: str, calibration: dict) -> str | None:
    """Why a run folder does not qualify for the bar, or None."""
    if not (run_dir / "config.json").exists():
        return f"no {run_dir}/config.json"
    saved = json.loads((run_dir / "config.json").read_text())
    expected = asdict(config.Config.tiny(reward=reward, epochs=calibration["epochs"],
                                         **calibration.get("settings", {})))
    names = {f.name for f in fields(config.Config)}
    missing = sorted(names - FREE_FIELDS - set(saved))
    if missing:
        return "config.json lacks " + ", ".join(missing[:4]) + ": hand in the run folder as written"
    differ = sorted(k for k in names - FREE_FIELDS if saved[k] != expected[k])
    if differ:
        return "config.json differs from the calibrated run in " + ", ".join(
            f"{k} ({saved[k]!r}, expected {expected[k]!r})" for k in differ[:4])
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() \
        if (run_dir / "metrics.jsonl").exists() else []
    if len(lines) != calibration["epochs"]:
        return f"metrics.jsonl has {len(lines)} epochs, the bar is set for {calibration['epochs']}"
    if not (run_dir / "weights" / "unet.safetensors").exists():
        return f"no {run_dir}/weights/unet.safetensors"
    return None


def grade_ex5(submission: Path, calibration: dict) -> dict:
    """Re-measure each run's held-out JPEG change from its weights; the bar of every reward."""
    changes, clipfracs, problems = {}, {}, []
    before = None  # the pretrained model's held-out size: the same for every reward, measured once
    for reward in calibration["bars"]:
        run_dir = submission / "ex5" / reward
        problem = _run_problem(run_dir, reward, calibration)
        if problem:
            problems.append(f"{reward}: {problem}")
            continue
        cfg = config.Config.tiny(reward=reward, **calibration.get("settings", {}))
        if before is None:
            before = ex5.held_out_jpeg_kb(tiny.load_tiny(), cfg)
        after = ex5.held_out_jpeg_kb(
            tiny.load_tiny(weights=run_dir / "weights" / "unet.safetensors"), cfg)
        changes[reward] = 100 * (after / before - 1)
        clipfracs[reward] = ex5.clipfrac_median(run_dir)
    if problems:
        return dict(points=0, max=EX5_POINTS, detail="; ".join(problems), change_percent=changes)
    ok = ex5.passes(changes, clipfracs, calibration)
    return dict(points=EX5_POINTS if ok else 0, max=EX5_POINTS,
                detail=ex5.judged(calibration, changes, clipfracs), change_percent=changes,
                clipfrac_median=clipfracs)


def grade(submission: Path, seeds=DEFAULT_SEEDS, calibration: dict | None = None,
          ex5_runs: bool = True) -> dict:
    calibration = calibration or json.loads(ex5.CALIBRATION.read_text())
    items = grade_code(submission, seeds)
    if ex5_runs:
        items["ex5_bar"] = grade_ex5(submission, calibration)
    return dict(submission=str(submission), hidden_seeds=list(seeds), items=items,
                points=sum(i["points"] for i in items.values()),
                max=sum(i["max"] for i in items.values()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.autograde", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("submission", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                   help="hidden input seeds (choose your own; 0 is the notebooks' inputs)")
    p.add_argument("--no-ex5", action="store_true", help="grade exercises 1-4 only")
    p.add_argument("--out", type=Path, default=None,
                   help="where the JSON goes (default: SUBMISSION/grades.json)")
    args = p.parse_args(argv)
    if not args.submission.is_dir():
        print(f"error: {args.submission} is not a folder (the handout's 'What to submit' gives "
              "its layout)", file=sys.stderr)
        return 2
    result = grade(args.submission, args.seeds, ex5_runs=not args.no_ex5)
    out = args.out or args.submission / "grades.json"
    write_json(out, result)
    for name, item in result["items"].items():
        print(f"{name:10s} {item['points']:>2}/{item['max']:<2} {item['detail']}")
    print(f"total {result['points']}/{result['max']} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
