"""Evaluation: perplexity, lm-eval benchmarks and efficiency measurements."""
