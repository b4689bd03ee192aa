"""Library warnings are shown once per run: dropped on ranks other than 0, and on rank 0 not shown again after a
``catch_warnings()`` block (torch's pipeline tracer opens several) or through a deep copy (``copyreg``).

Each case runs in its own interpreter: warning filters and ``showwarning`` are process-wide."""

from __future__ import annotations

import subprocess
import sys

# The warnings the traced pipeline split gave: one from a torch module, the same text again after a catch_warnings
# block, and again attributed to copyreg (a deep copy of a deprecated class). A user warning is shown by Python's
# own rules (again after a catch_warnings block).
SCRIPT = """
import sys, warnings
from picotron_lightning.strategies.library_warnings import show_library_warnings_once
show_library_warnings_once(int(sys.argv[1]))
show_library_warnings_once(int(sys.argv[1]))
import torch.utils._pytree as pytree
def library_warning():
    warnings.warn_explicit("library says so", FutureWarning, pytree.__file__, 1, module="torch.utils._pytree")
def copyreg_warning():
    import copyreg
    warnings.warn_explicit("library says so", FutureWarning, copyreg.__file__, 105, module="copyreg")
library_warning()
with warnings.catch_warnings():
    pass
library_warning()
copyreg_warning()
warnings.warn("user says so")
with warnings.catch_warnings():
    pass
warnings.warn("user says so")
"""


def _stderr(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_rank_zero_shows_each_library_warning_once():
    err = _stderr("0")
    assert err.count("library says so") == 1, err
    assert err.count("user says so") == 2, err  # the package leaves other warnings alone


def test_other_ranks_drop_library_warnings():
    err = _stderr("1")
    assert err.count("library says so") == 0, err
    assert err.count("user says so") == 2, err


def test_user_warning_options_are_kept():
    proc = subprocess.run([sys.executable, "-W", "always", "-c", SCRIPT, "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.stderr.count("library says so") == 3, proc.stderr
