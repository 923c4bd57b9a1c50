"""plumbing.py: the reward executor, checkpoints that survive damage, the CPU thread governor."""

from __future__ import annotations

import pytest
import torch
from toy import history, tiny_config

import plumbing
from config import Config, ConfigError
from ddpo_min import train


def test_rewards_run_inline_on_cpu_and_on_a_worker_thread_elsewhere(monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    inline = plumbing.reward_executor(torch.device("cpu"))
    assert isinstance(inline, plumbing.InlineExecutor)
    # ran on this thread
    assert inline.submit(threading.get_ident).result() == threading.get_ident()
    assert inline.submit(lambda a, b=0: a + b, 2, b=3).result() == 5
    # an error surfaces at .result(), as a worker thread's would
    failed = inline.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result()

    def ctrl_c():
        raise KeyboardInterrupt

    # Ctrl-C stops the loop at once, not at the next .result()
    with pytest.raises(KeyboardInterrupt):
        inline.submit(ctrl_c)
    pool = plumbing.reward_executor(torch.device("meta"))  # an accelerator's pool, on any machine
    try:
        assert isinstance(pool, ThreadPoolExecutor)
        assert pool.submit(threading.get_ident).result() != threading.get_ident()
    finally:
        pool.shutdown()
    # on a GPU the thread first selects this process's device (a new thread's is cuda:0)
    pool = plumbing.reward_executor(torch.device("cuda", 3))  # building it needs no GPU
    assert pool._initializer is torch.cuda.set_device and pool._initargs == (3,)
    pool.shutdown()
    # an index-less "cuda" (the default device on one GPU) means the current one: set_device
    # refuses a device without an index
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    pool = plumbing.reward_executor(torch.device("cuda"))
    assert pool._initargs == (0,)
    pool.shutdown()
    with pytest.raises(ValueError, match="index"):  # what the index saves the thread from
        torch.cuda._utils._get_device_index(torch.device("cuda"), optional=False, allow_cpu=False)


def test_processes_that_start_from_different_checkpoints_stop_in_one_line():
    """A run folder that one process sees and another does not (node-local disks): one resumes,
    one starts afresh. Every process compares (epoch, step) with the others before training."""
    from types import SimpleNamespace

    def run(starts):
        acc = SimpleNamespace(num_processes=len(starts),
                              gather=lambda t: torch.tensor(starts))  # every process's (1, 2)
        return SimpleNamespace(accelerator=acc,
                               state=SimpleNamespace(epoch=starts[0][0], step=starts[0][1]),
                               device=torch.device("cpu"), dir="runs/x")

    plumbing.check_same_start(run([[3, 12], [3, 12]]))  # alike: goes on
    with pytest.raises(ConfigError, match="process 0: epoch 3, process 1: epoch 0.*every process"):
        plumbing.check_same_start(run([[3, 12], [0, 0]]))


def test_damaged_checkpoint_falls_back_to_the_previous_one(random_tiny_weights, tmp_path, capsys):
    run_dir = train(tiny_config(tmp_path / "run", epochs=2))
    first = history(run_dir)
    ckpt = run_dir / "checkpoint.pt"
    assert (run_dir / "checkpoint.prev.pt").is_file()  # the save before the last is kept
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a copy cut short
    resumed = history(train(Config(resume=str(run_dir), epochs=3)))
    out = capsys.readouterr().out
    assert "checkpoint.pt is unreadable" in out and "resuming from" in out
    assert [h["epoch"] for h in resumed] == [0, 1, 2]  # epoch 1 runs again, from the earlier save
    assert resumed[1]["reward/mean"] == first[1]["reward/mean"]  # and exactly as the first time
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run_dir / name).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="no readable checkpoint.pt or checkpoint.prev.pt"):
        train(Config(resume=str(run_dir), epochs=4))


