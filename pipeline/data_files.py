"""Stage `data_files`: fingerprint the local data files the `data` stage will read.

    dvc repro data_files  # always runs  ->  data/local_files.json ({relative path: sha256})

The data directory comes from ``data.local_dir`` or ``$LAYERFOLD_DATA_DIR``, which DVC cannot track.
This stage runs on every ``dvc repro`` (it only hashes a few files) and ``data`` depends on its
output: other files re-run ``data``, an identical copy at another path does not.
"""

import logging

from omegaconf import OmegaConf

from layerfold.data.fingerprint import DATA_FILES, fingerprint
from layerfold.io import install_error_hook, write_json


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [data_files] %(message)s", datefmt="%H:%M:%S")
    install_error_hook("data_files")
    # Only the data section is read, without importing torch: this stage runs on every repro.
    data = OmegaConf.load("params.yaml").data
    facts = fingerprint(data)
    write_json(DATA_FILES, facts)
    logging.info("%d local data files fingerprinted", len(facts["files"]))


if __name__ == "__main__":
    main()
