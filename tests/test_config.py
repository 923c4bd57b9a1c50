"""config.py: the tiny and paper recipes, the command line generated from Config, resume, and bad
input as one line naming the fix."""

from __future__ import annotations

import dataclasses
import json

import pytest

import config
import ddpo_min
import loading
from config import Config, ConfigError, parse_args


def test_resume_keeps_the_saved_run_but_takes_how_long_to_go_on(tmp_path):
    # what the run is (reward, lr, seed, ...) comes from the folder; epochs and the wall-time limit
    # of this invocation come from the new command line (tools/bench.py resumes in timed chunks)
    saved = Config.tiny(reward="alignment", seed=7, epochs=3, max_minutes=5.0, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(saved)))
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    cfg = config.resume_config(Config(resume=str(tmp_path), epochs=10, max_minutes=2.5, lr=1.0,
                                      seed=0))
    assert (cfg.reward, cfg.lr, cfg.seed) == ("alignment", saved.lr, 7)
    assert (cfg.epochs, cfg.max_minutes, cfg.output_dir, cfg.resume) == (10, 2.5, str(tmp_path), "")
    assert config.resume_config(Config(resume=str(tmp_path), epochs=0)).epochs == 3  # 0 = as saved
    # the device it ran on, unless another is named (on a GPU machine "" would mean cuda)
    assert config.resume_config(Config(resume=str(tmp_path))).device == "cpu"
    assert config.resume_config(Config(resume=str(tmp_path), device="cuda")).device == "cuda"


def test_tiny_defaults_apply_and_explicit_flags_win():
    cfg = parse_args(["--model", "tiny", "--lr", "5e-5"])
    assert (cfg.num_steps == config.TINY_DEFAULTS["num_steps"] and cfg.lr == 5e-5
            and cfg.lora_rank == 0)
    paper = parse_args([])
    assert (paper.model, paper.num_steps, paper.guidance_scale, paper.lora_rank) == (
        "CompVis/stable-diffusion-v1-4", 50, 5.0, 4)
    assert config.samples_per_epoch(paper) == 256  # the paper's 256 samples per epoch


def test_config_tiny_is_what_the_cli_gives():
    assert Config.tiny(lr=5e-5, reward="alignment") == parse_args(
        ["--model", "tiny", "--lr", "5e-5", "--reward", "alignment"])
    assert Config.tiny().model == "tiny"
    # per-reward tiny defaults apply on the CLI and in Python; an explicit flag still wins
    gentle = config.TINY_REWARD_DEFAULTS["alignment"]["lr"]
    assert parse_args(["--model", "tiny", "--reward", "alignment"]).lr == gentle
    assert Config.tiny(reward="alignment").lr == gentle
    assert parse_args(["--model", "tiny", "--reward", "alignment", "--lr", "1e-3"]).lr == 1e-3
    assert parse_args(["--model", "tiny"]).lr == config.TINY_DEFAULTS["lr"]


def test_the_paper_recipe_per_reward_and_explicit_flags_win():
    jpeg = parse_args(["--reward", "compressibility"])
    assert (jpeg.prompts, jpeg.minibatches, jpeg.stat_buffer, jpeg.stat_min_count, jpeg.epochs) == (
        "imagenet_animals", 4, 16, 16, 100)
    assert parse_args(["--reward", "incompressibility"]).prompts == "imagenet_animals"
    aesthetic = parse_args([])  # the default reward
    assert (aesthetic.prompts, aesthetic.minibatches, aesthetic.stat_buffer) == (
        "simple_animals", 2, 32)
    alignment = parse_args(["--reward", "alignment"])
    assert (alignment.prompts, alignment.minibatches, alignment.stat_buffer) == (
        "animals_activities", 2, 32)
    assert parse_args(["--reward", "compressibility", "--prompts", "simple_animals"]).prompts == (
        "simple_animals")
    assert Config.paper(reward="alignment") == alignment
    assert len(loading.load_prompts("imagenet_animals")) == 398
    assert "an American alligator" in loading.load_prompts("imagenet_animals")  # not "a American"


