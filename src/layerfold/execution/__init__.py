"""One execution path that scales: the same consumers run resident or layer by layer ("sequential").

- :mod:`~layerfold.execution.loaders`: where one decoder layer's weights come from (safetensors shards,
  a seeded generator for paper-scale shapes, an in-memory model).
- :mod:`~layerfold.execution.plan`: a compression plan applied lazily per layer (removals, linear merges,
  re-initialised stand-in layers).
- :mod:`~layerfold.execution.layer_major`: the layer-major runner (meta skeleton, probed layer
  arguments, activations on the device or in pinned host memory, optional prefetch).
- :mod:`~layerfold.execution.nll`: next-token NLL from the last boundary, LM head in chunks.
- :mod:`~layerfold.execution.loss`: the same losses of a resident model (next-token NLL, the loss without
  each candidate layer, final representations).
- :mod:`~layerfold.execution.entry`: one entry point per consumer, chosen by ``hardware.mode``.
- :mod:`~layerfold.execution.trials`: what compression methods measure during their search (NLL,
  removal NLL, final representations, statistics), answered resident or layer-major under a plan.
- :mod:`~layerfold.execution.checkpoint`: a checkpoint written layer by layer from a loader.
- :mod:`~layerfold.execution.concat`: CoMe's concatenation merges in a plan, its channel statistics per layer.

Place in the import order: beside ``capture`` and ``surgery``, below ``scoring`` (it uses capture, surgery,
models), so scoring, methods, recovery and evaluation may ask it to "run layers a..b over these activations"
(:meth:`LayerMajorRunner.run_layers`). What drives evaluation code layer by layer lives in ``evaluation``:
perplexity (:mod:`layerfold.evaluation.perplexity_layerwise`) and the lm-eval suite
(:mod:`layerfold.evaluation.lm_eval_layerwise`). Which method runs with which stage layer by layer is
decided above the methods (:mod:`layerfold.layer_major_coverage`).
"""

from layerfold.execution.entry import capture_statistics, layer_loader, resident_model, runner, token_nll
from layerfold.execution.layer_major import Activations, ExecutionReport, LayerMajorRunner, build_skeleton, materialise_model, probe_layer_calls
from layerfold.execution.loaders import LayerLoader, ModelLayerLoader, SafetensorsLayerLoader, SeededLayerLoader
from layerfold.execution.nll import TokenNLL
from layerfold.execution.plan import LayerRecipe, PlanError, PlannedLayerLoader, WeightedLayerPlan, coefficients_of, recipes_from_plan
from layerfold.execution.trials import LayerMajorStack, ResidentStack
from layerfold.execution.checkpoint import save_layerwise

__all__ = [
    "Activations", "ExecutionReport", "LayerLoader", "LayerMajorRunner", "LayerMajorStack", "LayerRecipe", "ModelLayerLoader", "PlanError", "ResidentStack",
    "PlannedLayerLoader", "SafetensorsLayerLoader", "SeededLayerLoader", "TokenNLL", "WeightedLayerPlan", "build_skeleton",
    "capture_statistics", "coefficients_of", "layer_loader", "materialise_model",
    "probe_layer_calls", "recipes_from_plan", "resident_model", "runner", "save_layerwise", "token_nll",
]
