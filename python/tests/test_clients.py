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


# ---- SGLang and vLLM (replays of their call sequences) -------------------------------------------

MAX_TOKENS = 8  # num_max_dispatch_tokens_per_rank of the low-latency calls


def routed_inputs(ctx: Any, num_tokens: int, num_experts: int, seed: int):
    x = ref.dyadic_tokens(ctx.rank, (num_tokens, HIDDEN), seed)
    topk_idx, weights = ref.routing(ctx.rank, num_tokens, NUM_TOPK, num_experts, seed)
    return x.to(ctx.device), topk_idx.to(ctx.device), weights.to(ctx.device)


def weighted_expert_rows(ctx: Any, recv_x: torch.Tensor, recv_topk_idx: torch.Tensor, recv_weights: torch.Tensor,
                         num_experts: int) -> torch.Tensor:
    """Normal-mode experts that apply the routing weights themselves (SGLang's and vLLM's experts do):
    row * sum_k weight_k * scale(expert_k) over this rank's slots, in bf16."""
    local = num_experts // ctx.size
    scales = expert_scales(num_experts)[ctx.rank * local:(ctx.rank + 1) * local].to(ctx.device)
    weight = torch.where(recv_topk_idx >= 0, recv_weights * scales[recv_topk_idx.clamp(min=0)], torch.zeros(()))
    return (recv_x.float() * weight.sum(dim=1, keepdim=True)).to(torch.bfloat16)


