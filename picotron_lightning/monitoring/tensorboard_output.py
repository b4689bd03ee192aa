"""TensorBoard output: tag namespaces, the custom-scalars dashboard, histograms and the expert heatmap.

Scalars go through the run's loggers (so a CSV or W&B logger gets them too); the TensorBoard-only
views (custom layout, histograms, images, text) go to the TensorBoard logger's ``SummaryWriter``,
or to a writer of our own under ``<log_dir>/monitoring`` when the run has other loggers but no
TensorBoard one. A run without loggers gets no files. Only rank 0 writes; every other rank's
:class:`TensorBoardOutput` is inert.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from picotron_lightning.monitoring.context import RunContext

# Tag namespaces: one TensorBoard section per concern, so the default dashboard groups them.
LOSS = "train"
THROUGHPUT = "throughput"
GRAD = "grad"
OPTIM = "optim"
MEMORY = "memory"
MOE = "moe"
PIPELINE = "pipeline"
ANOMALY = "anomaly"
WEIGHT_HIST = "weights"
GRAD_HIST = "grads"
ALERT_TEXT = "alerts"
EXPERT_LOAD_IMAGE = "moe/expert_load"


def custom_layout() -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout: the dashboard opens on loss, throughput/MFU, gradients, memory, experts."""
    return {
        "1 Loss": {
            "loss": ["Multiline", [rf"^{LOSS}/loss"]],
            "learning rate": ["Multiline", [rf"^{OPTIM}/lr"]],
        },
        "2 Throughput and MFU": {
            "tokens/s": ["Multiline", [rf"^{THROUGHPUT}/tokens_per_sec"]],
            "samples/s": ["Multiline", [rf"^{THROUGHPUT}/samples_per_sec"]],
            "MFU": ["Multiline", [rf"^{THROUGHPUT}/mfu$"]],
            "step time (s)": ["Multiline", [rf"^{THROUGHPUT}/step_time", rf"^{PIPELINE}/bubble"]],
        },
        "3 Gradient health": {
            "norms": ["Multiline", [rf"^{GRAD}/norm$", rf"^{GRAD}/param_norm$"]],
            "z-scores": ["Multiline", [rf"^{ANOMALY}/.*zscore"]],
            "skipped steps": ["Multiline", [rf"^{ANOMALY}/skipped_steps"]],
        },
        "4 Memory": {
            "accelerator (GiB)": ["Multiline", [rf"^{MEMORY}/(allocated|reserved|peak|fragmentation)"]],
            "host RSS (GiB)": ["Multiline", [rf"^{MEMORY}/host_rss"]],
        },
        "5 Experts": {
            "load imbalance": ["Multiline", [rf"^{MOE}/(layer\d+/)?load_imbalance"]],
            "router entropy": ["Multiline", [rf"^{MOE}/(layer\d+/)?router_entropy"]],
            "dropped tokens": ["Multiline", [rf"^{MOE}/(layer\d+/)?dropped_fraction"]],
            "aux losses": ["Multiline", [rf"^{MOE}/(layer\d+/)?(aux_loss|z_loss)"]],
        },
        "6 Stragglers": {
            "slowest / fastest rank": ["Multiline", [rf"^{ANOMALY}/straggler_ratio"]],
        },
    }


# Five anchors of a perceptually ordered dark-to-bright palette; cells interpolate between them.
_PALETTE = torch.tensor(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=torch.float32
)


def expert_load_image(tokens_per_expert: torch.Tensor, cell: int = 16) -> torch.Tensor:
    """A (H, W, 3) uint8 heatmap of a (layers, experts) token-count matrix.

    Each cell shows the expert's share of its layer's tokens relative to a uniform share,
    clamped to [0, 2]: dark = starved, the middle colour = balanced, bright = twice its share.
    Drawn with tensors only, so no plotting library is needed.
    """
    counts = tokens_per_expert.detach().float().cpu()
    if counts.dim() == 1:
        counts = counts.unsqueeze(0)
    experts = counts.size(1)
    share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1e-12)
    rel = (share * experts / 2).clamp(0, 1)  # 0..1 with 0.5 = uniform
    pos = rel * (len(_PALETTE) - 1)
    lo = pos.floor().long().clamp(max=len(_PALETTE) - 2)
    frac = (pos - lo).unsqueeze(-1)
    rgb = _PALETTE[lo] * (1 - frac) + _PALETTE[lo + 1] * frac  # (layers, experts, 3)
    img = rgb.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    img[::cell, :, :] = 255  # thin white grid lines separate the cells
    img[:, ::cell, :] = 255
    return img.round().clamp(0, 255).to(torch.uint8)


