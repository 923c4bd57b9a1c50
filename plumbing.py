"""Run plumbing: the run's parts, checkpoints, the reward executor, the run folder (grids, the
reward curve, loggers), printing.

Nothing here is DDPO; ddpo_min.py calls these so that the loop stays about the algorithm.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import filelock
import numpy as np
import torch
from accelerate import Accelerator

import loading
from config import (
    CONTINUABLE,
    REWARD_OPTIONS,
    Config,
    ConfigError,
    TrainingDiverged,
    check_config,
    resume_config,
    samples_per_epoch,
)
from loading import trainable_state
from rewards import RewardModelUnavailable, make_reward
from sampler import trainable_steps

ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------
# The run: what one training run holds on one process
# ----------------------------------------------------------------------------------------------


@dataclass
class State:
    epoch: int = 0
    step: int = 0  # optimizer steps so far
    history: list = field(default_factory=list)  # per-epoch metric dicts
    skips_in_a_row: int = 0  # fp16 optimizer steps the GradScaler skipped, since the last taken


class Run:
    """The processes, model, reward and RNGs of one training run, on one process.

    The algorithm's own parts are built in ddpo_min.train(): `tracker`, what turns rewards into
    advantages (PerPromptStatTracker), and `optimizer`, AdamW over `params`; both are
    checkpointed. A Run built elsewhere (the tests, tools/gpu_check.py) sets them itself where it
    needs them.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        device = loading.resolve_device(cfg.device)
        # the process group, when launched with accelerate or torchrun (gloo on a CPU)
        self.accelerator = Accelerator(cpu=device.type == "cpu")
        launched = self.accelerator.mixed_precision  # from `accelerate launch` or its config
        if launched not in ("no", cfg.mixed_precision):
            raise ConfigError(f"accelerate was launched with mixed precision {launched!r} but the "
                              f"run's is {cfg.mixed_precision!r}: the run's flag decides here, so "
                              f"pass --mixed-precision {launched} (or launch without it)")
        check_config(cfg, self.accelerator.num_processes)
        self.device = device if self.accelerator.num_processes == 1 else self.accelerator.device
        self.is_main = self.accelerator.is_main_process  # only it writes files and prints
        self.dir = Path(cfg.output_dir)
        self.prompts = loading.load_prompts(cfg.prompts)
        # before the reward, whose models load slowly
        loading.check_model_source(cfg.model, self.device, cfg.sd_on_cpu)
        scale = "tiny" if cfg.model == "tiny" else "paper"
        options = {k: getattr(cfg, k) for k in REWARD_OPTIONS.get(cfg.reward, ())
                   if getattr(cfg, k)}
        try:
            self.reward_fn = make_reward(cfg.reward, scale=scale, device=str(self.device),
                                         **options)
        except (ValueError, RewardModelUnavailable) as err:
            raise ConfigError(str(err)) from None
        self.model = loading.load_model(cfg, self.device)  # after the cheap checks: SD is slow
        # the pretrained policy, for the KL diagnostic and penalty: LoRA switches its adapters off
        self.reference = (loading.frozen_copy(self.model.unet)
                          if (cfg.kl_samples or cfg.kl_coef) and not cfg.lora_rank else None)
        self.params = [p for p in self.model.unet.parameters() if p.requires_grad]
        self.tracker = None  # set by ddpo_min.train()
        self.optimizer: torch.optim.Optimizer | None = None  # set by ddpo_min.train()
        self.kl_penalty_seconds = 0.0  # per epoch: the KL leash's extra forwards (--kl-coef)
        # Mixed precision: the frozen weights in fp16/bf16 (loading.py), the UNet run under
        # autocast, and in fp16 the loss scaled up before backward (unscaled before the clip):
        # the DDPO gradient at the UNet output is ~1e-8 per element, below fp16's normal range.
        half = loading.DTYPES[cfg.mixed_precision]
        self.autocast = torch.autocast(self.device.type, dtype=half, enabled=half != torch.float32)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=half == torch.float16)
        # the scale exists from the start: with N processes one may own none of a minibatch, scale
        # no loss, and still unscale the summed gradients (else GradScaler: "_scale is None")
        self.scaler.scale(torch.zeros((), device=self.device))
        self.negative_embeds = self.model.encode_prompts([""])  # (1, L, D) the empty prompt
        # training shuffles and RWR noise (checkpointed; the same on every process); a sample's
        # prompt and noise come from seeds made of (seed, epoch, its number), ddpo_min.sample_seed
        self.train_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.state = State()
        # CPU threads: this process's share of the cores, fewer while other processes are busy
        self.cpu_threads = ThreadGovernor(cfg.threads, self.accelerator.num_processes)


