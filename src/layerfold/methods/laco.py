"""LaCo, "Layer Collapse" (Yang, Cao, Zhao; Findings of EMNLP 2024; arXiv 2402.11187).

Rear layers collapse into a prior layer: going from the top of the stack downwards, layer ``l``
absorbs the next ``K`` layers by parameter differencing (RDSC) and they are deleted. The merge is
kept only if the final-norm representation of a few calibration sentences stays close to the *dense*
model's (mean over sentences of one cosine per flattened ``[seq, hidden]`` matrix).

Control flow follows the released notebook, yangyifei729/LaCo ``laco_llama-13b.ipynb``::

    l <- H - C
    while l >= L:
        K <- min(C - 1, |M*| - l - 1)            # rear layers folded into l
        trial-merge l+1..l+K into l; s <- sim(M, M_trial)
        if s > T: accept; l <- l - I; if l >= |M*|: l <- |M*| - 1 - C
        else:     l <- l - 1

Additions to the notebook: ``target_layers`` clamps ``K`` so the stack never drops below the target
and ends the loop as soon as the target is reached (``target_layers=None`` runs the notebook's loop
exactly: preset ``laco_code_parity``; ``laco_code_22`` is the code merge with the target stop);
trials run in place through :meth:`MethodContext.trial` (only layer ``l`` is cloned; the notebook
deep-copies the model twice per trial); a window whose layers differ in structure (dense and
mixture-of-experts layers) is not tried (``details.skipped_windows``). With ``hardware=sequential`` the context runs each trial layer
by layer from the dense model's boundary at ``l`` (the layers below a trial's base are the dense ones),
the merged layer built lazily from the plan.

Two merge rules: ``rdsc="paper"`` is Eq. 1, ``theta_l + sum_k (theta_{l+k} - theta_l)``;
``rdsc="code"`` is what the released code computes (``W += W_{l+k} - W`` updated in place, which
telescopes to the last layer's weights, so the merge degenerates to dropping ``l..l+K-1`` while
keeping layer ``l``'s norms). Only linear weights (and biases) are combined; norms stay the base's.
With ``merge_layers=2`` (one layer folded) the two rules coincide: ``theta_l + (theta_{l+1} - theta_l)
= theta_{l+1}``. LaCo issue #4 reports that Eq. 1 with several folded layers drives the similarity to
about 0, so nothing passes the threshold; SmolLM2-135M behaves the same way (C = 3 or 4).
"""

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from layerfold.config import ConfigError
from layerfold.methods import MethodCapabilities, MethodContext, register
from layerfold.models.facts import ModelFacts
from layerfold.scoring.loss import representation_similarity
from layerfold.surgery import rdsc_code, rdsc_paper
from layerfold.surgery.support import Family, structure_kinds, structure_runs

log = logging.getLogger(__name__)

# The five English Wikipedia prefixes of the released notebooks (laco_llama-13b.ipynb, commit
# 84835877, `en_wiki_selected`), verbatim including the cut-off words; the Chinese list beside them
# is commented out there and is not used here either.
LACO_SENTENCES = [
    "Mouron () is a commune in the Arde",
    "The 81st Mechanised Brigade () is a mechanised brigade of the Romanian Land Force",
    "There are 18 National Natural Landmarks in the U.S. state of Washington, out of nearly",
    "Torreorgaz is a municipality in the",
    "Copa Libertadores 1973 was won by defending champions Independiente of A",
]

RDSC = {"paper": rdsc_paper, "code": rdsc_code}