class TensorBoardOutput:
    """Rank-0 writer for everything the monitors show in TensorBoard.

    Args:
        ctx: the run (see :class:`RunContext`).
        writer: a ``SummaryWriter`` to use instead of finding the TensorBoard logger's.
    """

    def __init__(self, ctx: RunContext, writer: Any = None) -> None:
        self.ctx = ctx
        self._own_writer = False
        self.writer = writer if writer is not None else self._find_writer()
        self._layout_written = False

    def _find_writer(self) -> Any:
        # No loggers at all means the user turned logging off: write nothing, leave no files.
        if not self.ctx.is_global_zero or not self.ctx.loggers:
            return None
        for logger in self.ctx.loggers:
            if "TensorBoard" in type(logger).__name__:
                return logger.experiment
        from torch.utils.tensorboard import SummaryWriter

        self._own_writer = True
        return SummaryWriter(os.path.join(self.ctx.log_dir or os.getcwd(), "monitoring"))

    @property
    def log_dir(self) -> str | None:
        return getattr(self.writer, "log_dir", None) if self.writer is not None else None

    def write_layout(self) -> None:
        """Write the custom-scalars layout once per run."""
        if self.writer is None or self._layout_written:
            return
        self.writer.add_custom_scalars(custom_layout())
        self._layout_written = True

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars to every logger of the run (rank 0 only); to our own writer if we made one."""
        if not self.ctx.is_global_zero or not metrics:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if self._own_writer:
            for k, v in clean.items():
                self.writer.add_scalar(k, v, step)
        for logger in self.ctx.loggers:
            logger.log_metrics(clean, step)

    def histograms(self, module: torch.nn.Module, step: int, grads: bool = True) -> None:
        """Weight (and gradient) histograms of rank 0's local parameters.

        Under FSDP/TP a parameter's local piece is a shard: its histogram is a sample of the whole
        distribution, which avoids gathering full weights every K steps.
        """
        if self.writer is None:
            return
        for name, p in module.named_parameters():
            data = p.detach()
            data = data.to_local() if hasattr(data, "to_local") else data
            if data.numel() == 0:
                continue
            self.writer.add_histogram(f"{WEIGHT_HIST}/{name}", data.float().cpu(), step)
            g = p.grad
            if grads and g is not None:
                g = g.to_local() if hasattr(g, "to_local") else g
                if g.numel() and bool(torch.isfinite(g).all()):
                    self.writer.add_histogram(f"{GRAD_HIST}/{name}", g.detach().float().cpu(), step)

    def expert_heatmap(self, tokens_per_expert: torch.Tensor, step: int) -> None:
        """The (layers x experts) load heatmap as an image."""
        if self.writer is None or tokens_per_expert.numel() == 0:
            return
        image = expert_load_image(tokens_per_expert)
        self.writer.add_image(EXPERT_LOAD_IMAGE, image, step, dataformats="HWC")

    def text(self, tag: str, markdown: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, markdown, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        for logger in self.ctx.loggers if self.ctx.is_global_zero else ():
            save = getattr(logger, "save", None)
            if callable(save):
                save()

    def close(self) -> None:
        self.flush()
        if self._own_writer and self.writer is not None:
            self.writer.close()


def shared_output(ctx: RunContext) -> TensorBoardOutput:
    """The one :class:`TensorBoardOutput` of this run, created on first use."""
    from picotron_lightning.monitoring.context import shared_state

    state = shared_state(ctx)
    out = state.get("tensorboard")
    if out is None:
        out = state["tensorboard"] = TensorBoardOutput(ctx)
    return out