# ----------------------------------------------------------------------------------------------
# Checkpoints: everything that must survive a restart for the run to continue exactly
# ----------------------------------------------------------------------------------------------


CHECKPOINT, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"  # the last save and the one before


def has_checkpoint(folder: Path) -> bool:
    return (folder / CHECKPOINT).is_file() or (folder / PREVIOUS).is_file()


def save_checkpoint(run) -> None:
    """Trainable weights, optimizer, loss scale, reward statistics, the training RNG and the
    history, atomically, from the main process (every process holds the same).

    A sample's prompt and noise are drawn from (seed, epoch, its number), so they need no state.
    The previous checkpoint is kept as checkpoint.prev.pt: if the new file is ever damaged (a full
    disk, a copy cut short), --resume falls back to it.
    """
    if not run.is_main:
        return
    state = {
        "trainable": trainable_state(run.model.unet),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "tracker": run.tracker.state_dict(),
        "train_gen": run.train_gen.get_state(),
        "epoch": run.state.epoch,
        "step": run.state.step,
        "history": run.state.history,
        "skips_in_a_row": run.state.skips_in_a_row,
        "num_processes": run.accelerator.num_processes,
    }
    tmp = run.dir / "checkpoint.tmp"
    torch.save(state, tmp)
    if (run.dir / CHECKPOINT).is_file():
        os.replace(run.dir / CHECKPOINT, run.dir / PREVIOUS)
    os.replace(tmp, run.dir / CHECKPOINT)  # atomic: a kill mid-save leaves the old files whole


def read_checkpoint(folder: Path, say=print) -> dict:
    """The last readable checkpoint of a run folder: checkpoint.pt, else the one saved before it
    (`say` reports the fallback)."""
    for path in (folder / CHECKPOINT, folder / PREVIOUS):
        if not path.is_file():
            continue
        try:
            s = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # a truncated or corrupt file: torch raises zip/pickle errors
            say(f"warning: {path} is unreadable ({type(err).__name__}); trying the previous "
                "checkpoint")
            continue
        if path.name == PREVIOUS:
            say(f"resuming from {path}, saved one checkpoint before the damaged one")
        return s
    raise ConfigError(f"--resume {folder}: no readable {CHECKPOINT} or {PREVIOUS} there; "
                      "start a new run")


def check_same_start(run) -> None:
    """With N processes, every one must start from the same state: each reads the run folder on
    its own, and a folder on a disk that not every process sees (several machines, node-local
    storage) would resume one and start another afresh, summing gradients taken at different
    weights without an error. One line instead."""
    if run.accelerator.num_processes == 1:
        return
    mine = torch.tensor([[run.state.epoch, run.state.step]], device=run.device)  # (1, 2)
    every = run.accelerator.gather(mine).cpu()  # (N, 2), in process order
    if not (every == every[0]).all():
        starts = ", ".join(f"process {i}: epoch {e}" for i, (e, _) in enumerate(every.tolist()))
        raise ConfigError(f"the processes start from different checkpoints ({starts}): "
                          f"{run.dir} must be on a filesystem that every process sees")


