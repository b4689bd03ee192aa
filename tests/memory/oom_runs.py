"""Workers for the OOM-recovery tests: real ``Trainer.fit`` runs on gloo ranks with injected OOMs."""

from __future__ import annotations

import random
from typing import Any

from torch.utils.data import DataLoader

from picotron_lightning.testing_memory import OOMAt, Phase


def random_plan(world: int, steps: int, count: int, micro: int, retry_larger_after: int, seed: int,
                max_op: int = 60) -> tuple[list[OOMAt], list[int]]:
    """``count`` scripted OOMs over ``world`` ranks and ``steps`` steps, and the split each step should end with.

    Random ranks (up to two per step), phase, op and number of failing attempts; the plan is drawn while
    simulating the agreed schedule (:class:`SplitSchedule`), so no step runs out of splits. The first and
    the last step always get an OOM. Raises if ``count`` does not fit in ``steps``.
    """
    from picotron_lightning.memory.oom import SplitSchedule

    rng = random.Random(seed)
    schedule = SplitSchedule(retry_larger_after)
    plan: list[OOMAt] = []
    splits: list[int] = []
    fired = 0
    for step in range(steps):
        chosen = step in (0, steps - 1) or rng.random() < 0.8
        ranks = rng.sample(range(world), k=rng.choice([1, world, world])) if chosen else []
        retries = 0
        for rank in ranks:
            room = count - fired
            attempts = min(rng.choice([1, 1, 2]), room)
            while attempts > retries and schedule.split * 2 ** attempts > micro:  # would run out of splits
                attempts -= 1
            if attempts == 0:
                continue
            plan.append(OOMAt(rank=rank, step=step, phase=rng.choice(["forward", "backward"]),
                              op=rng.randrange(max_op), attempts=attempts))
            fired += attempts
            retries = max(retries, attempts)
        for _ in range(retries):
            assert schedule.on_oom(micro) is not None
        splits.append(schedule.split)
        schedule.on_success()
    if fired != count:
        raise ValueError(f"only {fired} of {count} OOMs fit in {steps} steps")
    return plan, splits


def check_agreed_schedule(runs: list[dict[str, Any]], count: int, expected_splits: list[int]) -> None:
    """All ``count`` scripted OOMs fired, every rank agreed on every retry, each step ended with the predicted split."""
    assert sum(len(r["fired"]) for r in runs) == count, [r["fired"] for r in runs]
    events = runs[0]["events"]
    assert all(r["events"] == events for r in runs)
    ended = {e["step"]: e["new_split"] for e in events}
    assert [ended.get(step) for step in range(len(expected_splits))] == [
        s if step in ended else None for step, s in enumerate(expected_splits)]


CHOSEN_STEPS = 5
# (step, failed ranks, split, new split) of each retry that chosen_points() causes with oom_retry_larger_after=1.
CHOSEN_POINT_EVENTS = [(0, [1], 1, 2), (1, [0], 1, 2), (1, [0], 2, 4), (2, [0, 1], 2, 4), (4, [1], 1, 2)]


def chosen_points(last_phase: Phase = "forward") -> list[OOMAt]:
    """OOMs on 2 ranks over :data:`CHOSEN_STEPS` steps at the points a replay can get wrong (3 on each rank)."""
    return [
        OOMAt(rank=1, step=0, phase="forward", op=40),  # the very first step: no earlier step to learn from
        OOMAt(rank=0, step=1, phase="backward", op=25, attempts=2),  # the retry fails too
        OOMAt(rank=0, step=2, phase="forward", op=3),  # both ranks, at different points
        OOMAt(rank=1, step=2, phase="backward", op=60),
        OOMAt(rank=1, step=4, phase=last_phase, op=150),  # the last batch
    ]


