"""Datasets: calibration text, evaluation corpora and offline benchmark files."""
