"""A Mixture-of-Experts layer with expert parallelism over epcomm (DeepEP's API), trained end to end.

Every rank owns L = E / R experts. Forward: route each token to its top-k experts, ``dispatch`` the
tokens to the experts' ranks, run the experts (each received row becomes the weighted sum of its
local experts' outputs), ``combine`` the rows back (an unweighted sum over ranks). Backward is the
same communication reversed, as ``torch.autograd.Function``s:

    backward of dispatch = combine of the gradients (rows -> tokens, summing over ranks)
    backward of combine  = cached dispatch of the gradient (tokens -> rows, with the saved handle)

The run checks the layer's output and every gradient against a dense single-process computation.

    python examples/moe_layer.py --ranks 2            # CPU backend, gloo, spawned processes
    python examples/moe_layer.py --ranks 4 --cuda     # CUDA backend, NCCL, one GPU per rank
    torchrun --nproc-per-node 8 examples/moe_layer.py # under torchrun (NCCL when CUDA is available)
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

import epcomm as deep_ep


class DispatchState:
    """What the forward's dispatch leaves for the combine and for both backward passes."""

    def __init__(self, buffer: deep_ep.Buffer) -> None:
        self.buffer = buffer
        self.handle: Optional[tuple] = None


class Dispatch(torch.autograd.Function):
    """tokens [T, hidden] bf16 -> received rows [num_recv, hidden] bf16 with their local routing."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, topk_weights: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
                state: DispatchState) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        buffer = state.buffer
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
            buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, recv_topk_idx, recv_topk_weights, _, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
            is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
            topk_weights=topk_weights)
        state.handle = handle
        ctx.state = state
        ctx.mark_non_differentiable(recv_topk_idx)
        return recv_x, recv_topk_idx, recv_topk_weights

    @staticmethod
    def backward(ctx: Any, grad_recv_x: torch.Tensor, _grad_recv_topk_idx: Any, grad_recv_topk_weights: torch.Tensor):
        # rows -> tokens: each token's gradient is the sum of its rows' gradients over the ranks it went
        # to; each topk weight lives on exactly one rank, so summing recovers its gradient
        grad_x, grad_topk_weights, _ = ctx.state.buffer.combine(
            grad_recv_x.to(torch.bfloat16).contiguous(), ctx.state.handle,
            topk_weights=grad_recv_topk_weights.float().contiguous())
        return grad_x, grad_topk_weights, None, None, None


class Combine(torch.autograd.Function):
    """expert outputs [num_recv, hidden] bf16 -> tokens [T, hidden] bf16 (sum over ranks)."""

    @staticmethod
    def forward(ctx: Any, expert_out: torch.Tensor, state: DispatchState) -> torch.Tensor:
        combined_x, _, _ = state.buffer.combine(expert_out, state.handle)
        ctx.state = state
        return combined_x

    @staticmethod
    def backward(ctx: Any, grad_combined: torch.Tensor):
        # tokens -> rows with the forward's routing: a cached dispatch
        grad_rows, _, _, _, _, _ = ctx.state.buffer.dispatch(grad_combined.to(torch.bfloat16).contiguous(),
                                                             handle=ctx.state.handle)
        return grad_rows, None


class ExpertParallelMoE(torch.nn.Module):
    """Top-k routed experts (one hidden x hidden matrix each), L of them on this rank."""

    def __init__(self, buffer: deep_ep.Buffer, hidden: int, num_experts: int, num_topk: int, seed: int) -> None:
        super().__init__()
        self.buffer, self.num_experts, self.num_topk = buffer, num_experts, num_topk
        rank, num_ranks = buffer.rank, buffer.group_size
        local = num_experts // num_ranks
        everyone = torch.Generator().manual_seed(seed)  # the router is replicated: same seed everywhere
        self.router = torch.nn.Parameter(torch.randn(hidden, num_experts, generator=everyone) / hidden ** 0.5)
        all_experts = torch.randn(num_experts, hidden, hidden, generator=everyone) / hidden ** 0.5
        self.experts = torch.nn.Parameter(all_experts[rank * local:(rank + 1) * local].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x.float() @ self.router
        top_logits, topk_idx = logits.topk(self.num_topk, dim=1)
        topk_weights = torch.softmax(top_logits, dim=1)
        state = DispatchState(self.buffer)
        recv_x, recv_topk_idx, recv_topk_weights = Dispatch.apply(x, topk_weights, topk_idx, self.num_experts, state)
        expert_out = torch.zeros(recv_x.shape, dtype=torch.float32, device=recv_x.device)
        for local_expert in range(self.experts.size(0)):
            row_weight = (recv_topk_weights * (recv_topk_idx == local_expert)).sum(dim=1, keepdim=True)
            expert_out = expert_out + row_weight * (recv_x.float() @ self.experts[local_expert])
        return Combine.apply(expert_out.to(torch.bfloat16), state)


def dense_reference(x: torch.Tensor, router: torch.Tensor, experts: torch.Tensor, num_topk: int) -> torch.Tensor:
    """The same layer in one process, float32, every expert local."""
    logits = x.float() @ router
    top_logits, topk_idx = logits.topk(num_topk, dim=1)
    topk_weights = torch.softmax(top_logits, dim=1)
    y = torch.zeros(x.size(0), experts.size(2), dtype=torch.float32, device=x.device)
    for k in range(num_topk):
        per_token = torch.bmm(x.float().unsqueeze(1), experts[topk_idx[:, k]]).squeeze(1)
        y = y + topk_weights[:, k:k + 1] * per_token
    return y


def gather(group: Any, tensor: torch.Tensor) -> List[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(group.size())]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


def run_check(group: Any, device: torch.device, hidden: int = 256, num_tokens: int = 64, num_topk: int = 2,
              experts_per_rank: int = 2, seed: int = 0) -> float:
    """Trains one step of the layer on every rank and checks it against the dense layer; returns the
    largest relative error seen."""
    rank, num_ranks = group.rank(), group.size()
    num_experts = experts_per_rank * num_ranks
    config = deep_ep.Buffer.get_dispatch_config(num_ranks)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=config.get_nvl_buffer_size_hint(hidden * 2, num_ranks))
    layer = ExpertParallelMoE(buffer, hidden, num_experts, num_topk, seed).to(device)

    mine = torch.Generator().manual_seed(seed + 1 + rank)
    x = torch.randn(num_tokens, hidden, generator=mine).to(torch.bfloat16).to(device).requires_grad_()
    upstream = torch.randn(num_tokens, hidden, generator=mine).to(device)
    y = layer(x)
    (y.float() * upstream).sum().backward()
    router_grad = layer.router.grad.clone()
    dist.all_reduce(router_grad, group=group)  # the router is data-parallel: its gradient is summed

    # dense: every rank's tokens through every expert, in one process
    all_x = torch.cat(gather(group, x.detach())).float().requires_grad_()
    all_upstream = torch.cat(gather(group, upstream))
    all_experts = torch.cat(gather(group, layer.experts.detach())).requires_grad_()
    router = layer.router.detach().clone().requires_grad_()
    y_dense = dense_reference(all_x, router, all_experts, num_topk)
    (y_dense * all_upstream).sum().backward()

    rows = slice(rank * num_tokens, (rank + 1) * num_tokens)
    local = slice(rank * experts_per_rank, (rank + 1) * experts_per_rank)
    checks = [("output", y.float(), y_dense[rows]), ("grad x", x.grad.float(), all_x.grad[rows]),
              ("grad experts", layer.experts.grad, all_experts.grad[local]), ("grad router", router_grad, router.grad)]
    worst = 0.0
    for name, actual, expected in checks:
        actual, expected = actual.detach(), expected.detach()
        error = float((actual - expected).norm() / expected.norm().clamp(min=1e-12))
        assert error < 2e-2, f"rank {rank}: {name} differs from the dense layer by {error:.3g} (relative)"
        worst = max(worst, error)
    buffer.destroy()
    return worst


def _spawned(rank: int, num_ranks: int, use_cuda: bool, init_file: str) -> None:
    if use_cuda:
        torch.cuda.set_device(rank)
    else:  # the CPU backend on CPU tensors, also where CUDA is available (epcomm would choose it)
        os.environ.setdefault("EPCOMM_BACKEND", "cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=num_ranks)
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    error = run_check(dist.group.WORLD, device)
    if rank == 0:
        print(f"MoE layer over {num_ranks} ranks matches the dense layer (largest relative error {error:.2e})")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    parser.add_argument("--cuda", action="store_true", help="CUDA backend over NCCL (one GPU per rank)")
    args = parser.parse_args()
    if "RANK" in os.environ:  # torchrun
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        error = run_check(dist.group.WORLD, device)
        if dist.get_rank() == 0:
            print(f"MoE layer matches the dense layer (largest relative error {error:.2e})")
        dist.destroy_process_group()
        return
    init_file = tempfile.mktemp(prefix="epcomm-moe-")
    torch.multiprocessing.spawn(_spawned, args=(args.ranks, args.cuda, init_file), nprocs=args.ranks)


if __name__ == "__main__":
    main()
