"""pytest settings for executing the notebooks: `python -m pytest --nbmake notebooks`.

The kernels nbmake starts inherit this process's environment, so:
- DDPO_SOLUTIONS=1 makes the exercise notebooks run the reference implementations (their first
  cell reads it); without it an unsolved exercise fails its self-check, as it should for a student.
- HF_HUB_OFFLINE=1: at tiny scale nothing may come from the Hugging Face hub.
"""

import os

os.environ.setdefault("DDPO_SOLUTIONS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# the executed copies (notebooks/executed/, for reading on GitHub) are not executed again
collect_ignore_glob = ["executed/*"]
