"""Hydra plugin module: a misspelt ``dvc exp run -S key=value`` gets layerfold's message, not Hydra's '+' hint.

DVC loads the Hydra plugins found under ``hydra_plugins/`` in the repository root (its
``hydra.plugins_path``, default the root) before composing ``conf/`` into ``params.yaml``. Importing
this module installs :func:`layerfold.config.install_override_hint`; it defines no plugin class.
"""

try:
    from layerfold.config import install_override_hint
except ImportError:  # DVC run from an environment without layerfold: Hydra's own message stays
    pass
else:
    install_override_hint()
