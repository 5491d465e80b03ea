"""Write params.yaml from conf/ with Hydra overrides, as `dvc exp run -S ...` would.

    python scripts/compose_params.py                      # refresh params.yaml after editing conf/
    python scripts/compose_params.py method=laco eval=gpu # compose a variant (then `dvc repro`)
"""

import sys

import yaml

from layerfold.config import compose
from layerfold.io import atomic_file

if __name__ == "__main__":
    params = compose("conf", sys.argv[1:])
    with atomic_file("params.yaml") as handle:
        yaml.safe_dump(params, handle, sort_keys=False)
    print(f"params.yaml composed with overrides: {sys.argv[1:] or 'none'}")
