"""The distributed micro-batch finder: its decisions as pure functions, and a real 2-rank run."""

from __future__ import annotations

import pytest
import torch

from picotron_lightning.memory.finder import back_off, fitting_size, largest_fitting, linear_fit, repeat_rows


def test_linear_model_and_largest_fitting_size() -> None:
    fixed, per_sample = linear_fit(1, 1100, 2, 1200)
    assert (fixed, per_sample) == (1000, 100)
    assert largest_fitting(fixed, per_sample, budget=1750, max_size=64) == 7
    assert largest_fitting(fixed, per_sample, budget=1750, max_size=5) == 5
    assert largest_fitting(fixed, per_sample, budget=900, max_size=64) == 1


def test_fitting_size_interpolates_between_the_bracketing_estimates() -> None:
    # A constant part (DDP's end of backward) hides the activations at small sizes: 1 and 2 estimate the same.
    peaks = {1: 500, 2: 500, 4: 540, 8: 580, 16: 660}
    assert fitting_size(peaks, budget=600) == 10  # on the line through 8 (580) and 16 (660)
    assert fitting_size(peaks, budget=400) == 1  # nothing fits: the real steps decide
    assert fitting_size({1: 10, 2: 20}, budget=100) == 2  # all fit: the largest estimated


def test_back_off_is_proportional_and_less_than_half() -> None:
    assert back_off(100, peak=110, budget=100) == 90
    assert back_off(100, peak=1000, budget=100) == 51  # never below half + 1
    assert back_off(100, peak=101, budget=100) == 99  # always smaller
    assert back_off(2, peak=3, budget=1) == 1
    for size in range(3, 200):
        for over in (1.01, 1.3, 3.0):
            smaller = back_off(size, int(1000 * over), 1000)
            assert size // 2 < smaller < size


def test_repeat_rows_cycles_samples() -> None:
    batch = {"ids": torch.arange(6).reshape(3, 2), "n": 3}
    grown = repeat_rows(batch, 5)
    assert grown["ids"].tolist() == [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3]] and grown["n"] == 3


# Strategy arguments, and the layout on 2 ranks: DDP and FSDP2 over dp=2, and tensor parallelism (tp=2), which the
# estimate traces on fake tensors too.
FINDER_LAYOUTS = {
    "ddp": ({"data_parallel_mode": "ddp"}, (2, 1)),
    "fsdp": ({"data_parallel_mode": "fsdp"}, (2, 1)),
    "tp2": ({"tensor_parallel_size": 2}, (1, 2)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FINDER_LAYOUTS))
def test_finder_sets_the_same_fitting_size_on_every_rank(name: str) -> None:
    from picotron_lightning.memory.estimate import estimate_memory
    from picotron_lightning.options import Picotron3DOptions
    from picotron_lightning.testing import run_ranks
    from picotron_lightning.topology import ParallelLayout
    from tests.memory.finder_runs import build_sized, finder_fit
    from tests.parity import make_data

    strategy_kwargs, (dp, tp) = FINDER_LAYOUTS[name]
    layout = ParallelLayout(data_parallel_size=dp, tensor_parallel_size=tp).resolve(2)
    options = Picotron3DOptions.from_arguments(strategy_kwargs)
    low, high = (estimate_memory(build_sized, make_data(b), layout, options=options)[0].peak for b in (16, 32))
    assert high > low  # activations dominate here
    budget = int(low + (high - low) * 4.5 / 16)  # the estimate's line through 16 and 32 puts the answer at 20
    runs = run_ranks(finder_fit, 2, budget, strategy_kwargs, timeout=600)
    sizes = {r["size"] for r in runs}
    assert len(sizes) == 1, runs
    size = sizes.pop()
    assert runs[0]["estimated"] == 20, runs
    assert 10 < size <= 20, runs  # the estimate, or one back-off by less than half
    assert all(1 <= len(r["measured"]) <= 2 and r["measured"] == runs[0]["measured"] for r in runs)
    assert all(r["module_batch_size"] == size and r["loader_batch"] == size for r in runs)
    assert all(r["measured"][-1][1] <= budget for r in runs)
    # A real training step at that size (Lightning's loop, optimizer state included) stays under the budget.
    assert all(r["probe_peak"] <= budget for r in runs), runs
