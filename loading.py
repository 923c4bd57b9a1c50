"""Loading what a run trains on: prompt sets, the model (tiny or Stable Diffusion with LoRA), and
exporting the trained weights.

Everything downstream of `load_model` sees a `sampler.TextToImage` and never branches on scale.
"""

from __future__ import annotations

import copy
import re
import socket
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

import tiny
from config import PROMPT_SETS, Config, ConfigError
from sampler import TextToImage

PROMPTS_DIR = Path(__file__).resolve().parent / "assets" / "prompts"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}  # --mixed-precision


def resolve_device(name: str) -> torch.device:
    """--device as a torch.device: cuda when there is one and none was asked for, else cpu."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "is a CPU build" if torch.version.cuda is None else "sees no GPU"
        raise ConfigError(f"--device {name}: CUDA is not available (this torch {why}); use "
                          "--device cpu, or leave --device out to take cuda when there is one")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                          "CUDA device(s)")
    if device.type == "mps":
        raise ConfigError("--device mps: Apple's GPU backend is not supported (no test covers "
                          "it); use --device cpu, which trains the tiny model in minutes")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: only cpu and cuda are supported")
    return device


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT's host) accepts a connection within `timeout`
    seconds: one probe, instead of the hub client's retries (about 50 s without a network)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    answered: list[bool] = []

    def probe():  # in a thread: the name lookup itself can hang longer than a socket timeout
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def check_model_source(name: str, device: torch.device | None = None,
                       sd_on_cpu: bool = False) -> None:
    """Fail at once, before any reward model loads, on a --model that cannot be a pipeline; on a
    hub model that would have to download from an unreachable hub; and on a hub model (Stable
    Diffusion) on a CPU, unless asked (--sd-on-cpu true)."""
    if name == "tiny":
        return
    path = Path(name).expanduser()
    fix = ("pass a folder saved with StableDiffusionPipeline.save_pretrained, a hub id such as "
           "CompVis/stable-diffusion-v1-4, or --model tiny")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"--model {name}: the folder has no model_index.json; {fix}")
        return
    hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and "\\" not in name
    if not hub_id or path.exists():
        raise ConfigError(f"--model {name}: no such folder; {fix}")
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "model_index.json"), str)
    if constants.HF_HUB_OFFLINE and not cached:
        raise ConfigError(f"--model {name}: not in the local Hugging Face cache and the hub is "
                          f"offline (HF_HUB_OFFLINE=1); {fix}")
    if not cached and not hub_reachable():
        raise ConfigError(f"--model {name}: not in the local Hugging Face cache and the hub "
                          f"({constants.ENDPOINT}) cannot be reached from here; connect once to "
                          f"download it (several GB), or {fix}")
    if device is not None and device.type == "cpu" and not sd_on_cpu:
        raise ConfigError(f"--model {name} on a CPU: " + ("" if cached else "a download of "
                          "several GB, then ") + "hours per epoch (no GPU here); use --model tiny "
                          "for a CPU run in minutes, or pass --sd-on-cpu true to go on")


def load_prompts(name: str) -> list[str]:
    """A prompt set of the paper (assets/prompts/<name>.txt), or one prompt per line of a file."""
    path = PROMPTS_DIR / f"{name}.txt" if name in PROMPT_SETS else Path(name)
    if not path.is_file():
        raise ConfigError(f"--prompts {name!r} is neither one of {', '.join(PROMPT_SETS)} nor a "
                          "text file")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
    except UnicodeDecodeError:
        raise ConfigError(f"--prompts file {name} is not UTF-8 text: save it as UTF-8") from None
    if not prompts:
        raise ConfigError(f"--prompts file {name} has no prompts (one per line)")
    return prompts


def load_model(cfg: Config, device: torch.device) -> TextToImage:
    """The tiny model, or Stable Diffusion (hub id / local folder) with LoRA or full fine-tuning."""
    if cfg.model != "tiny":
        return load_stable_diffusion(cfg, device)
    try:
        model = tiny.load_tiny(device)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    if cfg.lora_rank > 0:
        model.unet.to(DTYPES[cfg.mixed_precision])  # the frozen base, as for Stable Diffusion
        add_lora(model.unet, cfg.lora_rank, cfg.trainable, cfg.seed)
    else:
        full_fine_tuning(model.unet, cfg.trainable)  # in fp32 at tiny scale
    no_active_dropout(model.unet)
    return model


def no_active_dropout(unet: torch.nn.Module) -> None:
    """DDPO_IS's ratio is 1 at theta = theta_old only if rescoring (the UNet in train mode)
    repeats sampling's forward pass (eval mode) exactly: a UNet or LoRA with dropout > 0 would
    put every ratio past the clip range before any update. Refused at load, in one line."""
    active = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if active:
        raise ConfigError(f"the UNet has active dropout ({len(active)} module(s), e.g. "
                          f"{active[0]}): sampling and rescoring would differ, so the importance "
                          "ratio would not be 1 before an update; save the model with dropout 0")


# The UNet's attention blocks come in pairs: attn1 is self-attention (pixels attend to pixels),
# attn2 is cross-attention (pixels attend to the prompt's tokens). attn2 is the only place the
# prompt enters the UNet, so `--trainable cross_attention` trains the weights that map text to
# image.
CROSS_ATTENTION = ".attn2."
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections (paper: LoRA here)


def full_fine_tuning(unet: torch.nn.Module, trainable: str = "all") -> None:
    """Train the UNet's own weights (kept in float32): all of them, or only the cross-attention."""
    unet.float()
    for name, p in unet.named_parameters():
        p.requires_grad_(trainable == "all" or CROSS_ATTENTION in name)


