"""Run code on N real processes with gloo: as torchrun would start them, or as a user starts a script.

Used by the test suite and the benchmarks; useful for testing your own multi-rank code too.

:func:`run_script` is the user's path: ``python script.py`` with no launcher variables in the
environment, so Lightning's own launcher (or ``fabric.launch()``) starts the ranks.
:func:`run_ranks` proves numerics: it starts the ranks itself and gives them torchrun's (or srun's)
variables, which a user running ``python train.py`` does not have.

Each worker gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, GROUP_RANK, ...), so
Lightning's TorchElasticEnvironment sees externally created processes and a Trainer or Fabric
inside the worker joins the others instead of launching its own. The parent waits with a hard
deadline: a worker that raises brings the whole run down with its traceback, and a hang is
killed and reported instead of blocking CI.
"""

from __future__ import annotations

import os
import pickle
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = timedelta(seconds=90)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_env(launcher: str, rank: int, world_size: int) -> dict[str, str]:
    """What torchrun or srun would set for one rank on a single node."""
    if launcher == "torchrun":
        return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "picotron-test"}
    if launcher == "slurm":
        return {"SLURM_NTASKS": str(world_size), "SLURM_NTASKS_PER_NODE": str(world_size), "SLURM_NNODES": "1",
                "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
                "SLURM_JOB_NAME": "picotron-test", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "127.0.0.1"}
    raise ValueError(f"`launcher={launcher!r}` must be 'torchrun' or 'slurm'.")


def _rank_environment(launcher: str, rank: int, world_size: int, port: int) -> dict[str, str]:
    """What one rank's process sees: this process's environment now, plus what the launcher would set."""
    return {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
            "PL_DISABLE_FORK": "1", **_launcher_env(launcher, rank, world_size)}


def _worker(rank: int, world_size: int, fn: Callable, args: tuple, kwargs: dict, results: Any,
            environ: dict[str, str]) -> None:
    # A forked worker starts with the fork server's environment, from when that server started; set the whole of it,
    # as a spawned process would have inherited it.
    os.environ.clear()
    os.environ.update(environ)
    import torch

    torch.set_num_threads(1)
    try:
        out = fn(rank, world_size, *args, **kwargs)
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# Imported once by the fork server that starts every rank. Spawning a rank imported torch, Lightning and this
# package anew (about 4 s of CPU each, measured on a 2-core machine), which was most of a short multi-rank test.
_PRELOADED_MODULES = ["torch", "torch.distributed", "lightning", "picotron_lightning"]


def _rank_context() -> Any:
    """The multiprocessing context ranks start from: a fork server that has imported the heavy modules.

    Nothing in the server has touched threads, devices or process groups, so a fork of it is as clean as a
    spawned interpreter; each rank still builds its own model, process group and (see ``_worker``) environment.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOADED_MODULES)
    return ctx


def run_ranks(
    fn: Callable, world_size: int, *args: Any, timeout: float = 300.0, launcher: str = "torchrun", **kwargs: Any
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes; return results by rank.

    ``launcher`` chooses the environment each rank sees: ``"torchrun"`` or ``"slurm"`` (srun's variables).
    """
    ctx = _rank_context()
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, daemon=True,
                    args=(r, world_size, fn, args, kwargs, results, _rank_environment(launcher, r, world_size, port)))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outputs]
                if dead:
                    raise RuntimeError(f"rank(s) {dead} died without a result (exit codes "
                                       f"{[procs[r].exitcode for r in dead]})") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(outputs))} did not finish "
                                       f"within {timeout:.0f}s (hang?)") from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            outputs[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [outputs[r] for r in range(world_size)]


def init_gloo(rank: int, world_size: int) -> None:
    """Plain process group for tests that drive torch.distributed without a strategy."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)




# Variables a launcher (torchrun, srun, mpirun, Lightning's own) sets for the ranks it starts; a user
# who types `python train.py` has none of them.
_LAUNCHER_VARIABLES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
    "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS", "PL_DISABLE_FORK",
)
_LAUNCHER_PREFIXES = ("TORCHELASTIC_", "SLURM_", "OMPI_", "PMI_", "PMIX_", "LSB_", "JSM_", "KUBEFLOW_")


def user_environment(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables (what ``python train.py`` sees), plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARIABLES and not k.startswith(_LAUNCHER_PREFIXES)}
    env.setdefault("OMP_NUM_THREADS", "1")  # many ranks on few cores
    env.update(extra)
    return env


def run_script(
    script: str | os.PathLike, *args: str, timeout: float = 600.0, cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None, module: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``python script *args`` as a user would and return it; raise with its output if it fails.

    The script gets :func:`user_environment` (or ``env``), so whatever it starts (Lightning's launcher,
    ``fabric.launch()``) starts the ranks. ``module=True`` runs ``python -m script`` (e.g. torchrun).
    The script and every rank it started run in a new process group, killed when the script ends or at
    ``timeout``: a hang fails the test with the output so far instead of blocking CI, and no rank outlives it.
    """
    command = [sys.executable, *(["-m", str(script)] if module else [str(script)]), *map(str, args)]
    # Output goes to a file, not a pipe: ranks left behind by a launcher that died would hold a pipe open.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=env if env is not None else user_environment(),
                                stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        try:  # the launcher is done (or out of time): whatever it started goes with it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.seek(0)
        output = log.read()
    if timed_out:
        raise TimeoutError(f"`{' '.join(command)}` did not finish within {timeout:.0f}s (hang?); output:\n"
                           f"{output[-6000:]}")
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` exited with {proc.returncode}; {_first_error(output)}"
                           f"output:\n{output[-8000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, output, "")


def _first_error(output: str) -> str:
    """The first traceback in ``output``: the rank that failed first, before the others saw it die."""
    start = output.find("Traceback (most recent call last)")
    if start < 0:
        return ""
    # The traceback ends at its first unindented line after the header (the exception itself); ranks prefix
    # their lines with "[rankN]: ", so that prefix is skipped when looking at the indentation.
    end = len(output)
    for line in output[start:].splitlines(keepends=True)[1:]:
        body = re.sub(r"^\[rank\d+\]: ", "", line)
        if body.strip() and not body[0].isspace() and not body.startswith("Traceback"):
            end = output.index(line, start) + len(line)
            break
    first = output[start:end]
    if len(first) > 8000:  # keep where it started and the exception itself
        first = f"{first[:3000]}\n[...]\n{first[-5000:]}"
    return f"first error:\n{first}\n...\n"


class TokenDataset:
    """A map-style dataset over the rows of a token tensor (what :func:`token_data` makes)."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        return self.data[i]


def token_data(num_samples: int, seq_len: int = 16, vocab_size: int = 256, seed: int = 1234):  # noqa: ANN201
    """``num_samples`` random token rows of ``seq_len + 1`` (inputs and shifted targets), reproducible by seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_samples, seq_len + 1), generator=g)
