"""An MoE communication script written against DeepEP V1's ``deep_ep`` API (v1.2.x), exercising its
whole public surface and checking every result. It runs unchanged on epcomm: the import below is
its only epcomm-specific line (with DeepEP installed, ``import deep_ep`` runs the same script on GPUs).

    torchrun --nproc-per-node 4 deep_ep_compat_script.py          # NCCL on GPUs, else gloo on CPUs
    EPCOMM_BACKEND=cpu DEEP_EP_COMPAT_BACKEND=gloo torchrun --nproc-per-node 2 deep_ep_compat_script.py

(A gloo group alone does not choose epcomm's CPU backend on a machine with GPUs: the backend follows
CUDA's availability, as DeepEP's does, unless $EPCOMM_BACKEND says otherwise.)

The tests call ``main(group)`` inside their rank pools (python/tests/test_compat.py).
"""
import os

import torch
import torch.distributed as dist

import epcomm as deep_ep  # the only line that differs from a DeepEP script

HIDDEN = 2048
NUM_TOKENS = 32
NUM_TOPK = 4
LL_MAX_TOKENS = 32


def per_token_cast_to_fp8(x):
    """[T, H] bf16 -> (float8_e4m3fn [T, H], float32 scales [T, H / 128]): amax / 448 per 128 channels."""
    blocks = x.float().view(x.size(0), -1, 128)
    amax = blocks.abs().amax(dim=-1).clamp(min=1e-4)
    scales = amax / 448.0
    values = (blocks / scales.unsqueeze(-1)).clamp(-448, 448).view_as(x).to(torch.float8_e4m3fn)
    return values, scales


def gather(group, tensor):
    """Every rank's tensor (on the CPU, as bytes for FP8), in rank order."""
    out = [None] * group.size()
    payload = tensor.cpu().view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor.cpu()
    dist.all_gather_object(out, payload, group=group)
    return [t.view(tensor.dtype) for t in out]


def make_routing(rank, num_tokens, num_experts, seed):
    g = torch.Generator().manual_seed(seed + rank)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    topk_idx = scores.topk(NUM_TOPK, dim=1).indices.to(deep_ep.topk_idx_t)
    topk_idx[torch.rand(num_tokens, NUM_TOPK, generator=g) < 0.1] = -1
    topk_weights = torch.rand(num_tokens, NUM_TOPK, generator=g)
    return topk_idx, topk_weights


def expected_receive(group, num_experts, x, topk_idx):
    """Rows this rank must receive, in DeepEP's order: by source rank, then by token index."""
    rank, num_ranks = group.rank(), group.size()
    local = num_experts // num_ranks
    rows = []
    for src_x, src_topk in zip(gather(group, x), gather(group, topk_idx)):
        mine = ((src_topk >= rank * local) & (src_topk < (rank + 1) * local)).any(dim=1)
        rows.append(src_x[mine])
    return torch.cat(rows)