def load_checkpoint(run) -> None:
    """Restore the last readable checkpoint: checkpoint.pt, else the one saved before it."""
    s = read_checkpoint(run.dir, run.accelerator.print)
    params = dict(run.model.unet.named_parameters())
    with torch.no_grad():
        for k, v in s["trainable"].items():
            params[k].copy_(v)
    run.optimizer.load_state_dict(s["optimizer"])
    run.scaler.load_state_dict(s["scaler"])
    run.tracker.load_state_dict(s["tracker"])
    run.train_gen.set_state(s["train_gen"])
    run.state = State(epoch=s["epoch"], step=s["step"], history=s["history"],
                      skips_in_a_row=s["skips_in_a_row"])


# ----------------------------------------------------------------------------------------------
# Where the rewards run: a worker thread on a GPU, inline on a CPU
# ----------------------------------------------------------------------------------------------


class InlineExecutor(Executor):
    """Runs each job at once on the calling thread (the CPU stand-in for a worker thread).

    On a GPU the reward worker thread overlaps real work: the GPU samples batch i+1 while the CPU
    scores batch i. On a CPU there is nothing to overlap: torch already runs the UNet on every core,
    and a second thread running torch ops makes OpenMP start a second team of threads on the same
    cores, which slowed whole epochs by about a third (measured on 2 cores; RESULTS.md, "Speed").
    """

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:  # re-raised by future.result(), as a worker thread's would be
            # (KeyboardInterrupt is not caught: Ctrl-C must stop the loop at once)
            future.set_exception(error)
        return future


def reward_executor(device: torch.device) -> Executor:
    """A one-thread pool for the rewards on an accelerator; inline on a CPU (see InlineExecutor).
    A new thread's current CUDA device is cuda:0: the pool's thread is set to this process's GPU,
    so that a reward model's device-less CUDA call does not land on GPU 0 from every process."""
    if device.type == "cpu":
        return InlineExecutor()
    if device.type == "cuda":  # (set_device needs an index: "cuda" alone means the current one)
        index = device.index if device.index is not None else torch.cuda.current_device()
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward",
                                  initializer=torch.cuda.set_device, initargs=(index,))
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")


class ThreadGovernor:
    """torch's CPU thread count: every core when the machine is idle, fewer while other processes
    keep cores busy (measured from /proc/stat on Linux; elsewhere the count stays fixed).

    torch splits each operation across its threads and waits for the slowest. When another
    process holds a core, one of the threads waits for it at every step: a 2-thread tiny epoch on
    2 cores beside one busy process took 2.9x its idle time, and 1.7x with that core given up
    (`python -m tools.bench contention`). `--threads N` fixes the count instead.
    """

    def __init__(self, threads: int = 0, num_processes: int = 1):
        self.fixed = threads > 0
        affinity = getattr(os, "sched_getaffinity", None)
        cores = len(affinity(0)) if affinity else (os.cpu_count() or 1)
        self.cores = max(1, cores // num_processes)  # this process's share
        self.threads = threads if self.fixed else self.cores
        torch.set_num_threads(self.threads)
        # the CPUs this process may run on (a container's or a batch job's cpuset); with several
        # processes the share stays fixed: their own use would read as others' load
        self.cpus = set(affinity(0)) if affinity else None
        measured = not self.fixed and num_processes == 1
        self.last = self._reading() if measured else None

    def _reading(self) -> tuple[float, float, float] | None:
        """(seconds of CPU this process's cores have been busy, seconds of CPU this process used,
        now)."""
        try:
            with open("/proc/stat") as f:
                lines = [line.split() for line in f if line.startswith("cpu")]
            per_cpu = {int(w[0][3:]): [int(x) for x in w[1:9]] for w in lines if w[0] != "cpu"}
            mine = [j for c, j in per_cpu.items() if self.cpus is None or c in self.cpus]
            busy = sum(sum(j) - j[3] - j[4] for j in mine)  # all but idle and iowait
        except (OSError, ValueError, IndexError):
            return None  # not Linux: no measurement, the count stays as it is
        return busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.monotonic()

    def adjust(self) -> None:
        """Set the thread count from the last second or more: the cores others left free."""
        if self.last is None:
            return
        now = self._reading()
        if now is None or now[2] - self.last[2] < 1.0:
            return
        others = ((now[0] - self.last[0]) - (now[1] - self.last[1])) / (now[2] - self.last[2])
        self.last = now
        threads = max(1, min(self.cores, round(self.cores - others)))  # cores others left free
        if threads != self.threads:
            self.threads = threads
            torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# The optimizer step (with fp16 loss scaling) and what N processes share (each a no-op with one
# process): the loop's only collective operations besides gathering the rewards
# ----------------------------------------------------------------------------------------------


def sum_gradients_over_processes(run, nonfinite: int) -> int:
    """Sum every trainable weight's gradient over the processes, in one all-reduce that also sums
    the count of non-finite losses (so every process stops together). Returns that count."""
    if run.accelerator.num_processes == 1:
        return nonfinite
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in run.params]
    count = torch.tensor([float(nonfinite)], device=grads[0].device)
    flat = run.accelerator.reduce(torch.cat([g.flatten() for g in grads] + [count]), "sum")
    for p, g in zip(run.params, flat[:-1].split([g.numel() for g in grads])):
        p.grad = g.view_as(p)
    return int(flat[-1].item())


