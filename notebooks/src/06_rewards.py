# ruff: noqa: E402, E501
# (a notebook source: imports follow the setup cell; markdown tables and LaTeX lines do not wrap)
# %% [markdown]
# # 6. The rewards
#
# DDPO only ever sees a number per image, so everything it learns is shaped by how that number is
# computed. This notebook opens the three reward families of the paper, using the functions in
# `rewards.py`:
#
# 1. **JPEG (in)compressibility**: file size of the image saved as JPEG at quality 95, in kB.
# 2. **Aesthetic score**: the LAION predictor, a small head on CLIP ViT-L/14 image embeddings. We load the
#    real head, show that it is a single affine map, and show the preprocessing pitfall (floats rescaled
#    twice) that the project's `clip_preprocess` avoids.
# 3. **Prompt alignment**: a captioner describes the image, and BERTScore recall compares the description
#    with "The image contains {prompt}". We compute BERTScore token by token.

# %%
SCALE = "tiny"  # "tiny": CPU, offline, ~30 s. "paper": SD v1.4 samples, CLIP ViT-L/14 and a VLM from the
#                 Hugging Face hub, on a GPU. (The LAION head, the uint8 check and BERTScore run offline.)

# %%
import nbutils

SCALE = nbutils.use_scale(SCALE)  # DDPO_SCALE in the environment wins
import io
import math

import numpy as np
import torch
from PIL import Image

import rewards
import sampler

if SCALE == "tiny":
    import tiny
    from tools import tiny_data

    model = tiny.load_tiny()
else:
    model = nbutils.load_paper_model()  # SD v1.4 + LoRA, fp32

# %% [markdown]
# ## 6.1 JPEG size
#
# $r_\text{compress}(x_0) = -\text{size}_\text{JPEG,q95}(x_0)$ in kB (bytes / 1000) and
# $r_\text{incompress} = +\text{size}$. JPEG stores an image as 8x8 blocks of cosine-transform
# coefficients; flat regions need almost none, edges and texture need many. So compressibility rewards
# flat colours, blur and empty backgrounds, and incompressibility rewards fine noise. Neither can be
# asked for in a prompt (images are not captioned with their file size), which is why the paper uses them.
#
# **Check.** Sample a few images from the tiny model and compare `rewards.jpeg_size_kb` with encoding them
# by hand with Pillow. A flat image and a noise image of the same size bracket the range.

# %%
prompts = ["a cat", "a frog", "a whale", "a bee", "a pig", "a snake"]
embeds, negative = model.encode_prompts(prompts), model.encode_prompts([""])
traj = sampler.sample_with_logprob(model.unet, model.scheduler, embeds, negative, num_steps=20, guidance_scale=3.0,
                                   eta=1.0, latent_shape=model.latent_shape,
                                   generator=torch.Generator().manual_seed(0))
images = model.decode(traj.x0)  # (B, 3, H, W) float in [0, 1]
side = images.shape[-1]
flat = torch.full((1, 3, side, side), 0.5)
noise = torch.rand((1, 3, side, side), generator=torch.Generator().manual_seed(0))
batch = torch.cat([images, flat, noise])  # (B + 2, 3, H, W)
names = prompts + ["flat grey", "uniform noise"]

sizes = rewards.jpeg_size_kb(batch)  # kB, (B + 2,)
by_hand = []
for img in rewards.to_uint8_images(batch):  # (H, W, 3) uint8: the image you would save
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    by_hand.append(len(buf.getvalue()) / 1000)
comp, _ = rewards.jpeg_compressibility(batch, names)
nbutils.show_images(batch, [f"{n}\n{s:.2f} kB" for n, s in zip(names, sizes)], ncols=len(names))
nbutils.check(np.allclose(sizes, by_hand) and np.allclose(comp, -sizes),
              "jpeg_size_kb == Pillow JPEG bytes / 1000 at quality 95, and compressibility == -size")

# %% [markdown]
# The code of the derivation above, as it runs in the repository:

# %%
nbutils.show_source(rewards.jpeg_size_kb)

