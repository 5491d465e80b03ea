"""Environment defaults every layerfold entry point gets on import: the Hugging Face hub off unless asked for.

layerfold reads models and data from local folders (``LAYERFOLD_MODELS_DIR``, ``LAYERFOLD_DATA_DIR``;
``scripts/env.sh`` sets them). Without ``HF_HUB_OFFLINE``, a missing local file makes ``huggingface_hub``
and ``datasets`` retry the network for about half a minute before they fail. So when the user has set
neither ``HF_HUB_OFFLINE`` nor ``HF_DATASETS_OFFLINE`` and has not configured the hub (no token, no
``HF_ENDPOINT``), both are set to ``1`` here, with one log line that says how to turn the hub back on.
A value the user set, ``0`` included, is always kept.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
HUB_OFF_MESSAGE = ("Hugging Face hub off (HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1): models and data come from local folders; "
                   "to use the hub, export HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 (or log in: huggingface-cli login)")


def _token_file(env: Mapping[str, str]) -> Path:
    """Where ``huggingface_hub`` keeps the token of ``huggingface-cli login`` (HF_TOKEN_PATH, else $HF_HOME/token)."""
    if env.get("HF_TOKEN_PATH"):
        return Path(env["HF_TOKEN_PATH"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home).expanduser() / "token"


def hub_configured(env: Mapping[str, str]) -> bool:
    """Whether the user set the hub up: a token (variable or login file) or a custom ``HF_ENDPOINT``."""
    return any(env.get(k) for k in (*TOKEN_VARIABLES, "HF_ENDPOINT")) or _token_file(env).is_file()


def offline_defaults(env: MutableMapping[str, str] | None = None) -> bool:
    """Set ``HF_HUB_OFFLINE`` and ``HF_DATASETS_OFFLINE`` to ``1`` in ``env`` (default ``os.environ``) when
    neither is set and the hub is not configured; log it once. Returns whether it set them."""
    env = os.environ if env is None else env
    if any(k in env for k in OFFLINE_VARIABLES) or hub_configured(env):
        return False
    for key in OFFLINE_VARIABLES:
        env[key] = "1"
    if env is os.environ and "huggingface_hub" in sys.modules:  # imported first: it read its constants already
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    logging.getLogger("layerfold").warning(HUB_OFF_MESSAGE)
    return True