@dataclass
class LaCoConfig:
    name: str = "laco"
    merge_layers: int = field(default=4, metadata={"ge": 2, "le": "num_layers"})  # C: layers per merge, the base layer included (C - 1 rear layers folded)
    interval: int = field(default=2, metadata={"ge": 1})  # I: how far l moves down after an accepted merge
    lowest_layer: int = field(default=0, metadata={"ge": 0, "lt": "num_layers"})  # L: lowest base layer tried
    highest_layer: int | None = field(default=None, metadata={"ge": 1, "lt": "num_layers"})  # H: None = index of the last layer; the first base is H - C
    threshold: float = field(default=0.65, metadata={"ge": -1.0, "le": 1.0})  # T: accept a merge when the similarity is strictly above it
    target_layers: int | None = field(default=None, metadata={"ge": 1, "lt": "num_layers"})  # stop once the model has this many layers, never go below
    rdsc: str = field(default="paper", metadata={"choices": ["paper", "code"]})  # paper (Eq. 1) | code (released notebook, telescoping)
    sentences: list[str] = field(default_factory=lambda: list(LACO_SENTENCES))
    # true: BOS prepended explicitly (every tokenizer alike); null: the tokenizer's own default special tokens,
    # as the released notebook calls it (`tokenizer(s)`: Llama's adds BOS, SmolLM2's adds none)
    add_bos: bool | None = True


def tokenize_sentences(tokenizer, sentences: list[str], add_bos: bool | None) -> list[torch.Tensor]:
    """One id tensor per sentence: BOS prepended explicitly (``add_bos=True``) so every tokenizer behaves
    alike, none (``False``), or the tokenizer's own default special tokens (``None``, the released code)."""
    if add_bos is None:
        return [torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long) for text in sentences]
    bos = tokenizer.bos_token_id if add_bos else None
    if add_bos and bos is None:
        raise ConfigError("method.add_bos=true but the tokenizer has no BOS token; set method.add_bos=false.")
    ids = []
    for text in sentences:
        tokens = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if bos is not None:
            tokens = [bos] + tokens
        if not tokens:
            raise ConfigError(f"method.sentences: {text!r} tokenizes to nothing.")
        ids.append(torch.tensor(tokens, dtype=torch.long))
    return ids


def _check(ctx: MethodContext, cfg: LaCoConfig, highest: int) -> None:
    n = ctx.num_layers
    if cfg.merge_layers < 2:
        raise ConfigError(f"method.merge_layers must be at least 2 (the base layer plus one), got {cfg.merge_layers}.")
    if cfg.interval < 1:
        raise ConfigError(f"method.interval must be at least 1, got {cfg.interval}.")
    if not 0 <= cfg.lowest_layer <= highest <= n - 1:
        raise ConfigError(
            f"method: need 0 <= lowest_layer ({cfg.lowest_layer}) <= highest_layer ({highest}) <= {n - 1} "
            f"(the model has {n} layers)."
        )
    if cfg.rdsc not in RDSC:
        raise ConfigError(f"method.rdsc must be one of {sorted(RDSC)}, got '{cfg.rdsc}'.")
    if cfg.target_layers is not None and not 1 <= cfg.target_layers < n:
        raise ConfigError(f"method.target_layers must be between 1 and {n - 1} (the model has {n} layers), got {cfg.target_layers}.")
    if not cfg.sentences:
        raise ConfigError("method.sentences is empty; LaCo needs at least one calibration sentence.")


def problems(cfg: LaCoConfig, facts: ModelFacts, params: Any) -> list[str]:
    """Settings against each other that the config's field ranges cannot express (``validate``; compress checks again)."""
    if cfg.highest_layer is not None and cfg.lowest_layer > cfg.highest_layer:
        return [f"method.lowest_layer={cfg.lowest_layer} lies above method.highest_layer={cfg.highest_layer}: LaCo tries base "
                "layers from highest_layer down to lowest_layer; lower lowest_layer or raise highest_layer."]
    return []


