"""Every notebook's paper branch executes, on a CPU, against random toy models saved to folders:
a Stable Diffusion pipeline (the SD v1.4 classes, scheduler and LoRA targets), a CLIP with
ViT-L/14's projection width and a LLaVA (tools/sd_random.py). The numbers are meaningless; what is
tested is that each paper branch runs the project's code end to end and its checks hold.

The notebooks read DDPO_SCALE, DDPO_PAPER_MODEL, DDPO_CLIP_MODEL, DDPO_VLM and DDPO_PAPER_TOY
(notebooks/nbutils.py); the kernels inherit them from this process.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from tools.sd_random import save_random_reward_models, save_random_sd

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PAPER_BRANCHES = ["01_diffusion_as_mdp", "02_logprob_ddim_step", "04_importance_sampling_clipping",
                  "05_rwr", "06_rewards", "07_full_ddpo_run"]


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("paper_toys")
    return {"model": str(save_random_sd(folder, "toy")), **save_random_reward_models(folder)}


@pytest.mark.parametrize("name", PAPER_BRANCHES)
def test_paper_branch_executes(name, toy_models, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("DDPO_SCALE", "paper")
    monkeypatch.setenv("DDPO_PAPER_TOY", "1")
    monkeypatch.setenv("DDPO_PAPER_MODEL", toy_models["model"])
    monkeypatch.setenv("DDPO_CLIP_MODEL", toy_models["clip_model"])
    monkeypatch.setenv("DDPO_VLM", toy_models["vlm"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for out in cell.get("outputs", []))
    assert "match: False" not in printed
