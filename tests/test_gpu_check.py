"""The one-shot GPU check at toy size on a CPU. What this test measures is one thing: in fp32 the
ratio at theta = theta_old is 1 to rounding. The rest only keeps the command running so that it
cannot rot before a GPU is lent: at the toy's 8x8 latents nothing underflows in fp16 (the gradient
per element is 256x larger than at SD's 64x64) and CPU timings say nothing about a GPU. The loss
scaling that check 2 measures on a GPU is tested at SD's 64x64 latent size in
tests/test_engine.py (fp16 without scaling: most LoRA gradients 0; with it: the fp32 gradient).
"""

from __future__ import annotations

import json
import math

from tools.gpu_check import gpu_check


def test_gpu_check_runs_at_toy_size(tmp_path):
    out = tmp_path / "gpu.json"
    r = gpu_check(toy=True, out=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert not [k for k, v in r.items() if isinstance(v, dict) and "error" in v]
    assert not [p for p, v in r["ratio_at_theta_old"].items() if "error" in v]
    assert r["versions"]["diffusers"] and set(r["tf32"]) == {"cudnn", "matmul"}
    fp32 = r["ratio_at_theta_old"]["no"]
    # fp32, same weights: ratio 1 to rounding (measured 5e-7 to 2e-6 on CPU), far inside the
    # paper's clip range 1e-4, so no transition is clipped before an update
    assert fp32["max_abs_ratio_minus_1"] < 1e-5 and fp32["share_past_clip"] == 0
    # the rest: every figure is there and finite (the command ran through)
    figures = [r["ratio_at_theta_old"][p]["max_abs_ratio_minus_1"] for p in ("fp16", "bf16")]
    g = r["zero_lora_gradients_fp16"]
    figures += [g[k]["zero_share"] for k in ("with_scaling", "without_scaling")]
    speed = r["fp16_speed_memory"]
    figures += [speed[p][k] for p in ("sampling", "training")
                for k in ("samples_per_s", "ratio_to_floor")]
    figures.append(r["shortened_epoch_fp16"]["default_epoch_minutes_extrapolated"])
    assert all(math.isfinite(v) for v in figures), figures
    assert speed["peak_gib_sampling"] is None  # no CUDA here


def test_a_failing_check_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    """On a lent GPU one crash (out of memory, a missing kernel) must not cost the other figures:
    the error and its traceback go into the JSON, written after every check."""
    import tools.gpu_check as g

    def out_of_memory(cfg):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(g, "zero_lora_gradients", out_of_memory)
    r = gpu_check(toy=True, out=tmp_path / "gpu.json")
    assert r["zero_lora_gradients_fp16"]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert "out_of_memory" in r["zero_lora_gradients_fp16"]["traceback"]
    assert "max_abs_ratio_minus_1" in r["ratio_at_theta_old"]["no"]  # before it
    assert "samples_per_s" in r["fp16_speed_memory"]["training"]  # and after it
    assert json.loads((tmp_path / "gpu.json").read_text())["zero_lora_gradients_fp16"]["error"]
