"""The multi-process harness lives in the package (``picotron_lightning.testing``); tests import it as ``dist``."""

from picotron_lightning.testing import COLLECTIVE_TIMEOUT, free_port, init_gloo, run_ranks

__all__ = ["COLLECTIVE_TIMEOUT", "free_port", "init_gloo", "run_ranks"]
