"""Layer-major ("sequential") execution: the outer loop runs over decoder layers, the inner over sequences.

A resident forward needs the whole model on the accelerator; a 70B model (140 GB in bf16) fits neither
one 80 GB GPU nor a 128 GB host. Layer-major execution swaps the loops: every sequence is embedded
first; then each decoder layer in turn is materialised from a :class:`~layerfold.execution.LayerLoader`,
run over all sequences (batched), and freed. The peak is one layer (two with prefetch) plus one
boundary of activations, which live on the accelerator when they fit and in pinned host memory
otherwise.

The arguments a decoder layer receives (causal mask, rotary ``position_embeddings``, ``position_ids``,
...) are not rebuilt here: the model's own forward computes them, with the decoder-layer list swapped
for probes that record what each layer would have been called with and stop the forward after the
last one. So any family with an adapter (curated or discovered) runs unchanged, per-layer masks
(sliding-window and chunked layer types) and per-layer rotary tables (Gemma 3) included.

Consumers see the residual stream through one callback, ``on_boundary(boundary, batch_id, hidden)``:
boundary ``i`` enters layer ``i``, boundary ``L`` leaves the last one (pre-norm), as in
:mod:`layerfold.capture.hooks`. Boundaries arrive boundary-major (all batches of boundary ``i``, then
``i + 1``). ``hidden`` is on the accelerator and is never modified afterwards, so a consumer may keep it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from layerfold.capture.hooks import hidden_from
from layerfold.execution.loaders import LayerLoader, StateDict
from layerfold.models.adapters import get_adapter, logits_head
from layerfold.models.devices import host_peak_rss_mib

OnBoundary = Callable[[int, int, torch.Tensor], None]
OnLayer = Callable[[int, nn.Module], list]  # (layer index, materialised layer) -> hook handles to remove after it ran
PLACEMENTS = ("auto", "device", "host")


class LayerMajorError(RuntimeError):
    """A model or setting layer-major execution cannot run; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------
