"""Properties that must hold for every seed, checked over hundreds of them: no UNet runs here, so
each test takes about a second.

- A minibatch splits over N processes into non-empty chunks that cover each of its samples exactly
  once, with weights that sum to 1 over the processes, also when a process owns none of it.
- Groups of samples that share a prompt (the tiny scale) get advantages normalised within the
  group: they average 0 in every epoch.
- Exercise 5's harness (per-batch statistics) computes the loop's advantages.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ddpo_min
import tiny
from config import Config, samples_per_epoch
from sampler import trainable_steps
from tools import ex5

SEEDS = range(300)


def _process_samples(cfg: Config, rank: int, processes: int) -> ddpo_min.Samples:
    """Process `rank`'s share of an epoch, as sample_epoch lays it out (only what the minibatch
    generators read)."""
    total = samples_per_epoch(cfg)
    mine = total // processes
    index = torch.arange(rank * mine, (rank + 1) * mine)
    signal = np.random.default_rng(cfg.seed).normal(size=total).astype(np.float32)
    return ddpo_min.Samples(
        index=index, latents=torch.empty(0), log_probs=torch.empty(0),
        timesteps=torch.empty(0), prompt_embeds=torch.empty(0), prompts=[], images=torch.empty(0),
        rewards=signal[index.numpy()], extras={}, all_prompts=["p"] * total, all_rewards=signal,
        all_advantages=signal)  # fmt: skip


def _terms(cfg: Config, rank: int, processes: int) -> list[list[tuple[list[tuple], float]]]:
    """Per optimizer step of one epoch, process `rank`'s loss terms as ([(sample number, step j)
    trained], weight), j None for RWR, from the loop's own minibatch generator with the UNet's
    loss replaced by a recorder."""
    scheduler = tiny.make_scheduler()
    scheduler.set_timesteps(cfg.num_steps)
    run = SimpleNamespace(cfg=cfg, device=torch.device("cpu"),
                          train_gen=torch.Generator().manual_seed(cfg.seed + 1),
                          model=SimpleNamespace(scheduler=scheduler, latent_shape=(3, 2, 2)))
    samples = _process_samples(cfg, rank, processes)
    samples.timesteps = scheduler.timesteps.long()
    calls = []

    def recorder(run, samples, idx, j_or_weights, *args):
        assert len(idx) > 0, "a UNet forward on 0 samples"
        numbers = samples.index[idx].tolist()
        steps = j_or_weights.tolist() if cfg.algo.startswith("ddpo") else [None] * len(idx)
        calls.append(list(zip(numbers, steps, strict=True)))  # (sample number, step j)
        return torch.tensor(0.0), {}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ddpo_min, "policy_loss", recorder)
        mp.setattr(ddpo_min, "rwr_loss", recorder)
        adv = torch.as_tensor(samples.all_advantages)  # (S,), as compute_advantages returns
        steps = []
        for terms in ddpo_min.minibatches(run, samples, adv):
            done = len(calls)
            weights = [w for _, w, _ in terms]
            steps.append(list(zip(calls[done:], weights, strict=True)))
    return steps


@pytest.mark.parametrize("algo", ["ddpo_is", "rwr_sparse"])
def test_every_minibatch_splits_exactly_over_processes(algo):
    """The tests' own toy sizes (16 samples, minibatches of 8, chunks of 2): over 300 seeds, one
    process's epoch trains every sample (DDPO; sparse RWR: every kept sample) in exactly one
    optimizer step, on T_train distinct stochastic steps (RWR: once); with 2 and 4 processes
    each step's terms cover the same (sample, step) pairs, no chunk is empty, and the weights sum
    to 1."""
    empty_shares = 0
    for seed in SEEDS:
        cfg = Config.tiny(algo=algo, seed=seed, num_steps=3, sample_batch_size=4, sample_batches=4,
                          samples_per_prompt=2, train_batch_size=2, minibatches=2)
        one = _terms(cfg, 0, 1)
        _trains_each_sample_once(cfg, one)
        if algo == "ddpo_is":  # several trained steps per sample (here T_train is 1)
            more = replace(cfg, num_steps=6, timestep_fraction=1.0)
            _trains_each_sample_once(more, _terms(more, 0, 1))
        for processes in (2, 4):
            shares = [_terms(cfg, r, processes) for r in range(processes)]
            assert all(len(share) == len(one) for share in shares)  # every process steps alike
            for s, step in enumerate(one):
                terms = [term for share in shares for term in share[s]]
                empty_shares += sum(not share[s] for share in shares)
                assert all(0 < len(pairs) <= cfg.train_batch_size for pairs, _ in terms)
                covered = sorted(x for pairs, _ in terms for x in pairs)
                assert covered == sorted(x for pairs, _ in step for x in pairs)
                assert sum(w for _, w in terms) == pytest.approx(1.0)
                per_sample = sum(len(n) for n, _ in terms)  # samples x trained timesteps
                assert all(w == pytest.approx(len(n) / per_sample) for n, w in terms)
    assert empty_shares > 0  # the edge case was reached (seed 0 alone does not reach it)


def _trains_each_sample_once(cfg: Config, steps: list) -> None:
    """One process's epoch: which samples it trains, in how many steps, on which timesteps."""
    total = samples_per_epoch(cfg)
    scheduler = tiny.make_scheduler()
    scheduler.set_timesteps(cfg.num_steps)
    stochastic, T_train = trainable_steps(scheduler, scheduler.timesteps.long(), cfg.eta,
                                          cfg.timestep_fraction)
    if cfg.algo == "rwr_sparse":  # the samples at or above the percentile, each once
        signal = torch.as_tensor(_process_samples(cfg, 0, 1).all_advantages)
        expected = ddpo_min.sparse_rwr_mask(signal, cfg.rwr_percentile).nonzero().flatten()
        T_train, stochastic = 1, torch.tensor([-1])
    else:
        expected = torch.arange(total)
    step_of, trained = {}, {}
    for s, step in enumerate(steps):
        for pairs, _ in step:
            for number, j in pairs:
                assert step_of.setdefault(number, s) == s  # all of a sample's terms in one step
                trained.setdefault(number, []).append(-1 if j is None else j)
    assert sorted(trained) == expected.tolist()
    for js in trained.values():  # T_train distinct stochastic steps each (RWR: one term)
        assert len(js) == len(set(js)) == T_train and set(js) <= set(stochastic.tolist())
