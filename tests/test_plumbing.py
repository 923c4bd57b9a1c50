"""plumbing.py: the reward executor, checkpoints that survive damage, the CPU thread governor."""

from __future__ import annotations

import pytest
import torch
from toy import history, tiny_config

import plumbing
from config import Config, ConfigError
from ddpo_min import train


def test_rewards_run_inline_on_cpu_and_on_a_worker_thread_elsewhere():
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
    pool = plumbing.reward_executor(torch.device("cuda"))  # building it needs no GPU
    try:
        assert isinstance(pool, ThreadPoolExecutor)
        assert pool.submit(threading.get_ident).result() != threading.get_ident()
    finally:
        pool.shutdown()


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