# The skeleton: the model's modules with meta decoder layers and real outer modules.
def build_skeleton(loader: LayerLoader, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model of ``loader.config`` with its decoder layers on the meta device and everything else materialised.

    Parameters are created on meta (no memory); buffers such as the rotary ``inv_freq`` are computed
    for real (accelerate's ``init_empty_weights`` keeps buffers) and moved to ``device`` in the dtype
    the model computed them in, as ``from_pretrained`` leaves them.
    """
    with init_empty_weights(include_buffers=False):  # a copy of the config: editing the skeleton must not change the loader's
        model = AutoModelForCausalLM.from_config(copy.deepcopy(loader.config), dtype=dtype)
    model.eval()
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    outer = loader.load_outer(device, dtype)
    buffers = {name for name, _ in model.named_buffers()}
    _, unexpected = model.load_state_dict(outer, strict=False, assign=True)
    unknown = [k for k in unexpected if k not in buffers]
    if unknown:
        raise LayerMajorError(f"The loader's outer tensors {unknown[:5]} are not part of a {loader.config.model_type} model; the checkpoint and its config disagree.")
    if getattr(model.config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    prefix = f"{get_adapter(model).layers}."
    empty = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta and not n.startswith(prefix)]
    if empty:
        raise LayerMajorError(f"The loader gave no weights for {empty[:5]}; its outer state dict is incomplete (loader.load_outer).")
    return model


def materialise_layer(template: nn.Module, state: StateDict) -> nn.Module:
    """A copy of the meta ``template`` layer holding ``state`` (tensors adopted, not copied)."""
    layer = copy.deepcopy(template)
    layer.load_state_dict(state, strict=True, assign=True)
    empty = [n for n, t in chain(layer.named_parameters(), layer.named_buffers()) if t.is_meta]
    if empty:
        raise LayerMajorError(f"Decoder layer tensors {empty[:5]} are not in its state dict and have no value (non-persistent buffers are not supported).")
    return layer


def materialise_model(loader: LayerLoader, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """The whole model of ``loader`` on ``device`` (resident execution of a loader, e.g. a planned stack)."""
    device = torch.device(device)
    model = build_skeleton(loader, device, dtype)
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    adapter.set_layers(model, nn.ModuleList(materialise_layer(t, loader.load_layer(i, device, dtype)) for i, t in enumerate(layers)))
    return model


# ---------------------------------------------------------------------------------------------------
# The probe: what every decoder layer is called with.
@dataclass
class LayerCall:
    """Everything a decoder layer receives besides the hidden states."""

    args: tuple
    kwargs: dict[str, Any]


class _ProbeDone(Exception):
    pass


class _Probe(nn.Module):
    """Stands in for decoder layer ``index``: records its call, passes the hidden states through, stops after the last."""

    def __init__(self, index: int, last: bool, template: nn.Module, record: dict[int, Any]) -> None:
        super().__init__()
        self.index, self.last, self.record = index, last, record
        if hasattr(template, "attention_type"):  # read by some families' layer loops
            self.attention_type = template.attention_type

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.record["hidden"] = hidden
        self.record[self.index] = LayerCall(tuple(args[1:]), dict(kwargs))
        if self.last:
            raise _ProbeDone
        return hidden


def probe_layer_calls(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[LayerCall]]:
    """The hidden states entering layer 0 and every layer's call arguments, from the model's own forward."""
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    record: dict[Any, Any] = {}
    probes = nn.ModuleList(_Probe(i, i == len(layers) - 1, t, record) for i, t in enumerate(layers))
    adapter.set_layers(model, probes)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _ProbeDone:
        pass
    finally:
        adapter.set_layers(model, layers)
    if len(record) != len(layers) + 1:
        raise LayerMajorError(
            f"The {model.config.model_type} forward called {len(record) - 1} of its {len(layers)} decoder layers; "
            "layer-major execution needs a forward that calls every layer once, in order."
        )
    return record["hidden"], [record[i] for i in range(len(layers))]


# ---------------------------------------------------------------------------------------------------
# Activations: one boundary of every sequence, on the accelerator or in pinned host memory.
@dataclass
class Activations:
    """Per batch: the current boundary's hidden states, the token ids, and each layer's call arguments (on the device)."""

    placement: str  # "device" or "host"
    device: torch.device
    boundary: int = 0  # which boundary ``hidden`` holds
    hidden: list[torch.Tensor] = field(default_factory=list)
    input_ids: list[torch.Tensor] = field(default_factory=list)  # on the host, for targets
    calls: list[list[LayerCall]] = field(default_factory=list)

    @property
    def num_batches(self) -> int:
        return len(self.hidden)

    def fork(self) -> Activations:
        """A second handle on the same boundary: running layers over it leaves this one as it is.

        Cheap: the tensors are shared, never copied, since layers replace them rather than write into them.
        """
        return Activations(self.placement, self.device, self.boundary, list(self.hidden), self.input_ids, self.calls)

    def extend(self, other: Activations) -> None:
        """Append ``other``'s batches (same boundary and placement), e.g. sequences of different lengths embedded one by one."""
        if (other.boundary, other.placement) != (self.boundary, self.placement):
            raise ValueError(f"Cannot join activations at boundary {other.boundary} ({other.placement}) to boundary {self.boundary} ({self.placement}).")
        self.hidden += other.hidden
        self.input_ids += other.input_ids
        self.calls += other.calls

    def store(self, hidden: torch.Tensor) -> torch.Tensor:
        """Where a boundary of one batch is kept: as it is on the device, or copied to (pinned) host memory."""
        if self.placement == "device":
            return hidden
        host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=torch.cuda.is_available() and self.device.type == "cuda")
        host.copy_(hidden, non_blocking=host.is_pinned())
        return host

    def visit(self, fn: Callable[[int, torch.Tensor], None]) -> None:
        """Call ``fn(batch_id, hidden_on_device)`` for every batch without changing anything."""
        for b, hidden in enumerate(self.hidden):
            fn(b, hidden if self.placement == "device" else hidden.to(self.device, copy=True))

    def update(self, fn: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        """Replace every batch's hidden states with ``fn(batch_id, hidden_on_device)`` (never in place)."""
        if self.placement == "device":
            for b in range(len(self.hidden)):  # one batch at a time: the old boundary is freed as the new one arrives
                self.hidden[b] = fn(b, self.hidden[b])
        elif self.device.type == "cuda":
            self._update_streamed(fn)
        else:
            # Host placement on a CPU device: the same copies (and code path) without streams.
            self.hidden = [self.store(fn(b, h.to(self.device, copy=True))) for b, h in enumerate(self.hidden)]

    def _update_streamed(self, fn: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        """Host placement on CUDA: batch ``b + 1`` is copied in and ``b - 1`` copied out on a side stream while ``b`` computes."""
        compute, copies = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)

        def fetch(b: int) -> tuple[torch.Tensor, torch.cuda.Event]:
            with torch.cuda.stream(copies):
                tensor = self.hidden[b].to(self.device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(copies)
            return tensor, ready

        results: list[torch.Tensor] = []
        upcoming = fetch(0) if self.hidden else None
        for b in range(len(self.hidden)):
            current, ready = upcoming
            if b + 1 < len(self.hidden):
                upcoming = fetch(b + 1)
            compute.wait_event(ready)
            current.record_stream(compute)
            out = fn(b, current)
            done = torch.cuda.Event()
            done.record(compute)
            with torch.cuda.stream(copies):
                copies.wait_event(done)
                host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                host.copy_(out, non_blocking=True)
            out.record_stream(copies)
            results.append(host)
        copies.synchronize()
        self.hidden = results


def choose_placement(requested: str, device: torch.device, bytes_needed: int, share: float) -> str:
    """``auto``: on the accelerator when one boundary of all sequences takes at most ``share`` of its free memory."""
    if requested not in PLACEMENTS:
        raise ValueError(f"hardware.activations={requested!r} is not allowed: it must be one of {', '.join(PLACEMENTS)}.")
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "device"  # host and device memory are the same memory
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if bytes_needed <= share * free else "host"


# ---------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WeightStream:
    """Layer weights in order, each handed over exactly once so that nothing here keeps a finished layer alive.

    With ``prefetch`` the next layer loads on a background thread (on CUDA, on its own stream) while
    the caller computes with the current one; ``wait_s`` is the time the caller spent waiting for weights.
    """

    def __init__(self, loader: LayerLoader, indices: range, device: torch.device, dtype: torch.dtype, prefetch: bool) -> None:
        self.loader, self.indices, self.device, self.dtype = loader, indices, device, dtype
        self.position = 0
        self.wait_s = 0.0
        self.stream = torch.cuda.Stream(device) if prefetch and device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
        self.pending: Future | None = None

    def __enter__(self) -> WeightStream:
        if self.pool is not None and len(self.indices):
            self.pending = self.pool.submit(self._load, self.indices[0])
        return self

    def __exit__(self, *exc) -> None:
        self.pending = None
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def _load(self, index: int) -> tuple[StateDict, torch.cuda.Event | None]:
        if self.stream is None:
            return self.loader.load_layer(index, self.device, self.dtype), None
        with torch.cuda.stream(self.stream):
            state = self.loader.load_layer(index, self.device, self.dtype)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return state, ready

    def take(self) -> StateDict:
        """The next layer's state dict, ready to use on the current stream."""
        began = time.perf_counter()
        index = self.indices[self.position]
        self.position += 1
        if self.pool is None:
            state, ready = self._load(index)
            _sync(self.device)
        else:
            state, ready = self.pending.result()
            self.pending = self.pool.submit(self._load, self.indices[self.position]) if self.position < len(self.indices) else None
        if ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ready)
            for tensor in state.values():
                tensor.record_stream(compute)  # allocated on the load stream, used and freed on this one
        self.wait_s += time.perf_counter() - began
        return state


@dataclass
class ExecutionReport:
    """What a layer-major run did and cost (peaks since the last reset of the device's peak statistics)."""

    mode: str = "sequential"
    activations: str = ""
    activation_mib: float = 0.0  # one boundary of every sequence
    layers_run: int = 0
    seconds: float = 0.0  # embedding and layers, wall clock
    weights_wait_s: float = 0.0  # time the compute waited for layer weights (all of the load time without prefetch)
    peak_gpu_mib: float | None = None
    peak_host_mib: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def sentence(self) -> str:
        """The report as one short log line (the dict goes to DEBUG and to the stage's timing file)."""
        size = f" ({self.activation_mib:.0f} MiB)" if self.activation_mib else ""
        where = f", activations on {self.activations}{size}" if self.activations else ""
        layers = f"{self.layers_run} layers in " if self.layers_run else ""
        waited = f" ({self.weights_wait_s:.1f} s waiting for weights)" if self.weights_wait_s >= 0.05 else ""
        gpu = f", GPU peak {self.peak_gpu_mib:.0f} MiB" if self.peak_gpu_mib is not None else ""
        return f"{self.mode}{where}: {layers}{self.seconds:.1f} s{waited}, host peak {self.peak_host_mib:.0f} MiB{gpu}"


class LayerMajorRunner:
    """Runs the stack of ``loader`` one decoder layer at a time over a fixed set of sequences.

    ``activations``: ``device``, ``host`` (pinned, copies overlapped with compute) or ``auto`` (device
    when one boundary of all sequences takes at most ``activation_share`` of the free accelerator
    memory). ``prefetch``: load layer ``i + 1`` on a background thread (and CUDA stream) while layer
    ``i`` computes.
    """

    def __init__(self, loader: LayerLoader, device: torch.device | str, dtype: torch.dtype, *, activations: str = "auto",
                 prefetch: bool = False, batch_size: int = 4, activation_share: float = 0.5) -> None:
        if batch_size < 1:
            raise ValueError(f"hardware.batch_size={batch_size} is not allowed: it must be >= 1.")
        choose_placement(activations, torch.device("cpu"), 0, activation_share)  # validates the name early
        self.loader = loader
        self.device = torch.device(device)
        self.dtype = dtype
        self.activations = activations
        self.prefetch = prefetch
        self.batch_size = batch_size
        self.activation_share = activation_share
        self.model = build_skeleton(loader, self.device, dtype)
        self.adapter = get_adapter(self.model)
        self.templates = list(self.adapter.get_layers(self.model))
        self.call_of = list(range(len(self.templates)))  # layer k runs with the call arguments probed for layer call_of[k]
        self.report = ExecutionReport()

    def over(self, loader: LayerLoader, call_of: list[int]) -> LayerMajorRunner:
        """A runner over another stack of the same model (e.g. a :class:`~layerfold.execution.PlannedLayerLoader` of
        this runner's loader) that shares this runner's skeleton, settings and report.

        Layer ``k`` of ``loader`` runs as this stack's layer ``call_of[k]`` does (its template and its
        call arguments in activations this runner embedded): the layer a planned layer keeps the
        per-layer settings of, as the plan's config does. Nothing is loaded, so trying many plans
        costs no second copy of the embeddings or the LM head.
        """
        if len(call_of) != loader.num_layers or not all(0 <= i < self.num_layers for i in call_of):
            raise ValueError(f"call_of={call_of} must name one of this stack's {self.num_layers} layers for each of the {loader.num_layers} layers.")
        other = copy.copy(self)
        other.loader = loader
        other.templates = [self.templates[i] for i in call_of]
        other.call_of = [self.call_of[i] for i in call_of]
        return other

    @property
    def num_layers(self) -> int:
        return len(self.templates)

    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.adapter.final_norm)

    def lm_head(self) -> nn.Module:
        """The LM head with the family's logit scaling or soft-capping (what the model's own forward applies)."""
        return logits_head(self.model)

    @torch.no_grad()
    def embed(self, blocks: torch.Tensor) -> Activations:
        """Boundary 0 of every sequence in ``blocks`` ``[n, seq]`` and each layer's call arguments, batch by batch."""
        if blocks.dim() != 2 or blocks.shape[0] == 0:
            raise ValueError(f"blocks must be token ids of shape [num_sequences, seq_len], got {tuple(blocks.shape)}.")
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        needed = blocks.numel() * self.model.config.hidden_size * itemsize
        placement = choose_placement(self.activations, self.device, needed, self.activation_share)
        began = time.perf_counter()
        acts = Activations(placement, self.device)
        for start in range(0, blocks.shape[0], self.batch_size):
            ids = blocks[start : start + self.batch_size]
            hidden, calls = probe_layer_calls(self.model, ids.to(self.device))
            acts.hidden.append(acts.store(hidden))
            acts.input_ids.append(ids.cpu())
            acts.calls.append(calls)
        _sync(self.device)  # host placement: the copies to pinned memory are complete before anything reads them
        self.report.seconds += time.perf_counter() - began
        self.report.activations = placement
        self.report.activation_mib = round(needed / 2**20, 1)
        return acts

    @torch.no_grad()
    def run_layers(self, acts: Activations, start: int = 0, stop: int | None = None, on_boundary: OnBoundary | None = None,
                   on_layer: OnLayer | None = None) -> None:
        """Run layers ``start .. stop - 1`` over ``acts`` (which must hold boundary ``start``), leaving boundary ``stop`` in it.

        ``on_boundary`` sees boundaries ``start`` to ``stop`` for every batch, boundary-major.
        ``on_layer(index, layer)`` is called with each materialised layer before it runs and returns hook
        handles, removed once the layer has run over every batch (hooks inside a layer: CoMe's channel sums).
        """
        stop = self.num_layers if stop is None else stop
        if not 0 <= start <= stop <= self.num_layers:
            raise ValueError(f"Layers {start}..{stop} are not a range of the stack's {self.num_layers} layers.")
        if acts.boundary != start:
            raise ValueError(f"The activations hold boundary {acts.boundary}, but layers from {start} were asked for.")
        began = time.perf_counter()
        if on_boundary is not None:
            acts.visit(lambda b, hidden: on_boundary(start, b, hidden))
        with WeightStream(self.loader, range(start, stop), self.device, self.dtype, self.prefetch) as weights:
            # a bar with rate and ETA over the layers (one layer of a trial is no pass worth a bar)
            for index in tqdm(range(start, stop), desc="layer by layer", unit="layer", leave=False,
                              disable=True if stop - start < 2 else None):
                self._run_layer(acts, index, weights.take(), on_boundary, on_layer)
                _sync(self.device)  # the layer's tensors are back with the allocator before the next one is used
                self.report.layers_run += 1
            self.report.weights_wait_s += weights.wait_s
        self.report.seconds += time.perf_counter() - began
        self.report.peak_host_mib = round(host_peak_rss_mib(), 1)
        if self.device.type == "cuda":
            self.report.peak_gpu_mib = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

    def _run_layer(self, acts: Activations, index: int, state: StateDict, on_boundary: OnBoundary | None,
                   on_layer: OnLayer | None = None) -> None:
        """Layer ``index`` over every batch of ``acts``; the layer lives only inside this call."""
        layer = materialise_layer(self.templates[index], state)
        handles = on_layer(index, layer) if on_layer is not None else []

        def step(b: int, hidden: torch.Tensor) -> torch.Tensor:
            call = acts.calls[b][self.call_of[index]]
            out = hidden_from(layer(hidden, *call.args, **call.kwargs))
            if on_boundary is not None:
                on_boundary(index + 1, b, out)
            return out

        try:
            acts.update(step)
        finally:
            for handle in handles:
                handle.remove()
        acts.boundary = index + 1
