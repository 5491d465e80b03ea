"""layerfold: make decoder-only LLMs shallower by pruning and merging whole transformer layers."""

from layerfold.env import offline_defaults

__version__ = "0.1.0"

# Before any stage or script imports huggingface_hub/datasets: no half-minute hub retries in a plain shell.
offline_defaults()

__all__ = ["compress", "recover"]


def __getattr__(name: str):
    """``layerfold.compress`` / ``layerfold.recover`` (:mod:`layerfold.api`), imported on first use so that importing a
    submodule does not load the methods and the recovery engine."""
    if name in __all__:
        from layerfold import api

        return getattr(api, name)
    raise AttributeError(f"module 'layerfold' has no attribute {name!r}")
