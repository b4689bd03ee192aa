"""One copy of each of torch's and Lightning's warnings per run, not one per rank (or per traced stage).

Every rank runs the same library code on the same configuration, so every rank repeats the same warnings
word for word; Lightning prints its own messages on rank 0 only (``rank_zero_warn``) and this does the same
for the libraries underneath. Python's own "print once per location" is not enough on rank 0 either: any
``warnings.catch_warnings()`` block (torch's pipeline tracer opens several per traced split) resets the
record of what was shown, so the same message would come back after every trace.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, TextIO

# Libraries whose warnings every rank repeats word for word. ``copyreg`` is there because a deprecated class
# that a library deep-copies (torch's pipeline tracer copies Lightning's tree specs) warns from
# ``copyreg.__newobj__``, not from the library's own module.
_LIBRARY_PACKAGES = ("torch", "lightning", "lightning_fabric", "pytorch_lightning", "lightning_utilities")
_LIBRARY_MODULES = rf"({'|'.join(_LIBRARY_PACKAGES)}|copyreg)(\.|$)"


def _is_library_file(filename: str) -> bool:
    """Whether a warning attributed to ``filename`` comes from one of the libraries (or ``copyreg``)."""
    parts = Path(filename).parts
    if parts and parts[-1] == "copyreg.py":
        return True
    for install_dir in ("site-packages", "dist-packages"):
        if install_dir in parts:
            package = parts.index(install_dir) + 1
            return package < len(parts) and parts[package] in _LIBRARY_PACKAGES
    return False


class _ShowLibraryWarningsOnce:
    """``warnings.showwarning`` for rank 0: a library warning whose text and category were shown once are
    not shown again; every other warning goes straight to the function it wraps."""

    def __init__(self, show: Any) -> None:
        self.wrapped = show
        self._shown: set[tuple[str, type[Warning]]] = set()

    def __call__(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
        if _is_library_file(filename):
            key = (str(message), category)
            if key in self._shown:
                return
            self._shown.add(key)
        self.wrapped(message, category, filename, lineno, file, line)


def show_library_warnings_once(rank: int) -> None:
    """Print each of torch's and Lightning's warnings once per run: on global rank 0, the first time only.

    Other ranks drop them (an ``ignore`` filter on those modules); rank 0 shows each message text once per
    process. The package's own warnings and everything else are untouched, and so are filters a library or
    the user set. A user who chose warning filters (``python -W ...`` or ``PYTHONWARNINGS``) keeps exactly
    those. Calling it again (``fit`` then ``test``) changes nothing.
    """
    if sys.warnoptions:
        return
    if rank != 0:
        warnings.filterwarnings("ignore", module=_LIBRARY_MODULES)
    elif not isinstance(warnings.showwarning, _ShowLibraryWarningsOnce):
        warnings.showwarning = _ShowLibraryWarningsOnce(warnings.showwarning)

