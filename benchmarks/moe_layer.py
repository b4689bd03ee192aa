"""MoE layer forward+backward throughput against a naive expert loop and a dense MLP, same run.

    OMP_NUM_THREADS=1 python benchmarks/moe_layer.py                 # CPU, 16 experts, top-2
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16 --tokens 16384 --hidden 1024

Three contenders on the same tokens:

- ``MoELayer``: router + sort by expert + grouped matmuls (``torch._grouped_mm`` or padded bmm);
- naive loop: the same router and experts, but one ``nn.Linear`` SwiGLU per expert and a Python
  loop that gathers each expert's tokens, the way eager MoE code is usually written;
- dense SwiGLU MLP whose width is ``top_k * ffn``: the same active parameters per token.

Prints tokens/s for each and the ratios ``moe / naive`` and ``moe / dense``. Never run by tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from picotron_lightning.moe import MoELayer, grouped_mm_available


class NaiveMoE(nn.Module):
    """Reference: a loop over expert modules (no sorting, no grouped products)."""

    def __init__(self, moe: MoELayer) -> None:
        super().__init__()
        self.router = moe.router
        self.top_k = moe.top_k
        hidden, ffn2 = moe.experts.gate_up_proj.shape[1:]
        self.experts = nn.ModuleList()
        for e in range(moe.num_experts):
            gate_up = nn.Linear(hidden, ffn2, bias=False)
            down = nn.Linear(ffn2 // 2, hidden, bias=False)
            with torch.no_grad():
                gate_up.weight.copy_(moe.experts.gate_up_proj[e].t())
                down.weight.copy_(moe.experts.down_proj[e].t())
            self.experts.append(nn.ModuleList([gate_up, down]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        route = self.router(tokens)
        out = torch.zeros_like(tokens)
        for e, (gate_up, down) in enumerate(self.experts):
            token_idx, slot = torch.where(route.indices == e)
            if token_idx.numel() == 0:
                continue
            gate, up = gate_up(tokens[token_idx]).chunk(2, dim=-1)
            y = down(F.silu(gate) * up) * route.weights[token_idx, slot, None].to(x.dtype)
            out = out.index_add(0, token_idx, y)
        return out.view_as(x)


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_time(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    xi = x.detach().requires_grad_()
    _sync(x.device)
    start = time.perf_counter()
    module(xi).backward(grad)
    _sync(x.device)
    elapsed = time.perf_counter() - start
    module.zero_grad(set_to_none=True)
    return elapsed


def tokens_per_second(modules: dict[str, nn.Module], x: torch.Tensor, warmup: int,
                      iters: int) -> dict[str, float]:
    """Median forward+backward throughput of each module.

    The contenders take turns, one step each per round, so a machine whose load drifts (shared CI
    cores) slows all of them alike instead of whichever happened to run last.
    """
    grad = torch.randn_like(x)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for i in range(warmup + iters):
        for name, module in modules.items():
            t = _step_time(module, x, grad)
            if i >= warmup:
                times[name].append(t)
    return {name: x.shape[0] * x.shape[1] / statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=256, help="inner width of one expert")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    moe = MoELayer(args.hidden, args.ffn, args.experts, top_k=args.top_k).to(device, dtype)
    naive = NaiveMoE(moe).to(device, dtype)
    dense = DenseMLP(args.hidden, args.top_k * args.ffn).to(device, dtype)
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype)
    with torch.no_grad():
        assert torch.allclose(naive(x), moe(x), atol=1e-3 if dtype == torch.float32 else 5e-2)
    contenders = {"moe": moe, "naive_loop": naive, "dense_mlp": dense}
    results = tokens_per_second(contenders, x, args.warmup, args.iters)
    path = "torch._grouped_mm" if grouped_mm_available(device, dtype) else "padded bmm"
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} experts={args.experts}"
          f" top_k={args.top_k} hidden={args.hidden} ffn={args.ffn} tokens={args.tokens} expert path={path}")
    for name, tps in results.items():
        print(f"  {name:>10}: {tps:12,.0f} tokens/s (forward+backward)")
    print(f"  moe / naive_loop = {results['moe'] / results['naive_loop']:.2f}x   (target >= 3x)")
    print(f"  moe / dense_mlp  = {results['moe'] / results['dense_mlp']:.2f}x   (target >= 0.6x)")


if __name__ == "__main__":
    main()
