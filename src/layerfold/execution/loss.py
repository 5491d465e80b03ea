"""Losses of a resident model over calibration blocks: next-token NLL (perplexity, SLEB, BlockPruner), the loss
without each candidate layer, and final representations (LaCo).

They sit here, below scoring, because the layer-major runner (:mod:`layerfold.execution.entry`,
:mod:`layerfold.execution.trials`) answers the same questions resident with them; scores built on them
(:func:`layerfold.scoring.loss.representation_similarity`) sit above.

:func:`removal_nll` is SLEB's inner loop, the calibration loss of the model without each candidate
layer, computed without re-running the layers every candidate shares. Removing layer ``i`` leaves
layers ``0..i-1`` untouched, so the hidden state entering layer ``i`` is the same for the full model
and for the model without ``i``; it is kept per batch and carried forward from one candidate to the
next, and evaluating "without ``i``" runs only layers ``i+1..L-1`` and the head on it. Both the
tail and the carry are forwards of the model itself with its layer stack trimmed (shared surgery,
undone at once) and the kept state put in at the first layer, so masks, rotary embeddings, per-layer
attention types, the final norm and the head are the model's own, for any architecture. On the same
batches the losses equal :func:`calibration_nll` of the trimmed model bit for bit (deterministic
kernels: CPU, and the CUDA ones the forward uses), which is what keeps SLEB's choices unchanged.

Cost per call, over ``N T`` calibration tokens with ``L`` layers and ``C`` candidates (a contiguous run
``c..c+C-1``): before, ``C`` full forwards, ``C (L - 1)`` layer passes and ``C`` heads; now
``c + C - 1`` layer passes to carry the state plus ``sum_i (L - 1 - i)`` for the tails, about
``C^2 / 2 + L`` layer passes when ``C ~ L``, and the same ``C`` heads. A layer pass is
``O(N T (d^2 + d d_ff) + N T^2 d)``, a head ``O(N T d V)``. The kept state is one hidden state per
window, ``N T d`` values in the model's dtype, on the model's device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from layerfold.capture.hooks import StopForward, hidden_from, hidden_into, iterate_batches
from layerfold.models.adapters import get_adapter
from layerfold.surgery import StackSnapshot, remove_layers


def _summed_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of one batch (float32 logits), the one formula every loss here uses."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")


@torch.no_grad()
def token_nll(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, desc: str | None = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over ``blocks`` ``[n, seq]`` and the number of predicted tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in iterate_batches(blocks, batch_size, device, desc):
        total += _summed_nll(model(input_ids=batch, use_cache=False).logits, batch).item()
        count += batch[:, 1:].numel()
    return total, count


def calibration_nll(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood of ``model`` over all calibration tokens (SLEB's criterion)."""
    total, count = token_nll(model, blocks, batch_size)
    return total / count


# --------------------------------------------------------------------------------------------
# Loss without each candidate layer, sharing the prefix
# --------------------------------------------------------------------------------------------


@contextmanager
def _only_layers(model: nn.Module, keep: Sequence[int]) -> Iterator[None]:
    """The model with only the decoder layers at positions ``keep`` (in order), restored on exit.

    Shared surgery: references to the layer modules are swapped and the config kept consistent
    (``num_hidden_layers``, per-layer lists such as ``layer_types``); no weight is copied.
    """
    snapshot, kept = StackSnapshot(model), set(keep)
    remove_layers(model, [i for i in range(len(snapshot.layers)) if i not in kept])
    try:
        yield
    finally:
        snapshot.restore()