# %% [markdown]
# ## 6.2 The LAION aesthetic predictor is linear
#
# The predictor maps an L2-normalised CLIP ViT-L/14 image embedding $e\in\mathbb R^{768}$ through an
# MLP 768 → 1024 → 128 → 64 → 16 → 1 with dropout between the first layers. The released file
# (`sac+logos+ava1-l14-linearMSE.pth`, committed as `assets/aesthetic_head.pth`) has **no activation
# functions**: in eval mode (dropout off) the composition of affine maps is one affine map,
#
# $$f(e) = W_5W_4W_3W_2W_1\,e + (\text{a constant}) = w^\top e + b,\qquad w\in\mathbb R^{768}.$$
#
# Its 930k parameters express a linear score on CLIP space: a direction $w$ that means "aesthetic".
#
# **Check.** Load the real head, list its layers, collapse it into $(w, b)$, and compare on random unit
# embeddings.

# %%
head = rewards.load_aesthetic_head()  # strict load of the LAION weights, eval mode
print(head)
kinds = [type(m).__name__ for m in head.layers]
print("layer types:", kinds)
print("parameters:", sum(p.numel() for p in head.parameters()))

w_eff, b_eff = torch.eye(768, dtype=torch.float64), torch.zeros(768, dtype=torch.float64)  # identity affine map
for layer in head.layers:
    if isinstance(layer, torch.nn.Linear):
        W, b = layer.weight.double(), layer.bias.double()
        w_eff, b_eff = W @ w_eff, W @ b_eff + b  # compose: x -> W (w_eff x + b_eff) + b
print("collapsed to w:", tuple(w_eff.shape), "b:", tuple(b_eff.shape))