def dense_weighted(x: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    topk_idx, weights = cpu(topk_idx), cpu(weights)
    scales = expert_scales(num_experts)
    slot = torch.where(topk_idx >= 0, weights * scales[topk_idx.clamp(min=0)], torch.zeros(()))
    return cpu(x).float() * slot.sum(dim=1, keepdim=True)


def check_received(ctx: Any, x: Any, topk_idx: torch.Tensor, weights: torch.Tensor, received: Tuple[Any, ...],
                   num_experts: int, expert_alignment: int) -> None:
    """dispatch's results against the reference (x may be an (fp8, scales) pair)."""
    recv_x, recv_topk_idx, recv_weights, counts = received
    in_rank = ref.layout(cpu(topk_idx), ctx.size, num_experts, ctx.size)[3]
    tokens = x if isinstance(x, tuple) else (x,)
    received_tokens = recv_x if isinstance(recv_x, tuple) else (recv_x,)
    everyone_in_rank = ctx.gather(in_rank)
    for part, (sent, got) in enumerate(zip(tokens, received_tokens)):
        expected = ref.dispatch(ctx.rank, num_experts, ctx.gather(cpu(sent)), everyone_in_rank)
        assert_equal(got, expected["recv_x"], f"recv_x[{part}]")
    expected = ref.dispatch(ctx.rank, num_experts, ctx.gather(cpu(tokens[0])), everyone_in_rank,
                            ctx.gather(cpu(topk_idx)), ctx.gather(cpu(weights)), expert_alignment=expert_alignment)
    assert_equal(recv_topk_idx, expected["recv_topk_idx"], "recv_topk_idx")
    assert_equal(recv_weights, expected["recv_topk_weights"], "recv_topk_weights")
    assert counts == expected["counts"], f"num_recv_tokens_per_expert_list {counts} != {expected['counts']}"
    assert all(c % expert_alignment == 0 for c in counts)


def low_latency_round(ctx: Any, buffer: Any, num_experts: int, seed: int, use_fp8: bool, **combine_kwargs: Any) -> None:
    """low_latency_dispatch with a receive hook, experts scaling each local expert's rows, then
    low_latency_combine with a hook, checked against the reference (exact: dyadic values)."""
    num_tokens = MAX_TOKENS - ctx.rank % 2
    x, topk_idx, weights = routed_inputs(ctx, num_tokens, num_experts, seed)
    topk_idx = ref.duplicate_slots(cpu(topk_idx)).to(ctx.device)
    recv, recv_count, handle, _, hook = buffer.low_latency_dispatch(
        x, topk_idx, MAX_TOKENS, num_experts, use_fp8=use_fp8, async_finish=False, return_recv_hook=True)
    hook()
    all_topk = ctx.gather(cpu(topk_idx))
    all_rows = [ref.low_latency_rows(r, num_experts, all_topk) for r in range(ctx.size)]
    rows = all_rows[ctx.rank]
    assert_equal(recv_count, torch.tensor([len(r) for r in rows], dtype=torch.int32), "recv_count")
    if use_fp8:  # dequantize, as the FP8 grouped GEMM's inputs mean
        fp8, scales = recv
        recv = (fp8.float().view(*fp8.shape[:2], -1, 128) * scales.unsqueeze(-1)).view(fp8.shape)
    local = num_experts // ctx.size
    everyone = ctx.gather(cpu(x))
    for l, expert_rows in enumerate(rows):
        if expert_rows:
            sent = torch.stack([everyone[s][t] for s, t in expert_rows]).float()
            got = cpu(recv[l, :len(expert_rows)]).float()
            torch.testing.assert_close(got, sent, rtol=0.07, atol=1e-3, msg=f"received rows of local expert {l}")
    scales = expert_scales(num_experts)[ctx.rank * local:(ctx.rank + 1) * local].to(ctx.device)
    count = torch.arange(recv.size(1), device=ctx.device).unsqueeze(0) < recv_count.unsqueeze(1)  # [L, N]
    expert_x = (cpu(recv).to(torch.bfloat16).to(ctx.device).float() * scales.view(-1, 1, 1) * count.unsqueeze(-1))
    expert_x = expert_x.to(torch.bfloat16)
    combined, _, hook = buffer.low_latency_combine(expert_x, topk_idx, weights, handle, async_finish=False,
                                                   return_recv_hook=True, **combine_kwargs)
    hook()
    expected = ref.low_latency_combine(ctx.rank, num_experts, MAX_TOKENS, cpu(topk_idx), cpu(weights),
                                       ctx.gather(cpu(expert_x)), all_rows)
    assert_equal(combined, expected.to(torch.bfloat16), "low_latency_combine")
    if "out" in combine_kwargs:
        assert combined is combine_kwargs["out"]


def check_sglang_sequence(ctx: Any, seed: int) -> None:
    import deep_ep
    from deep_ep import Buffer, Config
    num_experts = 4 * ctx.size
    # DeepEPConfig: a tuned config file, read with Config(**json) (SGLang's --deepep-config)
    tuned = json.loads(json.dumps({
        "normal_dispatch": {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 8,
                            "num_max_nvl_chunked_recv_tokens": 256, "num_max_rdma_chunked_send_tokens": 6,
                            "num_max_rdma_chunked_recv_tokens": 128},
        "normal_combine": {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 6,
                           "num_max_nvl_chunked_recv_tokens": 256, "num_max_rdma_chunked_send_tokens": 6,
                           "num_max_rdma_chunked_recv_tokens": 128}}))
    dispatch_config, combine_config = Config(**tuned["normal_dispatch"]), Config(**tuned["normal_combine"])
    Buffer.set_num_sms(dispatch_config.num_sms)
    # DeepEPBuffer.get_deepep_buffer (auto mode: normal and low-latency on one buffer)
    hidden_bytes = HIDDEN * 2
    num_nvl_bytes = num_rdma_bytes = 0
    for config in (dispatch_config, combine_config):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, ctx.size), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, ctx.size), num_rdma_bytes)
    num_rdma_bytes = max(Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, ctx.size, num_experts),
                         num_rdma_bytes)
    buffer = deep_ep.Buffer(ctx.group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=True,
                            num_qps_per_rank=num_experts // ctx.size, allow_mnnvl=False)
    try:
        for round_index in range(2):  # normal, low-latency, normal, low-latency
            sglang_normal_round(ctx, buffer, num_experts, dispatch_config, combine_config, seed + round_index)
            buffer.clean_low_latency_buffer(MAX_TOKENS, HIDDEN, num_experts)  # set_dispatch_mode_as_low_latency
            overlap_args: dict = {}  # single-batch overlap off: SGLang passes no fork argument
            low_latency_round(ctx, buffer, num_experts, seed + 10 + round_index, use_fp8=False, **overlap_args)
    finally:
        Buffer.set_num_sms(20)
    buffer.destroy()


def sglang_normal_round(ctx: Any, buffer: Any, num_experts: int, dispatch_config: Any, combine_config: Any,
                        seed: int) -> None:
    """DeepEPNormalDispatcher: async, on the comm stream, expert_alignment=128 (DeepGEMM's layout)."""
    from deep_ep import Buffer
    x, topk_idx, weights = routed_inputs(ctx, 12 + ctx.rank, num_experts, seed)
    previous_event = Buffer.capture()
    (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank,
     previous_event) = buffer.get_dispatch_layout(topk_idx, num_experts, previous_event=previous_event,
                                                  async_finish=True, allocate_on_comm_stream=True)
    recv_x, recv_topk_idx, recv_weights, counts, handle, event = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=weights, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, previous_event=previous_event, async_finish=True,
        allocate_on_comm_stream=True, expert_alignment=128, config=dispatch_config)
    event.current_stream_wait()
    check_received(ctx, x, topk_idx, weights, (recv_x, recv_topk_idx, recv_weights, counts), num_experts, 128)
    expert_out = weighted_expert_rows(ctx, recv_x, recv_topk_idx, recv_weights, num_experts)
    previous_event = Buffer.capture()
    combined, _, event = buffer.combine(expert_out, handle, async_finish=True, previous_event=previous_event,
                                        allocate_on_comm_stream=True, config=combine_config)
    event.current_stream_wait()
    close(combined, dense_weighted(x, topk_idx, weights, num_experts), "SGLang normal combine")


