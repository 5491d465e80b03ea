"""Fixtures for the layer-major execution tests (imported by each test module): stories260K's calibration
blocks (the checkpoint itself is ``conftest.stories``), and one CPU thread per test.

The tests compare two execution orders of the same fp32 arithmetic on tiny models; one thread keeps
them fast on a shared 2-core machine (OpenMP spin-waiting between two threads costs more than it
saves at these sizes) and changes no result.
"""

from __future__ import annotations

import pytest
import torch

# Short stories in the model's domain: 5 windows of 32 tokens with stories260K's 512-piece tokenizer.
STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her mom. "
    "One day, she saw a big red ball under a tree. She ran to get it, but a dog took it first. Lily was sad. "
    "Her mom said, \"Let's go home and have some cake.\" Lily smiled and they went home together. "
    "The next day, the sun was shining and the birds were singing. Tom and his friend Sam went to the lake. "
    "They saw a fish jump out of the water. Sam laughed and said, \"Look, the fish is happy!\" "
)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models only: one intra-op thread (see conftest.one_thread)."""




@pytest.fixture(scope="session")
def story_blocks(stories) -> torch.Tensor:
    """Calibration-style blocks ``[5, 32]`` of real text."""
    _, _, tokenizer = stories
    ids = torch.tensor(tokenizer(STORY * 2, add_special_tokens=False)["input_ids"][: 5 * 32])
    return ids.view(5, 32)
