"""The user's path for ``plan --calibrate``: ``python -m picotron_lightning.plan ... --calibrate`` as a subprocess.

The first run measures (local gloo ranks started by the planner itself) and writes the cache; the second,
with the same cache directory, must read everything from it, start no ranks and print the same ranking.
The layouts are restricted with the CLI's own constraints (``--tp 1 --dp-mode ddp --checkpointing none``: the
data-parallel DDP layouts, one style) so that the probe measures one style, not the twelve of all fitting layouts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from picotron_lightning.testing import run_script, user_environment

pytestmark = pytest.mark.slow

COMMAND = ("--model", "picotron_lightning.models:CausalLMModule", "--model-args", '{"preset": "tiny"}',
           "--device", "cpu", "--devices", "2", "--devices-per-node", "2", "--seq-len", "32",
           "--global-batch", "4", "--tp", "1", "--dp-mode", "ddp", "--checkpointing", "none", "--calibrate")


def _plan(cache: Path, tmp: Path) -> tuple[list[str], str]:
    """Run the CLI as a user does; return the ranked rows and the calibration note."""
    env = user_environment(PICOTRON_PLANNER_CACHE=str(cache))
    output = run_script("picotron_lightning.plan", *COMMAND, module=True, timeout=300, cwd=tmp, env=env).stdout
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if "step ms" in line and "layout" in line)
    rows = [line for line in lines[header + 1:] if line[:4].strip().isdigit()]
    notes = [line for line in lines if line.startswith("ranked by calibrated step times")]
    assert len(notes) == 1, output
    return rows, notes[0]


def _snapshot(cache: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in sorted(cache.glob("*.json"))}


def test_calibrate_measures_then_plans_from_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "planner-cache"
    rows, note = _plan(cache, tmp_path)
    # The ranked table: the data-parallel DDP layouts (several microbatch counts) of the tiny model on 2 CPUs.
    assert len(rows) >= 2 and all("dp=2[ddp] tp=1 pp=1" in r for r in rows), rows
    assert "block costs of 1 parallel style on 2 local processes, 0 of them read from the cache" in note, note
    assert "gloo link measured" in note and "local ranks started to measure" in note, note
    assert str(cache) in note, note
    written = _snapshot(cache)
    assert sum(name.startswith("rates-") for name in written) == 1, written.keys()
    assert sum(not name.startswith("rates-") for name in written) == 1, written.keys()  # one file per style

    rows_again, note_again = _plan(cache, tmp_path)
    assert "1 of them read from the cache, gloo link read from the cache (no ranks started)" in note_again, note_again
    assert _snapshot(cache) == written  # nothing measured or rewritten
    assert rows_again == rows  # the same numbers give the same ranking
