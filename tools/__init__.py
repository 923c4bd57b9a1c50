"""The scripts that make the tiny world's assets: the emoji atlas and its class list, the pretrained
diffusion model, the captioner, and the report and benchmarks that measure them. They are not what
a reader of the algorithm needs (that is ddpo_min.py, sampler.py, rewards.py and tiny.py), and a
training run imports none of them. Run them from the repo root as `python -m tools.<name> ...`.
"""

import json as _json
import os as _os
from pathlib import Path as _Path


def write_json(path, data, **dumps) -> None:
    """Write a result file whole or not at all: to a temporary file beside it, then renamed, so a
    kill mid-write leaves the previous file (or none), never a truncated one that a resumed job
    would misread. dumps: json.dumps's options (indent 1 unless given)."""
    path = _Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{_os.getpid()}.tmp")  # two shards may write one file
    tmp.write_text(_json.dumps(data, **{"indent": 1, **dumps}))
    _os.replace(tmp, path)
