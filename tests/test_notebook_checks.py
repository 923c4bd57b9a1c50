"""The notebooks' checks can fail: each notebook is run with one wrong project function
(tests/notebook_mutants.py) and must stop at the check meant to catch that mistake. The run stops at
the first failing cell, so each costs only the cells before that check."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("notebook, mutant, check", [
    ("01_diffusion_as_mdp", "diffusion_mse_loss x2", "Eq. 1 == weight_t * diffusion_mse_loss"),
    ("02_logprob_ddim_step", "mean without -sigma^2",
     "ddim_step_with_logprob == DDIMScheduler.step"),
    ("02_logprob_ddim_step", "log-prob summed", "sampler log-prob == Normal(mu_theta, sigma_t)"),
    ("03_score_function_gradient", "SF loss sign", "gradient of ddpo_sf_loss == analytic"),
    ("04_importance_sampling_clipping", "IS loss min", "zero-gradient regions are exactly"),
    ("05_rwr", "RWR weights unnormalised", "rwr_weights == exp(beta r)/Z"),
    ("06_rewards", "JPEG in bytes", "jpeg_size_kb == Pillow JPEG bytes / 1000"),
])  # fmt: skip
def test_a_notebook_check_catches_a_wrong_function(notebook, mutant, check, monkeypatch):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("DDPO_MUTANT", mutant)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    nb = nbformat.read(NOTEBOOKS / f"{notebook}.ipynb", as_version=4)
    with pytest.raises(CellExecutionError) as info:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    assert f"check failed: {check}" in str(info.value), str(info.value)[-2000:]
