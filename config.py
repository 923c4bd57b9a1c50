"""The run's configuration: one typed dataclass, its tiny-scale defaults, its checks and its CLI.

Every field reads default first, then its help as the docstring under it, and, where it has a
fixed set of values, its choices; the command line of `python ddpo_min.py` is generated from it
(help text included, read from this file's source by `field_help`), so argparse rejects a bad
choice by itself.
Defaults are the paper's single-GPU setting (Stable Diffusion v1.4 + LoRA, arXiv 2305.13301, Sec. 6
and Appendix); `--model tiny` switches to TINY_DEFAULTS below, for a laptop CPU. A flag given
explicitly wins over both.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from rewards import REWARDS
from tiny import GUIDANCE as TINY_GUIDANCE

ALGOS = ("ddpo_is", "ddpo_sf", "rwr", "rwr_sparse")
TRAINABLE = ("all", "cross_attention")
PROMPT_SETS = ("simple_animals", "imagenet_animals", "animals_activities")
PRECISIONS = ("fp16", "bf16", "no")
LOGGERS = ("none", "tensorboard", "wandb")
REWARD_OPTIONS = {"aesthetic": ("clip_model",), "alignment": ("vlm", "bertscore_model")}


class ConfigError(ValueError):
    """Bad input from the user: printed as one line by the CLI."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or reward: the run stops, keeping its last good checkpoint."""


def arg(default, choices: tuple[str, ...] | None = None, need: str = ""):
    """A field: its default, and either its choices or a range `need` ("> 0", ">= 1", ...). Its
    help is the docstring under it (read by `field_help`)."""
    return field(default=default, metadata={"choices": choices, "need": need})


_NEED = {  # the ranges a field may declare, as predicates
    "> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1,
    "in [0, 1)": lambda v: 0 <= v < 1, "in (0, 1]": lambda v: 0 < v <= 1,
    "in [0, 100]": lambda v: 0 <= v <= 100,
}


