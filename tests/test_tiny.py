"""The tiny world: deterministic data, a model that samples, a captioner as good as it claims.

These need the MiniLM wheel and the shipped assets (tiny_atlas.png + .json, tiny_unet.safetensors +
.json, tiny_captioner.safetensors). CPU only, no network. The emoji font is needed only by the test
that re-renders the atlas and compares it with the shipped one; it is skipped without the font.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from sampler import TextToImage, sample_with_logprob
from tools import tiny_data, tiny_report, tiny_train

ROOT = Path(__file__).resolve().parents[1]

needs_font = pytest.mark.skipif(
    not tiny_data.FONT_PATH.exists(),
    reason=f"no emoji font at {tiny_data.FONT_PATH} (apt-get install fonts-noto-color-emoji): "
    "only re-rendering the atlas needs it",
)


@pytest.fixture
def no_font(monkeypatch, tmp_path):
    """The font path points at a missing file, and nothing cached from the real font is left."""
    monkeypatch.setattr(tiny_data, "FONT_PATH", tmp_path / "NotoColorEmoji.ttf")
    tiny_data._font_codepoints.cache_clear()
    tiny_data.emoji_classes.cache_clear()
    tiny.atlas_classes.cache_clear()
    yield
    # exceptions are not cached; clear anyway so later tests re-read the real font
    tiny_data._font_codepoints.cache_clear()
    tiny_data.emoji_classes.cache_clear()


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def test_classes_start_with_the_45_animals_and_prompts_are_unique():
    prompts = tiny.class_prompts()
    assert len(tiny.ANIMALS) == 45
    assert prompts[:45] == tiny.ANIMAL_PROMPTS  # the paper's 45 prompts, in its order, first
    assert len(prompts) == 45 + tiny_data.NUM_OTHER_CLASSES
    assert len(set(prompts)) == len(prompts)  # one prompt per class: a caption names one class
    assert tiny.ANIMAL_PROMPTS[:3] == ["a cat", "a dog", "a horse"]
    assert "an ant" in tiny.ANIMAL_PROMPTS  # "a(n) [animal]"
    assert set(tiny.generalisation_prompts()).isdisjoint(tiny.ANIMAL_PROMPTS)


def test_animal_prompts_come_from_the_prompt_file_with_articles():
    text = (ROOT / "assets" / "prompts" / "simple_animals.txt").read_text()
    assert tiny.ANIMAL_PROMPTS == [line for line in text.splitlines() if line.strip()]
    assert tiny.ANIMALS[:3] == ["cat", "dog", "horse"] and tiny.ANIMALS[20] == "ant"
    assert tiny.ANIMAL_PROMPTS == [tiny_data.prompt_for(a) for a in tiny.ANIMALS]
    cases = {"owl": "an owl", "Owl": "an Owl", "cat": "a cat", "unicorn": "a unicorn",
             "Unicorn": "a Unicorn", "Eucalyptus": "a Eucalyptus", "Apple": "an Apple",
             "one-horned ram": "a one-horned ram", "user": "a user"}
    assert {k: tiny_data.prompt_for(k) for k in cases} == cases


def test_sprites_shape_range_and_every_class_present():
    sprites, labels = tiny_data.load_sprites()
    n = len(tiny.class_prompts())
    side = tiny_data.SPRITE
    assert sprites.dtype == torch.float32 and sprites.shape[1:] == (4, side, side)
    assert sprites.is_contiguous()
    assert labels.dtype == torch.int64 and labels.shape == (len(sprites),)
    assert sprites.min() >= 0 and sprites.max() <= 1
    assert torch.equal((sprites * 255).round() / 255, sprites)  # whole uint8 levels
    rgb, alpha = sprites[:, :3], sprites[:, 3:]
    # premultiplied alpha: colour never exceeds coverage (up to Lanczos ringing at the edges,
    # < 15/255)
    assert (rgb <= alpha + 15 / 255).all()
    assert (rgb[alpha.expand_as(rgb) == 0] < 15 / 255).all()
    assert (alpha.flatten(1).amax(1) > 0.99).all()  # every sprite draws something opaque
    # every class has a sprite, all 45 animals included
    assert torch.equal(labels.unique(), torch.arange(n))
    assert torch.equal(labels, labels.sort().values)  # sprites are in class order
    assert len(sprites) == sum(len(cps) for _, cps in tiny.atlas_classes())


def test_atlas_files_describe_themselves():
    from PIL import Image

    meta = json.loads(tiny.ATLAS_JSON.read_text())
    assert meta["sprite"] == tiny_data.SPRITE and meta["columns"] == tiny_data.ATLAS_COLUMNS
    assert meta["sprites"] == sum(len(cps) for _, cps in meta["classes"])
    assert "premultiplied" in meta["note"] and meta["font"] == "NotoColorEmoji.ttf"
    assert meta["pillow"] and meta["font_version"]
    assert [[c, list(cps)] for c, cps in tiny.atlas_classes()] == meta["classes"]
    rows = -(-meta["sprites"] // meta["columns"])
    with Image.open(tiny.ATLAS_PNG) as im:
        assert im.mode == "RGBA"
        assert im.size == (meta["columns"] * meta["sprite"], rows * meta["sprite"])
    licence = (ROOT / "assets" / "LICENSE-emoji.md").read_text()
    assert "Apache License" in licence and "https://www.apache.org/licenses/LICENSE-2.0" in licence


@needs_font
def test_atlas_equals_fresh_renders_from_the_font_bit_for_bit():
    """The shipped atlas is exactly what the font renders today: the class list and every pixel.

    So the shipped model's data distribution is the one it was trained on, and `python -m
    tools.tiny_data atlas` is deterministic.
    """
    pytest.importorskip("fontTools", reason="re-rendering the atlas needs fontTools")
    assert tiny_data.emoji_classes() == tiny.atlas_classes()
    sprites, labels = tiny_data.load_sprites()
    cps = [cp for _, c in tiny_data.emoji_classes() for cp in c]
    assert len(cps) == len(sprites)
    for i, cp in enumerate(cps):
        render = tiny_data._render_sprite(cp)
        assert render.shape == (tiny_data.SPRITE, tiny_data.SPRITE, 4)
        assert torch.equal(torch.from_numpy(render).permute(2, 0, 1), sprites[i]), f"U+{cp:04X}"
    again = tiny_data._render_sprite(cps[0])
    assert (again == tiny_data._render_sprite(cps[0])).all()


def test_renders_same_seed_identical_different_seed_different():
    prompts = tiny.ANIMAL_PROMPTS[:6]
    a = tiny_data.render_prompt_images(prompts, seed=3)
    b = tiny_data.render_prompt_images(prompts, seed=3)
    c = tiny_data.render_prompt_images(prompts, seed=4)
    assert a.shape == (6, 3, tiny.IMAGE, tiny.IMAGE) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and (a - c).abs().mean() > 0.05
    sprites, labels = tiny_data.load_sprites()
    x, y = tiny_data.sample_batch(sprites, labels, 8, torch.Generator().manual_seed(0))
    x2, y2 = tiny_data.sample_batch(sprites, labels, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="not a tiny-world class prompt"):
        tiny_data.render_prompt_images(["a unicorn riding a bike"])


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
                               model.encode_prompts([""]), num_steps=5,
                               guidance_scale=tiny.GUIDANCE, eta=1.0,
                               latent_shape=model.latent_shape,
                               generator=torch.Generator().manual_seed(0))
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
    # a seed neither training nor the card used
    acc = tiny_train.captioner_accuracy(captioner, n=300, seed=2718)
    assert acc >= tiny_report.BAR_CAPTIONER, f"captioner top-1 {acc:.3f} on 300 fresh renders"
    card = json.loads(tiny.CAPTIONER_WEIGHTS.with_suffix(".json").read_text())
    assert card["held_out_accuracy"] >= tiny_report.BAR_CAPTIONER
    captions = captioner.caption(tiny_data.render_prompt_images(["a cat", "a whale"], seed=5))
    assert all(c in tiny.class_prompts() for c in captions)


# ----------------------------------------------------------------------------------------------
# Report helpers (cheap parts), clear errors, and what needs the font
# ----------------------------------------------------------------------------------------------


def test_recognition_rates_and_grid():
    class Fixed:  # a captioner that always answers "a cat"
        def caption(self, images):
            return ["a cat"] * len(images)

    prompts = ["a cat", "a cat", "a dog", "a dog"]
    rates = tiny_report.recognition_rates(Fixed(), torch.zeros(4, 3, 32, 32), prompts)
    assert rates == {"a cat": 1.0, "a dog": 0.0}
    labels = ["a cat", "a table tennis paddle and ball", "a b", "a c", "a d"]
    grid = tiny_report.labelled_grid(torch.rand(5, 3, 32, 32), labels, cols=3, scale=3)
    assert grid.width == 3 * (96 + 4) + 4 and grid.height > 2 * (96 + 4)


def test_missing_weights_raise_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(tiny, "UNET_WEIGHTS", tmp_path / "tiny_unet.safetensors")
    monkeypatch.setattr(tiny, "CAPTIONER_WEIGHTS", tmp_path / "tiny_captioner.safetensors")
    with pytest.raises(FileNotFoundError, match=r"python -m tools\.tiny_train pretrain"):
        tiny.load_tiny()
    with pytest.raises(FileNotFoundError, match=r"python -m tools\.tiny_train captioner"):
        tiny.load_captioner()
    with pytest.raises(SystemExit, match=r"error: tiny model weights not found"):
        tiny_report.main(["--out", str(tmp_path)])  # a one-line message, before any sampling
    assert not (tmp_path / "tiny_report.json").exists()


def test_regenerating_the_atlas_without_the_font_is_one_clear_error(no_font, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install fonts-noto-color-emoji") as err:
        tiny_data.write_atlas(tmp_path)
    assert "\n" not in str(err.value) and str(tiny_data.FONT_PATH) in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"apt-get install fonts-noto-color-emoji"):
        tiny_data.emoji_classes()
    with pytest.raises(SystemExit, match=r"^error: emoji font not found"):
        tiny_data.main(["atlas", "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_everything_but_the_atlas_works_without_the_font(no_font, monkeypatch):
    def no_rendering(cp):
        raise AssertionError("only `python -m tools.tiny_data atlas` may render from the font")

    monkeypatch.setattr(tiny_data, "_render_sprite", no_rendering)
    assert len(tiny.class_prompts()) == 45 + tiny_data.NUM_OTHER_CLASSES
    sprites, labels = tiny_data.load_sprites()
    assert sprites.shape == (len(labels), 4, tiny_data.SPRITE, tiny_data.SPRITE)
    images = tiny_data.render_prompt_images(tiny.ANIMAL_PROMPTS[:3], seed=0)
    assert images.shape == (3, 3, tiny.IMAGE, tiny.IMAGE)
    captions = tiny.load_captioner().caption(images)
    assert len(captions) == 3 and all(c in tiny.class_prompts() for c in captions)


def test_tiny_imports_no_other_module_of_this_repo_but_sampler():
    tree = ast.parse((ROOT / "tiny.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    ours = {p.stem for p in ROOT.glob("*.py")} | {"tools", "tests", "notebooks"}
    assert "torch" in imported  # the walk sees imports
    assert imported & ours == {"sampler"}


def test_a_pretraining_stage_resumes_only_with_its_own_settings(tmp_path):
    """A stage's folder holds its settings: resuming it with others would splice two schedules
    (and the default destination is never the shipped weights)."""
    assert not tiny_train.PretrainConfig().out.startswith(str(tiny_train.ASSETS))
    cfg = tiny_train.PretrainConfig(steps=1, batch_size=2, warmup=1, ckpt_every=1,
                                    dir=str(tmp_path / "stage"),
                                    out=str(tmp_path / "w.safetensors"))
    tiny_train.pretrain(cfg)
    assert (tmp_path / "w.safetensors").is_file() and (tmp_path / "w.json").is_file()
    tiny_train.pretrain(cfg)  # the same settings: resumes (at its last step: nothing to do)
    with pytest.raises(SystemExit, match=r"other settings \(--lr 0.001 there, 0.0005 here\)"):
        tiny_train.pretrain(dataclasses.replace(cfg, lr=5e-4))
