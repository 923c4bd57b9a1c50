"""The one-shot GPU check at toy size on a CPU: the same code, so it cannot rot before a GPU is
lent."""

from __future__ import annotations

import json

from tools.gpu_check import gpu_check


def test_gpu_check_runs_at_toy_size(tmp_path):
    out = tmp_path / "gpu.json"
    r = gpu_check(toy=True, out=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    fp32 = r["ratio_at_theta_old"]["no"]
    assert fp32["max_abs_ratio_minus_1"] < 1e-4  # fp32, same weights: ratio 1 to rounding
    for precision in ("fp16", "bf16"):
        v = r["ratio_at_theta_old"][precision]
        assert 0 <= v["share_past_clip"] <= 1 and v["max_abs_ratio_minus_1"] >= 0
    g = r["zero_lora_gradients_fp16"]
    # (at 8x8 toy latents the gradient is 256x larger per element than at SD's 64x64: no underflow)
    assert g["with_scaling"]["zero_share"] <= g["without_scaling"]["zero_share"]
    speed = r["fp16_speed_memory"]
    assert speed["peak_gib_sampling"] is None  # no CUDA here
    assert speed["sampling"]["samples_per_s"] > 0 and speed["training"]["ratio_to_floor"] > 0
    assert r["shortened_epoch_fp16"]["default_epoch_minutes_extrapolated"] > 0
