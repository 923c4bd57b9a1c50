"""loading.py: prompt sets, devices, and the model source checked before anything slow (no network
needed)."""

from __future__ import annotations

import re
import time
from functools import partial

import pytest
import torch

import ddpo_min
import loading
from config import Config, ConfigError


def test_prompt_sets(tmp_path):
    assert len(loading.load_prompts("simple_animals")) == 45
    imagenet = loading.load_prompts("imagenet_animals")
    assert len(imagenet) == 398 and imagenet[0] == "a tench"
    acts = loading.load_prompts("animals_activities")
    assert len(acts) == 135 and "a cat riding a bike" in acts
    f = tmp_path / "p.txt"
    f.write_text("a red cube\n\na blue ball\n")
    assert loading.load_prompts(str(f)) == ["a red cube", "a blue ball"]
    with pytest.raises(ConfigError, match="neither"):
        loading.load_prompts(str(tmp_path / "missing.txt"))


def test_unloadable_model_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--model tiny"):
        loading.load_model(Config(model=str(tmp_path / "no_such_model"), device="cpu"),
                           torch.device("cpu"))


@pytest.mark.parametrize("reachable, cpu_ok, says", [
    (False, False, "cannot be reached from here"),
    (True, False, "use --model tiny for a CPU run in minutes, or pass --sd-on-cpu true"),
    (True, True, None),
])  # fmt: skip
def test_the_headline_command_fails_in_seconds_without_a_network_or_a_gpu(
        monkeypatch, reachable, cpu_ok, says):
    """`python ddpo_min.py --reward aesthetic` (SD v1.4 from the hub): without a network, one probe
    of the hub and a one-line error, not the hub client's retries; on a CPU, one line naming the
    tiny model, unless --sd-on-cpu."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: reachable)
    check = partial(loading.check_model_source, "CompVis/stable-diffusion-v1-4",
                    torch.device("cpu"), cpu_ok)
    if says is None:
        check()
        return
    with pytest.raises(ConfigError, match=re.escape(says)):
        check()


def test_the_hub_probe_answers_within_its_timeout(monkeypatch):
    """A connection (or a name lookup) that hangs: the probe says False after its timeout, not
    after the hang."""
    def hang(*args, **kwargs):
        time.sleep(10)
        raise OSError("no answer")

    monkeypatch.setattr(loading.socket, "create_connection", hang)
    start = time.perf_counter()
    assert loading.hub_reachable(timeout=0.5) is False
    assert time.perf_counter() - start < 2.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exited:
        ddpo_min.main(["--model", "tiny", "--device", "cuda", "--output-dir", str(tmp_path)])
    message = str(exited.value.code)
    assert "--device cuda: CUDA is not available" in message and "--device cpu" in message
    assert "\n" not in message


def test_lora_weights_are_drawn_from_the_run_seed_not_torchs_global_generator():
    """peft draws LoRA's A matrices from torch's global generator: loading seeds them with --seed
    (so seeds differ and every process agrees) and leaves the global generator as it was."""
    import tiny

    def lora_a(seed):
        unet = tiny.load_tiny().unet
        before = torch.get_rng_state()
        loading.add_lora(unet, rank=2, seed=seed)
        assert torch.equal(torch.get_rng_state(), before)
        return torch.cat([p.flatten() for n, p in unet.named_parameters() if "lora_A" in n])

    a0, a1, again = lora_a(0), lora_a(1), lora_a(0)
    assert torch.equal(a0, again) and not torch.equal(a0, a1)
    model = loading.load_model(Config.tiny(lora_rank=2, seed=1, device="cpu"), torch.device("cpu"))
    assert torch.equal(torch.cat([p.flatten() for n, p in model.unet.named_parameters()
                                  if "lora_A" in n]), a1)  # --seed reaches it


def test_a_unet_with_active_dropout_is_refused_at_load():
    """Rescoring runs the UNet in train mode, sampling in eval mode: with dropout they differ and
    the ratio leaves 1 before any update, so such a UNet (or LoRA dropout) stops at load."""
    import tiny

    unet = tiny.load_tiny().unet
    loading.no_active_dropout(unet)  # the shipped model: none
    loading.add_lora(unet, rank=2)
    loading.no_active_dropout(unet)  # LoRA as the loop adds it: none
    x = torch.randn(2, 3, 32, 32)
    t, embeds = torch.tensor([500, 500]), torch.randn(2, 4, unet.config.cross_attention_dim)
    unet.mid_block.resnets[0].dropout = torch.nn.Dropout(0.1)
    unet.train()
    moved = unet(x, t, embeds).sample
    unet.eval()
    assert not torch.allclose(moved, unet(x, t, embeds).sample)  # what the check prevents
    with pytest.raises(ConfigError, match=r"active dropout \(1 module\(s\), e.g. mid_block"):
        loading.no_active_dropout(unet)