def family_refusal(family: Family, cfg: LaCoConfig) -> str | None:
    """Why no merge can be made on this stack: layers of different structure never merge weight by weight."""
    structures = family.structures
    if structures is None or len(set(structures)) == 1:
        return None
    lo = int(cfg.get("lowest_layer") or 0)
    hi = cfg.get("highest_layer")
    hi = len(structures) - 1 if hi is None else int(hi)
    if max(structure_runs(structures, lo, hi), default=0) < 2:
        return (f"method=laco merges adjacent layers weight by weight, but no two adjacent layers between lowest_layer={lo} and "
                f"highest_layer={hi} of this {family.model_type} model share a structure ({structure_kinds(family)}; a dense layer and "
                "a mixture-of-experts layer cannot be merged). Widen the range (method.lowest_layer / method.highest_layer), or use "
                "a removal method.")
    return None


# Measures the final representations of its sentences itself (no capture statistics).
@register("laco", LaCoConfig, capabilities=MethodCapabilities(edit="merge", family_refusal=family_refusal), problems=problems)
def laco(ctx: MethodContext, cfg: LaCoConfig) -> dict:
    original = ctx.num_layers
    highest = original - 1 if cfg.highest_layer is None else cfg.highest_layer
    _check(ctx, cfg, highest)
    combine = RDSC[cfg.rdsc]
    C, I, T, target = cfg.merge_layers, cfg.interval, cfg.threshold, cfg.target_layers

    inputs = tokenize_sentences(ctx.tokenizer, list(cfg.sentences), cfg.add_bos)
    reference = ctx.final_representations(inputs)  # the dense model M, computed once

    trials: list[dict] = []
    skipped: list[dict] = []  # windows whose layers differ in structure
    base = highest - C
    # every trial moves base down by at least one layer: the bar's total is an upper bound (its ETA too)
    bar = tqdm(total=max(base - cfg.lowest_layer + 1, 0), desc="LaCo trials", unit="trial", disable=None)
    while base >= cfg.lowest_layer and (target is None or ctx.num_layers > target):
        k = min(C - 1, ctx.num_layers - base - 1)
        if target is not None:
            k = min(k, ctx.num_layers - target)
        if k < 1:  # base is the top layer: nothing above it to fold
            base -= 1
            continue
        window = list(range(base, base + k + 1))
        stands_for = sorted(o for i in window for o in ctx.plan.groups[i])
        if not ctx.mergeable(window):  # e.g. a dense layer beside a mixture-of-experts one: not a trial LaCo can make
            skipped.append({"base": base, "folded": k, "original_layers": stands_for})
            base -= 1
            continue
        with ctx.trial(changed=[base]) as trial:
            ctx.merge(base, window[1:], combine)
            sim = representation_similarity(reference, ctx.final_representations(inputs))
            accepted = sim > T
            if accepted:
                trial.accept()
        trials.append(
            {"base": base, "folded": k, "original_layers": stands_for, "similarity": round(sim, 6), "accepted": accepted}
        )
        log.info("LaCo: merge %s into %d -> similarity %.4f (%s)", window[1:], base, sim, "accepted" if accepted else "rejected")
        bar.update()
        if accepted:
            base -= I
            if base >= ctx.num_layers:
                base = ctx.num_layers - 1 - C
        else:
            base -= 1

    bar.close()
    final = ctx.num_layers
    reached = None if target is None else final == target
    details = {
        "settings": {
            "merge_layers": C, "interval": I, "lowest_layer": cfg.lowest_layer, "highest_layer": highest,
            "threshold": T, "target_layers": target, "rdsc": cfg.rdsc, "add_bos": cfg.add_bos,
            "sentence_tokens": [int(x.numel()) for x in inputs],
        },
        "trials": trials,
        "accepted": sum(t["accepted"] for t in trials),
        "original_layers": original,
        "final_layers": final,
        "target_reached": reached,
    }
    if skipped:
        details["skipped_windows"] = skipped
    if reached is False:
        note = (
            f"LaCo stopped at {final} layers, above target_layers={target}: no further merge passed "
            f"threshold={T} down to lowest_layer={cfg.lowest_layer}. Lower method.threshold or method.interval, "
            "or raise method.merge_layers."
        )
        details["note"] = note
        log.warning(note)
    return details