def add_lora(unet: torch.nn.Module, rank: int, trainable: str = "all", seed: int = 0) -> None:
    """LoRA (peft) on the attention projections to_q, to_k, to_v, to_out.0; only LoRA weights train.

    trainable="cross_attention" puts LoRA on the cross-attention (attn2) projections only.
    LoRA weights stay in float32 even when the base UNet is fp16/bf16 (autocast mixes them).
    The random A matrices are drawn from `seed` (peft draws from torch's global generator, which
    is left as it was), so --seed sets them and every process draws the same.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    targets: list[str] | str = LORA_TARGETS
    if trainable == "cross_attention":  # a string: a regex peft matches against whole module names
        targets = f".*{re.escape(CROSS_ATTENTION)}({'|'.join(map(re.escape, LORA_TARGETS))})"
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                        target_modules=targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def load_stable_diffusion(cfg: Config, device: torch.device) -> TextToImage:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = DTYPES[cfg.mixed_precision]  # of the frozen weights
    try:
        # with LoRA every part stays frozen in `dtype`: loaded so, not in fp32 first (5 GB of host
        # memory per process); full fine-tuning keeps the UNet's fp32 weights
        with warnings.catch_warnings():  # diffusers >= 0.42 renames torch_dtype; older ones lack
            warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)  # dtype
            pipe = StableDiffusionPipeline.from_pretrained(
                cfg.model, safety_checker=None, requires_safety_checker=False,
                torch_dtype=dtype if cfg.lora_rank > 0 else None)
    except (OSError, ValueError) as err:
        hub = "" if Path(cfg.model).is_dir() else " The Hugging Face hub is unreachable or offline."
        raise ConfigError(
            f"cannot load Stable Diffusion from {cfg.model!r} ({type(err).__name__}).{hub} Pass "
            "--model with a local folder holding a saved StableDiffusionPipeline, or use --model "
            "tiny (no download)."
        ) from None
    # the paper's sampler (eta = 1); x̂_0 is never clipped nor thresholded in latent space
    # (DDIMScheduler's own default clips, and a saved pipeline whose config lacks the key would
    # inherit it; dynamic thresholding is for pixel-space models, and the step's density has none)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False,
                                          thresholding=False)
    vae, text_encoder, tokenizer, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    def place(module):  # (a dtype given to diffusers' .to() warns, even when it changes nothing)
        return module.to(device) if module.dtype == dtype else module.to(device, dtype)

    for module in (vae, text_encoder):
        place(module.requires_grad_(False)).eval()
    if cfg.lora_rank > 0:
        place(unet)
        add_lora(unet, cfg.lora_rank, cfg.trainable, cfg.seed)
    else:
        unet.to(device)
        full_fine_tuning(unet, cfg.trainable)  # full fine-tuning stays in fp32

    @torch.no_grad()
    def encode_prompts(prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        return text_encoder(ids)[0]  # (B, 77, 768)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        scaled = latents.to(dtype) / vae.config.scaling_factor
        images = vae.decode(scaled).sample  # (B, 3, 512, 512) in [-1, 1]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    no_active_dropout(unet)
    size = unet.config.sample_size
    return TextToImage(unet=unet, scheduler=scheduler, encode_prompts=encode_prompts,
                       decode=decode, latent_shape=(unet.config.in_channels, size, size),
                       name=cfg.model)


def frozen_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the UNet as loaded: the pretrained policy when every weight trains."""
    return copy.deepcopy(unet).requires_grad_(False).eval()


@contextmanager
def pretrained_unet(unet: torch.nn.Module, reference: torch.nn.Module | None):
    """The pretrained policy's UNet for a `with` block: the frozen copy (full fine-tuning), or
    the trained UNet with its LoRA adapters switched off, then on again."""
    if reference is not None:
        yield reference
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def trainable_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.named_parameters() if v.requires_grad}


def save_weights(model: TextToImage, cfg: Config, folder: Path) -> None:
    """LoRA in the format `StableDiffusionPipeline.load_lora_weights` reads; else the full UNet."""
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.lora_rank > 0:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(model.unet))
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=lora,
                                                  safe_serialization=True)
    else:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in model.unet.state_dict().items()}
        save_file(state, str(folder / "unet.safetensors"))