def _epoch_rewards(prompts: list[str], rng: np.random.Generator) -> np.ndarray:
    """Rewards whose mean depends on the prompt, as the tiny JPEG reward's does (82% of its
    variance is between prompts)."""
    offset = {p: i % 7 for i, p in enumerate(sorted(set(prompts)))}
    return np.array([offset[p] + rng.normal(scale=0.3) for p in prompts], np.float32)


def test_tiny_groups_are_normalised_within_themselves_in_every_epoch():
    """The tiny defaults (8 groups of 8 per epoch, a buffer of 8): over 300 seeds x 4 epochs the
    groups draw 8 different prompts, and each group's advantages average 0 with std 1 (before the
    clip, which they never reach). Two groups on one prompt failed this in about half the epochs."""
    for seed in SEEDS:
        cfg = Config.tiny(seed=seed)
        k, rng = cfg.samples_per_prompt, np.random.default_rng(seed)
        tracker = ddpo_min.PerPromptStatTracker(cfg.stat_buffer, cfg.stat_min_count)
        for epoch in range(4):
            prompts = ddpo_min.epoch_prompts(cfg, tiny.ANIMAL_PROMPTS, epoch)
            groups = [prompts[g:g + k] for g in range(0, len(prompts), k)]
            assert all(len(set(group)) == 1 for group in groups)  # a group shares one prompt
            assert len({group[0] for group in groups}) == len(groups)  # no prompt twice
            adv = tracker.update(prompts, _epoch_rewards(prompts, rng)).reshape(-1, k)
            assert np.abs(adv.mean(axis=1)).max() < 1e-4, (seed, epoch)
            assert np.abs(adv.std(axis=1) - 1).max() < 1e-3, (seed, epoch)


