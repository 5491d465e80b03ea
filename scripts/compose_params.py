"""Write params.yaml from conf/ with Hydra overrides, as `dvc exp run -S ...` would, after checking it.

    python scripts/compose_params.py                      # refresh params.yaml after editing conf/
    python scripts/compose_params.py method=laco eval=gpu # compose a variant (then `dvc repro`)

The composed configuration is validated first (keys, types, ranges, the method's settings, recovery's
settings as the recover stage would judge them, and what the model's config rules out: sequence lengths
beyond its context, a target depth beyond its depth), with the same check as the ``validate`` stage, so a
bad value is reported here and params.yaml is left as it was.
"""

import sys

import yaml

from layerfold.config import ConfigError, compose, parse_params
from layerfold.io import atomic_file
from layerfold.models import ModelSourceError, UnsupportedArchitectureError, probe
from layerfold.stage import expand
from layerfold.validation import check


def main(overrides: list[str]) -> int:
    try:
        composed = compose("conf", overrides)
        params = parse_params(composed, "composed config")
        model = params.model.copy()
        model.path, model.tokenizer = expand(model.path), expand(model.tokenizer)
        check(params, probe(model), "composed config")
    except (ConfigError, ModelSourceError, UnsupportedArchitectureError, FileNotFoundError) as err:
        print(f"error: {err}\nparams.yaml was not changed.", file=sys.stderr)
        return 1
    with atomic_file("params.yaml") as handle:
        yaml.safe_dump(composed, handle, sort_keys=False)
    print(f"params.yaml composed with overrides: {overrides or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
