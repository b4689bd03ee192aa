import os

# Tests import their helpers as a package (``from tests.parity import ...``): pytest puts the repository
# root on sys.path (pyproject's ``pythonpath``), and spawned worker processes inherit that sys.path.
os.environ.setdefault("OMP_NUM_THREADS", "1")