@dataclass
class Config:
    # what to optimise
    reward: str = arg("aesthetic", choices=tuple(REWARDS))
    """what to maximise"""
    algo: str = arg("ddpo_is", choices=ALGOS)
    """ddpo_is (PPO-clipped, the paper's best) | ddpo_sf (REINFORCE) | rwr | rwr_sparse"""
    model: str = arg("CompVis/stable-diffusion-v1-4")
    """hub id or local folder of a Stable Diffusion pipeline, or `tiny`"""
    prompts: str = arg("simple_animals")
    """simple_animals (45) | imagenet_animals (398) | animals_activities (45 x 3) | a .txt path,
    one prompt per line"""
    clip_model: str = arg("")
    """aesthetic: CLIP ViT-L/14 hub id or local folder (default openai/clip-vit-large-patch14)"""
    vlm: str = arg("")
    """alignment: VLM hub id or folder (default Qwen/Qwen2-VL-2B-Instruct; closest to the paper's
    LLaVA: llava-hf/llava-1.5-7b-hf)"""
    bertscore_model: str = arg("")
    """alignment: BERTScore model, hub id, folder or `minilm` (offline)"""
    # sampling
    num_steps: int = arg(50, need=">= 1")
    """DDIM denoising steps T"""
    eta: float = arg(1.0)
    """DDIM noise scale, in (0, 1]: 0 would be deterministic, with no policy to improve"""
    guidance_scale: float = arg(5.0, need=">= 0")
    """classifier-free guidance weight w (negative prompt: empty)"""
    sample_batch_size: int = arg(8, need=">= 1")
    """images per sampling forward pass, on each process"""
    sample_batches: int = arg(32, need=">= 1")
    """sampling batches per epoch over all processes: samples/epoch = this x sample_batch_size,
    and each of N processes samples sample_batches / N of them"""
    samples_per_prompt: int = arg(1, need=">= 1")
    """images per drawn prompt in a sampling batch; 1 = every image draws its own prompt (the
    paper)"""
    # training
    train_batch_size: int = arg(2, need=">= 1")
    """at most this many samples per training forward pass, on each process (gradients accumulate
    over them)"""
    minibatches: int = arg(2, need=">= 1")
    """optimizer steps per pass over the epoch's samples, each on samples/epoch / minibatches
    samples over all processes (ddpo_sf: always 1)"""
    inner_epochs: int = arg(1, need=">= 1")
    """passes over each epoch's samples"""
    timestep_fraction: float = arg(1.0, need="in (0, 1]")
    """fraction of the T steps trained per sample (shuffled per sample)"""
    lr: float = arg(3e-4, need="> 0")
    """AdamW learning rate"""
    adam_beta1: float = arg(0.9, need="in [0, 1)")
    """AdamW beta1"""
    adam_beta2: float = arg(0.999, need="in [0, 1)")
    """AdamW beta2"""
    weight_decay: float = arg(1e-4, need=">= 0")
    """AdamW weight decay"""
    max_grad_norm: float = arg(1.0, need="> 0")
    """gradient-norm clip"""
    clip_range: float = arg(1e-4, need="> 0")
    """PPO clip range eps on the ratio (ddpo_is)"""
    adv_clip_max: float = arg(5.0, need="> 0")
    """advantages are clipped to [-this, this]"""
    per_prompt_stats: bool = arg(True)
    """normalise rewards per prompt (else over the batch)"""
    kl_coef: float = arg(0.0, need=">= 0")
    """beta: DDPO plus beta times each trained transition's KL to the pretrained policy (a KL
    leash, as DPOK; 0 = the paper's objective). One more UNet forward per transition, without
    gradient"""
    reward_blind: bool = arg(False)
    """a control for comparisons: train on N(0, 1) draws in place of the rewards, independent of
    the samples (the logged rewards stay the real ones)"""
    stat_buffer: int = arg(32, need=">= 1")
    """per-prompt reward buffer length"""
    stat_min_count: int = arg(16, need=">= 1")
    """rewards a prompt needs before its own stats are used"""
    rwr_beta: float = arg(0.2, need=">= 0")
    """RWR inverse temperature beta in exp(beta r) (r: the reward, or the advantage with
    --rwr-signal advantage)"""
    rwr_signal: str = arg("reward", choices=("reward", "advantage"))
    """what RWR weighs and sparse RWR thresholds: the raw reward (the paper) | the advantage
    (per-prompt standardised reward)"""
    rwr_percentile: float = arg(90.0, need="in [0, 100]")
    """sparse RWR keeps samples with reward >= this batch percentile"""
    lora_rank: int = arg(4, need=">= 0")
    """LoRA rank on the UNet attention projections; 0 = full fine-tuning"""
    trainable: str = arg("all", choices=TRAINABLE)
    """which UNet weights train: all (LoRA: every attention projection; full fine-tuning: every
    weight) | cross_attention (only the text-to-image attention blocks, attn2)"""
    mixed_precision: str = arg("fp16", choices=PRECISIONS)
    """fp16 | bf16: the frozen weights in half precision and the UNet under autocast, fp16 with
    loss scaling; no: fp32 (on a CPU half precision runs, slowly)"""
    # run
    epochs: int = arg(200, need=">= 0")
    """sampling+training epochs in all (under --resume the total too, not how many more; 0 there:
    the run's own number)"""
    max_minutes: float = arg(0.0, need=">= 0")
    """stop (with a checkpoint) after the epoch that passes this many minutes of this invocation
    (a resumed run counts afresh); 0 = off"""
    seed: int = arg(0, need=">= 0")
    """random seed (sampling, prompts, shuffles)"""
    output_dir: str = arg("")
    """run folder (default: runs/<reward>-<algo>-<model>-<time>)"""
    resume: str = arg("")
    """a run folder to continue exactly from its last checkpoint"""
    save_every: int = arg(1, need=">= 1")
    """checkpoint every N epochs (and always at the end)"""
    device: str = arg("")
    """cuda | cpu (default: cuda if available); with several processes each takes the GPU its
    launcher gives it"""
    sd_on_cpu: bool = arg(False)
    """run a hub model (Stable Diffusion) on a CPU anyway: a download of several GB, then hours
    per epoch"""
    threads: int = arg(0, need=">= 0")
    """CPU threads for torch; 0 = every core while the machine is idle, fewer while other
    processes keep cores busy"""
    log: str = arg("none", choices=LOGGERS)
    """besides metrics.jsonl"""
    grid_size: int = arg(16, need=">= 1")
    """images in each epoch's sample grid"""
    kl_samples: int = arg(4, need=">= 0")
    """diagnostic: the mean per-step KL to the pretrained policy, on this many of each epoch's
    trajectories (over all processes); 0 = off"""
    kl_steps: int = arg(3, need=">= 1")
    """diagnostic: stochastic steps scored per KL trajectory, evenly spaced and staggered over
    the trajectories (fewer: cheaper)"""

    @classmethod
    def paper(cls, **overrides) -> Config:
        """The paper's recipe for the reward, as the command line gives it:
        Config.paper(reward="compressibility") samples the ImageNet animals, and so on."""
        reward = overrides.get("reward", cls.reward)
        algo = overrides.get("algo", cls.algo)
        recipe = {**PAPER_REWARD_DEFAULTS[reward], **ALGO_DEFAULTS.get(algo, {})}
        return replace(cls(), **{**recipe, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> Config:
        """The tiny-scale config, as `--model tiny` gives it: Config.tiny(reward="alignment")."""
        reward = overrides.get("reward", TINY_DEFAULTS["reward"])
        algo = overrides.get("algo", cls.algo)
        recipe = {**TINY_DEFAULTS, **TINY_REWARD_DEFAULTS.get(reward, {}),
                  **ALGO_DEFAULTS.get(algo, {})}
        return replace(cls(), **{"model": "tiny", **recipe, **overrides})


# The paper's recipe per reward (arXiv 2305.13301, Sec. 6 and Appendix; the updates per epoch and
# reward buffers are those of the authors' public PyTorch code, ddpo-pytorch's config/dgx.py).
# The dataclass defaults above are aesthetic's.
PAPER_REWARD_DEFAULTS = {
    "compressibility": dict(prompts="imagenet_animals", minibatches=4, stat_buffer=16,
                            stat_min_count=16, epochs=100),
    "incompressibility": dict(prompts="imagenet_animals", minibatches=4, stat_buffer=16,
                              stat_min_count=16, epochs=100),
    "aesthetic": dict(prompts="simple_animals", minibatches=2, stat_buffer=32, stat_min_count=16,
                      epochs=200),
    "alignment": dict(prompts="animals_activities", minibatches=2, stat_buffer=32,
                      stat_min_count=16, epochs=200),
}
# DDPO_SF's gradient is unbiased only at theta = theta_old: one optimizer step per round of
# sampling (Sec. 4.3), whatever the reward or scale.
ALGO_DEFAULTS = {"ddpo_sf": dict(minibatches=1, inner_epochs=1)}


# Tiny-scale defaults (`--model tiny`): a 1.2M-parameter pixel-space model on a laptop CPU.
# DEVIATION: 20 DDIM steps (paper 50), 64 samples per epoch (paper 256), half the timesteps trained
# per sample, full fine-tuning in fp32 (paper: LoRA over fp16). Why: minutes on 2 CPU cores, not
# hours on 8 A100s. Effect: noisier gradients.
# DEVIATION: each epoch draws 8 different prompts (without replacement, ddpo_min.epoch_prompts) and
# samples each 8 times; advantages are normalised within those 8 (the paper draws a prompt per
# sample and keeps 32 rewards per prompt). Why: 82% of the tiny JPEG reward's variance is between
# prompts, so short per-prompt buffers made the advantage mostly "which animal". Effect: a baseline
# from the current epoch only (README, "Deviations").
# DEVIATION: clip range 1e-3 (paper 1e-4). Why: one AdamW step of full fine-tuning moves the
# averaged log-prob ratio ~50x further than LoRA does, so with 1e-4 the 2nd-4th minibatches were
# nearly all clipped. Effect: larger steps per epoch; held-out trials in RESULTS.md.
# DEVIATION: RWR weighs exp(A) of the per-prompt advantage A, and sparse RWR keeps the top 10% of
# A (paper: exp(r / 5) and the top 10% of r). Why: tiny JPEG rewards spread by tenths of a kB, so
# exp(r / 5) left every weight within about 7% of 1 (notebook 5: [0.933, 1.049] on a batch of 16).
# Effect: weights span up to e^5 per epoch, and reward what is good for its prompt, as DDPO's
# advantages do.
TINY_DEFAULTS = dict(
    reward="compressibility", num_steps=20, guidance_scale=TINY_GUIDANCE, sample_batch_size=32,
    sample_batches=2, samples_per_prompt=8, stat_buffer=8, stat_min_count=8, clip_range=1e-3,
    train_batch_size=16, minibatches=4, timestep_fraction=0.5, lr=2e-4, lora_rank=0,
    mixed_precision="no", epochs=15, grid_size=16, rwr_signal="advantage", rwr_beta=1.0,
    kl_samples=8,
)  # fmt: skip
# Per reward, on top of TINY_DEFAULTS.
# DEVIATION: tiny alignment trains only the cross-attention blocks (attn2, 0.23M of 1.15M weights)
# at lr 1e-4 on every timestep (paper: LoRA on every attention projection, lr 3e-4). Why: trained on
# every weight, the images drifted busier instead of more recognisable. Effect: slower drift; the
# 3-seed trials behind the choice are in RESULTS.md.
TINY_REWARD_DEFAULTS = {
    "alignment": dict(lr=1e-4, trainable="cross_attention", timestep_fraction=1.0),
}


def samples_per_epoch(cfg: Config) -> int:
    return cfg.sample_batch_size * cfg.sample_batches


def check_config(cfg: Config, num_processes: int = 1) -> None:
    """Fail early, with the numbers, on what argparse cannot check (or a Config built in Python)."""
    for f in fields(Config):
        value, choices, need = getattr(cfg, f.name), f.metadata["choices"], f.metadata["need"]
        if f.type == "float" and not math.isfinite(value):
            raise ConfigError(f"--{_flag(f.name)} {value}: must be a finite number")
        if choices and value not in choices:  # argparse rejects these on the CLI already
            raise ConfigError(f"unknown --{_flag(f.name)} {value!r}; choose one of "
                              f"{', '.join(choices)}")
        if need and not _NEED[need](value):
            raise ConfigError(f"--{_flag(f.name)} {value}: must be {need} (default: "
                              f"{f.default!r})")
    # checked on every process before the models load (the logger itself starts on the main one)
    if cfg.log != "none" and importlib.util.find_spec(cfg.log) is None:
        raise ConfigError(f"--log {cfg.log} needs its package: pip install {cfg.log}")
    if not 0 < cfg.eta <= 1:
        raise ConfigError(f"--eta {cfg.eta}: DDPO needs a stochastic DDIM sampler, 0 < eta <= 1 "
                          "(paper: 1; above 1 the step's variance exceeds what DDIM can spend)")
    if cfg.algo == "ddpo_sf" and cfg.minibatches * cfg.inner_epochs != 1:
        raise ConfigError(
            f"--algo ddpo_sf takes one optimizer step per epoch, at theta_old (Sec. 4.3); "
            f"--minibatches {cfg.minibatches} x --inner-epochs {cfg.inner_epochs} would apply the "
            "score-function gradient at an updated theta to theta_old's samples, with no "
            "importance weight: use --minibatches 1 --inner-epochs 1 (or --algo ddpo_is)")
    if cfg.kl_coef and cfg.algo not in ("ddpo_is", "ddpo_sf"):
        raise ConfigError(f"--kl-coef {cfg.kl_coef} leashes DDPO's policy loss only; --algo "
                          f"{cfg.algo} would train without it: use --kl-coef 0, or --algo ddpo_is")
    if cfg.stat_min_count > cfg.stat_buffer:
        raise ConfigError(f"--stat-min-count {cfg.stat_min_count} must be <= --stat-buffer "
                          f"{cfg.stat_buffer} (a prompt's buffer never holds more)")
    if cfg.samples_per_prompt < 1 or cfg.sample_batch_size % cfg.samples_per_prompt:
        raise ConfigError(f"--samples-per-prompt {cfg.samples_per_prompt} must divide "
                          f"--sample-batch-size {cfg.sample_batch_size}")
    n = samples_per_epoch(cfg)
    if n % cfg.minibatches:
        raise ConfigError(f"batch arithmetic: {cfg.sample_batch_size} x {cfg.sample_batches} = "
                          f"{n} samples per epoch must split into --minibatches {cfg.minibatches}")
    if cfg.sample_batches % num_processes:
        raise ConfigError(f"batch arithmetic: --sample-batches {cfg.sample_batches} must split "
                          f"evenly over {num_processes} processes (each samples sample_batches / "
                          f"{num_processes} batches of {cfg.sample_batch_size})")


# what may change when a run goes on (under --resume, or when its --output-dir is named again): how
# long it goes on and where it runs; every other setting is the one the run began with
CONTINUABLE = ("epochs", "max_minutes", "threads", "output_dir", "resume", "device", "sd_on_cpu")


def resume_config(cfg: Config) -> Config:
    """The config a resumed run continues with: the saved one, but how long to go on is new."""
    folder = Path(cfg.resume)
    if not (folder / "config.json").is_file():  # (train() checks for the checkpoint)
        raise ConfigError(f"--resume {cfg.resume}: no config.json there")
    try:
        saved = Config(**json.loads((folder / "config.json").read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise ConfigError(f"--resume {cfg.resume}: its config.json is unreadable or from another "
                          f"version of ddpo-min ({str(err)[:120]}); start a new run") from None
    if cfg.output_dir and Path(cfg.output_dir).resolve() != folder.resolve():
        raise ConfigError(f"--resume {cfg.resume} continues in its own folder: drop --output-dir "
                          f"{cfg.output_dir}, or start a new run there without --resume")
    # the saved config wins (the run continues as it began) but for CONTINUABLE: the number of
    # epochs (0: the saved number), this invocation's wall-time limit, CPU threads and device
    goes_on = {k: getattr(cfg, k) for k in CONTINUABLE}
    return replace(saved, **goes_on | dict(epochs=cfg.epochs or saved.epochs,
                                           device=cfg.device or saved.device,  # "": as it ran
                                           sd_on_cpu=cfg.sd_on_cpu or saved.sd_on_cpu,
                                           output_dir=str(folder), resume=""))


# ----------------------------------------------------------------------------------------------
# The command line, generated from Config: unknown flags and bad choices fail in argparse
# ----------------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return name.replace("_", "-")


@functools.cache
def field_help() -> dict[str, str]:
    """Each Config field's help: the string literal right under it in this file, on one line."""
    return attribute_docs(Path(__file__).read_text(encoding="utf-8"), "Config")


def attribute_docs(source: str, cls: str) -> dict[str, str]:
    """{field: the string literal right under it} for class `cls` in `source`."""
    tree = ast.parse(source)
    (body,) = [n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    out = {}
    for field_, doc in zip(body, body[1:]):
        if (isinstance(field_, ast.AnnAssign) and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            out[field_.target.id] = " ".join(doc.value.value.split())
    return out


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        description="DDPO: fine-tune a text-to-image diffusion model on a reward with RL.",
        epilog="The defaults shown are Config()'s, the paper's aesthetic run. --reward picks that "
               "reward's recipe from the paper (prompts, minibatches, buffer, epochs) and --model "
               "tiny the tiny recipe (README, 'Tiny defaults'); a flag given explicitly wins.",
    )
    defaults = Config()
    for f in fields(Config):
        kind = {"int": int, "float": float, "str": str, "bool": _parse_bool}[f.type]
        parser.add_argument("--" + _flag(f.name), type=kind, default=argparse.SUPPRESS,
                            choices=f.metadata["choices"],
                            help=f"{field_help()[f.name]} (default: "
                                 f"{getattr(defaults, f.name)!r})")
    explicit = vars(parser.parse_args(argv))  # only the flags actually given
    _check_explicit(explicit)
    if explicit.get("resume"):
        explicit = {"epochs": 0, **explicit}  # 0 = keep the run's own epochs unless --epochs given
    if explicit.get("model") == "tiny":
        return Config.tiny(**explicit)
    return Config.paper(**explicit)


# flags that only one kind of run reads: given for another, they would be silently ignored
_ONLY_FOR = {"clip_range": ("ddpo_is",), "timestep_fraction": ("ddpo_is", "ddpo_sf"),
             "rwr_beta": ("rwr",), "rwr_signal": ("rwr", "rwr_sparse"),
             "rwr_percentile": ("rwr_sparse",)}


def _check_explicit(explicit: dict) -> None:
    """Flags given on the command line that the run would not use: one line naming the fix."""
    if explicit.get("resume"):
        fixed = sorted(k for k in explicit if k not in CONTINUABLE)
        if fixed:
            raise ConfigError(f"--resume continues a run with its own settings, so --"
                              f"{_flag(fixed[0])} cannot change (only --epochs, --max-minutes, "
                              "--threads and the device may): drop it, or start a new run")
        return
    tiny = explicit.get("model") == "tiny"
    algo = explicit.get("algo", Config.algo)
    for name, algos in _ONLY_FOR.items():
        if name in explicit and algo not in algos:
            raise ConfigError(f"--{_flag(name)} applies to --algo {' / '.join(algos)} only; "
                              f"--algo {algo} would ignore it")
    reward = explicit.get("reward", TINY_DEFAULTS["reward"] if tiny else Config.reward)
    for owner, names in REWARD_OPTIONS.items():
        for name in names:
            if name in explicit and reward != owner:
                raise ConfigError(f"--{_flag(name)} is an option of --reward {owner}; --reward "
                                  f"{reward} would ignore it")
    if tiny and ("vlm" in explicit or "clip_model" in explicit):  # (BERTScore's model applies)
        raise ConfigError("--model tiny scores alignment with its own captioner and has no "
                          "aesthetic reward: --vlm and --clip-model are for Stable Diffusion runs")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