def check_normal_mode(group, device):
    rank, num_ranks = group.rank(), group.size()
    num_experts = 4 * num_ranks
    deep_ep.Buffer.set_num_sms(24)
    assert deep_ep.Buffer.num_sms == 24
    dispatch_config = deep_ep.Buffer.get_dispatch_config(num_ranks)
    combine_config = deep_ep.Buffer.get_combine_config(num_ranks)
    num_nvl_bytes = max(dispatch_config.get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks),
                        combine_config.get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks))
    num_rdma_bytes = max(dispatch_config.get_rdma_buffer_size_hint(HIDDEN * 2, num_ranks),
                         combine_config.get_rdma_buffer_size_hint(HIDDEN * 2, num_ranks))
    buffer = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes, explicitly_destroy=True)

    torch.manual_seed(rank)
    x = torch.randn(NUM_TOKENS, HIDDEN, dtype=torch.bfloat16, device=device)
    topk_idx, topk_weights = (t.to(device) for t in make_routing(rank, NUM_TOKENS, num_experts, seed=10))

    # layout, overlapped with the current stream
    previous = deep_ep.Buffer.capture()
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
        buffer.get_dispatch_layout(topk_idx, num_experts, previous_event=previous, async_finish=True,
                                   allocate_on_comm_stream=True)
    event.current_stream_wait()

    # dispatch
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
        topk_weights=topk_weights, expert_alignment=4, config=dispatch_config, previous_event=event,
        async_finish=True)
    event.current_stream_wait()
    assert torch.equal(recv_x.cpu(), expected_receive(group, num_experts, x, topk_idx))
    local = num_experts // num_ranks
    counts = [int((recv_topk_idx == i).sum()) for i in range(local)]
    assert num_recv_tokens_per_expert_list == [(c + 3) // 4 * 4 for c in counts]
    rank_prefix_matrix = handle[0]
    assert int(rank_prefix_matrix[num_ranks - 1, rank]) == recv_x.size(0)

    # FP8 dispatch with the same layout
    x_fp8 = per_token_cast_to_fp8(x)
    (recv_fp8, recv_scales), *_ = buffer.dispatch(
        x_fp8, num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
        topk_weights=topk_weights)
    assert torch.equal(recv_scales.cpu(), expected_receive(group, num_experts, x_fp8[1], topk_idx))

    # combine (unweighted sum over receiving ranks) with a bias pair, and the weights back
    bias = (torch.ones_like(x), torch.ones_like(x))
    combined_x, combined_topk_weights, event = buffer.combine(recv_x, handle, topk_weights=recv_topk_weights,
                                                              bias=bias, config=combine_config)
    times_received = is_token_in_rank.sum(dim=1, keepdim=True).float()
    torch.testing.assert_close(combined_x.float(), x.float() * times_received + 2, rtol=2e-2, atol=2e-2)
    kept = topk_idx >= 0
    torch.testing.assert_close(combined_topk_weights[kept], topk_weights[kept])

    # cached dispatch (the backward of combine), and the overlap context manager
    grad = torch.randn_like(x)
    recv_grad, _, _, _, _, event = buffer.dispatch(grad, handle=handle, async_finish=True)
    with event:
        pass
    assert torch.equal(recv_grad.cpu(), expected_receive(group, num_experts, grad, topk_idx))

    # worst-case rows, no CPU synchronisation
    worst = NUM_TOKENS * num_ranks
    padded_x, padded_topk_idx, _, empty_list, worst_handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
        topk_weights=topk_weights, num_worst_tokens=worst)
    assert padded_x.size(0) == worst and empty_list == []
    assert torch.equal(padded_x[:recv_x.size(0)], recv_x)
    assert bool((padded_topk_idx[recv_x.size(0):] == -1).all())
    worst_combined, _, _ = buffer.combine(padded_x, worst_handle)
    torch.testing.assert_close(worst_combined.float(), x.float() * times_received, rtol=2e-2, atol=2e-2)

    # the internode entry points take the same arguments
    recv_again, *_, again_handle, _ = buffer.internode_dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
        topk_weights=topk_weights, config=dispatch_config)
    assert torch.equal(recv_again, recv_x)
    internode_combined, _, _ = buffer.internode_combine(recv_again, again_handle, config=combine_config)
    torch.testing.assert_close(internode_combined.float(), x.float() * times_received, rtol=2e-2, atol=2e-2)

    # raw views of the communication memory
    tail = num_nvl_bytes - 64
    raw = buffer.get_local_buffer_tensor(torch.bfloat16, torch.Size([4, 8]), offset=tail)
    raw.fill_(1)
    assert float(buffer.get_local_buffer_tensor(torch.bfloat16, offset=tail).float().sum()) == 32
    del raw
    stream = buffer.get_comm_stream()
    if device.type == "cuda":
        assert isinstance(stream, torch.cuda.Stream)

    deep_ep.Buffer.set_num_sms(20)
    buffer.destroy()


