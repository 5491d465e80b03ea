"""layerfold: make decoder-only LLMs shallower by pruning and merging whole transformer layers."""

__version__ = "0.1.0"
