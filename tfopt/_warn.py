"""One warning a user must see, pointing at the user's own line.

``warnings.warn(stacklevel=n)`` counts frames by hand, and the count breaks
whenever tfopt's internals are rearranged. :func:`warn_user` points the
warning at the first frame outside the tfopt package instead (Python 3.12's
``skip_file_prefixes`` does the same; tfopt supports 3.10+).
"""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_user(message: str, category: type = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the caller of tfopt."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