def check_low_latency_mode(group, device):
    rank, num_ranks = group.rank(), group.size()
    num_experts = 2 * num_ranks
    local = num_experts // num_ranks
    num_rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(LL_MAX_TOKENS, HIDDEN, num_ranks, num_experts)
    buffer = deep_ep.Buffer(group, 0, num_rdma_bytes, low_latency_mode=True, num_qps_per_rank=local,
                            allow_nvlink_for_low_latency_mode=True, explicitly_destroy=True)
    buffer.clean_low_latency_buffer(LL_MAX_TOKENS, HIDDEN, num_experts)

    num_tokens = LL_MAX_TOKENS - rank
    torch.manual_seed(100 + rank)
    x = torch.randn(num_tokens, HIDDEN, dtype=torch.bfloat16, device=device)
    topk_idx, topk_weights = (t.to(device) for t in make_routing(rank, num_tokens, num_experts, seed=20))
    recv_stats = torch.zeros(local, dtype=torch.int, device=device)
    wait_stats = torch.zeros(num_ranks, dtype=torch.int64, device=device)

    # BF16 dispatch with a receive hook
    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x, topk_idx, LL_MAX_TOKENS, num_experts, cumulative_local_expert_recv_stats=recv_stats,
        dispatch_wait_recv_cost_stats=wait_stats, use_fp8=False, return_recv_hook=True)
    hook()
    assert recv_x.shape == (local, num_ranks * LL_MAX_TOKENS, HIDDEN)
    src_info, layout_range, max_tokens, hidden, handle_experts = handle
    assert (max_tokens, hidden, handle_experts) == (LL_MAX_TOKENS, HIDDEN, num_experts)
    assert torch.equal(recv_stats, recv_count)
    everyone_x, everyone_topk = gather(group, x), gather(group, topk_idx)
    for i in range(local):
        expert = rank * local + i
        expected = [src_x[(src_topk == expert).any(dim=1)] for src_x, src_topk in zip(everyone_x, everyone_topk)]
        expected = torch.cat(expected)
        assert int(recv_count[i]) == expected.size(0)
        assert torch.equal(recv_x[i, :expected.size(0)].cpu(), expected)

    # weighted combine, zero-copy into the next combine buffer, written into `out`
    combine_buffer = buffer.get_next_low_latency_combine_buffer(handle)
    combine_buffer.copy_(recv_x)
    out = torch.empty(num_tokens, HIDDEN, dtype=torch.bfloat16, device=device)
    combined_x, event, hook = buffer.low_latency_combine(recv_x, topk_idx, topk_weights, handle, zero_copy=True,
                                                         out=out, combine_wait_recv_cost_stats=wait_stats)
    assert combined_x is out
    weight_sum = (topk_weights * (topk_idx >= 0)).sum(dim=1, keepdim=True)
    torch.testing.assert_close(combined_x.float(), x.float() * weight_sum, rtol=5e-2, atol=5e-2)

    # FP8 dispatch (UE8M0 scales) and an asynchronous combine
    (fp8_x, packed_scales), recv_count, handle, event, _ = buffer.low_latency_dispatch(
        x, topk_idx, LL_MAX_TOKENS, num_experts, use_fp8=True, round_scale=True, use_ue8m0=True, async_finish=True)
    event.current_stream_wait()
    assert fp8_x.dtype == torch.float8_e4m3fn and packed_scales.dtype == torch.int
    assert packed_scales.shape == (local, num_ranks * LL_MAX_TOKENS, HIDDEN // 512)
    combined_x, event, _ = buffer.low_latency_combine(recv_x, topk_idx, topk_weights, handle, async_finish=True)
    event.current_stream_wait()
    assert combined_x.shape == x.shape
    buffer.destroy()


def main(group):
    on_gpus = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpus else torch.device("cpu")
    assert isinstance(deep_ep.Buffer.is_sm90_compiled(), bool)
    config = deep_ep.Config(20, 6, 256, 6, 128)
    assert config.get_nvl_buffer_size_hint(HIDDEN * 2, group.size()) > 0
    check_normal_mode(group, device)
    check_low_latency_mode(group, device)


if __name__ == "__main__":
    backend = os.environ.get("DEEP_EP_COMPAT_BACKEND", "nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    main(dist.group.WORLD)
    if dist.get_rank() == 0:
        print("deep_ep compatibility script: all checks passed")
    dist.destroy_process_group()
