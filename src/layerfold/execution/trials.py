"""What a compression method measures while it searches, resident or layer-major.

A method states its edits (remove, merge) and asks for a measurement of the stack as its plan says
*now*: the mean next-token NLL of calibration blocks (SLEB, MKA's tie-break), that NLL with each
candidate layer removed (SLEB's step), the final-norm hidden states of a few token sequences (LaCo),
or the layer-boundary statistics (MKA's re-scoring). Two stacks answer the same four questions:

- :class:`ResidentStack`: the whole model on the device, edited in place (merges written with
  :func:`~layerfold.surgery.merge_weights`, layers removed with :func:`~layerfold.surgery.remove_layers`,
  a stand-in layer re-initialised with its :class:`~layerfold.models.replacement.TensorInit`),
  measured by the resident functions of :mod:`layerfold.execution.loss` and :mod:`layerfold.capture`.
  This is the code path methods have always run; its numbers are unchanged.
- :class:`LayerMajorStack`: the model never exists as a whole. Edits go into the plan only (and into
  a meta skeleton that mirrors the layer list, so ``num_layers``, the config and the adapter stay
  right); a measurement builds the planned stack lazily (:class:`~layerfold.execution.PlannedLayerLoader`,
  which replays merges with ``merge_weights``' arithmetic) and runs it layer by layer through one
  :class:`~layerfold.execution.LayerMajorRunner` (one skeleton, one copy of the embeddings and the LM
  head, whatever the number of trials). Activations live on the device or in pinned host memory as
  ``hardware.activations`` says.

Prefixes are reused where the structure allows, as the resident SLEB search does: the calibration
blocks are embedded once; removing candidate ``i`` leaves layers ``0..i-1`` untouched, so the state
entering ``i`` is carried forward across candidates and only the suffix re-runs; LaCo's trials start
from the dense model's boundary at the first layer their plan changes (every boundary of the few
LaCo sentences is kept from the reference run: sentences x tokens x hidden x (L + 1) values).
Results agree with the resident ones to float32 rounding (the LM head runs in chunks, sums are
taken in another order), so both stacks choose the same layers unless two candidates tie to rounding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

from layerfold.capture.channels import ChannelStatistics, capture_channel_statistics
from layerfold.capture.stats import BoundaryStatistics, capture_statistics
from layerfold.execution.concat import ConcatBuild, channel_statistics
from layerfold.execution.entry import _setting, runner
from layerfold.execution.layer_major import Activations, ExecutionReport, LayerMajorRunner
from layerfold.execution.loaders import LayerLoader, ModelLayerLoader
from layerfold.execution.loss import calibration_nll, final_representations, removal_nll, removal_order
from layerfold.execution.nll import TokenNLL
from layerfold.execution.plan import PlannedLayerLoader, WeightedLayerPlan
from layerfold.models import layer_config
from layerfold.models.adapters import get_adapter
from layerfold.models.replacement import TensorInit
from layerfold.surgery import StackSnapshot, merge_weights, reindex_layers, remove_layers
from layerfold.surgery.merge import Combine


class Stack(Protocol):
    """The model a method edits and measures; ``plan`` is the method's plan, kept in step by the caller."""

    model: nn.Module  # resident: the model itself; layer-major: its skeleton (decoder layers on the meta device)
    layer_major: bool
    device: torch.device  # where measurements run

    def remove(self, positions: Sequence[int]) -> None: ...

    def merge(self, base: int, others: Sequence[int], combine: Combine) -> None: ...

    def stand_in(self, base: int, others: Sequence[int], init: TensorInit | None) -> None: ...

    def calibration_nll(self, plan: WeightedLayerPlan, blocks: torch.Tensor) -> float: ...

    def removal_nll(self, plan: WeightedLayerPlan, blocks: torch.Tensor, positions: Sequence[int], desc: str | None = None) -> dict[int, float]: ...

    def final_representations(self, plan: WeightedLayerPlan, inputs: list[torch.Tensor]) -> list[torch.Tensor]: ...

    def capture(self, plan: WeightedLayerPlan, blocks: torch.Tensor, desc: str | None = None) -> BoundaryStatistics: ...

    def layers_over(self, plan: WeightedLayerPlan, blocks: torch.Tensor) -> tuple[LayerMajorRunner, Activations]: ...

    def concat(self, positions: Sequence[int], build: ConcatBuild) -> None: ...

    def channel_statistics(self, plan: WeightedLayerPlan, blocks: torch.Tensor, window: int, skip_tokens: str,
                           desc: str | None = None, **options: Any) -> ChannelStatistics: ...

    def layer_tensors(self, plan: WeightedLayerPlan, position: int, names: Sequence[str]) -> dict[str, torch.Tensor]: ...


