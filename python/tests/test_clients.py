"""The clients' own code on epcomm through the ``deep_ep`` module (python/deep_ep_shim, i.e.
``epcomm.install_as_deep_ep()``), checked against a dense computation:

* Megatron-Core, from the installed ``megatron-core`` package (requirements-dev.txt; skipped when it
  is missing): ``fused_a2a.fused_dispatch`` / ``fused_combine`` forward and backward, and
  ``_DeepepManager``'s dispatch -> permute -> experts -> unpermute -> combine -> backward, with
  ``async_finish`` off and on. Nothing of Megatron is copied here: its modules run as released.
* SGLang's and vLLM's DeepEP call sequences (their packages need CUDA to import, so these are replays
  written from their token dispatcher / all-to-all manager code): normal and low-latency mode on one
  buffer, ``Config(**json)``, ``expert_alignment=128``, receive hooks, ``clean_low_latency_buffer``,
  rank masks and vLLM's buffer reset (``get_local_buffer_tensor(torch.int8, use_rdma_buffer=True).zero_()``).
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import warnings
from typing import Any, Tuple

import pytest
import torch

import reference as ref
from _common import assert_equal, cpu

SHIM = str(pathlib.Path(__file__).resolve().parents[1] / "deep_ep_shim")
if SHIM not in sys.path:  # rank processes import this module too: they get the same path
    sys.path.insert(0, SHIM)

HAVE_MEGATRON = importlib.util.find_spec("megatron") is not None and \
    importlib.util.find_spec("megatron.core") is not None
needs_megatron = pytest.mark.skipif(not HAVE_MEGATRON, reason="megatron-core is not installed "
                                                              "(pip install -r requirements-dev.txt)")

HIDDEN = 128
NUM_TOPK = 3


def expert_scales(num_experts: int) -> torch.Tensor:
    """Expert e multiplies its rows by a dyadic scale: a stand-in for an expert MLP that keeps the
    dense reference simple while making every expert's output different."""
    return (torch.arange(num_experts, dtype=torch.float32) % 4 + 1) / 4


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """bf16 results against a float32 dense reference: one bf16 rounding per partial sum."""
    torch.testing.assert_close(cpu(actual).float(), cpu(expected).float(), rtol=2e-2, atol=2e-2, msg=what)


def import_megatron() -> Tuple[Any, Any]:
    import deep_ep  # noqa: F401 - the shim: deep_ep is epcomm from here on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        from megatron.core.transformer.moe import fused_a2a, token_dispatcher
    import epcomm
    assert fused_a2a.HAVE_DEEP_EP and fused_a2a.Buffer is epcomm.Buffer
    assert fused_a2a.EventOverlap is epcomm.EventOverlap
    return fused_a2a, token_dispatcher


# ---- Megatron-Core -------------------------------------------------------------------------------

def check_megatron_fused_a2a(ctx: Any, async_finish: bool, seed: int) -> None:
    fused_a2a, _ = import_megatron()
    num_experts = 2 * ctx.size
    local = num_experts // ctx.size
    num_tokens = 20 - ctx.rank
    x0 = ref.dyadic_tokens(ctx.rank, (num_tokens, HIDDEN), seed)
    topk_idx, probs0 = ref.routing(ctx.rank, num_tokens, NUM_TOPK, num_experts, seed)
    scales = expert_scales(num_experts)
    x = x0.to(ctx.device, copy=True).requires_grad_()
    probs = probs0.to(ctx.device, copy=True).requires_grad_()

    recv_x, recv_idx, recv_probs, tokens_per_expert, handle = fused_a2a.fused_dispatch(
        x, topk_idx.to(ctx.device), probs, num_experts, ctx.group, async_finish=async_finish,
        allocate_on_comm_stream=async_finish)
    everyone = torch.cat(ctx.gather(topk_idx))
    mine = everyone[(everyone >= ctx.rank * local) & (everyone < (ctx.rank + 1) * local)] - ctx.rank * local
    assert_equal(tokens_per_expert, torch.bincount(mine, minlength=local), "tokens_per_expert")
    # the local experts: each received row times sum_k prob_k * scale(expert_k) over this rank's slots
    valid = recv_idx >= 0
    local_scales = scales[ctx.rank * local:(ctx.rank + 1) * local].to(ctx.device)
    row_weight = torch.where(valid, recv_probs * local_scales[recv_idx.clamp(min=0)], torch.zeros(()))
    expert_out = (recv_x.float() * row_weight.sum(dim=1, keepdim=True)).to(torch.bfloat16)
    combined, _ = fused_a2a.fused_combine(expert_out, ctx.group, handle, async_finish=async_finish,
                                          allocate_on_comm_stream=async_finish)
    upstream = ref.dyadic_tokens(ctx.rank + 64, (num_tokens, HIDDEN), seed).float()
    (combined.float() * upstream.to(ctx.device)).sum().backward()

    dense_x = x0.float().requires_grad_()
    dense_probs = probs0.clone().requires_grad_()
    slot_weight = torch.where(topk_idx >= 0, dense_probs * scales[topk_idx.clamp(min=0)], torch.zeros(()))
    dense = dense_x * slot_weight.sum(dim=1, keepdim=True)
    (dense * upstream).sum().backward()
    close(combined, dense, "fused_combine(experts(fused_dispatch(x)))")
    close(x.grad, dense_x.grad, "d loss / d x")
    close(probs.grad, dense_probs.grad, "d loss / d probs")


