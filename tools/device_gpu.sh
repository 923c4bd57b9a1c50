#!/bin/bash
# The one prepared command for a lent GPU machine (no network there; its python3 holds a CUDA torch,
# transformers, peft and accelerate, but not diffusers). Here, first: pip download diffusers==0.42.1
# --no-deps -d .whl   (.whl/ is ignored by git and travels with carry). Then, from the device tool:
#     run(command="bash tools/device_gpu.sh", carry=[".whl"], timeout_s=540)
# It installs the carried wheels, records the machine and the versions, and runs the GPU check
# (tools/gpu_check.py) with its JSON and log in $OUT, the folder that comes back.
set -o pipefail
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
OUT=${OUT:-/tmp/ddpo_gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/env.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/env.txt" || exit 4
import accelerate, diffusers, peft, torch, transformers
print("python3 torch", torch.__version__, "cuda", torch.cuda.is_available(), "diffusers",
      diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "accelerate", accelerate.__version__)
import tools.bench  # noqa: F401  (the project imports here)
PY
timeout -k 10 450 python3 -m tools.bench gpu --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
echo "bench exit status $?"
ls -la "$OUT"
