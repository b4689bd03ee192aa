import os

# Tests import their helpers as a package (``from tests.parity import ...``): pytest puts the repository
# root on sys.path (pyproject's ``pythonpath``), and the ranks run_ranks starts (forked from a fork server) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):  # noqa: ANN001 - pytest's hook signature
    """Tests marked ``large`` run only with ``PICOTRON_LARGE_TESTS=1``: CI (2 cores, 90 minutes) leaves them out,
    and docs/benchmarks.md records their last measured run with the command."""
    if os.environ.get("PICOTRON_LARGE_TESTS") == "1":
        return
    import pytest

    skip = pytest.mark.skip(reason="a large run (PICOTRON_LARGE_TESTS=1 runs it; CI's time budget leaves it out)")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)