def check_vllm_sequence(ctx: Any, seed: int) -> None:
    import torch.distributed as dist

    import deep_ep
    num_experts = 2 * ctx.size
    # DeepEPHTAll2AllManager: the gloo cpu_group bootstraps a buffer for the model's tensors
    ht = deep_ep.Buffer(group=ctx.group, num_nvl_bytes=deep_ep.Config().get_nvl_buffer_size_hint(HIDDEN * 2, ctx.size),
                        num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=10)
    assert ht.backend == ctx.kind
    ht.set_num_sms(20)
    vllm_high_throughput_round(ctx, ht, num_experts, seed)
    ht.destroy()
    # DeepEPLLAll2AllManager, with a rank mask as elastic EP uses it
    ll = deep_ep.Buffer(group=ctx.group, num_nvl_bytes=0,
                        num_rdma_bytes=deep_ep.Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, ctx.size,
                                                                                     num_experts),
                        low_latency_mode=True, num_qps_per_rank=num_experts // ctx.size,
                        allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, enable_shrink=True)
    output = torch.empty(MAX_TOKENS - ctx.rank % 2, HIDDEN, dtype=torch.bfloat16, device=ctx.device)
    low_latency_round(ctx, ll, num_experts, seed + 1, use_fp8=True, out=output, zero_copy=False)
    peer = (ctx.rank + 1) % ctx.size
    ll.low_latency_update_mask_buffer(peer, True)
    # the buffer reset: zeroes the whole low-latency memory of this rank
    ll.get_local_buffer_tensor(torch.int8, use_rdma_buffer=True).zero_()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier(group=ctx.group)  # every rank is reset before anyone sends again
    status = torch.zeros(ctx.size, dtype=torch.int32, device=ctx.device)
    ll.low_latency_query_mask_buffer(status)
    assert cpu(status).tolist() == [int(r == peer) for r in range(ctx.size)], "the mask survives the reset"
    ll.low_latency_clean_mask_buffer()
    ll.low_latency_query_mask_buffer(status)
    assert not bool(cpu(status).any())
    low_latency_round(ctx, ll, num_experts, seed + 2, use_fp8=True, out=output, zero_copy=False)
    low_latency_round(ctx, ll, num_experts, seed + 3, use_fp8=False)
    ll.destroy()


def vllm_high_throughput_round(ctx: Any, buffer: Any, num_experts: int, seed: int) -> None:
    """DeepEPHTPrepareAndFinalize: block-FP8 tokens (fp8, float32 scales), synchronous, then combine
    without weights (vLLM's experts applied them)."""
    x, topk_idx, weights = routed_inputs(ctx, 10 + 2 * ctx.rank, num_experts, seed)
    fp8, scales = ref.fp8_cast(cpu(x), round_scale=False)
    token_data = (fp8.to(ctx.device), scales.to(ctx.device))
    (num_tokens_per_rank, num_tokens_per_rdma_rank, dispatch_expert_num_tokens, is_token_in_rank,
     event) = buffer.get_dispatch_layout(topk_idx=topk_idx, num_experts=num_experts, previous_event=None,
                                         async_finish=False, allocate_on_comm_stream=False)
    (token_data, expert_topk_ids, expert_topk_weights, expert_num_tokens_per_expert_list, handle,
     event) = buffer.dispatch(x=token_data, handle=None, num_tokens_per_rank=num_tokens_per_rank,
                              num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
                              num_tokens_per_expert=dispatch_expert_num_tokens, topk_idx=topk_idx,
                              topk_weights=weights, expert_alignment=1,
                              config=buffer.get_dispatch_config(ctx.size), previous_event=None, async_finish=False,
                              allocate_on_comm_stream=False)
    check_received(ctx, (fp8, scales), topk_idx, weights,
                   (token_data, expert_topk_ids, expert_topk_weights, expert_num_tokens_per_expert_list),
                   num_experts, 1)
    recv_fp8, recv_scales = token_data
    dequantized = (recv_fp8.float().view(recv_fp8.size(0), -1, 128) * recv_scales.unsqueeze(-1)).view(recv_fp8.shape)
    fused_expert_output = weighted_expert_rows(ctx, dequantized, expert_topk_ids, expert_topk_weights, num_experts)
    combined_x, _, event = buffer.combine(x=fused_expert_output, handle=handle, topk_weights=None,
                                          config=buffer.get_combine_config(ctx.size), previous_event=None,
                                          async_finish=False, allocate_on_comm_stream=False)
    sent = (fp8.float().view(fp8.size(0), -1, 128) * scales.unsqueeze(-1)).view(fp8.shape)
    close(combined_x, dense_weighted(sent, topk_idx, weights, num_experts), "vLLM high-throughput combine")


def test_sglang_call_sequence(world) -> None:
    world.run(check_sglang_sequence, seed=21)


def test_vllm_call_sequence(world) -> None:
    world.run(check_vllm_sequence, seed=31)
