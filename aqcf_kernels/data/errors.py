"""The one exception the data pipeline raises for bad input data.

Every message names the offending file (or folder), so a broken case in a 131-case dataset can be
found without a debugger. It subclasses :class:`ValueError` so callers that already guard against
bad values keep working.
"""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad or missing data on disk: unreadable NIfTI, mismatched image/label, unexpected layout."""
