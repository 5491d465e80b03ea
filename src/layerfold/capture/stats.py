"""Streaming statistics over layer boundaries: everything the scoring functions need, in O(L^2) memory.

A boundary reaches :meth:`BoundaryStatistics.add` as soon as the layer that produces it has run, in
either of two orders: batch-major (the whole model resident: batch 0 boundaries ``0..L``, then batch
1, ...) or boundary-major (a layer-at-a-time executor: boundary 0 of every batch, then boundary 1,
...). Within a batch the boundaries always arrive in increasing order, and per batch the accumulator
keeps only what a later boundary of that batch still needs:

- **Token cosine between boundaries** (all pairs, or pairs ``|i - j| <= max_distance``) needs the
  earlier boundaries at full token resolution. They are kept as the hidden states themselves, in the
  dtype the model produced, in a token-major ring of slots. The pairs are counted in one pass over the
  ring: per-token dot products of every two slots by one batched matmul with fp32 accumulation, whose
  diagonal is each token's squared norm, so the cosines need no second read of the ring (divided by
  the two norms, summed over tokens in fp64). Comparing each new boundary with every kept one as it
  arrives would re-read the kept ones once per arrival, ``O(L^2)`` reads of the batch's hidden states
  instead of one. With all pairs the ring holds all ``L + 1`` boundaries and is read once, when the
  batch's last boundary arrives. With ``max_distance = d`` it has ``2d + 1`` slots (fewer if that
  covers every boundary): when full, the pending pairs are counted and the boundaries that can no
  longer pair with a later one are dropped, so each boundary is read about twice and memory stays
  ``2d + 1`` boundaries whatever the depth. Pairs farther apart stay NaN. With ``max_distance = 1``
  (what Block Influence reads) there is no ring: each boundary is compared with the previous one as
  it arrives, which is held by reference, not copied, until then (one pass, nothing written).
- **Last-token angular distance** needs only each boundary's last-token vector (``[L + 1, batch, hidden]``).
- **Sample features** need only each boundary's per-sequence mean over tokens after the first.

Memory of a batch with all pairs: ``(L + 1) x tokens x hidden`` elements of the stored dtype; for a
Llama-2-7B in bf16 and one 2048-token sequence, 33 x 2048 x 4096 x 2 B = 0.55 GB, 4 % of its weights.

**No host synchronisation while the model runs.** Every sum (token cosines, last-token angles, sample
features) accumulates on the activations' device; index tensors for the ring's pairs are made once per
ring layout and reused. The host reads the sums once, when a result is asked for (``cosine``,
``tensors()``, ...). On an accelerator a host read waits for every queued kernel, so the next batch's
forward could not be queued behind this batch's statistics (on the Llama-2-7B shape the three reads per
batch the earlier code made were within run-to-run noise of none; what matters is that nothing here
forces a wait). The check for NaN/inf activations follows the same rule: each batch's flags
are copied to the host without waiting and read one batch later (and at the end), so a broken model
stops after the next batch, naming the first boundary where the values went bad.

``store_dtype`` (default None: the dtype the hidden states arrive in) is what the ring stores. The
default loses nothing: the cosines are computed in fp32 from exactly the values the model produced,
so float32 for a bf16 model doubles the memory for the same result. ``torch.bfloat16`` for an fp32
model halves the memory at the cost of rounding every element to 8 significant bits before the dot
products; on stories260K (fp32, 4 x 64 tokens) that moved the mean cosines by at most 9.8e-5 (measured
by ``tests/capture/test_streaming_stats.py``, which bounds it at 1e-3).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from layerfold.capture.hooks import LayerBoundaries, iterate_batches
from layerfold.models.adapters import get_adapter

NORM_EPS = 1e-12  # F.normalize's floor: a zero vector has cosine 0 with everything, as before
FLUSH_WORKING_BYTES = 64 << 20  # temporaries of one pass over the ring are made in token chunks of this size


class NonFiniteActivationError(FloatingPointError):
    """A layer produced NaN or inf activations; the message names the layer."""


def _non_finite_message(boundary: int) -> str:
    where = "the embeddings" if boundary == 0 else f"the output of decoder layer {boundary - 1}"
    return (
        f"NaN or inf activations first appear in {where} (layer boundary {boundary}). The weights are damaged "
        "or the compute dtype overflows: try runtime.dtype=float32, and restore the checkpoint with "
        "`dvc checkout --force artifacts/base` if it was modified."
    )


@functools.cache
def _fp32_output_bmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether half-precision matrices on ``device`` multiply straight into fp32 output (CUDA, recent torch)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    probe = torch.zeros(1, 1, 1, dtype=dtype, device=device)
    try:
        torch.bmm(probe, probe, torch.float32)
    except (TypeError, RuntimeError):
        return False
    return True


def _widens(states: torch.Tensor) -> bool:
    """Whether the dot products need an fp32 copy of a chunk of the ring first."""
    return states.dtype not in (torch.float32, torch.float64) and not _fp32_output_bmm(states.device, states.dtype)


def _token_dots(block: torch.Tensor) -> torch.Tensor:
    """Per-token dot products between the slots of ``block`` ``[tokens, slots, hidden]``: ``[tokens, slots, slots]``.

    Accumulated in fp32 or wider. Half-precision rings on CUDA go straight to a matmul that accumulates
    and returns fp32, so no fp32 copy of the ring is made; elsewhere the chunk is widened first.
    """
    if not _widens(block):
        return torch.bmm(block, block.mT, torch.float32) if block.dtype in (torch.bfloat16, torch.float16) else torch.bmm(block, block.mT)
    wide = block.float()
    return torch.bmm(wide, wide.mT)


class _Window:
    """What every batch keeps whatever the pairs: each boundary's last-token vector and per-sequence feature."""

    def __init__(self, first: torch.Tensor, num_boundaries: int) -> None:
        batch, _, width = first.shape
        self.shape = first.shape
        self.last = torch.empty(num_boundaries, batch, width, dtype=torch.float32, device=first.device)
        self.features = torch.empty(num_boundaries, batch, width, dtype=torch.float32, device=first.device)
        self.next_boundary = 0

    def _record(self, boundary: int, hidden: torch.Tensor) -> None:
        self.last[boundary].copy_(hidden[:, -1])
        # Mean over tokens after the first: BOS/attention-sink tokens carry outlier norms that would dominate.
        torch.mean(hidden[:, 1:], dim=1, dtype=torch.float32, out=self.features[boundary])
        self.next_boundary += 1


