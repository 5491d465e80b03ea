"""The run list of a comparison (``conf/comparison/*.yaml``): which runs, with which ``dvc exp run -S``
overrides, how many layers each removes and which depth curve it belongs to; every run composed and
validated as the ``validate`` stage would before anything is queued, and the ``dvc exp run --queue``
command of each.

A typo fails here, naming the run, instead of an hour into the queue.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.errors import HydraException
from omegaconf import DictConfig

from layerfold.config import ConfigError, compose, parse_params
from layerfold.models import ModelFacts, ModelSourceError, UnsupportedArchitectureError, probe
from layerfold.stage import expand
from layerfold.validation import check

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a git ref component and a file name
RUN_KEYS = {"overrides", "remove", "curve"}
LIST_KEYS = {"experiment_prefix", "common", "compare_at", "runs"}


# ------------------------------------------------------------------------------------------------
# the run list


@dataclass(frozen=True)
class PlannedRun:
    name: str
    overrides: tuple[str, ...]
    remove: int  # layers the run takes away; checked against the composed method settings
    curve: str | None = None  # line of the depth plot this run is a point of


@dataclass(frozen=True)
class RunList:
    source: str  # the file it was read from, named in errors
    runs: tuple[PlannedRun, ...]
    common: tuple[str, ...] = ()
    prefix: str = ""
    compare_at: int = 8

    def experiment(self, run: PlannedRun) -> str:
        """The dvc experiment name of ``run``."""
        return f"{self.prefix}{run.name}"

    def overrides(self, run: PlannedRun, extra: Iterable[str] = ()) -> list[str]:
        """``common``, then ``extra`` (``--set``), then the run's own: later ones win in Hydra."""
        return [*self.common, *extra, *run.overrides]

    def select(self, names: Iterable[str] | None) -> list[PlannedRun]:
        """The runs named (all when ``names`` is empty), in run-list order."""
        names = list(names or [])
        known = {run.name for run in self.runs}
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else f" Runs: {', '.join(sorted(known))}."
                raise ConfigError(f"--only {name}: no such run in {self.source}.{hint}")
        return [run for run in self.runs if not names or run.name in names]


def _list_error(source: str, key: str, value: Any, want: str) -> ConfigError:
    return ConfigError(f"{source}: {key} = {value!r}; {want}. Fix it in {source}.")


def load_run_list(path: str | Path) -> RunList:
    """Read and check a run list: known keys, names usable as experiment names, overrides as strings."""
    source = str(path)
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(raw) - LIST_KEYS)
    if unknown:
        raise _list_error(source, unknown[0], raw[unknown[0]], f"the keys are {', '.join(sorted(LIST_KEYS))}")
    common, prefix, compare_at = raw.get("common") or [], raw.get("experiment_prefix") or "", raw.get("compare_at", 8)
    if not isinstance(common, list) or not all(isinstance(o, str) for o in common):
        raise _list_error(source, "common", common, "must be a list of Hydra overrides such as 'eval=gpu'")
    if prefix and not RUN_NAME.fullmatch(prefix):
        raise _list_error(source, "experiment_prefix", prefix, "must use letters, digits, '-' and '_' only")
    if isinstance(compare_at, bool) or not isinstance(compare_at, int) or compare_at < 1:
        raise _list_error(source, "compare_at", compare_at, "must be an integer >= 1 (layers removed in the comparison)")
    runs = []
    for name, spec in (raw.get("runs") or {}).items():
        key = f"runs.{name}"
        if not RUN_NAME.fullmatch(str(name)):
            raise _list_error(source, key, name, "a run name uses letters, digits, '-' and '_' only (it becomes a git ref)")
        if not isinstance(spec, dict) or set(spec) - RUN_KEYS:
            raise _list_error(source, key, spec, f"must be a mapping with the keys {', '.join(sorted(RUN_KEYS))}")
        overrides, remove, curve = spec.get("overrides"), spec.get("remove"), spec.get("curve")
        if not isinstance(overrides, list) or not overrides or not all(isinstance(o, str) for o in overrides):
            raise _list_error(source, f"{key}.overrides", overrides, "must be a non-empty list of overrides such as 'method=shortgpt'")
        if isinstance(remove, bool) or not isinstance(remove, int) or remove < 1:
            raise _list_error(source, f"{key}.remove", remove, "must be an integer >= 1 (the layers the run removes)")
        if curve is not None and not isinstance(curve, str):
            raise _list_error(source, f"{key}.curve", curve, "must be a label such as 'shortgpt', or absent")
        runs.append(PlannedRun(str(name), tuple(overrides), remove, curve))
    if not runs:
        raise _list_error(source, "runs", raw.get("runs"), "must name at least one run")
    return RunList(source, tuple(runs), tuple(common), prefix, compare_at)


