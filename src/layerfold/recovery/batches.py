"""The order training blocks are seen in: one sequence of micro-batches, whatever the number of processes.

The training blocks are read as an endless sequence of epochs; epoch ``e`` is a permutation of the
rows drawn from ``torch.Generator().manual_seed(seed * 1000 + e)``, cut into micro-batches of
``batch_size`` rows (the last micro-batch of an epoch is short when the rows do not divide evenly).
Micro-batch ``i`` is therefore a pure function of ``i``: a resumed run continues at the index where
it stopped, and every process computes the same sequence without talking to the others.

Optimiser step ``s`` consumes the global micro-batches ``s * grad_accum ... s * grad_accum + grad_accum - 1``.
With N processes, accelerate's batch-sampler shard hands global micro-batch ``i`` to process
``i % N``, so each process runs ``grad_accum / N`` of them per step, no micro-batch is seen twice and
none is skipped: the samples of every optimiser step, and the order within the run, are those of the
single-process run.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset


class MicroBatches:
    """Row indices of micro-batches ``start .. stop - 1`` of the seeded epoch sequence (a batch sampler).

    ``batch_size`` is None on purpose: it tells accelerate's ``BatchSamplerShard`` that batches may
    differ in size, so it neither holds back an epoch's short last micro-batch nor pads with rows from
    the start; ``micro_batch_size`` is the configured size.
    """

    batch_size = None

    def __init__(self, rows: int, micro_batch_size: int, seed: int, start: int, stop: int) -> None:
        self.rows = rows
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.start = start
        self.stop = stop
        self.per_epoch = -(-rows // micro_batch_size)
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, index: int) -> list[int]:
        """The rows of global micro-batch ``index``."""
        epoch, chunk = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        return self._order[chunk * self.micro_batch_size : (chunk + 1) * self.micro_batch_size].tolist()

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[int]]:
        for index in range(self.start, self.stop):
            yield self.indices(index)


class IndexedRows(Dataset):
    """The rows of a ``[n, seq_len]`` token tensor as ``(row index, token ids)``: batches carry the indices
    along (collated to ``[indices, ids]``), so targets stored per row can be looked up for them."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, self.blocks[index]