def test_more_groups_than_prompts_cycle_through_the_prompts():
    """Over 300 seeds and 2, 3 and 5 prompts for 8 groups of 2: a group's samples share a prompt,
    every full cycle of P groups is a permutation of the prompts, the partial cycle repeats none,
    and the draw depends on (seed, epoch) only."""
    for seed in SEEDS:
        cfg = Config.tiny(seed=seed, sample_batch_size=8, sample_batches=2, samples_per_prompt=2)
        for P in (2, 3, 5):
            names = [chr(ord("a") + i) for i in range(P)]
            prompts = ddpo_min.epoch_prompts(cfg, names, epoch=0)
            assert len(prompts) == 16 and prompts[1::2] == prompts[::2]  # groups of 2
            firsts = prompts[::2]  # each group's prompt, 8 groups
            cycles = [firsts[c:c + P] for c in range(0, len(firsts), P)]
            assert all(sorted(c) == names for c in cycles if len(c) == P)
            assert all(len(set(c)) == len(c) for c in cycles)  # the partial cycle too
            assert ddpo_min.epoch_prompts(cfg, names, epoch=0) == prompts  # from (seed, epoch)
    other = [ddpo_min.epoch_prompts(Config.tiny(seed=s, samples_per_prompt=2), list("abcde"), e)
             for s, e in ((0, 0), (0, 1), (1, 0))]
    assert other[0] != other[1] and other[0] != other[2]  # a new draw per epoch and per seed


def test_paper_scale_draws_each_prompt_independently():
    """samples_per_prompt 1 (the paper): each of 256 samples draws one of 398 prompts, i.i.d.
    uniform. Over 100 (seed, epoch) pairs the distinct prompts per epoch average
    398 (1 - (397/398)^256) = 188.9 (sd about 5.7), and the pooled counts fit a uniform draw."""
    names = [str(i) for i in range(398)]
    distinct, counts = [], np.zeros(398)
    for seed in range(50):
        cfg = Config.paper(reward="compressibility", seed=seed)
        for epoch in (0, 1):
            prompts = ddpo_min.epoch_prompts(cfg, names, epoch)
            assert len(prompts) == 256
            distinct.append(len(set(prompts)))
            np.add.at(counts, [int(p) for p in prompts], 1)
    expected = 398 * (1 - (397 / 398) ** 256)
    assert abs(np.mean(distinct) - expected) < 3  # the mean of 100: sd about 0.6
    assert all(abs(d - expected) < 30 for d in distinct)
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()  # 397 degrees of freedom
    assert 397 - 5 * np.sqrt(2 * 397) < chi2 < 397 + 5 * np.sqrt(2 * 397)  # 5 sd either way


def test_the_tracker_normalises_every_reward_with_statistics_that_include_it():
    """A prompt with more rewards in one batch than its buffer holds (3 groups of 8, a buffer of
    8): all of them are in the statistics, so their advantages average 0."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        tracker = ddpo_min.PerPromptStatTracker(buffer_size=8, min_count=8)
        rewards = rng.normal(size=24) + np.repeat(rng.normal(size=3) * 3, 8)
        adv = tracker.update(["cat"] * 24, rewards)
        assert abs(adv.mean()) < 1e-4 and abs(adv.std() - 1) < 1e-3
        assert list(tracker.buffers["cat"]) == pytest.approx(rewards[-8:].tolist())  # as before


def test_exercise_5_harness_computes_the_loops_advantages_for_every_seed():
    """tools/ex5.py replaces phase 3 by per-batch statistics (exercise 4); at the tiny defaults
    the loop's tracker computes the same advantages, in every epoch of 300 seeds."""
    for seed in SEEDS:
        cfg = Config.tiny(seed=seed)
        rng = np.random.default_rng(seed)
        tracker = ddpo_min.PerPromptStatTracker(cfg.stat_buffer, cfg.stat_min_count)
        for epoch in range(3):
            prompts = ddpo_min.epoch_prompts(cfg, tiny.ANIMAL_PROMPTS, epoch)
            rewards = _epoch_rewards(prompts, rng)
            loop = ddpo_min.clip_advantages(tracker.update(prompts, rewards), cfg.adv_clip_max)
            harness = ex5.reference_functions()
            student = harness["clip_advantages"](harness["advantages"](prompts, rewards),
                                                 cfg.adv_clip_max)
            np.testing.assert_allclose(student, loop, rtol=1e-5, atol=1e-5)
