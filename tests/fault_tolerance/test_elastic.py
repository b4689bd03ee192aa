"""An elastic torchrun run loses a node and comes back with half the data-parallel ranks, on its own.

Two torchrun agents on this machine form one run through an elastic c10d rendezvous (``--nnodes=1:2``), two
workers each: dp=4. After a checkpoint, at a random step, one agent and its workers are SIGKILLed (a node is
lost). The surviving agent's workers fail, it restarts them (``--max-restarts=1``), the rendezvous closes
with the one node left, and the strategy resumes at dp=2 from the newest complete checkpoint (DCP reshards
on load; the user's data module splits the same global batch over the ranks it now has).

Checked: per-step losses equal one process's with the same global batch (fp32 1e-4), and final weights
equal a run that switches from dp=4 to dp=2 at the same checkpoint by hand (same steps, nobody killed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from picotron_lightning.testing import free_port, token_data, user_environment
from tests.fault_tolerance.test_restart import (
    MODEL,
    SCRIPTS,
    attempts_of,
    final_weights,
    kill_step_seed,
    random_kill_step,
    torchrun,
    trajectory,
)
from tests.parity import RTOL, max_relative_diff, train_reference

sys.path.insert(0, str(Path(__file__).parents[1] / "user_path" / "scripts"))
from user_models import build_module  # noqa: E402

pytestmark = pytest.mark.slow

DEADLINE_S = 900.0


def _start_agent(tmp: Path, name: str, spec: dict[str, Any], port: int) -> subprocess.Popen:
    """One torchrun agent (one "node") of an elastic run, as a user types it on each node."""
    (tmp / f"spec_{name}.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=elastic-test",
               "--max-restarts=1", str(SCRIPTS / "train_resume.py"), str(tmp / f"spec_{name}.json"), str(tmp)]
    log = open(tmp / f"agent_{name}.log", "w")  # noqa: SIM115 - closed with the process in _stop
    return subprocess.Popen(command, cwd=tmp, env=user_environment(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for_listener(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the first agent's rendezvous store never listened on port {port}")


def _stop(tmp: Path, agents: list[subprocess.Popen]) -> None:
    """Kill whatever is left: the agents' process groups and every worker they started (own sessions)."""
    for agent in agents:
        try:
            os.killpg(agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        agent.wait()
    for worker in (tmp / "workers").glob("*/*"):
        try:
            os.kill(int(worker.name), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _logs(tmp: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-5000:]}" for log in sorted(tmp.glob("agent_*.log")))


def test_a_lost_node_resumes_at_half_the_data_parallel_ranks_under_elastic_torchrun(tmp_path):
    steps, every, global_batch = 6, 2, 8
    seed = kill_step_seed()
    kill_step, resume_step = random_kill_step(seed, checkpoint_every=every, steps=steps)
    context = f"seed {seed}: node killed at step {kill_step}"
    # 32 samples, global batch 8: an epoch is 4 steps; every resume point is divisible by 2 and 4 ranks.
    spec = {"model": MODEL, "steps": steps, "global_batch": global_batch, "samples": 32, "checkpoint_every": every}
    port = free_port()
    deadline = time.monotonic() + DEADLINE_S
    survivor = _start_agent(tmp_path, "survivor", spec, port)
    agents = [survivor]
    try:
        # The survivor hosts the rendezvous store (it binds the endpoint first); the lost node must not,
        # or nobody would be left to rendezvous with.
        _wait_for_listener(port, deadline)
        lost = _start_agent(tmp_path, "lost", {**spec, "kill": {"agent": True, "local_rank": 0, "step": kill_step}},
                            port)
        agents.append(lost)
        while survivor.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        assert survivor.returncode == 0, (context, survivor.returncode, _logs(tmp_path))
        assert lost.wait(timeout=max(1.0, deadline - time.monotonic())) == -signal.SIGKILL, (context, _logs(tmp_path))
    finally:
        _stop(tmp_path, agents)
    attempts = attempts_of(tmp_path)
    assert set(attempts) == {"0", "1"}, (context, attempts)  # the survivor restarted its workers once
    assert (attempts["0"]["world_size"], attempts["1"]["world_size"]) == (4, 2), (context, attempts)
    assert sorted(map(int, attempts["0"]["losses"])) == list(range(1, kill_step + 1)), (context, attempts)
    assert str(attempts["1"]["resumed_from"]).endswith(f"step={resume_step}.ckpt"), (context, attempts)
    assert sorted(map(int, attempts["1"]["losses"])) == list(range(resume_step + 1, steps + 1)), context

    reference = train_reference(build_module(MODEL), token_data(spec["samples"]), steps, global_batch)
    got = trajectory(attempts)
    assert max_relative_diff(got, reference["losses"]) <= RTOL, (context, got, reference["losses"])

    # The same switch by hand: the dp=4 run's checkpoint (written before the kill, so an uninterrupted run's),
    # continued on 2 ranks with resume="auto" and nobody killed.
    switched = tmp_path / "switched_by_hand"
    (switched / "checkpoints").mkdir(parents=True)
    name = f"step={resume_step}.ckpt"
    shutil.copytree(tmp_path / "checkpoints" / name, switched / "checkpoints" / name)
    torchrun(switched, {**spec, "strategy": {"resume": "auto"}}, nproc=2, max_restarts=0,
             timeout=max(60.0, deadline - time.monotonic()))
    assert attempts_of(switched)["0"]["resumed_from"].endswith(name)
    resumed = final_weights(tmp_path / "checkpoints" / f"step={steps}.ckpt", tmp_path)
    expected = final_weights(switched / "checkpoints" / f"step={steps}.ckpt", switched)
    assert sorted(resumed) == sorted(expected)
    for weight, want in expected.items():
        torch.testing.assert_close(resumed[weight], want, rtol=RTOL, atol=1e-6, msg=lambda m, w=weight: f"{w}: {m}")