e = torch.nn.functional.normalize(torch.randn(16, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
with torch.no_grad():
    scores = head(e).double()
collapsed = (e.double() @ w_eff.T + b_eff).squeeze(-1)
print("head(e)     :", scores[:4].numpy().round(5))
print("w^T e + b   :", collapsed[:4].numpy().round(5))
nbutils.check(all(k in ("Linear", "Dropout") for k in kinds) and torch.allclose(scores, collapsed, atol=1e-5),
              "the LAION head has no activations and equals one affine map w^T e + b")

# %% [markdown]
# The code of the derivation above, as it runs in the repository:

# %%
nbutils.show_source(rewards.AestheticReward.__call__)

# %% [markdown]
# ## 6.3 The uint8 pitfall: rescaling twice
#
# CLIP expects pixels in $[0,1]$, normalised per channel: $(x - \text{mean})/\text{std}$. Hugging Face's
# `CLIPImageProcessor` gets there from **uint8** images by multiplying by $1/255$ (`do_rescale`), and it
# does so whatever the input dtype. A VAE decode or the tiny model returns **floats already in
# $[0,1]$**; handed to the processor they are divided by 255 a second time, land in $[0, 1/255]$, and CLIP
# sees an almost black image: every normalised pixel sits within $(1/255)/\text{std}\approx 0.015$ of
# $-\text{mean}/\text{std}$. The score then barely depends on the image. This is a generic pitfall of
# any pipeline that hands decoded floats to a CLIP processor. It is *not* what bent the paper's own
# aesthetic curve: the first author traced that to JAX and PyTorch CLIP giving different embeddings for
# pixel-identical images (kvablack/ddpo-pytorch, issue 3), which rules preprocessing out.
#
# The project avoids it by construction: every reward first converts its input to the uint8 image you
# would save (`to_uint8_images`), and `clip_preprocess` divides by 255 exactly once.
#
# **Check.** On the tiny samples (upsampled to 224 like any image), compare (a) the processor on uint8,
# (b) `clip_preprocess` on uint8 and on floats, (c) the processor on floats.

# %%
try:  # transformers >= 5: the PIL-based processor (the default one in earlier versions)
    from transformers.models.clip.image_processing_pil_clip import (
        CLIPImageProcessorPil as CLIPProcessorClass,
    )
except ImportError:
    from transformers import CLIPImageProcessor as CLIPProcessorClass
processor = CLIPProcessorClass()  # OpenAI CLIP defaults; nothing is downloaded

u8 = rewards.to_uint8_images(images)  # (B, H, W, 3) uint8
right = processor(images=list(u8), return_tensors="pt")["pixel_values"]  # uint8 in: one rescale
ours_u8, ours_float = rewards.clip_preprocess(u8), rewards.clip_preprocess(images)
wrong = processor(images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]
black = (-torch.tensor(rewards.CLIP_MEAN) / torch.tensor(rewards.CLIP_STD)).view(1, 3, 1, 1)
for name, px in (("processor(uint8)", right), ("clip_preprocess(uint8)", ours_u8),
                 ("clip_preprocess(float)", ours_float), ("processor(float) [bug]", wrong)):
    print(f"{name:24s} range [{px.min():+.3f}, {px.max():+.3f}]   pixel std {px.std():.4f}   "
          f"max distance from black {(px - black).abs().max():.4f}")
nbutils.check(torch.allclose(ours_u8, right, atol=1e-5) and torch.equal(ours_u8, ours_float)
              and (wrong - black).abs().max() < 1 / 255 / min(rewards.CLIP_STD) + 1e-4,
              "clip_preprocess == processor on uint8, floats give the same pixels, processor on floats ≈ black")

# %% [markdown]
# What that does to a score: with a randomly initialised small CLIP (the real ViT-L/14 needs the hub) and
# the real LAION head, the spread of scores across our six images, through the correct path and through
# the double rescale.

# %%
from transformers import CLIPConfig, CLIPModel

config = CLIPConfig(
    text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                     vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
    vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       image_size=224, patch_size=32),
    projection_dim=768,
)
torch.manual_seed(0)
small_clip = CLIPModel(config).eval()
if SCALE == "paper":
    small_clip = rewards.load_clip_image_tower(nbutils.PAPER_CLIP)  # the real ViT-L/14 (hub)
aesthetic = rewards.AestheticReward(small_clip, head)
good, _ = aesthetic(images, prompts)  # correct: uint8 path inside
with torch.no_grad():
    e_bad = small_clip.visual_projection(small_clip.vision_model(pixel_values=wrong).pooler_output)
    bad = head(torch.nn.functional.normalize(e_bad, dim=-1)).numpy()
print("scores, correct preprocessing :", good.round(3), f"  spread {np.ptp(good):.3f}")
print("scores, double rescale        :", bad.round(3), f"  spread {np.ptp(bad):.3f}")
nbutils.check(np.ptp(good) > 10 * np.ptp(bad), "with floats rescaled twice the score no longer depends on the image")

# %% [markdown]
# ## 6.4 Alignment: a caption and BERTScore recall
#
# The paper asks LLaVA "*Answer concisely: what is going on in this image?*" and scores the answer
# against the reference "*The image contains {prompt}*" with BERTScore. At tiny scale the "VLM" is a small
# CNN trained to name the emoji (`tiny.load_captioner()`), and BERTScore runs on MiniLM-L6, offline.
#
# BERTScore embeds both sentences with a transformer, keeps one contextual vector per token, L2-normalises
# them, and matches tokens greedily by cosine similarity. With candidate tokens $x_i$ (the caption) and
# reference tokens $y_j$, the sums running over the word pieces:
#
# $$R = \frac1{|y|}\sum_j \max_i\ x_i^\top y_j,\qquad P = \frac1{|x|}\sum_i \max_j\ x_i^\top y_j,\qquad
#   F = \frac{2PR}{P+R}.$$
#
# The reward is **recall**: every word of the reference should be matched by something in the caption;
# extra words in the caption cost nothing. One detail follows the `bert_score` package, which the authors'
# reward server ran: the special tokens `[CLS]` and `[SEP]` carry no weight in the sums, but they may
# still be the best match $\max_i$ of a word (`rewards.BERTScorer` is tested equal to the package).
#
# (Letters: Zhang et al.'s BERTScore paper writes the reference as $x$ and the candidate as $\hat x$. Here
# the candidate is $x$ and the reference $y$, so their $x$ is our $y$ and their $\hat x$ our $x$; the
# recall above is their $R_\text{BERT}$, the mean over reference tokens of the best candidate match.)

# %%
if SCALE == "tiny":
    describer = rewards.TinyCaptionerDescriber(tiny.load_captioner())
else:
    describer = rewards.load_vlm(nbutils.PAPER_VLM, device=nbutils.paper_device())
scorer = rewards.load_bertscore(rewards.MINILM)  # offline MiniLM-L6, layer 6

if SCALE == "tiny":
    examples = tiny_data.render_prompt_images(["a cat", "a frog"], seed=7)  # clean renders: the captioner's home turf
else:
    examples = images[:2]
caption = describer.describe(rewards.to_uint8_images(examples), rewards.ALIGNMENT_QUESTION)
print("captions:", caption)
nbutils.show_images(examples, [f"caption: {c}" for c in caption], ncols=2, size=1.6)

# %%
candidate, prompt = caption[0], "a cat"
reference = rewards.ALIGNMENT_REFERENCE.format(prompt=prompt)
(cand_emb, cand_words, _), (ref_emb, ref_words, _) = scorer.embed([candidate]), scorer.embed([reference])
tok = scorer.tokenizer
cand_tokens = tok.convert_ids_to_tokens(tok(candidate)["input_ids"])  # [CLS] ... [SEP], no padding
ref_tokens = tok.convert_ids_to_tokens(tok(reference)["input_ids"])
x = torch.nn.functional.normalize(cand_emb[0], dim=-1)  # (Lc, D) every candidate token
y = torch.nn.functional.normalize(ref_emb[0], dim=-1)  # (Lr, D) every reference token
sim = x @ y.T  # (Lc, Lr) cosine similarities
cand_words, ref_words = cand_words[0], ref_words[0]  # (Lc,), (Lr,) True for word pieces

print(f"candidate: {candidate!r}   reference: {reference!r}\n")
print(" " * 10 + "".join(f"{t:>10s}" for t in ref_tokens))
for t, row in zip(cand_tokens, sim):
    print(f"{t:>10s}" + "".join(f"{v:10.3f}" for v in row.tolist()))
print(" " * 10 + "".join(f"{v:10.3f}" for v in sim.max(0).values.tolist()), "  <- best match per reference token")

recall_hand = sim.max(dim=0).values[ref_words].mean().item()  # mean over reference words of the best match
precision_hand = sim.max(dim=1).values[cand_words].mean().item()
f1_hand = 2 * precision_hand * recall_hand / (precision_hand + recall_hand)
s = scorer.score([candidate], [reference])
print(f"\nrecall    by hand {recall_hand:.5f}   scorer {s['recall'][0]:.5f}")
print(f"precision by hand {precision_hand:.5f}   scorer {s['precision'][0]:.5f}")
print(f"F1        by hand {f1_hand:.5f}   scorer {s['f1'][0]:.5f}")
nbutils.check(math.isclose(recall_hand, s["recall"][0], abs_tol=1e-5)
              and math.isclose(precision_hand, s["precision"][0], abs_tol=1e-5),
              "BERTScore recall and precision by hand == rewards.BERTScorer.score")

# %% [markdown]
# Reference words like "the", "image", "contains" have no counterpart in a two-word caption and pull
# recall down by roughly the same amount for every image (not exactly: the embeddings are contextual, so
# each word's best match depends on the whole sentence), so what separates a good image from a bad one is
# mostly how well the animal word is matched. The full reward, `make_reward("alignment", scale="tiny")`, runs the same
# steps for a batch; with the right and a wrong prompt:

# %%
if SCALE == "tiny":
    alignment = rewards.make_reward("alignment", scale="tiny")
    r_right, extras = alignment(examples, ["a cat", "a frog"])
    r_wrong, _ = alignment(examples, ["a frog", "a cat"])
    for i in range(2):
        print(f"caption {extras['captions'][i]!r}: reward vs its own prompt {r_right[i]:.3f}, "
              f"vs the other prompt {r_wrong[i]:.3f}")