def oom_fit(rank: int, world: int, data: Any, micro: int, steps: int, plan: list[OOMAt], budget: int | None = None,
            memory: dict | None = None, monitor: bool = True, tp: int = 1, dp_mode: str = "ddp",
            strategy_options: dict | None = None, module: Any = None, trainer_options: dict | None = None,
            ) -> dict[str, Any]:
    """``Trainer.fit`` with picotron3d (``dp_mode`` data parallelism, ``tp`` tensor parallelism; oom_recovery) and
    :class:`InjectOOM`; what the test compares (the state as whole tensors, gathered from sharded ones).
    ``trainer_options``: more ``Trainer`` arguments (``accumulate_grad_batches``)."""
    from picotron_lightning import AlertManager, MetricsCollector, Picotron3DStrategy
    from picotron_lightning.testing import COLLECTIVE_TIMEOUT, TokenDataset
    from picotron_lightning.testing_memory import InjectOOM
    from tests.fitting import fit_and_record
    from tests.parity import make_module

    memory = {"oom_recovery": True, "oom_retry_larger_after": 2, **(memory or {})}
    strategy = Picotron3DStrategy(timeout=COLLECTIVE_TIMEOUT, data_parallel_mode=dp_mode, memory=memory,
                                  tensor_parallel_size=tp, **(strategy_options or {}))
    injector = InjectOOM(plan, budget=budget)
    callbacks: list[Any] = [injector]
    alerts = collector = None
    if monitor:
        alerts = AlertManager(sinks=("logging",), rate_limit=10_000)
        collector = MetricsCollector(log_every_n_steps=1, histogram_every_n_steps=0, flops_per_token=1.0,
                                     peak_flops_per_device=1.0, log_param_norm=False, log_moe=False)
        callbacks += [alerts, collector]
    module = module() if module is not None else make_module()
    loader = DataLoader(TokenDataset(data), batch_size=micro, shuffle=False)
    fitted = fit_and_record(module, loader, callbacks=callbacks, strategy=strategy, devices=world, max_steps=steps,
                            **(trainer_options or {}))
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in module.state_dict().items()}
    recovery = strategy.oom_recovery
    reported = {}
    if collector is not None:
        for step, metrics in collector.history:
            if "memory/oom_retries" in metrics:
                reported[step] = (metrics["memory/oom_retries"], metrics["memory/oom_micro_batches"])
    return {
        "losses": fitted.losses, "fired": injector.fired, "budget_fired": injector.budget_fired,
        "events": recovery.events if recovery is not None else [],
        "state": {k: v.detach().clone() for k, v in state.items()},
        "alerts": dict(alerts.counts) if alerts is not None else {}, "metrics": reported,
        "final_split": recovery.schedule.split if recovery is not None else None,
        "replayed": recovery.replayed if recovery is not None else [],
        # collectives a failed pipeline stage issued with zeros (tp inside stages), over the run
        "stage_replayed": pipeline.failure.replayed if (pipeline := strategy._pipeline) and pipeline.failure else 0,
    }


def module_reading_values() -> Any:
    """The tiny Llama whose ``training_step`` reads a value (``loss.item()``), as user code sometimes does."""
    from tests.parity import make_module

    module = make_module()

    def training_step(batch: Any, batch_idx: int) -> Any:
        loss = module._loss(batch)
        if loss.item() > 1e6:  # a value the fake trace of an OOM-recovered step cannot know
            raise RuntimeError("diverged")
        return loss

    module.training_step = training_step
    return module


def oom_fit_expect_error(rank: int, world: int, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``oom_fit`` that is expected to fail: the error's text, or an empty one if it finished."""
    try:
        oom_fit(rank, world, *args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the test reads the message
        return {"error": f"{type(error).__name__}: {error}"}
    return {"error": ""}


def oom_fit_expect_stop(rank: int, world: int, data: Any, micro: int, plan: list[OOMAt]) -> dict[str, Any]:
    """A run whose step 1 fails at every split on one rank: every rank must stop with the message."""
    from picotron_lightning.memory.oom import OOMRecoveryExhausted

    try:
        oom_fit(rank, world, data, micro, 3, plan)
    except OOMRecoveryExhausted as error:
        return {"stopped": True, "message": str(error)}
    return {"stopped": False, "message": ""}


# What OOM recovery covers: dropless, no auxiliary loss; z-loss on, and bias balancing, whose counts are sums
# (a split step must give the same update).
MOE_CONFIG = {"moe_aux_loss_coeff": 0.0, "moe_bias_update_rate": 1e-2}


def moe_module() -> Any:
    """The tiny MoE Llama in the configuration OOM recovery covers."""
    from tests.parity import make_module

    return make_module("tiny-moe", config=MOE_CONFIG)


def moe_module_with_aux_loss() -> Any:
    """The tiny MoE Llama as it comes (auxiliary loss 1e-2): a split step would change its update."""
    from tests.parity import make_module

    return make_module("tiny-moe")
