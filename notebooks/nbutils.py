"""Small helpers shared by the notebooks: find the repo, load the model for a SCALE, show images,
check.

Nothing here is DDPO math: every equation the notebooks check is computed by the project's own
modules (sampler.py, ddpo_min.py, rewards.py). This file only saves each notebook the same dozen
lines of setup.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

# tiny scale never touches the hub; paper scale unsets this
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets


def repo_root(start: Path | None = None) -> Path:
    """The folder holding ddpo_min.py, searched upwards from `start` (default: the working
    directory)."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "ddpo_min.py").exists():
            return folder
    raise FileNotFoundError(f"ddpo_min.py not found above {start}: "
                            "run the notebooks from inside the repo")


ROOT = repo_root(Path(__file__).parent)
for path in (ROOT, ROOT / "notebooks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

SCALES = ("tiny", "paper")

# tests/test_notebook_checks.py runs a notebook with one wrong project function (DDPO_MUTANT names
# it, tests/notebook_mutants.py defines it) to show that the notebook's check catches it
if os.environ.get("DDPO_MUTANT"):
    import runpy

    runpy.run_path(str(ROOT / "tests" / "notebook_mutants.py"))["apply"](os.environ["DDPO_MUTANT"])


def use_scale(scale: str) -> str:
    """Validate SCALE and return the scale to run; for "paper", let the hub be used (it needs
    network access or a local copy).

    DDPO_SCALE in the environment wins over the notebook's SCALE: that is how the tests execute
    the paper branches, against random toy models they build (see PAPER below)."""
    scale = os.environ.get("DDPO_SCALE", scale)
    if scale not in SCALES:
        raise ValueError(f"SCALE must be one of {SCALES}, got {scale!r}")
    if scale == "paper" and "DDPO_PAPER_MODEL" not in os.environ:
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            if os.environ.get(var) == "1":
                os.environ.pop(var)
    return scale


# Paper scale: SD v1.4 and the real reward models from the hub, on the GPU. The tests replace them
# with random toy models saved to local folders (DDPO_PAPER_MODEL, DDPO_CLIP_MODEL, DDPO_VLM) and
# shrink the runs (DDPO_PAPER_TOY=1), so every paper branch executes on a CPU in CI.
PAPER_MODEL = os.environ.get("DDPO_PAPER_MODEL", "CompVis/stable-diffusion-v1-4")
PAPER_CLIP = os.environ.get("DDPO_CLIP_MODEL", "openai/clip-vit-large-patch14")
PAPER_VLM = os.environ.get("DDPO_VLM", "Qwen/Qwen2-VL-2B-Instruct")
PAPER_TOY = os.environ.get("DDPO_PAPER_TOY") == "1"
# config overrides for a paper-scale run: none, or the toy sizes of the tests
PAPER_OVERRIDES = (dict(model=PAPER_MODEL, num_steps=4, sample_batch_size=2, sample_batches=2,
                        train_batch_size=1, minibatches=2, grid_size=4)
                   if PAPER_TOY else dict(model=PAPER_MODEL))


def paper_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_paper_model():
    """SD v1.4 with LoRA in fp32 on the GPU (the notebooks' paper branch)."""
    from config import Config
    from loading import load_model

    return load_model(Config(model=PAPER_MODEL, mixed_precision="no"), paper_device())


def check(ok, what: str) -> None:
    """Print the outcome of a numeric check as `match: True/False` and fail the notebook if
    False (unless DDPO_CHECK_RECORD names a file: then the failure is written there, for the tests
    that show several checks failing in one run)."""
    ok = bool(ok)
    print(f"{what}\nmatch: {ok}")
    record = os.environ.get("DDPO_CHECK_RECORD")  # tests: note a failure, go on to the next check
    if record and not ok:
        with open(record, "a") as f:
            f.write(what.splitlines()[0] + "\n")
        return
    assert ok, f"check failed: {what}"


def show_images(images, titles=None, ncols: int = 8, size: float = 1.3,
                suptitle: str | None = None) -> None:
    """Show float images (B, 3, H, W) in [0, 1] in a grid. Returns nothing: a returned figure
    would be shown a second time when the call ends a notebook cell."""
    import matplotlib.pyplot as plt
    import numpy as np

    images = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    n = len(images)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols,
                             figsize=(ncols * size, nrows * (size + 0.25 * bool(titles))),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(np.asarray(images[i]), interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    plt.show()


def restore_inline_plots() -> None:
    """Re-select Jupyter's inline matplotlib backend (a no-op outside IPython).

    `ddpo_min.train` saves its reward curve with matplotlib.use("Agg"), which switches the backend
    for the whole process; in a notebook, figures shown after a training run would then silently not
    appear.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and "ipykernel" in sys.modules:
        shell.run_line_magic("matplotlib", "inline")  # what `%matplotlib inline` does


def show_comparison() -> dict:
    """Show the repository's committed comparison of the algorithms (`python -m tools.bench
    compare`): its numbers, its markdown tables and its figure; returns the JSON.

    Nothing is trained here: the runs take hours on 2 cores, so they are made once, by the
    command, and read here."""
    import json

    import matplotlib.pyplot as plt
    from IPython.display import Markdown, display

    from tools import compare

    summary = json.loads(compare.REPORT.read_text())
    if summary["finished_runs"] != summary["planned_runs"]:
        raise RuntimeError(f"{compare.REPORT} holds {summary['finished_runs']} of "
                           f"{summary['planned_runs']} runs: finish them with "
                           "`python -m tools.bench compare` first")
    display(Markdown(compare.REPORT.with_suffix(".md").read_text()))
    figure = compare.REPORT.with_suffix(".png")
    image = plt.imread(figure)
    plt.figure(figsize=(16, 16 * image.shape[0] / image.shape[1]))
    plt.imshow(image)
    plt.axis("off")
    plt.show()
    return summary


def ddpm_posterior(scheduler, t: int, x0, x_t):
    """The DDPM posterior q(x_{t-1} | x_t, x_0) as diffusers computes it (an oracle for the
    notebooks' own a_t, b_t, beta-tilde): mean and variance, from `DDPMScheduler.step` with the
    network's output replaced by x_0 itself. The step adds sqrt(variance) * z; z is redrawn from
    the same seed and subtracted."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    ddpm = DDPMScheduler.from_config(scheduler.config, prediction_type="sample", clip_sample=False,
                                     variance_type="fixed_small", thresholding=False)
    ddpm.set_timesteps(ddpm.config.num_train_timesteps)  # every t, so t - 1 is the previous step
    x0, x_t = x0.double().cpu(), x_t.double().cpu()
    out = ddpm.step(x0, t, x_t, generator=torch.Generator().manual_seed(0)).prev_sample
    z = randn_tensor(x0.shape, generator=torch.Generator().manual_seed(0), dtype=x0.dtype)
    variance = ddpm._get_variance(t).double()
    return out - variance.sqrt() * z, variance


def show_source(*functions) -> None:
    """Show the project's source of the functions a derivation describes, as the reader would find
    them in the repository (file and line)."""
    import inspect

    from IPython.display import Markdown, display

    for fn in functions:
        lines, start = inspect.getsourcelines(fn)
        where = Path(inspect.getsourcefile(fn)).relative_to(ROOT)
        display(Markdown(f"`{where}`, line {start}:\n\n```python\n{''.join(lines)}```"))