def backward(run: Run, loss: torch.Tensor, weight: float) -> None:
    """Accumulate the gradient of weight * loss; in fp16 the loss is scaled up first (GradScaler)
    so that gradients of ~1e-8 do not underflow to 0 in the half-precision UNet."""
    run.scaler.scale(loss * weight).backward()


def optimizer_step(run: Run, nonfinite: int) -> tuple[float, bool]:
    """Sum the gradients over processes, unscale, clip the norm, step AdamW; zero the gradients.

    In fp16 the GradScaler skips a step whose gradients hold inf or NaN (and lowers its scale);
    that is counted, and only many in a row stop the run. Returns (grad norm, skipped).
    """
    epoch = run.state.epoch
    nonfinite = sum_gradients_over_processes(run, nonfinite)  # N = 1: nothing to do
    if nonfinite:
        raise TrainingDiverged(f"epoch {epoch}, phase train: non-finite loss")
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, run.cfg.max_grad_norm)
    if not torch.isfinite(grad_norm) and not run.scaler.is_enabled():
        raise TrainingDiverged(f"epoch {epoch}, phase train: non-finite gradient norm")
    scale = run.scaler.get_scale()
    run.scaler.step(run.optimizer)  # fp16: skipped if a gradient is inf/NaN
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    skipped = run.scaler.is_enabled() and run.scaler.get_scale() < scale
    run.state.skips_in_a_row = run.state.skips_in_a_row + 1 if skipped else 0
    if run.state.skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
        raise TrainingDiverged(f"epoch {epoch}, phase train: {MAX_SKIPS_IN_A_ROW} optimizer steps "
                               "in a row had inf/NaN gradients in fp16; try --mixed-precision bf16 "
                               "(python -m tools.bench gpu first: it measures whether bf16's first "
                               "minibatch stays inside the clip range) or --mixed-precision no")
    run.state.step += 1
    return grad_norm.item(), skipped


MAX_SKIPS_IN_A_ROW = 20  # the scale halves at each: 2^16 -> 2^-4, far past any fp16 overflow


def mean_over_processes(run, values: list[float]) -> float | None:
    """The mean of every process's values (None if there are none anywhere)."""
    return weighted_means_over_processes(run, {"mean": [sum(values), len(values)]})["mean"]


def weighted_means_over_processes(run, sums: dict[str, list[float]]) -> dict[str, float | None]:
    """{key: [Σ w * value, Σ w]} on each process -> {key: the weighted mean over all processes},
    None for a key no process has weight for. One all-reduce."""
    total = torch.tensor([x for pair in sums.values() for x in pair], dtype=torch.float64)
    if run.accelerator.num_processes > 1:
        total = run.accelerator.reduce(total.to(run.device), reduction="sum").cpu()
    pairs = total.view(-1, 2).tolist()
    return {key: (num / den if den else None) for key, (num, den) in zip(sums, pairs)}