def test_unknown_flag_or_choice_fails_in_argparse(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--lerning-rate", "1"])
    for flag, bad in (("--algo", "ppo"), ("--reward", "beauty"), ("--trainable", "mlp"),
                      ("--mixed-precision", "fp8"), ("--log", "mlflow")):
        with pytest.raises(SystemExit):
            parse_args([flag, bad])
        assert "invalid choice" in capsys.readouterr().err
    assert parse_args(["--algo", "rwr", "--mixed-precision", "bf16"]).algo == "rwr"


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(algo="ppo"), "unknown --algo"),
        (dict(reward="beauty"), "unknown --reward"),
        (dict(sample_batch_size=3, sample_batches=3, minibatches=2), "batch arithmetic"),
        (dict(eta=0.0), "eta"),
        (dict(eta=1.5), "0 < eta <= 1"),
        (dict(sample_batch_size=8, samples_per_prompt=3), "samples-per-prompt 3 must divide"),
        (dict(trainable="mlp"), "unknown --trainable"),
        (dict(algo="rwr", kl_coef=0.3), "leashes DDPO's policy loss only; --algo rwr"),
        (dict(algo="rwr_sparse", kl_coef=0.3), "--algo rwr_sparse would train without it"),
    ],
)
def test_bad_config_is_one_clear_error(kw, match):
    with pytest.raises(ConfigError, match=match):
        config.check_config(Config(**kw))


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--model", "tiny", "--num-steps", "0"], "--num-steps 0: must be >= 1"),
        (["--model", "tiny", "--lr", "-1"], "--lr -1.0: must be > 0"),
        (["--model", "tiny", "--stat-min-count", "9"], "--stat-min-count 9 must be <="),
        (["--model", "tiny", "--device", "mps"], "--device mps: Apple's GPU backend"),
        (["--model", "tiny", "--device", "tpu"], "--device 'tpu' is not a device"),
        # the default reward is aesthetic: the bad path is named, not the CLIP model it would load
        (["--model", "/no/such/folder"], "--model /no/such/folder: no such folder"),
        (["--resume", "/no/such/run"], "--resume /no/such/run: no checkpoint.pt there"),
        # flags the run would not use
        (["--resume", "/no/such/run", "--lr", "1e-5"], "so --lr cannot change"),
        (["--model", "tiny", "--algo", "rwr", "--clip-range", "1e-3"],
         "--clip-range applies to --algo ddpo_is only; --algo rwr would ignore it"),
        (["--model", "tiny", "--rwr-percentile", "50"], "applies to --algo rwr_sparse only"),
        (["--reward", "compressibility", "--clip-model", "x"],
         "--clip-model is an option of --reward aesthetic"),
        (["--model", "tiny", "--reward", "alignment", "--vlm", "x"], "its own captioner"),
        # numbers no range or finite check caught before
        (["--model", "tiny", "--guidance-scale", "nan"], "--guidance-scale nan: must be a finite"),
        (["--model", "tiny", "--algo", "rwr", "--rwr-beta", "-1"], "--rwr-beta -1.0: must be >= 0"),
        (["--model", "tiny", "--num-steps", "1"], "no step of this sampler is stochastic"),
    ],
)
def test_bad_input_is_one_line_naming_the_fix(argv, says, tmp_path):
    with pytest.raises(SystemExit) as exited:
        ddpo_min.main([*argv, "--output-dir", str(tmp_path / "run")])
    message = str(exited.value.code)
    assert message.startswith("error: ") and says in message and "\n" not in message, message


def test_every_field_reads_default_then_help_and_the_cli_shows_it(capsys):
    names = [f.name for f in dataclasses.fields(Config)]
    docs = config.field_help()
    assert sorted(docs) == sorted(names) and all(docs.values())
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert f"--num-steps NUM_STEPS {docs['num_steps']} (default: 50)" in shown
    assert docs["kl_coef"][:40] in shown
    # a field without its docstring is missing from the map (what the first assert would catch)
    source = 'class C:\n    a: int = 1\n    """help of a"""\n    b: int = 2\n'
    assert config.attribute_docs(source, "C") == {"a": "help of a"}


def test_a_logger_without_its_package_is_one_line_before_anything_loads(monkeypatch):
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="--log wandb needs its package: pip install wandb"):
        config.check_config(Config(log="wandb"))