def test_one_training_per_run_folder_at_a_time(random_tiny_weights, tmp_path, monkeypatch):
    """A second training in a folder where one is running stops before reading or writing
    anything; the lock goes with the process that held it, and with a training that failed in
    this process (released by train(), not by the garbage collector: the failure is kept)."""
    import subprocess
    import sys

    import ddpo_min

    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen(  # another process training there: it holds the folder's lock
        [sys.executable, "-c", "import filelock, sys; lock = filelock.FileLock(sys.argv[1]); "
         "lock.acquire(); print('held', flush=True); sys.stdin.read()", str(folder / ".lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="another training is running in .*--output-dir"):
            train(tiny_config(folder, epochs=1))
        assert [p.name for p in folder.iterdir()] == [".lock"]  # nothing written
        with pytest.raises(ConfigError, match="another training is running"):
            plumbing.empty_run_folder(folder)  # the tools' fresh start waits for it too
    finally:
        holder.kill()
        holder.wait()

    def broken(*args, **kwargs):
        raise RuntimeError("a failure inside the loop")

    with monkeypatch.context() as m:
        m.setattr(ddpo_min, "train_epoch", broken)
        with pytest.raises(RuntimeError, match="inside the loop") as failed:
            train(tiny_config(folder, epochs=1))
    assert len(history(train(tiny_config(folder, epochs=1)))) == 1  # free again, in this process
    assert failed.value is not None  # (the failure, and its frames, were alive until here)
    plumbing.empty_run_folder(folder)
    assert [p.name for p in folder.iterdir()] == [".lock"]


def test_a_refused_lock_stops_every_process(tmp_path, monkeypatch):
    """With N processes only the main one tries the lock; the others learn of a refusal through
    the collective and stop with the same line instead of waiting in the first all-reduce."""
    from types import SimpleNamespace

    seen = []

    def any_process(run, flag):
        seen.append(flag)
        return True  # the main process, elsewhere, found the folder busy

    monkeypatch.setattr(plumbing, "any_process", any_process)
    other = SimpleNamespace(is_main=False, dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="another training is running"):
        with plumbing.folder_lock(other):
            pass
    assert seen == [False] and not (tmp_path / "run").exists()  # it never touched the folder


def test_a_run_stopped_before_writing_leaves_no_folder(random_tiny_weights, tmp_path):
    with pytest.raises(ConfigError, match="no step of this sampler is stochastic"):
        train(tiny_config(tmp_path / "new", epochs=1, num_steps=1))
    assert not (tmp_path / "new").exists()


def test_thread_governor_yields_cores_to_busy_neighbours(monkeypatch):
    readings = iter([
        (0.0, 0.0, 0.0),  # at start: machine-busy seconds, our CPU seconds, wall seconds
        (4.0, 2.0, 2.0),  # 2 s: busy 4 core-s, ours 2 -> others held 1 core
        (4.5, 2.4, 2.5),  # 0.5 s later: too short to judge, nothing changes
        (6.0, 4.0, 4.0),  # 2 s more: busy 2, ours 2 -> the neighbour is gone
    ])
    monkeypatch.setattr(plumbing.ThreadGovernor, "_reading", staticmethod(lambda: next(readings)))
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    governor = plumbing.ThreadGovernor(0)
    governor.cores = 2
    governor.adjust()
    assert governor.threads == 1 and set_to[-1] == 1
    governor.adjust()
    assert governor.threads == 1
    governor.adjust()
    assert governor.threads == 2 and set_to[-1] == 2
    fixed = plumbing.ThreadGovernor(3)  # --threads 3: set once, never measured
    fixed.adjust()
    assert fixed.threads == 3 and set_to[-1] == 3 and fixed.last is None


def test_the_governor_reads_only_its_own_cpus_and_stays_fixed_with_several_processes(
        monkeypatch, tmp_path):
    """Load on CPUs outside this process's set (another job's cpuset) is not counted; with 2
    processes each keeps its share, since the other's use would read as a neighbour's."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  900 0 0 100 0 0 0 0 0 0\n"
                    "cpu0 800 0 0 50 0 0 0 0 0 0\n"  # busy 800 on a CPU this process may not use
                    "cpu1 100 0 0 50 0 0 0 0 0 0\n")
    real_open = open
    monkeypatch.setattr(plumbing, "open", lambda path, *a: real_open(
        stat if path == "/proc/stat" else path, *a), raising=False)
    governor = plumbing.ThreadGovernor(0)
    governor.cpus = {1}
    assert governor._reading()[0] * plumbing.os.sysconf("SC_CLK_TCK") == 100
    governor.cpus = {0, 1}
    assert governor._reading()[0] * plumbing.os.sysconf("SC_CLK_TCK") == 900
    shared = plumbing.ThreadGovernor(0, num_processes=2)
    assert shared.last is None and shared.threads == max(1, len(governor.cpus) // 2)


def test_naming_a_run_folder_again_continues_it_only_with_its_settings(random_tiny_weights,
                                                                      tmp_path):
    run_dir = train(tiny_config(tmp_path / "run", epochs=1))
    with pytest.raises(ConfigError, match=r"other settings \(--lr .*--resume "):
        train(tiny_config(tmp_path / "run", epochs=2, lr=1e-3))
    assert len(history(train(tiny_config(tmp_path / "run", epochs=2)))) == 2  # more epochs: fine
    with pytest.raises(ConfigError, match="at epoch 2 already: --epochs counts all epochs"):
        train(Config(resume=str(run_dir), epochs=1))  # a total below the checkpoint's
    with pytest.raises(ConfigError, match="continues in its own folder: drop --output-dir"):
        train(Config(resume=str(run_dir), epochs=3, output_dir=str(tmp_path / "elsewhere")))
    with pytest.raises(ConfigError, match="is a file: name a folder"):
        train(tiny_config(run_dir / "config.json", epochs=1))
    (run_dir / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is unreadable"):
        train(Config(resume=str(run_dir), epochs=3))


def test_accelerate_launched_with_another_precision_is_one_clear_error(monkeypatch, tmp_path):
    class Launched:  # what `accelerate launch --mixed_precision bf16` builds
        mixed_precision = "bf16"

        def __init__(self, cpu):
            pass

    monkeypatch.setattr(plumbing, "Accelerator", Launched)
    with pytest.raises(ConfigError, match="pass --mixed-precision bf16"):
        plumbing.Run(tiny_config(tmp_path / "run"))