def any_process(run, flag: bool) -> bool:
    """True on every process if it is True on any (e.g. --max-minutes passed somewhere)."""
    if run.accelerator.num_processes == 1:
        return flag
    total = run.accelerator.reduce(torch.tensor([float(flag)], device=run.device), "sum")
    return total.item() > 0


# ----------------------------------------------------------------------------------------------
# What a run writes: config.json, metrics.jsonl, an image grid per epoch, the reward curve,
# optional external loggers
# ----------------------------------------------------------------------------------------------


LOCK = ".lock"  # in a run folder: held by the training that uses it


def _try_lock(folder: Path) -> tuple[filelock.FileLock | None, bool]:
    """Take `folder`'s lock without waiting: (the held lock, or None; whether another process
    holds it). None and False: a filesystem without file locks."""
    lock = filelock.FileLock(folder / LOCK)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return None, True
    except (NotImplementedError, OSError):
        return None, False
    return lock, False


@contextlib.contextmanager
def folder_lock(run: Run):
    """One training per run folder at a time. A second one (another shell, a tool reusing a run
    folder) would read a checkpoint the first is about to replace and interleave its checkpoints
    and metrics with the first's. The main process holds an OS file lock on the folder's `.lock`
    from before the checkpoint is read to the end of training; the OS drops it when the process
    ends. If the lock is taken, every process stops with one line."""
    lock, busy, created = None, False, False
    if run.is_main:
        created = not run.dir.exists()
        run.dir.mkdir(parents=True, exist_ok=True)
        lock, busy = _try_lock(run.dir)
        if lock is None and not busy:
            print(f"warning: {run.dir} cannot be locked on this filesystem: make sure no other "
                  "training uses that folder")
    if any_process(run, busy):  # every process, not only the main one
        raise ConfigError(f"another training is running in {run.dir} (it holds "
                          f"{run.dir / LOCK}; if none is, delete that file): wait for it to end, "
                          "or name another --output-dir")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
        if created and [p.name for p in run.dir.iterdir()] in ([], [LOCK]):
            (run.dir / LOCK).unlink(missing_ok=True)  # a run that stopped before writing
            run.dir.rmdir()  # anything leaves no folder behind


