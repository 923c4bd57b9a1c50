"""A fingerprint of the training loop: the weights and logged numbers of 2-epoch toy runs of every
algorithm and option, for a refactor that must not change behaviour.

    python -m tools.fingerprint before.json      # on the old code
    python -m tools.fingerprint after.json       # on the new code, then compare the two files

Run both on an idle machine, or with --threads fixed: the loop gives cores back to busy
neighbours (plumbing.ThreadGovernor), and a different thread count changes float rounding.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

import ddpo_min
from config import Config

TOY = dict(num_steps=4, sample_batch_size=8, sample_batches=1, samples_per_prompt=4, stat_buffer=4,
           stat_min_count=4, train_batch_size=4, minibatches=2, grid_size=4, kl_samples=2,
           device="cpu", epochs=2, threads=1)
CASES = {"ddpo_is": {}, "ddpo_sf": dict(minibatches=1), "rwr": {}, "rwr_sparse": {},
         "ddpo_is kl": dict(kl_coef=1.0), "ddpo_is blind": dict(reward_blind=True),
         "rwr reward": dict(rwr_signal="reward"), "rwr_sparse blind": dict(reward_blind=True),
         "ddpo_is batchwide": dict(per_prompt_stats=False)}


def main(path: str) -> None:
    out = {}
    for name, extra in CASES.items():
        algo = name.split()[0]
        with tempfile.TemporaryDirectory() as d:
            run_dir = ddpo_min.train(Config.tiny(algo=algo, output_dir=d, **{**TOY, **extra}))
            w = load_file(Path(run_dir) / "weights" / "unet.safetensors")
            raw = b"".join(w[k].numpy().tobytes() for k in sorted(w))
            digest = hashlib.sha256(raw).hexdigest()[:16]
            lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            metrics = [{k: v for k, v in json.loads(line).items()
                        if not k.startswith("time") and k != "samples_per_second"}
                       for line in lines]  # wall times differ from run to run
        out[name] = dict(weights=digest, metrics=metrics)
        print(name, digest, flush=True)
    Path(path).write_text(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
