"""Stage `validate`: check the whole params.yaml against the model before any other stage runs.

    dvc repro validate    # params: all  ->  artifacts/validated.json (the model facts the check used)

DVC deletes a stage's outputs just before running it, so a stage cannot refuse bad params without
losing its previous outputs (``cache: false`` metrics cannot be checked out again). This stage runs
first instead: ``base`` depends on its output, so a bad value stops ``dvc repro`` here, in seconds,
with every earlier output intact. The model's facts come from its config or file header, not its weights.
A refusal is printed as its message (every problem found, with the key, the value and the fix), not a traceback.
"""

import logging
from typing import NoReturn

from layerfold.config import ConfigError, load_params
from layerfold.io import install_error_hook, write_json
from layerfold.models import ModelSourceError, UnsupportedArchitectureError, probe
from layerfold.stage import VALIDATED, expand
from layerfold.validation import check, check_runtime


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [validate] %(message)s", datefmt="%H:%M:%S")
    install_error_hook("validate")
    params = load_params()  # a ConfigError here is printed by the hook, one line
    problems = []
    try:
        model = params.model.copy()
        model.path, model.tokenizer = expand(model.path), expand(model.tokenizer)
        facts = probe(model)
        check(params, facts)
    except (ConfigError, ModelSourceError, UnsupportedArchitectureError, FileNotFoundError) as err:
        problems.append(str(err))
    try:
        check_runtime(params)  # the device must exist here, where the stages will run
    except ConfigError as err:
        problems.append(str(err))
    if problems:
        refuse(problems)
    # Facts only (no paths, no times): the same model writes the same bytes, so `base` does not re-run.
    write_json(VALIDATED, {"model": facts.to_json()})
    logging.info("params.yaml fits %s: %d layers, context %s", params.model.name, facts.num_layers, facts.context_length)


def refuse(problems: list[str]) -> NoReturn:
    """Every problem found, printed by the error hook as ``[validate] ConfigError: ...`` (no traceback)."""
    raise ConfigError("\n".join(problems))


if __name__ == "__main__":
    main()