class _BatchWindow(_Window):
    """What one calibration batch still needs while its boundaries arrive (see the module docstring)."""

    def __init__(self, first: torch.Tensor, num_boundaries: int, slots: int, store_dtype: torch.dtype) -> None:
        super().__init__(first, num_boundaries)
        batch, seq, width = first.shape
        self.slots = slots
        # Token-major, so a chunk of tokens is one contiguous [tokens, slots, hidden] block for the matmul.
        self.states = torch.empty(batch * seq, slots, width, dtype=store_dtype, device=first.device)
        self.held: list[int] = []  # boundaries in the ring, ascending; boundary b sits in slot b % slots
        self.pending: list[int] = []  # held boundaries whose pairs are not counted yet

    @property
    def full(self) -> bool:
        return len(self.held) == self.slots

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.states, self.last, self.features))

    def put(self, boundary: int, hidden: torch.Tensor) -> None:
        slot = boundary % self.slots
        tokens = hidden.reshape(-1, hidden.shape[-1])
        self.states[:, slot].copy_(tokens)
        self.held.append(boundary)
        self.pending.append(boundary)
        self._record(boundary, hidden)

    def drop_below(self, lowest: int) -> None:
        self.held = [b for b in self.held if b >= lowest]

    def cosine_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over the ring: the sum over the batch's tokens of cos(slot a, slot b), ``[slots, slots]``
        float64, and whether each slot's values are all finite, ``[slots]`` bool; both on the ring's device.

        Slots not in use hold stale or uninitialised values; their rows are computed and ignored (each
        entry depends on its two slots only).
        """
        tokens, slots, width = self.states.shape
        per_token = 2 * slots * slots * 4 + (slots * width * 4 if _widens(self.states) else 0)
        step = max(1, FLUSH_WORKING_BYTES // per_token)
        device = self.states.device
        total = torch.zeros(slots, slots, dtype=torch.float64, device=device)
        finite = torch.ones(slots, dtype=torch.bool, device=device)
        for start in range(0, tokens, step):
            dots = _token_dots(self.states[start : start + step])  # [chunk, slots, slots], fp32
            squares = dots.diagonal(dim1=1, dim2=2)  # each token's squared norm, from the same products
            finite &= torch.isfinite(squares).all(0)  # NaN/inf anywhere in a token makes its square non-finite
            norms = squares.sqrt().clamp_min(NORM_EPS)
            dots /= norms[:, :, None] * norms[:, None, :]
            total += dots.sum(0, dtype=torch.float64)
        return total, finite


class _ChainWindow(_Window):
    """What one batch needs when only adjacent boundaries pair (``max_distance=1``): the previous boundary.

    Each boundary is compared with the one before it as it arrives (per-token dot products, norms,
    cosines summed over tokens), so no ring and no copy: the previous boundary is held by reference
    (the forward made it as the layer's output and would free it next) until the following one has
    arrived. A model that changed a layer's output in place after the hook saw it would corrupt that
    reference; its version counter is checked before use.
    """

    pending: tuple[int, ...] = ()  # nothing is ever left to count: pairs are counted on arrival
    full = False  # no ring to flush

    def __init__(self, first: torch.Tensor, num_boundaries: int, sums: _DeviceSums, store_dtype: torch.dtype) -> None:
        super().__init__(first, num_boundaries)
        self.sums = sums
        self.store_dtype = store_dtype
        self.previous: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (tokens, version, fp32 norms)

    @property
    def nbytes(self) -> int:
        held = [self.last, self.features] + (list(self.previous[0::2]) if self.previous is not None else [])
        return sum(t.numel() * t.element_size() for t in held)

    def drop_below(self, lowest: int) -> None:
        pass

    def put(self, boundary: int, hidden: torch.Tensor) -> None:
        tokens = hidden.reshape(-1, hidden.shape[-1])
        if tokens.dtype != self.store_dtype:
            tokens = tokens.to(self.store_dtype)
        norms = torch.linalg.vector_norm(tokens, dim=-1, dtype=torch.float32)
        self.sums.add_self(boundary, (norms >= NORM_EPS).sum(dtype=torch.float64), torch.isfinite(norms).all())
        if self.previous is not None:
            before, version, before_norms = self.previous
            if before._version != version:
                raise RuntimeError(
                    f"Boundary {boundary - 1} was changed in place after capture saw it (the model modifies a layer's output "
                    "in place); capture with max_distance >= 2 or None, which copy every boundary they keep."
                )
            cosines = _pair_dots(before, tokens) / (before_norms.clamp_min(NORM_EPS) * norms.clamp_min(NORM_EPS))
            self.sums.add_adjacent(boundary, cosines.sum(dtype=torch.float64))
        self.previous = (tokens, tokens._version, norms)
        self._record(boundary, hidden)


def _pair_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token dot products of two ``[tokens, hidden]`` tensors, accumulated in fp32 (``[tokens]`` float32)."""
    if _widens(a):
        a, b = a.float(), b.float()
    if a.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(a[:, None], b[:, :, None], torch.float32).view(-1)
    return torch.bmm(a[:, None], b[:, :, None]).view(-1)


@dataclass
class BoundaryStatistics:
    """Running sums over calibration tokens for ``B = L + 1`` layer boundaries.

    - ``cosine_sum[i, j]``: sum over all tokens of cos(h_i, h_j)  (BI, windowed cosine); NaN where
      ``|i - j| > max_distance`` (not captured)
    - ``last_angular_sum[i, j]``: sum over sequences of arccos(cos(h_i, h_j))/pi on the last token (Gromov),
      always all pairs
    - ``sample_features[i]``: per-sequence mean of h_i over tokens after the first (MKA manifolds); the
      first position is skipped because BOS/attention-sink tokens carry outlier norms that would dominate.

    While batches arrive the sums live on the activations' device; reading any of them (or a derived
    view) brings them to the host as float64 CPU tensors and checks every boundary was finite.
    """

    num_boundaries: int
    max_distance: int | None = None
    store_dtype: torch.dtype | None = None
    tokens: int = 0
    sequences: int = 0
    _cosine_sum: torch.Tensor = field(init=False, repr=False)
    _last_angular_sum: torch.Tensor = field(init=False, repr=False)
    _features: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)  # batch_id -> [B, batch, hidden]
    _open: dict[int, _BatchWindow | _ChainWindow] = field(default_factory=dict, init=False, repr=False)
    _finished: set[int] = field(default_factory=set, init=False, repr=False)
    _device_sums: _DeviceSums | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        distance = self.max_distance
        if distance is not None and (isinstance(distance, bool) or not isinstance(distance, int) or distance < 1):
            raise ValueError(
                f"max_distance={self.max_distance!r} is not allowed: use an integer >= 1 (keep the token cosine of "
                "boundaries at most that many layers apart) or None (all pairs)."
            )
        if self.store_dtype is not None and not (isinstance(self.store_dtype, torch.dtype) and self.store_dtype.is_floating_point):
            raise ValueError(
                f"store_dtype={self.store_dtype!r} is not allowed: use a floating torch dtype (torch.bfloat16 halves "
                "the memory of fp32 activations) or None to keep the dtype the model produces."
            )
        b = self.num_boundaries
        self._cosine_sum = torch.zeros(b, b, dtype=torch.float64)
        self._cosine_sum[~self.captured_pairs] = float("nan")
        self._last_angular_sum = torch.zeros(b, b, dtype=torch.float64)

    @property
    def reach(self) -> int:
        """The largest ``|i - j|`` whose token cosine is captured."""
        last = self.num_boundaries - 1
        return last if self.max_distance is None else min(self.max_distance, last)

    @property
    def captured_pairs(self) -> torch.Tensor:
        """``[B, B]`` bool: which entries of ``cosine_sum`` are accumulated (the rest stay NaN)."""
        index = torch.arange(self.num_boundaries)
        return (index[:, None] - index[None, :]).abs() <= self.reach

    @property
    def held_bytes(self) -> int:
        """Bytes the accumulator holds on the activations' device for batches still in progress."""
        return sum(window.nbytes for window in self._open.values())

    # Feeding ------------------------------------------------------------------------------------
    def add(self, boundary: int, batch_id: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Add the residual stream at ``boundary`` (0 = input of layer 0, i = output of layer i - 1) of batch ``batch_id``.

        ``hidden`` is ``[batch, seq, hidden]`` in any dtype. Each batch's boundaries must arrive in
        increasing order; batches may interleave (boundary-major). ``attention_mask`` is accepted for
        padded batches later; today every token must be real (fixed-length calibration blocks).
        """
        _require_unpadded(attention_mask, hidden)
        window = self._window_for(boundary, batch_id, hidden)
        if window.full:
            self._count_pending(window)
            window.drop_below(boundary - self.reach)
        window.put(boundary, hidden)
        if boundary == self.num_boundaries - 1:
            self._count_pending(window)
            self._finish(batch_id, window)

    def update(self, boundaries: torch.Tensor) -> None:
        """Add one batch of every boundary at once, ``[batch, seq, L + 1, hidden]`` (e.g. ``LayerBoundaries.stacked()``)."""
        if boundaries.dim() != 4 or boundaries.shape[2] != self.num_boundaries:
            raise ValueError(
                f"update() takes [batch, seq, {self.num_boundaries}, hidden] (every boundary of one batch), got shape "
                f"{tuple(boundaries.shape)}; feed boundaries one at a time with add() instead."
            )
        batch_id = 1 + max(self._finished | set(self._open), default=-1)
        for boundary in range(self.num_boundaries):
            self.add(boundary, batch_id, boundaries[:, :, boundary])

    def _window_for(self, boundary: int, batch_id: int, hidden: torch.Tensor) -> _BatchWindow | _ChainWindow:
        last = self.num_boundaries - 1
        if not 0 <= boundary <= last:
            raise ValueError(
                f"boundary={boundary} is out of range 0..{last} (0 = input of layer 0, i = output of layer i - 1); "
                f"these statistics were made for {last} layers."
            )
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [batch, seq, hidden], got shape {tuple(hidden.shape)} at boundary {boundary}.")
        if batch_id in self._finished:
            raise ValueError(f"batch_id={batch_id} already has all {last + 1} boundaries; give every calibration batch its own id.")
        window = self._open.get(batch_id)
        if window is None:
            if boundary != 0:
                raise ValueError(f"batch_id={batch_id} starts at boundary {boundary}; each batch's boundaries must arrive in order from 0.")
            if self._device_sums is None:
                self._device_sums = _DeviceSums(self.num_boundaries, hidden.device)
            elif hidden.device != self._device_sums.device:
                raise ValueError(f"batch_id={batch_id} arrives on {hidden.device} but earlier batches were on "
                                 f"{self._device_sums.device}; feed every batch from one device.")
            store = self.store_dtype or hidden.dtype
            if self.reach == 1:  # adjacent pairs only: compared on arrival, nothing copied
                window = self._open[batch_id] = _ChainWindow(hidden, self.num_boundaries, self._device_sums, store)
            else:
                slots = min(self.num_boundaries, 2 * self.reach + 1)
                window = self._open[batch_id] = _BatchWindow(hidden, self.num_boundaries, slots, store)
        elif boundary != window.next_boundary:
            raise ValueError(
                f"batch_id={batch_id} got boundary {boundary} but expects {window.next_boundary}: each batch's boundaries "
                "must arrive in increasing order, once each."
            )
        elif hidden.shape != window.shape:
            raise ValueError(
                f"batch_id={batch_id} boundary {boundary} has shape {tuple(hidden.shape)} but its earlier boundaries "
                f"had {tuple(window.shape)}; every boundary of a batch has the same [batch, seq, hidden]."
            )
        return window

    def _count_pending(self, window: _BatchWindow | _ChainWindow) -> None:
        """Add the pairs (held i <= pending j, j - i <= reach) to the cosine sums and their mirror, from one pass over the ring."""
        if not window.pending:
            return
        sums, finite = window.cosine_sums()
        self._device_sums.add_pairs(sums, finite, window.held, window.pending, window.slots, self.reach)
        window.pending.clear()

    def _finish(self, batch_id: int, window: _BatchWindow | _ChainWindow) -> None:
        last = F.normalize(window.last, dim=-1)  # [B, batch, hidden]
        cos = torch.einsum("ibd,jbd->bij", last, last).clamp(-1.0, 1.0)
        # A vector's angle to itself is 0; arccos would turn the rounding of 1 into up to ~1e-4.
        cos.diagonal(dim1=1, dim2=2).fill_(1.0)
        self._device_sums.angular += (torch.arccos(cos) / torch.pi).sum(0, dtype=torch.float64)
        self._device_sums.check_previous_batch()
        self._features[batch_id] = window.features  # stays on the device until read
        batch, seq, _ = window.shape
        self.tokens += batch * seq
        self.sequences += batch
        del self._open[batch_id]
        self._finished.add(batch_id)

    def synchronize(self) -> None:
        """Bring the sums so far to the host (one wait for the device) and raise if any boundary was not finite.

        Reading a result does this; :func:`capture_statistics` does it once at its end, so a broken model
        fails there. Batches still open keep accumulating on the device afterwards.
        """
        if self._device_sums is not None:
            self._device_sums.raise_if_non_finite()
            cosine, angular = self._device_sums.take()
            self._cosine_sum += cosine
            self._last_angular_sum += angular
        self._features = {k: v.cpu() for k, v in self._features.items()}

    # Results (on the host) -----------------------------------------------------------------------
    @property
    def cosine_sum(self) -> torch.Tensor:
        """``[B, B]`` float64: sum over tokens of cos(h_i, h_j) (NaN for pairs not captured)."""
        self.synchronize()
        return self._cosine_sum

    @cosine_sum.setter
    def cosine_sum(self, value: torch.Tensor) -> None:  # hand-made statistics (tests, from_tensors)
        self.synchronize()
        self._cosine_sum = value

    @property
    def last_angular_sum(self) -> torch.Tensor:
        """``[B, B]`` float64: sum over sequences of the last token's angular distance."""
        self.synchronize()
        return self._last_angular_sum

    @last_angular_sum.setter
    def last_angular_sum(self, value: torch.Tensor) -> None:  # hand-made statistics (tests, from_tensors)
        self.synchronize()
        self._last_angular_sum = value

    @property
    def features(self) -> dict[int, torch.Tensor]:
        """batch id -> ``[B, batch, hidden]`` float32 per-sequence features, on the host."""
        self.synchronize()
        return self._features

    @property
    def cosine(self) -> torch.Tensor:
        """Mean token cosine between boundaries, ``[L + 1, L + 1]`` (NaN for pairs not captured)."""
        return (self.cosine_sum / max(self.tokens, 1)).float()

    @property
    def last_token_angular(self) -> torch.Tensor:
        """Mean last-token angular distance between boundaries, ``[L + 1, L + 1]``."""
        return (self.last_angular_sum / max(self.sequences, 1)).float()

    @property
    def sample_features(self) -> torch.Tensor:
        """``[L + 1, num_sequences, hidden]``, sequences in batch-id order."""
        features = self.features
        return torch.cat([features[k] for k in sorted(features)], dim=1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "cosine_sum": self.cosine_sum,
            "last_angular_sum": self.last_angular_sum,
            "sample_features": self.sample_features,
            "counts": torch.tensor([self.tokens, self.sequences], dtype=torch.long),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> BoundaryStatistics:
        cosine_sum = tensors["cosine_sum"].double()
        stats = cls(num_boundaries=cosine_sum.shape[0], max_distance=_captured_distance(cosine_sum))
        stats.cosine_sum = cosine_sum
        stats.last_angular_sum = tensors["last_angular_sum"].double()
        stats.tokens, stats.sequences = (int(v) for v in tensors["counts"])
        stats._features = {0: tensors["sample_features"]}
        stats._finished.add(0)
        return stats


class _DeviceSums:
    """The sums of :class:`BoundaryStatistics` while batches arrive, on the activations' device.

    Which ring slots pair with which boundaries depends only on the ring's layout (held and pending
    boundaries), which repeats from batch to batch: the index tensors are made once per layout and
    reused, so counting a batch's pairs never waits for the host.
    """

    def __init__(self, num_boundaries: int, device: torch.device) -> None:
        self.device = device
        self.cosine = torch.zeros(num_boundaries, num_boundaries, dtype=torch.float64, device=device)
        self.angular = torch.zeros(num_boundaries, num_boundaries, dtype=torch.float64, device=device)
        self.finite = torch.ones(num_boundaries, dtype=torch.bool, device=device)
        self._pairs: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._in_flight: tuple[torch.Tensor, torch.cuda.Event | None] | None = None  # last batch's flags, copied without waiting

    def add_pairs(self, sums: torch.Tensor, finite: torch.Tensor, held: list[int], pending: list[int], slots: int, reach: int) -> None:
        key = (tuple(held), tuple(pending), slots, reach)
        if key not in self._pairs:
            pairs = [(i, j) for j in pending for i in held if i <= j and j - i <= reach]
            rows = [i for i, j in pairs] + [j for i, j in pairs if i != j]  # each pair and its mirror
            cols = [j for i, j in pairs] + [i for i, j in pairs if i != j]
            as_index = functools.partial(torch.tensor, dtype=torch.long, device=self.device)
            self._pairs[key] = (as_index(rows), as_index(cols), as_index([r % slots for r in rows]), as_index([c % slots for c in cols]),
                                as_index(pending), as_index([p % slots for p in pending]))
        rows, cols, row_slots, col_slots, boundaries, boundary_slots = self._pairs[key]
        self.cosine.index_put_((rows, cols), sums[row_slots, col_slots], accumulate=True)
        self.finite[boundaries] &= finite[boundary_slots]

    def add_self(self, boundary: int, tokens_counted: torch.Tensor, finite: torch.Tensor) -> None:
        """A boundary's own pair: cos(h, h) = 1 for every token that is not zero (the ring's diagonal, exactly)."""
        self.cosine[boundary, boundary] += tokens_counted
        self.finite[boundary] &= finite

    def add_adjacent(self, boundary: int, cosine_sum: torch.Tensor) -> None:
        """The pair (boundary - 1, boundary) and its mirror."""
        self.cosine[boundary - 1, boundary] += cosine_sum
        self.cosine[boundary, boundary - 1] += cosine_sum

    def check_previous_batch(self) -> None:
        """Raise if the flags copied at the previous batch's end show a non-finite boundary; copy this batch's."""
        if self._in_flight is not None:
            flags, copied = self._in_flight
            if copied is not None:
                copied.synchronize()  # recorded a whole batch ago: normally long done
            _raise_for(flags)
        if self.device.type == "cuda":
            flags = torch.empty(self.finite.shape, dtype=torch.bool, pin_memory=True)
            flags.copy_(self.finite, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            self._in_flight = (flags, copied)
        else:
            self._in_flight = (self.finite.clone(), None)

    def raise_if_non_finite(self) -> None:
        _raise_for(self.finite.cpu())

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cosine and angular sums on the host; the device ones restart from zero."""
        cosine, angular = self.cosine.to("cpu", copy=True), self.angular.to("cpu", copy=True)  # .cpu() of a CPU tensor is itself
        self.cosine.zero_()
        self.angular.zero_()
        return cosine, angular


def _raise_for(finite: torch.Tensor) -> None:
    bad = (~finite).nonzero()
    if len(bad):
        raise NonFiniteActivationError(_non_finite_message(int(bad[0])))


def _captured_distance(cosine_sum: torch.Tensor) -> int | None:
    """The ``max_distance`` a saved ``cosine_sum`` was captured with: None when every pair is there."""
    index = torch.arange(cosine_sum.shape[0])
    missing = (index[:, None] - index[None, :]).abs()[~torch.isfinite(cosine_sum)]
    return None if missing.numel() == 0 else int(missing.min()) - 1


def _require_unpadded(attention_mask: torch.Tensor | None, hidden: torch.Tensor) -> None:
    if attention_mask is None:
        return
    if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but hidden is {tuple(hidden.shape)}; it must be [batch, seq].")
    if not bool(attention_mask.bool().all()):
        raise ValueError(
            "attention_mask marks padding, which capture statistics do not support yet: every statistic averages over "
            "all tokens. Use fixed-length calibration blocks (data.calibration.chunking concat or per_document) without padding."
        )


@torch.no_grad()
def capture_statistics(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 4,
    desc: str | None = "capture",
    *,
    max_distance: int | None = None,
    store_dtype: torch.dtype | None = None,
    stats: BoundaryStatistics | None = None,
) -> BoundaryStatistics:
    """One pass over ``blocks`` ``[n, seq]`` accumulating :class:`BoundaryStatistics` for the model's current layers
    (into ``stats`` when given, batch ids = batch positions in ``blocks``; else into new statistics).

    Hooks hand each boundary to :meth:`BoundaryStatistics.add` while the forward runs, so no batch of
    boundaries is stacked or widened to fp32. Only the decoder runs (``model.base_model``, no LM head):
    capture never reads logits, and they would be the largest activation of the pass.
    """
    device = next(model.parameters()).device
    decoder = model.base_model
    if stats is None:
        stats = BoundaryStatistics(get_adapter(model).num_layers(model) + 1, max_distance, store_dtype)
    batch_id = 0

    def on_boundary(index: int, hidden: torch.Tensor) -> None:
        stats.add(index, batch_id, hidden)

    with LayerBoundaries(model, on_boundary=on_boundary):
        for batch_id, batch in enumerate(iterate_batches(blocks, batch_size, device, desc)):
            decoder(input_ids=batch, use_cache=False)
    stats.synchronize()
    return stats
