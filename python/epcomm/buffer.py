"""``Buffer``: the DeepEP V1 (v1.2.x) compatible front end of epcomm (SPEC §2-§6).

Shapes use SPEC's letters: R ranks, N nodes, E experts, L = E / R local experts, T tokens on this rank,
K top-k slots, T_max = num_max_dispatch_tokens_per_rank, S = hidden / 128 FP8 scales per token.

Streams (SPEC §3.4), on the CUDA backend: normal-mode work runs on the buffer's communication stream
(``get_comm_stream()``), which first waits for ``previous_event`` if given, else for the current stream.
Without ``async_finish`` the current stream waits for the work before the call returns. With it, the
returned ``EventOverlap`` holds the inputs and outputs, and they are also ``record_stream``-ed on the
communication stream (except during CUDA-graph capture), so that torch's allocator does not reuse their
memory while the work is in flight. Low-latency calls run on the current stream. On the CPU backend
every call completes before it returns.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import _C
from ._arguments import LOW_LATENCY_FORK_ARGUMENTS, int32, reject_fork_arguments
from ._errors import invalid_argument, rejection_of
from ._group import backend_device, choose_backend, group_collectives, resolve_ranks_per_node
from ._tensors import DTYPES_BY_CODE, current_stream_handle, describe, describe_optional, is_capturing
from .config import Config
from .event import EventHandle, EventOverlap

TokenTensor = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
Bias = Union[None, torch.Tensor, Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]
LowLatencyHandle = Tuple[torch.Tensor, torch.Tensor, int, int, int]


def _limits_with_torch_dtypes(limits: dict) -> dict:
    for key in ("x_dtypes", "scale_dtypes"):
        limits[key] = [getattr(torch, name) for name in limits[key]]
    return limits


#: (dtype code, shape, CUDA device or -1) -> (tensor, data_ptr): how epcomm._C creates outputs.
Allocate = Callable[[int, Tuple[int, ...], int], Tuple[torch.Tensor, int]]


class DispatchHandle(NamedTuple):
    """The handle ``dispatch`` returns: everything ``combine`` and cached dispatch need.

    Element 0 is ``rank_prefix_matrix`` as in DeepEP; the other elements are epcomm's own. Built by
    name from what epcomm._C.Buffer.dispatch returns under ``"handle"``.
    """

    rank_prefix_matrix: torch.Tensor  # [R, R] int32: [i][j] = tokens rank j receives from ranks 0..i
    is_token_in_rank: torch.Tensor    # [T, R] bool: where this rank's tokens went
    send_row: torch.Tensor            # [T, R] int32: row of token t in rank r's recv_x, or -1
    recv_src_idx: torch.Tensor        # [num_recv] int32: each received row's token index on its source
    native: _C.DispatchHandle         # the C++ handle (tied to the Buffer that made it)


class InternodeDispatchHandle(NamedTuple):
    """The handle ``dispatch`` returns when the group spans N > 1 nodes (SPEC §3.6): 10 elements like
    DeepEP's internode handle. Element 0 is ``is_token_in_rank`` and element -4 (6)
    ``recv_gbl_rank_prefix_sum``, as in DeepEP; the others are epcomm's own.
    """

    is_token_in_rank: torch.Tensor           # [T, R] bool: where this rank's tokens went
    rank_prefix_matrix: torch.Tensor         # [R, R] int32: [i][j] = tokens rank j receives from ranks 0..i
    send_row: torch.Tensor                   # [T, R] int32: row of token t in rank r's recv_x, or -1
    recv_src_idx: torch.Tensor               # [num_recv] int32: each received row's token index on its source
    recv_rdma_rank_prefix_sum: torch.Tensor  # [N] int32: inclusive prefix over source nodes of the rows received
    is_token_in_node: torch.Tensor           # [T, N] bool: the nodes each token crosses to (or stays in)
    recv_gbl_rank_prefix_sum: torch.Tensor   # [R] int32: inclusive prefix over source ranks of the rows received
    recv_src_rank: torch.Tensor              # [num_recv] int32: each received row's source rank, -1 for padding
    forwarder_rank: torch.Tensor             # [N] int32: the rank of node n that forwards this rank's tokens
    native: _C.DispatchHandle                # the C++ handle (tied to the Buffer that made it)


AnyDispatchHandle = Union[DispatchHandle, InternodeDispatchHandle]


class Buffer:
    """Communication memory of one rank and every dispatch / combine operation on it.

    Attributes:
        num_sms: SMs high-throughput kernels may occupy by default (``set_num_sms``).
        rank: this rank in the group.
        group_size: R, the number of ranks.
        group: the group given at construction (or the mpi4py communicator).
        num_nvl_bytes / num_rdma_bytes / low_latency_mode / explicitly_destroy / enable_shrink: as given.
        backend: 'cpu' or 'cuda'.
        device: the torch device every tensor of this buffer lives on.
        runtime: the C++ buffer (``epcomm._C.Buffer``).
    """

    num_sms: int = 20

    def __init__(self, group: Optional[Any], num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm: Optional[Any] = None, *, backend: Optional[str] = None,
                 ranks_per_node: Optional[int] = None, timeout_s: Optional[float] = None) -> None:
        """Collective: every rank of the group constructs the buffer with the same arguments.

        Arguments (DeepEP's):
            group: a ``torch.distributed`` ProcessGroup (``None`` with ``comm``).
            num_nvl_bytes: normal-mode memory inside a node (``Config.get_nvl_buffer_size_hint``).
            num_rdma_bytes: low-latency memory (``get_low_latency_rdma_size_hint``), or normal mode
                between nodes (``Config.get_rdma_buffer_size_hint``).
            low_latency_mode: enable the low-latency calls.
            allow_nvlink_for_low_latency_mode: False = no NVLink stores in low-latency mode: the CUDA
                backend reaches every peer with NVSHMEM puts (results are the same either way).
            num_qps_per_rank, allow_mnnvl, use_fabric: accepted for compatibility and ignored (epcomm
                chooses its transports itself); they never reach the C++ core.
            explicitly_destroy: accepted and kept as an attribute; ``destroy()`` may be called either
                way, and the memory is otherwise released (locally, without talking to peers) when the
                buffer is collected.
            enable_shrink: allow masking failed ranks in low-latency mode (mask functions).
            comm: an ``mpi4py`` communicator, used when ``group`` is None.
        Keyword-only arguments (epcomm's):
            backend: 'cpu' (ranks are processes of one machine, CPU tensors) or 'cuda' (a GPU per
                rank, the current CUDA device). Default: $EPCOMM_BACKEND, else 'cuda' when CUDA is
                available (and this build has the CUDA backend), else 'cpu'. The group only
                bootstraps (a gloo group, as vLLM's cpu_group, works for CUDA tensors too).
            ranks_per_node: G, ranks per NVLink domain. Default: $EPCOMM_RANKS_PER_NODE, else
                $LOCAL_WORLD_SIZE (capped at R), else the ranks sharing a host name (all-gathered through
                the group; hosts holding different numbers of ranks raise). With N = R / G > 1 nodes,
                dispatch returns the 10-element ``InternodeDispatchHandle``.
            timeout_s: bound of every wait for a peer. Default: $EPCOMM_TIMEOUT_S, else 100 s.
        """
        collectives = group_collectives(group, comm)
        self.rank = collectives.rank
        self.group_size = collectives.size
        self.group = group if group is not None else comm
        self.num_nvl_bytes = int(num_nvl_bytes)
        self.num_rdma_bytes = int(num_rdma_bytes)
        self.low_latency_mode = bool(low_latency_mode)
        self.explicitly_destroy = bool(explicitly_destroy)
        self.enable_shrink = bool(enable_shrink)
        self.backend = choose_backend(backend)
        self.device = backend_device(self.backend)
        # The communication stream comes from torch's stream pool, whose streams are never destroyed:
        # tensors record_stream-ed on it may be freed after destroy() (a stream the Buffer created and
        # destroyed would make torch's allocator fail then). High priority, as DeepEP's.
        self._comm_stream: Optional[torch.cuda.Stream] = None
        if self.device.type == "cuda":
            self._comm_stream = torch.cuda.Stream(device=self.device, priority=-1)
        self.runtime = _C.Buffer(
            collectives.rank, collectives.size, collectives.all_gather, collectives.barrier, backend=self.backend,
            num_nvl_bytes=self.num_nvl_bytes, num_rdma_bytes=self.num_rdma_bytes,
            low_latency_mode=self.low_latency_mode,
            ranks_per_node=resolve_ranks_per_node(collectives.size, ranks_per_node, collectives),
            device=self.device.index if self.device.type == "cuda" else -1,
            timeout_s=float(timeout_s) if timeout_s is not None else 0.0,
            allow_nvlink_for_low_latency_mode=bool(allow_nvlink_for_low_latency_mode), enable_shrink=self.enable_shrink,
            comm_stream=self._comm_stream.cuda_stream if self._comm_stream is not None else 0)
        self.ranks_per_node = int(self.runtime.ranks_per_node)
        self.num_nodes = self.group_size // self.ranks_per_node
        self._allocate_here = self._make_allocator(on_comm_stream=False)
        self._allocate_on_comm = self._make_allocator(on_comm_stream=True)

    # ---- lifecycle and static helpers ------------------------------------------------------------

    def destroy(self) -> None:
        """Collective: releases the communication memory. Idempotent; later calls raise.
        Tensors viewing the buffer's memory (``get_local_buffer_tensor``, ...) must not be used after."""
        self.runtime.destroy()

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True when libepcomm contains CUDA kernels for Hopper (sm_90 / sm_90a).

        False on a CPU-only build (``-DEPCOMM_WITH_CUDA=OFF``, or no nvcc at build time): such a build
        runs the CPU backend only, and ``Buffer(..., backend="cuda")`` raises ``UnsupportedError``.
        """
        architectures = _C.cuda_architectures.replace(",", ";").split(";")
        return _C.backend_available("cuda") and any(a.strip().startswith("90") for a in architectures)

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Sets the SMs high-throughput kernels occupy when a call passes no ``config`` (even, >= 2)."""
        _C.set_default_num_sms(int(new_num_sms))
        Buffer.num_sms = int(new_num_sms)

    @staticmethod
    def capture() -> EventOverlap:
        """An ``EventOverlap`` recorded on the current stream, to pass as ``previous_event``."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of ``num_rdma_bytes`` always enough for low-latency calls with these sizes."""
        op = "get_low_latency_rdma_size_hint"
        return _C.low_latency_buffer_size_hint(
            num_max_dispatch_tokens_per_rank=int32(op, "num_max_dispatch_tokens_per_rank",
                                                   num_max_dispatch_tokens_per_rank),
            hidden=int32(op, "hidden", hidden), num_ranks=int32(op, "num_ranks", num_ranks),
            num_experts=int32(op, "num_experts", num_experts))

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """A good dispatch ``Config`` for R = ``num_ranks`` (any R), with ``num_sms = Buffer.num_sms``."""
        config = Config._from_dict(_C.default_dispatch_config(num_ranks=int32("get_dispatch_config", "num_ranks",
                                                                              num_ranks)))
        config.num_sms = Buffer.num_sms
        return config

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """A good combine ``Config`` for R = ``num_ranks`` (any R), with ``num_sms = Buffer.num_sms``."""
        config = Config._from_dict(_C.default_combine_config(num_ranks=int32("get_combine_config", "num_ranks",
                                                                            num_ranks)))
        config.num_sms = Buffer.num_sms
        return config

    def check_errors(self) -> None:
        """epcomm extension: waits for the comm stream and raises what the kernels reported (a
        timeout naming the phase and peer, a num_worst_tokens overflow, ...). Calls that never touch
        the host (num_worst_tokens, cached dispatch, combine, CUDA-graph replays) report errors
        only at the next call or here."""
        self.runtime.check_errors()

    def limits(self) -> dict:
        """epcomm extension: what this buffer's backend accepts on its device (``epcomm::Limits``):
        modes, ``max_topk``, ``row_alignment_bytes``, ``x_dtypes`` / ``scale_dtypes`` (torch dtypes),
        ``max_low_latency_tokens_per_rank``, ``max_low_latency_experts``, ... A call inside these
        limits is never rejected as unsupported: ask instead of catching ``UnsupportedError``."""
        return _limits_with_torch_dtypes(self.runtime.limits())

    @staticmethod
    def backend_limits(backend: str) -> dict:
        """epcomm extension: ``limits()`` of ``backend`` ('cpu' or 'cuda') in this build, before any
        buffer exists (``available`` is False when the backend is not built in)."""
        return _limits_with_torch_dtypes(_C.backend_limits(str(backend)))

    def get_comm_stream(self) -> Optional[torch.cuda.Stream]:
        """The communication stream (a ``torch.cuda.Stream``); None on the CPU backend."""
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[Union[torch.Size, Sequence[int], int]] = None,
                                offset: int = 0, use_rdma_buffer: bool = False) -> torch.Tensor:
        """A tensor viewing this rank's own communication memory (no copy; valid until ``destroy``).

        Arguments:
            dtype: any torch dtype.
            size: the view's shape; default: 1-D, everything from ``offset`` to the end.
            offset: start of the view in **bytes** (as DeepEP's implementation uses it), a multiple of
                the dtype's size.
            use_rdma_buffer: view the ``num_rdma_bytes`` memory instead of the ``num_nvl_bytes`` one.
        """
        op = "get_local_buffer_tensor"
        element = torch.empty((), dtype=dtype).element_size()
        offset = int(offset)
        if offset % element != 0:
            raise invalid_argument(op, "offset", f"expected a multiple of {element} (bytes of {dtype}), got {offset}")
        total = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        if size is None:
            shape = None
            numel = max(total - offset, 0) // element
        else:
            shape = torch.Size([size]) if isinstance(size, int) else torch.Size(size)
            numel = shape.numel()
        raw = self.runtime.local_buffer_bytes(offset=offset, num_bytes=numel * element, rdma=bool(use_rdma_buffer))
        tensor = raw.view(dtype)
        return tensor if shape is None else tensor.view(shape)

    # ---- high-throughput mode --------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """Counts where this rank's tokens go (SPEC §3.1).

        Arguments:
            topk_idx: [T, K] int64 (``topk_idx_t``) or int32, expert per slot, -1 = none.
            num_experts: E, a multiple of R.
        Returns:
            num_tokens_per_rank: [R] int32, tokens with at least one expert on rank r.
            num_tokens_per_rdma_rank: [N] int32 per node, or None when N == 1.
            num_tokens_per_expert: [E] int32, (token, slot) pairs per expert.
            is_token_in_rank: [T, R] bool.
            event: ``EventOverlap`` (an event only with ``async_finish``).
        """
        op = "get_dispatch_layout"
        r = self.runtime.get_dispatch_layout(
            topk_idx=describe(topk_idx, op, "topk_idx"), num_experts=int32(op, "num_experts", num_experts),
            stream=self._stream(), previous_event=self._native_event(previous_event, op),
            async_finish=bool(async_finish), allocate_on_comm_stream=bool(allocate_on_comm_stream),
            allocate=self._allocator(allocate_on_comm_stream))
        outputs = (r["num_tokens_per_rank"], r["num_tokens_per_rdma_rank"], r["num_tokens_per_expert"],
                   r["is_token_in_rank"])
        event = self._finish(r["event"], async_finish, allocate_on_comm_stream, (topk_idx,), outputs)
        return outputs + (event,)

    def dispatch(self, x: TokenTensor, handle: Optional[DispatchHandle] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None, num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> \
            Tuple[TokenTensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[List[int]],
                  Optional[DispatchHandle], EventOverlap]:
        """Sends every token to the ranks holding its experts (SPEC §3.2).

        Arguments:
            x: [T, hidden] bf16, or a tuple (x [T, hidden] float8_e4m3fn, scales): scales [T, S] float32
                with any strides, or [T, hidden / 512] int32 UE8M0-packed (DeepEP V1.2; passed through
                to the core as given, which checks whether it supports them).
            handle: a handle from an earlier dispatch: cached dispatch with that routing (topk_idx,
                topk_weights and the layout tensors must then be None).
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert: from
                ``get_dispatch_layout``; those not given are computed. ``num_tokens_per_expert`` is
                required with ``topk_idx`` (its length gives E).
            topk_idx: [T, K] int64 / int32; topk_weights: [T, K] float32.
            expert_alignment: per-expert counts are rounded up to a multiple of this.
            num_worst_tokens: > 0: outputs have exactly this many rows, no host synchronisation (CUDA-graph
                capturable); rows past the real count have recv_topk_idx == -1; the count list is empty.
            config: ``Config``; default ``get_dispatch_config(R)``.
        Returns:
            recv_x: [num_recv, hidden] like ``x`` (a tuple (fp8, scales [num_recv, S]) for FP8 input; the
                scales keep the input's majorness). Rows are grouped by source rank ascending, then by
                the token's index on its source.
            recv_topk_idx: [num_recv, K] int64, local expert index or -1 (None without topk_idx).
            recv_topk_weights: [num_recv, K] float32, 0 where the index is -1 (None without topk_idx).
            num_recv_tokens_per_expert_list: list of L ints (aligned); [] with num_worst_tokens.
            handle: ``DispatchHandle`` (a tuple, element 0 = rank_prefix_matrix [R, R] int32); with N > 1
                nodes an ``InternodeDispatchHandle`` (10 elements, element 0 = is_token_in_rank, element
                -4 = recv_gbl_rank_prefix_sum [R] int32).
            event: ``EventOverlap``.
            A cached dispatch returns (recv_x, None, None, None, None, event).
        """
        op = "dispatch"
        with self._rejecting("cached_dispatch" if handle is not None else "dispatch"):
            x_data, x_scales = self._split_tokens(x, op)
            native_handle = self._native_dispatch_handle(handle, op) if handle is not None else None
            if native_handle is None and topk_idx is not None and num_tokens_per_expert is None:
                raise invalid_argument(op, "num_tokens_per_expert",
                                       "required with topk_idx (get_dispatch_layout returns it): its length gives "
                                       "the number of experts")
            config = config if config is not None else self.get_dispatch_config(self.group_size)
            arguments = dict(
                x=describe(x_data, op, "x"), x_scales=describe_optional(x_scales, op, "x_scales"),
                topk_idx=describe_optional(topk_idx, op, "topk_idx"),
                topk_weights=describe_optional(topk_weights, op, "topk_weights"),
                num_tokens_per_rank=describe_optional(num_tokens_per_rank, op, "num_tokens_per_rank"),
                num_tokens_per_rdma_rank=describe_optional(num_tokens_per_rdma_rank, op, "num_tokens_per_rdma_rank"),
                is_token_in_rank=describe_optional(is_token_in_rank, op, "is_token_in_rank"),
                num_tokens_per_expert=describe_optional(num_tokens_per_expert, op, "num_tokens_per_expert"),
                handle=native_handle, expert_alignment=int32(op, "expert_alignment", expert_alignment),
                num_worst_tokens=int32(op, "num_worst_tokens", num_worst_tokens),
                config=self._config_fields(config, op), stream=self._stream(),
                previous_event=self._native_event(previous_event, op), async_finish=bool(async_finish),
                allocate_on_comm_stream=bool(allocate_on_comm_stream),
                allocate=self._allocator(allocate_on_comm_stream))
        r = self.runtime.dispatch(**arguments)
        new_handle = self._make_handle(r["handle"]) if r["handle"] is not None else None
        inputs = (x_data, x_scales, topk_idx, topk_weights, num_tokens_per_rank, num_tokens_per_rdma_rank,
                  is_token_in_rank, num_tokens_per_expert) + self._handle_tensors(handle)
        outputs = (r["recv_x"], r["recv_x_scales"], r["recv_topk_idx"], r["recv_topk_weights"]) + \
            self._handle_tensors(new_handle)
        event = self._finish(r["event"], async_finish, allocate_on_comm_stream, inputs, outputs)
        received = (r["recv_x"], r["recv_x_scales"]) if x_scales is not None else r["recv_x"]
        if native_handle is not None:
            return received, None, None, None, None, event
        return (received, r["recv_topk_idx"], r["recv_topk_weights"], r["num_recv_tokens_per_expert_list"], new_handle,
                event)

    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor] = None,
                bias: Bias = None, config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Brings every received row back to its token's rank and sums them (SPEC §3.3).

        Arguments:
            x: [num_recv, hidden] bf16 in the order dispatch returned.
            handle: the ``DispatchHandle`` of that dispatch.
            topk_weights: [num_recv, K] float32 (e.g. dispatch's recv_topk_weights), summed per token.
            bias: None, a [T, hidden] bf16 tensor, or a pair of them, added to the result.
            config: ``Config``; default ``get_combine_config(R)``.
        Returns:
            combined_x: [T, hidden] bf16, the unweighted sum over the ranks that received each token (float32
                accumulation in ascending rank order, one rounding; plus the bias).
            combined_topk_weights: [T, K] float32, or None without topk_weights.
            event: ``EventOverlap``.
        """
        op = "combine"
        with self._rejecting(op):
            native_handle = self._native_dispatch_handle(handle, op)
            bias_0, bias_1 = Buffer._unpack_bias(bias)
            config = config if config is not None else self.get_combine_config(self.group_size)
            arguments = dict(
                x=describe(x, op, "x"), handle=native_handle,
                topk_weights=describe_optional(topk_weights, op, "topk_weights"),
                bias_0=describe_optional(bias_0, op, "bias[0]"), bias_1=describe_optional(bias_1, op, "bias[1]"),
                config=self._config_fields(config, op), stream=self._stream(),
                previous_event=self._native_event(previous_event, op), async_finish=bool(async_finish),
                allocate_on_comm_stream=bool(allocate_on_comm_stream),
                allocate=self._allocator(allocate_on_comm_stream))
        r = self.runtime.combine(**arguments)
        inputs = (x, topk_weights, bias_0, bias_1) + self._handle_tensors(handle)
        outputs = (r["combined_x"], r["combined_topk_weights"])
        event = self._finish(r["event"], async_finish, allocate_on_comm_stream, inputs, outputs)
        return r["combined_x"], r["combined_topk_weights"], event

    def internode_dispatch(self, x: TokenTensor, handle: Optional[DispatchHandle] = None,
                           num_tokens_per_rank: Optional[torch.Tensor] = None,
                           num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                           is_token_in_rank: Optional[torch.Tensor] = None,
                           num_tokens_per_expert: Optional[torch.Tensor] = None,
                           topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                           expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                           previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                           allocate_on_comm_stream: bool = False) -> \
            Tuple[TokenTensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[List[int]],
                  Optional[DispatchHandle], EventOverlap]:
        """``dispatch`` (epcomm chooses the intra- or inter-node path itself; same results and handle)."""
        return self.dispatch(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                             num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens, config,
                             previous_event, async_finish, allocate_on_comm_stream)

    def internode_combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor] = None,
                          bias: Bias = None, config: Optional[Config] = None,
                          previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                          allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """``combine`` (epcomm chooses the intra- or inter-node path itself)."""
        return self.combine(x, handle, topk_weights, bias, config, previous_event, async_finish,
                            allocate_on_comm_stream)

    # ---- low-latency mode ------------------------------------------------------------------------

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Collective: resets the low-latency state for calls with these sizes (SPEC §4.3)."""
        op = "clean_low_latency_buffer"
        with self._rejecting(op):
            arguments = dict(
                num_max_dispatch_tokens_per_rank=int32(op, "num_max_dispatch_tokens_per_rank",
                                                       num_max_dispatch_tokens_per_rank),
                hidden=int32(op, "hidden", hidden), num_experts=int32(op, "num_experts", num_experts),
                stream=self._stream())
        self.runtime.clean_low_latency_buffer(**arguments)

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False, **fork_arguments: Any) -> \
            Tuple[TokenTensor, torch.Tensor, LowLatencyHandle, EventOverlap, Optional[Callable[[], None]]]:
        """Low-latency dispatch into fixed-size per-expert slots (SPEC §4.1). No host synchronisation.

        Arguments:
            x: [T, hidden] bf16, T <= T_max, hidden a multiple of 128.
            topk_idx: [T, K] int64 / int32, -1 = none.
            num_max_dispatch_tokens_per_rank: T_max, the same on every rank.
            num_experts: E.
            cumulative_local_expert_recv_stats: [L] int32; recv_count is added to it.
            dispatch_wait_recv_cost_stats: [R] int64; per source rank, the time spent waiting for it is
                added, in **nanoseconds**.
            use_fp8: cast to FP8 per token and 128 channels; round_scale: power-of-two scales;
            use_ue8m0: scales packed as exponent bytes (needs round_scale).
            async_finish: return an event instead of ordering the current stream.
            return_recv_hook: only issue the sends; the returned hook runs the receive half.
            fork_arguments: keyword arguments of DeepEP forks (``use_nvfp4``, ``x_global_scale``, ...):
                accepted at their defaults, else ``UnsupportedError`` naming them.
        Returns:
            recv_x: [L, R*T_max, hidden] bf16, or with use_fp8 a tuple (float8_e4m3fn [L, R*T_max, hidden],
                scales): float32 [L, R*T_max, S] or with use_ue8m0 int32 [L, R*T_max, hidden/512]; the
                scales' last two dims are column-major. Rows of expert l past recv_count[l] are unspecified.
            recv_count: [L] int32.
            handle: (src_info [L, R*T_max] int32, layout_range [L, R] int64, T_max, hidden, num_experts).
            event: ``EventOverlap`` (an event only with async_finish).
            hook: a callable with return_recv_hook, else None.
        """
        op = "low_latency_dispatch"
        with self._rejecting(op):
            reject_fork_arguments(op, fork_arguments, LOW_LATENCY_FORK_ARGUMENTS)
            max_tokens = int32(op, "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
            num_experts = int32(op, "num_experts", num_experts)
            arguments = dict(
                x=describe(x, op, "x"), topk_idx=describe(topk_idx, op, "topk_idx"),
                num_max_dispatch_tokens_per_rank=max_tokens, num_experts=num_experts,
                cumulative_local_expert_recv_stats=describe_optional(cumulative_local_expert_recv_stats, op,
                                                                     "cumulative_local_expert_recv_stats"),
                dispatch_wait_recv_cost_stats=describe_optional(dispatch_wait_recv_cost_stats, op,
                                                                "dispatch_wait_recv_cost_stats"),
                use_fp8=bool(use_fp8), round_scale=bool(round_scale), use_ue8m0=bool(use_ue8m0),
                stream=self._stream(), async_finish=bool(async_finish), return_recv_hook=bool(return_recv_hook),
                allocate=self._allocate_here)
        r = self.runtime.low_latency_dispatch(**arguments)
        handle = (r["src_info"], r["layout_range"], max_tokens, x.size(1), num_experts)
        in_flight = (x, topk_idx, r["recv_x"], r["recv_x_scales"], r["recv_count"], r["src_info"], r["layout_range"],
                     cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats)
        event = self._low_latency_event(r["event"], async_finish, in_flight)
        received = (r["recv_x"], r["recv_x_scales"]) if use_fp8 else r["recv_x"]
        return received, r["recv_count"], handle, event, self._wrap_hook(r["hook"], in_flight)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None, **fork_arguments: Any) -> \
            Tuple[torch.Tensor, EventOverlap, Optional[Callable[[], None]]]:
        """Low-latency weighted combine (SPEC §4.2).

        Arguments:
            x: [L, R*T_max, hidden] bf16 in low_latency_dispatch's layout.
            topk_idx: [T, K] as given to that dispatch; topk_weights: [T, K] float32.
            handle: the dispatch's handle tuple.
            use_logfmt: rows travel in LogFMT (docs/LOGFMT.md); CPU backend only so far (the CUDA
                backend raises ``UnsupportedError``).
            zero_copy: x was already written into ``get_next_low_latency_combine_buffer(handle)``.
            out: [T, hidden] bf16 to write the result into.
            combine_wait_recv_cost_stats: [R] int64, wait time per source rank added in nanoseconds.
            fork_arguments: keyword arguments of DeepEP forks (SGLang's single-batch overlap: ``overlap``,
                ``packed_recv_count``, ``comp_signal``, ``block_m``, ``threshold``, ``num_sms``,
                ``src_signals``, ``src_signal_expect_value``): accepted at their defaults, else
                ``UnsupportedError`` naming them.
        Returns:
            combined_x: [T, hidden] bf16, sum over k of topk_weights[t, k] * row (float32 fused
                multiply-add in ascending k, one rounding); ``out`` when given.
            event: ``EventOverlap``; hook: a callable with return_recv_hook, else None.
        """
        op = "low_latency_combine"
        with self._rejecting(op):
            reject_fork_arguments(op, fork_arguments, LOW_LATENCY_FORK_ARGUMENTS)
            src_info, layout_range, max_tokens, hidden, num_experts = self._unpack_low_latency_handle(handle, op)
            arguments = dict(
                x=describe(x, op, "x"), topk_idx=describe(topk_idx, op, "topk_idx"),
                topk_weights=describe(topk_weights, op, "topk_weights"), src_info=describe(src_info, op, "handle[0]"),
                layout_range=describe(layout_range, op, "handle[1]"), num_max_dispatch_tokens_per_rank=max_tokens,
                hidden=hidden, num_experts=num_experts, use_logfmt=bool(use_logfmt), zero_copy=bool(zero_copy),
                out=describe_optional(out, op, "out"),
                combine_wait_recv_cost_stats=describe_optional(combine_wait_recv_cost_stats, op,
                                                               "combine_wait_recv_cost_stats"),
                stream=self._stream(), async_finish=bool(async_finish), return_recv_hook=bool(return_recv_hook),
                allocate=self._allocate_here)
        r = self.runtime.low_latency_combine(**arguments)
        combined_x = out if out is not None else r["combined_x"]
        in_flight = (x, topk_idx, topk_weights, src_info, layout_range, combined_x, combine_wait_recv_cost_stats)
        event = self._low_latency_event(r["event"], async_finish, in_flight)
        return combined_x, event, self._wrap_hook(r["hook"], in_flight)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """[L, R*T_max, hidden] bf16 view of the memory the next ``zero_copy`` combine reads."""
        op = "get_next_low_latency_combine_buffer"
        src_info, layout_range, max_tokens, hidden, num_experts = self._unpack_low_latency_handle(handle, op)
        return self.runtime.next_low_latency_combine_buffer(
            src_info=describe(src_info, op, "handle[0]"), layout_range=describe(layout_range, op, "handle[1]"),
            num_max_dispatch_tokens_per_rank=max_tokens, hidden=hidden, num_experts=num_experts)

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Masks (``mask=True``) or unmasks a rank: low-latency calls skip a masked rank instead of
        waiting for it. Needs ``enable_shrink=True``."""
        op = "low_latency_update_mask_buffer"
        self.runtime.update_mask(rank=int32(op, "rank_to_mask", rank_to_mask), mask=bool(mask), stream=self._stream())

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Writes the mask into ``mask_status`` ([R] int32 on the buffer's device): 1 = masked."""
        op = "low_latency_query_mask_buffer"
        if not isinstance(mask_status, torch.Tensor) or mask_status.shape != (self.group_size,):
            got = list(mask_status.shape) if isinstance(mask_status, torch.Tensor) else type(mask_status).__name__
            raise invalid_argument(op, "mask_status", f"expected a [R] = [{self.group_size}] tensor, got {got}")
        mask_status.copy_(self.runtime.query_mask())

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmasks every rank. Needs ``enable_shrink=True``."""
        self.runtime.clean_mask(stream=self._stream())

    # ---- helpers ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _rejecting(self, kind: str) -> Iterator[None]:
        """Runs the Python-side checks and conversions of the collective call ``kind`` (a name of
        ``_C.Buffer.reject_inputs``). An exception there is first told to the peers in that call's
        exchange, the path the core's own checks take, so that every rank raises at this call (SPEC
        §5) instead of leaving its peers to time out; then it is raised as it was. The runtime call
        itself stays outside: the core rejects its own errors."""
        try:
            yield
        except Exception as error:
            code, message = rejection_of(error)
            self.runtime.reject_inputs(kind=kind, code=code, message=message)
            raise

    @staticmethod
    def _unpack_bias(bias: Bias) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if bias is None:
            return None, None
        if isinstance(bias, torch.Tensor):
            return bias, None
        if isinstance(bias, (tuple, list)) and len(bias) == 2:
            return bias[0], bias[1]
        raise invalid_argument("combine", "bias",
                               f"expected None, a tensor or a pair of tensors, got {type(bias).__name__}")

    @staticmethod
    def _split_tokens(x: TokenTensor, op: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise invalid_argument(op, "x", f"expected a tensor or a pair (fp8 tokens, scales), got {len(x)} items")
            return x[0], x[1]
        return x, None

    def _make_handle(self, fields: Dict[str, Any]) -> AnyDispatchHandle:
        """The Python handle of a fresh dispatch, built by name from what epcomm._C.Buffer.dispatch returns
        under ``"handle"``: DeepEP's intranode shape (5 elements) when N == 1, its internode shape
        (10 elements, SPEC §3.6) when N > 1."""
        rank_prefix_matrix, is_token_in_rank = fields["rank_prefix_matrix"], fields["is_token_in_rank"]
        send_row, recv_src_idx, native = fields["send_row"], fields["recv_src_idx"], fields["native"]
        gbl_prefix, rdma_prefix = fields["recv_gbl_rank_prefix_sum"], fields["recv_rdma_rank_prefix_sum"]
        if self.num_nodes == 1:
            return DispatchHandle(rank_prefix_matrix=rank_prefix_matrix, is_token_in_rank=is_token_in_rank,
                                  send_row=send_row, recv_src_idx=recv_src_idx, native=native)
        num_tokens, G = is_token_in_rank.size(0), self.ranks_per_node
        is_token_in_node = is_token_in_rank.view(num_tokens, self.num_nodes, G).any(dim=2)
        rows = torch.arange(recv_src_idx.size(0), dtype=torch.int32, device=gbl_prefix.device)
        src_rank = torch.searchsorted(gbl_prefix, rows, right=True).to(torch.int32)
        src_rank[src_rank >= self.group_size] = -1  # num_worst_tokens padding rows
        forwarder = (torch.arange(self.num_nodes, dtype=torch.int32) * G + self.rank % G).to(gbl_prefix.device)
        return InternodeDispatchHandle(is_token_in_rank, rank_prefix_matrix, send_row, recv_src_idx, rdma_prefix,
                                       is_token_in_node, gbl_prefix, src_rank, forwarder, native)

    def get_network_bytes_per_node(self) -> List[int]:
        """epcomm extension (debug / bench counter, CPU backend with N > 1 nodes): the bytes the last
        dispatch or combine of this buffer put on the emulated network for each destination node (0 for
        its own node). Measured by the CPU backend's two-level transport; [] otherwise."""
        return list(self.runtime.last_network_bytes)

    @staticmethod
    def _native_dispatch_handle(handle: Any, op: str) -> _C.DispatchHandle:
        if isinstance(handle, (DispatchHandle, InternodeDispatchHandle)):
            return handle.native
        if isinstance(handle, tuple) and len(handle) in (5, 10) and isinstance(handle[-1], _C.DispatchHandle):
            return handle[-1]
        raise invalid_argument(op, "handle",
                               f"expected the handle tuple returned by dispatch, got {type(handle).__name__}")

    @staticmethod
    def _handle_tensors(handle: Optional[DispatchHandle]) -> Tuple[torch.Tensor, ...]:
        """The tensors of a dispatch handle (kept alive by asynchronous calls that use it)."""
        if not isinstance(handle, tuple):
            return ()
        return tuple(t for t in handle if isinstance(t, torch.Tensor))

    @staticmethod
    def _unpack_low_latency_handle(handle: Any, op: str) -> Tuple[torch.Tensor, torch.Tensor, int, int, int]:
        if isinstance(handle, (DispatchHandle, InternodeDispatchHandle)):
            raise invalid_argument(op, "handle", "got the handle of a normal-mode dispatch (Buffer.dispatch); "
                                                 "pass the handle low_latency_dispatch returned")
        if not isinstance(handle, (tuple, list)) or len(handle) != 5:
            raise invalid_argument(op, "handle", "expected the 5-tuple (src_info, layout_range, "
                                                 "num_max_dispatch_tokens_per_rank, hidden, num_experts) returned by "
                                                 "low_latency_dispatch")
        src_info, layout_range, max_tokens, hidden, num_experts = handle
        return (src_info, layout_range, int32(op, "handle[2] (num_max_dispatch_tokens_per_rank)", max_tokens),
                int32(op, "handle[3] (hidden)", hidden), int32(op, "handle[4] (num_experts)", num_experts))

    @staticmethod
    def _native_event(previous_event: Any, op: str) -> Optional[_C.Event]:
        if previous_event is None:
            return None
        if isinstance(previous_event, EventOverlap):
            previous_event = previous_event.event
            if previous_event is None:
                return _C.Event()  # a synchronous call's event: already complete
        if isinstance(previous_event, EventHandle):
            return previous_event.native
        if isinstance(previous_event, _C.Event):
            return previous_event
        raise invalid_argument(op, "previous_event", f"expected an EventOverlap, got {type(previous_event).__name__}")

    @staticmethod
    def _config_fields(config: Any, op: str) -> Dict[str, int]:
        if not isinstance(config, Config):
            raise invalid_argument(op, "config", f"expected an epcomm.Config, got {type(config).__name__}")
        return {name: int32(op, f"config.{name}", value) for name, value in config._as_dict().items()}

    def _stream(self) -> int:
        return current_stream_handle(self.device)

    def _make_allocator(self, on_comm_stream: bool) -> Allocate:
        """The callable epcomm._C creates outputs with: torch.empty on the device epcomm asks for
        (``cuda_device`` = -1: the CPU), on the current stream or (``on_comm_stream``) on the
        communication stream."""
        comm_stream = self._comm_stream if on_comm_stream else None

        def allocate(dtype_code: int, shape: Tuple[int, ...], cuda_device: int) -> Tuple[torch.Tensor, int]:
            device = torch.device("cpu") if cuda_device < 0 else torch.device("cuda", cuda_device)
            if comm_stream is None or device.type == "cpu":
                tensor = torch.empty(shape, dtype=DTYPES_BY_CODE[dtype_code], device=device)
            else:
                with torch.cuda.stream(comm_stream):
                    tensor = torch.empty(shape, dtype=DTYPES_BY_CODE[dtype_code], device=device)
            return tensor, tensor.data_ptr()

        return allocate

    def _allocator(self, allocate_on_comm_stream: bool) -> Allocate:
        return self._allocate_on_comm if allocate_on_comm_stream else self._allocate_here

    def _finish(self, native_event: _C.Event, async_finish: bool, allocate_on_comm_stream: bool,
                inputs: Sequence[Optional[torch.Tensor]], outputs: Sequence[Optional[torch.Tensor]]) -> EventOverlap:
        """The EventOverlap of a normal-mode call, after telling torch's allocator which streams use what."""
        inputs = tuple(t for t in inputs if isinstance(t, torch.Tensor))
        outputs = tuple(t for t in outputs if isinstance(t, torch.Tensor))
        if self._comm_stream is not None and not is_capturing(self.device):
            current = torch.cuda.current_stream(self.device)
            if async_finish:
                for tensor in inputs + outputs:  # in use on the comm stream after we return
                    tensor.record_stream(self._comm_stream)
            if allocate_on_comm_stream:
                for tensor in outputs:  # allocated for the comm stream, used on the current one
                    tensor.record_stream(current)
        if not async_finish:
            return EventOverlap(None)
        return EventOverlap(EventHandle(native_event), inputs + outputs)

    @staticmethod
    def _low_latency_event(native_event: _C.Event, async_finish: bool,
                           in_flight: Sequence[Optional[torch.Tensor]]) -> EventOverlap:
        if not async_finish:
            return EventOverlap(None)
        return EventOverlap(EventHandle(native_event), tuple(t for t in in_flight if isinstance(t, torch.Tensor)))

    def _wrap_hook(self, native_hook: Optional[_C.RecvHook],
                   in_flight: Sequence[Optional[torch.Tensor]]) -> Optional[Callable[[], None]]:
        """The Python hook: runs the receive half on the current stream; keeps the call's tensors and
        the buffer alive until then. A second call raises."""
        if native_hook is None:
            return None
        kept = [self.runtime, tuple(t for t in in_flight if isinstance(t, torch.Tensor))]
        stream = self._stream

        def hook() -> None:
            native_hook(stream())
            kept.clear()

        return hook