# ---------------------------------------------------------------------------------------------------
class ResidentStack:
    """The whole model on its device, edited in place; every measurement is the resident function of before."""

    layer_major = False

    def __init__(self, model: nn.Module, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def remove(self, positions: Sequence[int]) -> None:
        remove_layers(self.model, positions)

    def merge(self, base: int, others: Sequence[int], combine: Combine) -> None:
        merge_weights(self.model, base, others, combine)
        remove_layers(self.model, others)

    def stand_in(self, base: int, others: Sequence[int], init: TensorInit | None) -> None:
        if init is not None:
            init.apply_to(get_adapter(self.model).get_layers(self.model)[base])
        remove_layers(self.model, others)

    def calibration_nll(self, plan: WeightedLayerPlan, blocks: torch.Tensor) -> float:
        return calibration_nll(self.model, blocks, self.batch_size)

    def removal_nll(self, plan: WeightedLayerPlan, blocks: torch.Tensor, positions: Sequence[int], desc: str | None = None) -> dict[int, float]:
        return removal_nll(self.model, blocks, positions, self.batch_size, desc=desc)

    def final_representations(self, plan: WeightedLayerPlan, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return final_representations(self.model, inputs)

    def capture(self, plan: WeightedLayerPlan, blocks: torch.Tensor, desc: str | None = None) -> BoundaryStatistics:
        return capture_statistics(self.model, blocks, self.batch_size, desc)

    def layers_over(self, plan: WeightedLayerPlan, blocks: torch.Tensor) -> tuple[LayerMajorRunner, Activations]:
        """A layer-major runner over the model as it is now (its tensors read in place, never copied) and boundary 0 of ``blocks``.

        For measurements that need a hand between layers (a sub-module's output, activations changed at
        a boundary): every sequence's boundary is held at once, on the model's device.
        """
        weight = next(self.model.parameters())
        run = LayerMajorRunner(ModelLayerLoader(self.model), weight.device, weight.dtype, activations="device", batch_size=self.batch_size)
        return run, run.embed(blocks)

    def concat(self, positions: Sequence[int], build: ConcatBuild) -> None:
        layers = get_adapter(self.model).get_layers(self.model)
        state = build.apply([layers[p].state_dict() for p in positions])
        layers[positions[0]].load_state_dict(state, strict=True)
        remove_layers(self.model, positions[1:])

    def channel_statistics(self, plan: WeightedLayerPlan, blocks: torch.Tensor, window: int, skip_tokens: str,
                           desc: str | None = None, **options: Any) -> ChannelStatistics:
        return capture_channel_statistics(self.model, blocks, self.batch_size, window=window, skip_tokens=skip_tokens, desc=desc, **options)

    def layer_tensors(self, plan: WeightedLayerPlan, position: int, names: Sequence[str]) -> dict[str, torch.Tensor]:
        state = get_adapter(self.model).get_layers(self.model)[position].state_dict()
        return {name: state[name] for name in names}


# ---------------------------------------------------------------------------------------------------
class LayerMajorStack:
    """The model of ``loader`` measured layer by layer under a plan; never more than one or two layers materialised.

    ``hardware`` is the ``hardware`` config section (activations, prefetch, batch_size, logits_chunk);
    ``batch_size`` is used when ``hardware.batch_size`` is null.
    """

    layer_major = True

    def __init__(self, loader: LayerLoader, hardware: Any, device: torch.device | str, dtype: torch.dtype, batch_size: int) -> None:
        self.loader = loader
        self.runner = runner(loader, hardware, device, dtype, batch_size)
        self.model = self.runner.model  # meta decoder layers: config, adapter and layer count, never a forward
        self.logits_chunk = int(_setting(hardware, "logits_chunk", 1024))
        self._embedded: tuple[torch.Tensor, Activations] | None = None
        self._references: list[tuple[list[torch.Tensor], list[tuple], list[Activations]]] = []

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def report(self) -> ExecutionReport:
        """Time and peaks of every layer-major pass so far (all stacks share the root runner's report)."""
        return self.runner.report

    # Edits: the plan holds them; the skeleton mirrors the layer list so that num_layers and the config follow.
    def remove(self, positions: Sequence[int]) -> None:
        remove_layers(self.model, positions)

    def merge(self, base: int, others: Sequence[int], combine: Combine) -> None:
        remove_layers(self.model, others)

    def stand_in(self, base: int, others: Sequence[int], init: TensorInit | None) -> None:
        remove_layers(self.model, others)

    # The planned stack as a runner over the root's skeleton and embeddings.
    def stack(self, plan: WeightedLayerPlan) -> LayerMajorRunner:
        planned = PlannedLayerLoader(self.loader, plan)
        return self.runner.over(planned, [recipe.base for recipe in planned.recipes])

    def _embed(self, blocks: torch.Tensor) -> Activations:
        """Boundary 0 of ``blocks``, embedded once per block tensor (a method measures the same blocks many times)."""
        if self._embedded is None or self._embedded[0] is not blocks:
            self._embedded = None  # the old boundary is freed before the new one is made
            with self._original_layers():
                self._embedded = (blocks, self.runner.embed(blocks))
        return self._embedded[1].fork()

    @contextmanager
    def _original_layers(self) -> Iterator[None]:
        """The skeleton with every original layer while call arguments are probed, the edits restored after.

        Planned layers run with the arguments probed for their base layer (an original index), so the
        probe must see the original stack even when the first measurement comes after an edit.
        """
        edited = StackSnapshot(self.model)
        adapter = get_adapter(self.model)
        adapter.set_layers(self.model, nn.ModuleList(self.runner.templates))
        layer_config.restore(self.model.config, layer_config.snapshot(self.loader.config))
        reindex_layers(self.model)
        try:
            yield
        finally:
            edited.restore()

    def _mean_nll(self, run: LayerMajorRunner, acts: Activations) -> float:
        """Mean next-token NLL of ``acts`` (holding some boundary of ``run``) after the rest of ``run``'s layers."""
        head = TokenNLL(run.final_norm(), run.lm_head(), acts, run.num_layers, self.logits_chunk)
        run.run_layers(acts, acts.boundary, on_boundary=head)
        return head.nll / head.count

    @torch.no_grad()
    def calibration_nll(self, plan: WeightedLayerPlan, blocks: torch.Tensor) -> float:
        return self._mean_nll(self.stack(plan), self._embed(blocks))

    @torch.no_grad()
    def removal_nll(self, plan: WeightedLayerPlan, blocks: torch.Tensor, positions: Sequence[int], desc: str | None = None) -> dict[int, float]:
        """``{i: mean NLL without layer i}`` for each candidate, the prefix shared as in :func:`layerfold.execution.loss.removal_nll`.

        Layer passes: ``order[-1]`` to carry the state entering each candidate, plus ``L - 1 - i`` per
        candidate ``i`` for its suffix, and one LM head per candidate.
        """
        order = removal_order(positions, len(plan.groups))
        if not order:
            return {}
        full = self.stack(plan)
        state = self._embed(blocks)
        full.run_layers(state, 0, order[0])  # the state entering the first candidate
        losses: dict[int, float] = {}
        for k, i in enumerate(order):
            without = plan.copy()
            without.remove([i])
            losses[i] = self._mean_nll(self.stack(without), state.fork())  # layers i+1.. of the full stack, then the head
            if k + 1 < len(order):
                full.run_layers(state, i, order[k + 1])
        return losses

    @torch.no_grad()
    def final_representations(self, plan: WeightedLayerPlan, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Final-norm hidden states ``[seq, hidden]`` (float32) per input, each input its own batch (lengths differ).

        The first call for a list of inputs keeps every boundary (the reference, e.g. LaCo's dense
        model); later calls start at the first layer where their plan departs from it.
        """
        run = self.stack(plan)
        layers = self._layer_identities(plan)
        reference = next((r for r in self._references if len(r[0]) == len(inputs) and all(a is b for a, b in zip(r[0], inputs))), None)
        outputs: dict[int, torch.Tensor] = {}

        def final(boundary: int, batch: int, hidden: torch.Tensor) -> None:
            if boundary == run.num_layers:
                outputs[batch] = run.final_norm()(hidden)[0].float()

        if reference is None:
            acts = self._embed_each(inputs)
            kept = [acts.fork()]

            def keep(boundary: int, batch: int, hidden: torch.Tensor) -> None:
                final(boundary, batch, hidden)
                if boundary > 0:
                    if batch == 0:
                        kept.append(Activations(acts.placement, acts.device, boundary, [], acts.input_ids, acts.calls))
                    kept[boundary].hidden.append(acts.store(hidden))

            run.run_layers(acts, on_boundary=keep)
            self._references.append((list(inputs), layers, kept))
        else:
            _, reference_layers, kept = reference
            start = 0
            while start < min(len(layers), len(reference_layers)) and layers[start] == reference_layers[start]:
                start += 1
            acts = kept[start].fork()
            run.run_layers(acts, start, on_boundary=final)
        return [outputs[b] for b in range(len(inputs))]

    @staticmethod
    def _layer_identities(plan: WeightedLayerPlan) -> list[tuple]:
        """What makes two plans' layer ``k`` the same layer: its group, coefficients, base, merge history and re-initialisation."""
        return [(tuple(g), tuple(sorted(c.items())) if c is not None else None, base, build, init)
                for g, c, base, build, init in zip(plan.groups, plan.coefficients, plan.bases, plan.builds, plan.inits)]

    def _embed_each(self, inputs: list[torch.Tensor]) -> Activations:
        """Boundary 0 of sequences of different lengths: one batch per sequence."""
        if not inputs:
            raise ValueError("final_representations needs at least one token sequence.")
        with self._original_layers():
            acts = self.runner.embed(inputs[0].view(1, -1))
            for ids in inputs[1:]:
                acts.extend(self.runner.embed(ids.view(1, -1)))
        return acts

    def concat(self, positions: Sequence[int], build: ConcatBuild) -> None:
        remove_layers(self.model, positions[1:])

    @torch.no_grad()
    def channel_statistics(self, plan: WeightedLayerPlan, blocks: torch.Tensor, window: int, skip_tokens: str,
                           desc: str | None = None, **options: Any) -> ChannelStatistics:
        """CoMe's channel and layer statistics of the planned stack, one layer at a time (:mod:`layerfold.execution.concat`)."""
        # The default top boundary (the last layer's output before the final norm) is what this pass reads; the
        # final-norm boundary needs a pass through the resident model's norm (validate refuses it layer by layer).
        if options.pop("top_boundary", "pre_norm") != "pre_norm" or options:
            raise TypeError(f"channel statistics options {sorted(options) or ['top_boundary']} are not available layer by layer "
                            "(hardware=sequential).")
        return channel_statistics(self.stack(plan), self._embed(blocks), window, skip_tokens)

    @torch.no_grad()
    def layer_tensors(self, plan: WeightedLayerPlan, position: int, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tensors of planned layer ``position`` (the layer built on the device, the rest freed)."""
        state = PlannedLayerLoader(self.loader, plan).load_layer(position, self.device, self.runner.dtype)
        return {name: state[name] for name in names}

    @torch.no_grad()
    def capture(self, plan: WeightedLayerPlan, blocks: torch.Tensor, desc: str | None = None) -> BoundaryStatistics:
        """Boundary statistics of the planned stack over ``blocks``, as the resident capture of the edited model gives them."""
        run = self.stack(plan)
        stats = BoundaryStatistics(run.num_layers + 1)
        run.run_layers(self._embed(blocks), on_boundary=stats.add)
        return stats

    def layers_over(self, plan: WeightedLayerPlan, blocks: torch.Tensor) -> tuple[LayerMajorRunner, Activations]:
        """The planned stack's runner and boundary 0 of ``blocks`` (embedded once per block tensor, as every measurement here)."""
        return self.stack(plan), self._embed(blocks)