def megatron_config(num_experts: int) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=1, num_moe_experts=num_experts,
                                 moe_router_topk=NUM_TOPK, moe_token_dispatcher_type="flex",
                                 moe_flex_dispatcher_backend="deepep", moe_router_dtype="fp32",
                                 use_cpu_initialization=True)


def check_megatron_deepep_manager(ctx: Any, async_finish: bool, seed: int) -> None:
    _, token_dispatcher = import_megatron()
    num_experts = 2 * ctx.size
    local = num_experts // ctx.size
    num_tokens = 16 + ctx.rank
    g = ref.generator(seed, ctx.rank)
    x0 = ref.dyadic_tokens(ctx.rank, (num_tokens, HIDDEN), seed)
    # a router's output: K experts per token with positive dyadic probabilities, 0 elsewhere
    chosen = torch.rand(num_tokens, num_experts, generator=g).topk(NUM_TOPK, dim=1).indices
    probs0 = torch.zeros(num_tokens, num_experts)
    probs0.scatter_(1, chosen, torch.randint(1, 9, (num_tokens, NUM_TOPK), generator=g).float() / 8)
    routing_map = probs0 > 0
    scales = expert_scales(num_experts)

    manager = token_dispatcher._DeepepManager(group=ctx.group, num_local_experts=local, router_topk=NUM_TOPK,
                                              num_experts=num_experts, config=megatron_config(num_experts))
    x = x0.to(ctx.device, copy=True).requires_grad_()
    probs = probs0.to(ctx.device, copy=True).requires_grad_()
    manager.setup_metadata(routing_map.to(ctx.device), probs)
    hidden = manager.dispatch(x, async_finish=async_finish, allocate_on_comm_stream=async_finish)
    permuted, permuted_probs = manager.get_permuted_hidden_states_by_experts(hidden)
    tokens_per_expert = manager.get_number_of_tokens_per_expert()
    everyone = torch.cat(ctx.gather(routing_map))
    assert_equal(tokens_per_expert, everyone[:, ctx.rank * local:(ctx.rank + 1) * local].sum(0),
                 "tokens_per_expert")
    outputs = []
    for l, (rows, row_probs) in enumerate(zip(permuted.split(tokens_per_expert.tolist()),
                                             permuted_probs.split(tokens_per_expert.tolist()))):
        weight = row_probs.unsqueeze(1) * float(scales[ctx.rank * local + l])
        outputs.append((rows.float() * weight).to(torch.bfloat16))
    restored = manager.get_restored_hidden_states_by_experts(torch.cat(outputs))
    combined = manager.combine(restored, async_finish=async_finish, allocate_on_comm_stream=async_finish)
    upstream = ref.dyadic_tokens(ctx.rank + 64, (num_tokens, HIDDEN), seed).float()
    (combined.float() * upstream.to(ctx.device)).sum().backward()

    dense_x = x0.float().requires_grad_()
    dense_probs = probs0.clone().requires_grad_()
    # only the routed (token, expert) pairs carry a gradient, as through the router's top-k
    dense = dense_x * (dense_probs * scales * routing_map).sum(dim=1, keepdim=True)
    (dense * upstream).sum().backward()
    close(combined, dense, "_DeepepManager forward")
    close(x.grad, dense_x.grad, "_DeepepManager d loss / d x")
    close(probs.grad, dense_probs.grad, "_DeepepManager d loss / d probs")


@needs_megatron
@pytest.mark.parametrize("async_finish", [False, True], ids=["sync", "async"])
def test_megatron_fused_a2a(world, async_finish: bool) -> None:
    world.run(check_megatron_fused_a2a, async_finish, seed=11)


@needs_megatron
@pytest.mark.parametrize("async_finish", [False, True], ids=["sync", "async"])
def test_megatron_deepep_manager(world, async_finish: bool) -> None:
    world.run(check_megatron_deepep_manager, async_finish, seed=12)
