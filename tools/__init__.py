"""The scripts that make the tiny world's assets: the emoji atlas and its class list, the pretrained
diffusion model, the captioner, and the report and benchmarks that measure them. They are not what
a reader of the algorithm needs (that is ddpo_min.py, sampler.py, rewards.py and tiny.py), and a
training run imports none of them. Run them from the repo root as `python -m tools.<name> ...`.
"""
