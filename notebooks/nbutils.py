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


def use_scale(scale: str) -> None:
    """Validate SCALE; for "paper", let the hub be used (it needs network access or a local
    copy)."""
    if scale not in SCALES:
        raise ValueError(f"SCALE must be one of {SCALES}, got {scale!r}")
    if scale == "paper":
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            if os.environ.get(var) == "1":
                os.environ.pop(var)


def check(ok, what: str) -> None:
    """Print the outcome of a numeric check as `match: True/False` and fail the notebook if
    False."""
    ok = bool(ok)
    print(f"{what}\nmatch: {ok}")
    assert ok, f"check failed: {what}"


def show_images(images, titles=None, ncols: int = 8, size: float = 1.3,
                suptitle: str | None = None):
    """Show float images (B, 3, H, W) in [0, 1] in a grid; returns the matplotlib figure."""
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
    return fig


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