def empty_run_folder(folder: str | Path) -> None:
    """Delete a run folder's contents for a fresh run (the tools' re-runs), unless a training is
    using it: deleting the lock file it holds would let a second training in beside it."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    lock, busy = _try_lock(folder)
    if busy:
        raise ConfigError(f"another training is running in {folder}: wait for it to end")
    try:
        for path in folder.iterdir():
            if path.name == LOCK:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    finally:
        if lock is not None:
            lock.release()


def run_config(cfg: Config) -> Config:
    """The config to run: with --resume the saved one; else a new folder named if none given."""
    if cfg.resume:
        if not has_checkpoint(Path(cfg.resume)):
            raise ConfigError(f"--resume {cfg.resume}: no checkpoint.pt there")
        return resume_config(cfg)
    if cfg.output_dir:
        if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
            raise ConfigError(f"--output-dir {cfg.output_dir} is a file: name a folder")
        _check_same_run(cfg)
        return cfg
    name = "tiny" if cfg.model == "tiny" else Path(cfg.model).name
    folder = ROOT / "runs" / f"{cfg.reward}-{cfg.algo}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return replace(cfg, output_dir=str(folder))


def _check_same_run(cfg: Config) -> None:
    """--output-dir naming a folder with a checkpoint continues that run (train() loads it): only
    with the settings it was trained with, else one line naming the difference."""
    folder = Path(cfg.output_dir)
    if not (has_checkpoint(folder) and (folder / "config.json").is_file()):
        return
    try:
        saved = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError:
        saved = {}
    new = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as config.json has them
    differ = sorted(k for k in new if k not in CONTINUABLE and saved.get(k) != new[k])
    if differ:
        raise ConfigError(
            f"--output-dir {folder} holds a run trained with other settings ("
            + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} there, {new[k]!r} here"
                        for k in differ[:3])
            + f"): continue it with --resume {folder}, or name another --output-dir")


class RunFolder:
    """Writes a run's files, on the main process only (other processes: every method a no-op).

    metrics.jsonl is rewritten at the start to the epochs the checkpoint holds (a crash between
    the two writes leaves one epoch extra), then appended after each epoch.
    """

    def __init__(self, run: Run):
        self.run, self.active = run, run.is_main
        if not self.active:
            return
        run.dir.mkdir(parents=True, exist_ok=True)
        tmp = run.dir / "config.json.tmp"  # whole or not at all: a resume reads it back
        tmp.write_text(json.dumps(asdict(run.cfg), indent=1))
        os.replace(tmp, run.dir / "config.json")
        self.metrics = run.dir / "metrics.jsonl"
        self.metrics.write_text("".join(json.dumps(h) + "\n" for h in run.state.history))
        self.logger = ExternalLogger(run.cfg, run.dir)
        print_sizes(run)

    def epoch(self, samples, metrics: dict) -> None:
        """One epoch's metrics line, sample grid, the reward curve so far, the external log."""
        if not self.active:
            return
        run = self.run
        with self.metrics.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        save_grid(samples, run.dir / f"samples_epoch{metrics['epoch']:04d}.png", run.cfg.grid_size)
        save_reward_curve(run.state.history, run.dir / "reward_curve.png", run.cfg.reward)
        self.logger.log(metrics, run.state.step)

    def interrupted(self) -> None:
        """After Ctrl-C: export the half-trained weights and say how to resume."""
        run = self.run
        if self.active:
            loading.save_weights(run.model, run.cfg, run.dir / "interrupted_weights")
        run.accelerator.print(
            f"\ninterrupted in epoch {run.state.epoch}; resume exactly with: python ddpo_min.py "
            f"--resume {run.dir}\n(it goes on from the last checkpoint, saved every "
            f"{run.cfg.save_every} epoch(s), repeating the epochs since exactly; current weights "
            f"saved to {run.dir / 'interrupted_weights'})")

    def finished(self) -> None:
        run = self.run
        if self.active:
            loading.save_weights(run.model, run.cfg, run.dir / "weights")
        run.accelerator.print(f"done: {run.dir} (weights in {run.dir / 'weights'})")


