"""Layouts the fake-tensor trace cannot follow are refused before anything is built.

A tensor-parallel fake trace failed half-way through DTensor's parameter swap and left half-swapped tensors behind;
freeing them later crashed the process (segmentation fault in the next estimate, Hugging Face GPT-2 and Llama at
tp=2). The process that estimates is a user's (the CLI, ``strategy.estimate_memory``, a memory budget's choice),
so the repeated estimates run in a child process here, where a crash shows as its exit status.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import functools
    from picotron_lightning.memory.estimate import estimate_memory
    from picotron_lightning.topology import ParallelLayout
    from tests.memory.mem_runs import build_module, sample_batch

    for model in ("gpt2", "hf", "gpt2", "hf"):
        try:
            estimate_memory(functools.partial(build_module, model), sample_batch(model), ParallelLayout(1, 2, 1, 1))
        except RuntimeError as error:
            print("refused:", str(error).splitlines()[0])
        else:
            print("estimated on fake tensors")
""")


@pytest.mark.slow
def test_tensor_parallel_fake_trace_is_refused_before_building() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    lines = [line for line in done.stdout.splitlines() if line.startswith(("refused", "estimated"))]
    assert len(lines) == 4, done.stdout
    for line in lines:
        assert "tensor parallelism" in line and "allow_real_trace=True" in line, line
