"""Render PNGs of a monitored run's TensorBoard data for the docs (needs Pillow).

    python examples/monitoring.py --inject --root /tmp/mon
    python examples/render_monitoring_pngs.py /tmp/mon/monitoring/version_0 docs/img

Everything drawn comes from the event files, read with TensorBoard's own reader.
"""

from __future__ import annotations

import argparse
import io
import math
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

PANELS = [
    ("train/loss", "loss"),
    ("throughput/tokens_per_sec", "tokens/s (global)"),
    ("throughput/mfu", "MFU"),
    ("grad/norm", "gradient norm"),
    ("grad/param_norm", "parameter norm"),
    ("memory/host_rss_gb", "host RSS (GiB)"),
    ("moe/load_imbalance", "MoE load imbalance (max/mean)"),
    ("anomaly/loss_zscore", "loss z-score"),
]
COLOURS = [(31, 119, 180), (214, 39, 40)]


def _chart(draw, box, title, series, font) -> None:  # noqa: ANN001 - Pillow types
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(200, 200, 200), fill=(255, 255, 255))
    draw.text((x0 + 8, y0 + 6), title, fill=(30, 30, 30), font=font)
    pts = [(s, v) for s, v in series if math.isfinite(v)]
    if len(pts) < 2:
        draw.text((x0 + 8, y0 + 40), "no data", fill=(150, 150, 150), font=font)
        return
    left, top, right, bottom = x0 + 56, y0 + 28, x1 - 10, y1 - 22
    steps, values = [p[0] for p in pts], [p[1] for p in pts]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    smin, smax = min(steps), max(steps)
    for frac in (0.0, 0.5, 1.0):
        y = bottom - frac * (bottom - top)
        draw.line((left, y, right, y), fill=(235, 235, 235))
        draw.text((x0 + 4, y - 6), f"{lo + frac * (hi - lo):.3g}", fill=(90, 90, 90), font=font)
    draw.text((left, bottom + 4), f"step {smin}", fill=(90, 90, 90), font=font)
    draw.text((right - 60, bottom + 4), f"step {smax}", fill=(90, 90, 90), font=font)
    xy = [(left + (s - smin) / max(smax - smin, 1) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))
          for s, v in pts]
    draw.line(xy, fill=COLOURS[0], width=2)


def render(log_dir: str, out_dir: str) -> list[str]:
    """Write dashboard, expert-load and alert PNGs from the events in ``log_dir``; return their paths."""
    from PIL import Image, ImageDraw, ImageFont

    ea = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0})
    ea.Reload()
    tags = ea.Tags()
    font = ImageFont.load_default()
    os.makedirs(out_dir, exist_ok=True)
    written = []

    cols, w, h = 4, 300, 190
    rows = math.ceil(len(PANELS) / cols)
    img = Image.new("RGB", (cols * w + 10, rows * h + 10), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    for i, (tag, title) in enumerate(PANELS):
        series = [(e.step, e.value) for e in ea.Scalars(tag)] if tag in tags["scalars"] else []
        r, c = divmod(i, cols)
        _chart(draw, (5 + c * w, 5 + r * h, c * w + w, r * h + h), title, series, font)
    path = os.path.join(out_dir, "monitoring_dashboard.png")
    img.save(path)
    written.append(path)

    if "moe/expert_load" in tags["images"]:
        event = ea.Images("moe/expert_load")[-1]
        heat = Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")
        heat = heat.resize((heat.width * 4, heat.height * 4), Image.NEAREST)
        canvas = Image.new("RGB", (heat.width + 20, heat.height + 40), (255, 255, 255))
        canvas.paste(heat, (10, 30))
        ImageDraw.Draw(canvas).text((10, 8), f"moe/expert_load, step {event.step}: layers (rows) x experts",
                                    fill=(30, 30, 30), font=font)
        path = os.path.join(out_dir, "monitoring_expert_load.png")
        canvas.save(path)
        written.append(path)

    lines = []
    for tag in sorted(t for t in tags["tensors"] if t.startswith("alerts/")):
        for e in ea.Tensors(tag):
            text = e.tensor_proto.string_val[0].decode() if e.tensor_proto.string_val else ""
            lines.append(f"{tag.split('/')[1]:<12} step {e.step:>4}  {text}")
    if lines:
        canvas = Image.new("RGB", (1100, 20 + 16 * len(lines)), (255, 255, 255))
        d = ImageDraw.Draw(canvas)
        for i, line in enumerate(lines):
            d.text((10, 10 + 16 * i), line[:170], fill=(30, 30, 30), font=font)
        path = os.path.join(out_dir, "monitoring_alerts.png")
        canvas.save(path)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir")
    parser.add_argument("out_dir", nargs="?", default="docs/img")
    args = parser.parse_args()
    for path in render(args.log_dir, args.out_dir):
        print(path)


if __name__ == "__main__":
    main()
