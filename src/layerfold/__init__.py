"""layerfold: make decoder-only LLMs shallower by pruning and merging whole transformer layers."""

from layerfold.env import offline_defaults

__version__ = "0.1.0"

# Before any stage or script imports huggingface_hub/datasets: no half-minute hub retries in a plain shell.
offline_defaults()
