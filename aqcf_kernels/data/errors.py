"""The one exception the data pipeline raises for bad input data.

Every message names the offending file (or folder), so a broken case in a 131-case dataset can be
found without a debugger. It subclasses :class:`ValueError` so callers that already guard against
bad values keep working.
"""

from __future__ import annotations

import re

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad or missing data on disk: unreadable NIfTI, mismatched image/label, unexpected layout.

    The message is kept to one line: the tools print it as their one-line error, and the messages of
    the libraries quoted in it can span several (nibabel's "... - could the file be damaged?").
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message)).strip())