# ------------------------------------------------------------------------------------------------
# checking every run before the queue is touched


def removed_layers(method: Mapping[str, Any], num_layers: int) -> int | None:
    """The layers a method's settings take away: ``num_layers - target_layers`` where a target depth is
    set (LaCo, CoMe), else ``num_remove``; None when neither fixes the depth (LaCo without a target)."""
    if method.get("target_layers") is not None:
        return num_layers - int(method["target_layers"])
    if method.get("num_remove") is not None:
        return int(method["num_remove"])
    return None


def model_facts(model: DictConfig) -> ModelFacts:
    """The model's facts from its config or file header (no weights), as the ``validate`` stage reads them."""
    model = model.copy()
    model.path, model.tokenizer = expand(model.path), expand(model.tokenizer)
    return probe(model)


def check_runs(run_list: RunList, runs: list[PlannedRun], extra: Iterable[str] = (), conf_dir: str | Path = "conf",
               facts_for: Callable[[DictConfig], ModelFacts] = model_facts) -> dict[str, dict]:
    """Compose every run as ``dvc exp run -S`` would and validate it against its model; return the composed
    params by run name. Raises :class:`ConfigError` naming the run, its overrides and the fix at the first
    run that fails, including a run whose settings remove another number of layers than its ``remove``."""
    extra = list(extra)
    facts_cache: dict[str, ModelFacts] = {}
    composed_by_run = {}
    for run in runs:
        overrides = run_list.overrides(run, extra)
        where = f"run '{run.name}'"
        try:
            composed = compose(conf_dir, overrides)
            params = parse_params(composed, where)
            key = json.dumps(composed["model"], sort_keys=True)
            if key not in facts_cache:
                facts_cache[key] = facts_for(params.model)
            check(params, facts_cache[key], where)
        except (HydraException, ValueError, ModelSourceError, UnsupportedArchitectureError, FileNotFoundError) as err:
            raise ConfigError(
                f"run '{run.name}' (overrides: {' '.join(overrides)}) does not compose and validate: {err}\n"
                f"Fix runs.{run.name}.overrides in {run_list.source} (or the --set value); nothing was queued."
            ) from None
        layers = facts_cache[key].num_layers
        removed = removed_layers(composed["method"], layers)
        if removed != run.remove:
            how = "no num_remove or target_layers fixes its depth" if removed is None else f"its method settings remove {removed}"
            raise ConfigError(
                f"run '{run.name}': runs.{run.name}.remove = {run.remove} but {how} (of {layers} layers; method: "
                f"{json.dumps(composed['method'], default=str)[:200]}). Set method.num_remove or method.target_layers in "
                f"runs.{run.name}.overrides, or correct remove, in {run_list.source}; nothing was queued."
            )
        composed_by_run[run.name] = composed
    return composed_by_run


def queue_command(run_list: RunList, run: PlannedRun, extra: Iterable[str] = (), force: bool = False) -> list[str]:
    """``dvc exp run --queue -n <experiment> -S <override> ...`` for one run (``-f`` replaces an
    experiment of the same name, which DVC otherwise refuses)."""
    options = [part for override in run_list.overrides(run, extra) for part in ("-S", override)]
    return ["dvc", "exp", "run", "--queue", *(["-f"] if force else []), "-n", run_list.experiment(run), *options]