def save_grid(samples, path: Path, n: int) -> None:
    """The first n images with their prompt and reward underneath."""
    from PIL import Image, ImageDraw

    n = min(n, len(samples.prompts))
    tile = 128 if samples.images.shape[-1] <= 128 else 256
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    text_h = 28
    sheet = Image.new("RGB", (cols * tile, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    captions = samples.extras.get("captions")
    for i in range(n):
        arr = (samples.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        resample = Image.NEAREST if arr.shape[0] < tile else Image.BILINEAR
        im = Image.fromarray(arr).resize((tile, tile), resample)
        x, y = (i % cols) * tile, (i // cols) * (tile + text_h)
        sheet.paste(im, (x, y))
        label = f"{samples.prompts[i][:22]}\nr={samples.rewards[i]:.3g}"
        if captions:
            label = (f"{samples.prompts[i][:13]}>{str(captions[i])[:9]}\n"
                     f"r={samples.rewards[i]:.3g}")
        draw.multiline_text((x + 2, y + tile + 1), label, fill="black", spacing=1)
    sheet.save(path)


def save_reward_curve(history: list[dict], path: Path, reward: str) -> None:
    # a bare Figure, not pyplot: no global backend switch, so notebooks keep their inline plots
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    mean = np.array([h["reward/mean"] for h in history])
    std = np.array([h["reward/std"] for h in history])
    fig = Figure(figsize=(5, 3.2), dpi=120)
    ax = fig.subplots()
    ax.plot(epochs, mean, marker="o", ms=3)
    ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set(xlabel="epoch", ylabel=f"reward ({reward})", title="reward/mean ± reward/std")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


class ExternalLogger:
    """Optional tensorboard / wandb mirror of metrics.jsonl (only imported when asked for)."""

    def __init__(self, cfg: Config, folder: Path):
        self.kind, self.writer = cfg.log, None
        try:
            if cfg.log == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(folder / "tb"))
            elif cfg.log == "wandb":
                import wandb

                self.writer = wandb.init(project="ddpo-min", config=asdict(cfg), dir=str(folder))
        except ImportError as err:
            raise ConfigError(f"--log {cfg.log} needs its package: pip install {cfg.log} "
                              f"({err})") from None

    def log(self, metrics: dict, step: int) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.kind == "tensorboard":
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        elif self.kind == "wandb":
            self.writer.log(scalars, step=step)


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------


def print_sizes(run: Run) -> None:
    """The derived sizes of the run, printed once at the start."""
    cfg, scheduler = run.cfg, run.model.scheduler  # (train() has set its timesteps)
    steps, n_trained = trainable_steps(scheduler, scheduler.timesteps, cfg.eta,
                                       cfg.timestep_fraction)
    n_samples, n_stochastic = samples_per_epoch(cfg), len(steps)
    n_proc = run.accelerator.num_processes
    n_train = sum(p.numel() for p in run.params)
    lora = f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "full fine-tuning"
    only = ", cross-attention only" if cfg.trainable == "cross_attention" else ""
    precision = {"no": "fp32"}.get(cfg.mixed_precision, cfg.mixed_precision)
    per_step = n_samples // cfg.minibatches
    chunks = math.ceil(per_step / n_proc / cfg.train_batch_size)
    if cfg.algo.startswith("rwr"):
        terms = " (RWR: one diffusion loss per sample)"
    else:
        terms = f" x {n_trained}/{n_stochastic} stochastic timesteps (of {cfg.num_steps})"
    where = (f" | {n_proc} processes, {cfg.sample_batches // n_proc} batches each"
             if n_proc > 1 else "")
    print(
        f"model {cfg.model} on {run.device} ({precision}) | trainable params "
        f"{n_train / 1e6:.2f}M ({lora}{only})\n"
        f"samples/epoch {n_samples} = {cfg.sample_batches} batches x {cfg.sample_batch_size}"
        f"{where} | {len(run.prompts)} prompts ({cfg.prompts}) | reward {cfg.reward} | "
        f"algo {cfg.algo}\n"
        f"optimizer steps/epoch {cfg.minibatches * cfg.inner_epochs} = {cfg.minibatches} "
        f"minibatches of {per_step} samples x {cfg.inner_epochs} inner epochs, each accumulating "
        f"about {chunks} forward chunks{' per process' if n_proc > 1 else ''}{terms}"
    )


def format_metrics(m: dict) -> str:
    parts = [f"epoch {m['epoch']}", f"reward {m['reward/mean']:.4g} ± {m['reward/std']:.3g}"]
    for k in ("loss/policy", "loss/approx_kl", "loss/clipfrac", "loss/kl_penalty",
              "kl/pretrained"):
        if m.get(k) is not None:
            parts.append(f"{k.replace('loss/', '')} {m[k]:.3g}")
    leash = (f", of which the KL leash's pretrained forwards {m['time/kl_penalty']:.1f}"
             if "time/kl_penalty" in m else "")
    parts.append(f"{m['time/epoch']:.1f}s (sample {m['time/sample']:.1f}, "
                 f"train {m['time/train']:.1f}{leash})")
    return " | ".join(parts)


def synced_clock(device: torch.device) -> float:
    """time.perf_counter() after the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