def _forward_from(model: nn.Module, batch: torch.Tensor, hidden: torch.Tensor | None, stop_after_last: bool) -> torch.Tensor:
    """Run ``model`` on ``batch`` with ``hidden`` put in as the input of its first decoder layer.

    Returns the logits, or with ``stop_after_last`` the output of the last decoder layer (the head
    is skipped). ``hidden=None`` keeps the embeddings the model computes itself.
    """
    layers = get_adapter(model).get_layers(model)
    taken: list[torch.Tensor] = []

    def put_in(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def take(module, args, output):
        taken.append(hidden_from(output))
        raise StopForward

    handles = []
    if hidden is not None:
        handles.append(layers[0].register_forward_pre_hook(put_in, with_kwargs=True))
    if stop_after_last:
        handles.append(layers[-1].register_forward_hook(take))
    try:
        logits = model(input_ids=batch, use_cache=False).logits
    except StopForward:
        return taken[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits


def _input_of(model: nn.Module, batch: torch.Tensor, position: int) -> torch.Tensor:
    """The hidden state entering decoder layer ``position`` (the prefix ``0..position-1`` only)."""
    layers = get_adapter(model).get_layers(model)
    taken: list[torch.Tensor] = []

    def take(module, args, kwargs):
        taken.append(hidden_into(args, kwargs))
        raise StopForward

    handle = layers[position].register_forward_pre_hook(take, with_kwargs=True)
    try:
        model(input_ids=batch, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    return taken[0]


def removal_order(positions: Sequence[int], num_layers: int) -> list[int]:
    """The candidate layers of a removal scan, ascending and checked (each scan shares the prefix up to them)."""
    order = sorted(set(int(i) for i in positions))
    if order and (order[0] < 0 or order[-1] >= num_layers):
        raise ValueError(f"positions {order} out of range for a model with {num_layers} layers (valid: 0..{num_layers - 1})")
    if order and num_layers < 2:
        raise ValueError("removal_nll needs at least two layers: removing the only one leaves no model")
    return order


@torch.no_grad()
def removal_nll(
    model: nn.Module, blocks: torch.Tensor, positions: Sequence[int], batch_size: int = 4, desc: str | None = None
) -> dict[int, float]:
    """``{i: calibration_nll(model without layer i)}`` for every ``i`` in ``positions``, sharing the prefix.

    Equal bit for bit to removing each layer on trial and calling :func:`calibration_nll` with the
    same ``batch_size`` (same batches, same kernels, same summation order); see the module docstring
    for how, and for the cost. The model is unchanged on return.
    """
    num_layers = get_adapter(model).num_layers(model)
    order = removal_order(positions, num_layers)
    if not order:
        return {}
    device = next(model.parameters()).device
    batches = list(iterate_batches(blocks, batch_size, device))
    count = sum(batch[:, 1:].numel() for batch in batches)
    states = [_input_of(model, batch, order[0]) for batch in batches]  # entering layer order[0]

    losses: dict[int, float] = {}
    for k, i in enumerate(tqdm(order, desc=desc, disable=True if desc is None else None, leave=False, unit="layer")):
        if i == num_layers - 1:  # nothing follows the last layer: its input goes straight to the norm and head
            tail, inputs = [j for j in range(num_layers) if j != i], [None] * len(batches)
        else:
            tail, inputs = list(range(i + 1, num_layers)), states
        with _only_layers(model, tail):
            # Summed in float64 in batch order, as token_nll's Python float does; one sync per candidate.
            total = torch.zeros((), dtype=torch.float64, device=device)
            for batch, hidden in zip(batches, inputs):
                total += _summed_nll(_forward_from(model, batch, hidden, stop_after_last=False), batch).double()
            losses[i] = total.item() / count
        if k + 1 < len(order):  # carry the state to the next candidate through layers i..next-1
            with _only_layers(model, range(i, order[k + 1])):
                states = [_forward_from(model, batch, hidden, stop_after_last=True) for batch, hidden in zip(batches, states)]
    return losses


# --------------------------------------------------------------------------------------------
# Final representations (LaCo)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def final_representations(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Final-norm hidden states ``[seq, hidden]`` per input (what HF's ``hidden_states[-1]`` holds)."""
    device = next(model.parameters()).device
    # The module holding the decoder layers returns them after the final norm (get_decoder() is the causal LM
    # itself for some families, e.g. Llama 4 text).
    base = model.get_submodule(get_adapter(model).layers.rpartition(".")[0])
    return [base(input_ids=ids.view(1, -1).to(device), use_cache=False).last_hidden_state[0].float() for ids in inputs]
