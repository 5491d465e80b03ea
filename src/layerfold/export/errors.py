"""The error every refused export raises: it names the setting or input, its value, what is allowed, and the fix."""

from __future__ import annotations


class ExportError(ValueError):
    """An export that cannot be written as asked; raised before anything is written."""
