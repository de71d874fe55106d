# Stub of epcomm._C, the pybind11 binding of libepcomm (python/bindings). Internal: use the epcomm
# package. Tensors cross as TensorDescription tuples (epcomm/_tensors.py), streams as cudaStream_t
# integers (0 on the CPU), configs as dicts of the Config field names; every Buffer operation takes
# keyword arguments only and returns a dict of the names below.
from typing import Any, Callable, Dict, List, Optional, Tuple, TypedDict

import torch

__version__: str
#: CMake's CUDA architectures of the kernels ("" in a CPU-only build).
cuda_architectures: str
#: epcomm::DType name ("bool", "int32", "int64", "float32", "bfloat16", "float8_e4m3fn") -> code.
dtype_codes: Dict[str, int]

#: (data_ptr, dtype code, shape, strides, device type (0 CPU, 1 CUDA), device index)
TensorDescription = Tuple[int, int, Tuple[int, ...], Tuple[int, ...], int, int]
#: (dtype code, shape, CUDA device or -1 for the CPU) -> (the new torch tensor, its data_ptr)
Allocate = Callable[[int, Tuple[int, ...], int], Tuple[torch.Tensor, int]]


class ConfigFields(TypedDict):
    num_sms: int
    num_max_nvl_chunked_send_tokens: int
    num_max_nvl_chunked_recv_tokens: int
    num_max_rdma_chunked_send_tokens: int
    num_max_rdma_chunked_recv_tokens: int


class Error(RuntimeError): ...
class InvalidArgumentError(Error, ValueError): ...
class UnsupportedError(Error, NotImplementedError): ...
class TimeoutError(Error): ...
class PeerFailureError(Error): ...
class OutOfCapacityError(Error): ...
class InternalError(Error): ...


def backend_available(name: str) -> bool: ...
def backend_limits(backend: str) -> Dict[str, Any]: ...
def set_default_num_sms(num_sms: int) -> None: ...
def default_num_sms() -> int: ...
def low_latency_buffer_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                 num_experts: int) -> int: ...
def default_dispatch_config(num_ranks: int) -> ConfigFields: ...
def default_combine_config(num_ranks: int) -> ConfigFields: ...
def validate_config(config: ConfigFields) -> None: ...
def nvl_buffer_size_hint(config: ConfigFields, hidden_bytes: int, num_ranks: int) -> int: ...
def rdma_buffer_size_hint(config: ConfigFields, hidden_bytes: int, num_ranks: int, ranks_per_node: int) -> int: ...


class Event:
    """Completion of epcomm work: a CUDA event, or one that is already complete."""
    def __init__(self) -> None: ...
    @staticmethod
    def record(stream: int) -> "Event": ...
    @property
    def is_cuda(self) -> bool: ...
    def wait(self, stream: int) -> None: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool: ...


class RecvHook:
    """Runs the receive half of a low-latency call, once."""
    def __call__(self, stream: int) -> None: ...
    def __bool__(self) -> bool: ...


class DispatchHandle:
    """The routing of one dispatch (opaque; DispatchHandle.native in epcomm.buffer)."""
    @property
    def num_ranks(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def num_recv_tokens(self) -> int: ...
    @property
    def num_topk(self) -> int: ...


class LayoutOutputs(TypedDict):
    num_tokens_per_rank: torch.Tensor              # [R] int32
    num_tokens_per_rdma_rank: Optional[torch.Tensor]  # [N] int32, None on one node
    num_tokens_per_expert: torch.Tensor            # [E] int32
    is_token_in_rank: torch.Tensor                 # [T, R] bool
    event: Event


class HandleFields(TypedDict):
    rank_prefix_matrix: torch.Tensor  # [R, R] int32
    is_token_in_rank: torch.Tensor    # [T, R] bool
    send_row: torch.Tensor            # [T, R] int32
    recv_src_idx: torch.Tensor        # [num_recv] int32
    recv_gbl_rank_prefix_sum: Optional[torch.Tensor]   # [R] int32, N > 1 only
    recv_rdma_rank_prefix_sum: Optional[torch.Tensor]  # [N] int32, N > 1 only
    native: DispatchHandle


class DispatchOutputs(TypedDict):
    recv_x: torch.Tensor                       # [num_recv, hidden], dtype of x
    recv_x_scales: Optional[torch.Tensor]      # [num_recv, S] with FP8 input
    recv_topk_idx: Optional[torch.Tensor]      # [num_recv, K] int64
    recv_topk_weights: Optional[torch.Tensor]  # [num_recv, K] float32
    num_recv_tokens_per_expert_list: Optional[List[int]]  # None for a cached dispatch
    handle: Optional[HandleFields]             # None for a cached dispatch
    event: Event


class CombineOutputs(TypedDict):
    combined_x: torch.Tensor                       # [T, hidden] bf16
    combined_topk_weights: Optional[torch.Tensor]  # [T, K] float32
    event: Event


class LowLatencyDispatchOutputs(TypedDict):
    recv_x: torch.Tensor                   # [L, R*T_max, hidden] bf16 or float8_e4m3fn
    recv_x_scales: Optional[torch.Tensor]  # float32 [L, R*T_max, S] or int32 (ue8m0), column-major
    recv_count: torch.Tensor               # [L] int32
    src_info: torch.Tensor                 # [L, R*T_max] int32
    layout_range: torch.Tensor             # [L, R] int64
    event: Event
    hook: Optional[RecvHook]


class LowLatencyCombineOutputs(TypedDict):
    combined_x: Optional[torch.Tensor]  # [T, hidden] bf16; None when `out` was given
    event: Event
    hook: Optional[RecvHook]


class Buffer:
    def __init__(self, rank: int, size: int, all_gather: Callable[[bytes], bytes], barrier: Callable[[], None], *,
                 backend: str, num_nvl_bytes: int, num_rdma_bytes: int, low_latency_mode: bool, ranks_per_node: int,
                 device: int, timeout_s: float, allow_nvlink_for_low_latency_mode: bool, enable_shrink: bool,
                 comm_stream: int = 0) -> None: ...
    @property
    def rank(self) -> int: ...
    @property
    def num_ranks(self) -> int: ...
    @property
    def ranks_per_node(self) -> int: ...
    @property
    def comm_stream(self) -> int: ...
    @property
    def last_network_bytes(self) -> List[int]: ...
    def limits(self) -> Dict[str, Any]: ...
    def destroy(self) -> None: ...
    def check_errors(self) -> None: ...
    def get_dispatch_layout(self, *, topk_idx: TensorDescription, num_experts: int, stream: int,
                            previous_event: Optional[Event], async_finish: bool, allocate_on_comm_stream: bool,
                            allocate: Allocate) -> LayoutOutputs: ...
    def dispatch(self, *, x: TensorDescription, x_scales: Optional[TensorDescription],
                 topk_idx: Optional[TensorDescription], topk_weights: Optional[TensorDescription],
                 num_tokens_per_rank: Optional[TensorDescription], num_tokens_per_rdma_rank: Optional[TensorDescription],
                 is_token_in_rank: Optional[TensorDescription], num_tokens_per_expert: Optional[TensorDescription],
                 handle: Optional[DispatchHandle], expert_alignment: int, num_worst_tokens: int,
                 config: Optional[ConfigFields], stream: int, previous_event: Optional[Event], async_finish: bool,
                 allocate_on_comm_stream: bool, allocate: Allocate) -> DispatchOutputs: ...
    def combine(self, *, x: TensorDescription, handle: DispatchHandle, topk_weights: Optional[TensorDescription],
                bias_0: Optional[TensorDescription], bias_1: Optional[TensorDescription],
                config: Optional[ConfigFields], stream: int, previous_event: Optional[Event], async_finish: bool,
                allocate_on_comm_stream: bool, allocate: Allocate) -> CombineOutputs: ...
    def low_latency_dispatch(self, *, x: TensorDescription, topk_idx: TensorDescription,
                             num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats: Optional[TensorDescription],
                             dispatch_wait_recv_cost_stats: Optional[TensorDescription], use_fp8: bool,
                             round_scale: bool, use_ue8m0: bool, stream: int, async_finish: bool,
                             return_recv_hook: bool, allocate: Allocate) -> LowLatencyDispatchOutputs: ...
    def low_latency_combine(self, *, x: TensorDescription, topk_idx: TensorDescription,
                            topk_weights: TensorDescription, src_info: TensorDescription,
                            layout_range: TensorDescription, num_max_dispatch_tokens_per_rank: int, hidden: int,
                            num_experts: int, use_logfmt: bool, zero_copy: bool, out: Optional[TensorDescription],
                            combine_wait_recv_cost_stats: Optional[TensorDescription], stream: int,
                            async_finish: bool, return_recv_hook: bool,
                            allocate: Allocate) -> LowLatencyCombineOutputs: ...
    def next_low_latency_combine_buffer(self, *, src_info: TensorDescription, layout_range: TensorDescription,
                                        num_max_dispatch_tokens_per_rank: int, hidden: int,
                                        num_experts: int) -> torch.Tensor: ...
    def clean_low_latency_buffer(self, *, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int,
                                 stream: int) -> None: ...
    def reject_inputs(self, *, kind: str, code: str, message: str) -> None:
        """Collective: this rank rejects its inputs of the call ``kind`` ('dispatch', 'cached_dispatch',
        'combine', 'low_latency_dispatch', 'low_latency_combine', 'clean_low_latency_buffer') with an
        input error (``code``: 'invalid argument', 'not supported' or 'out of capacity'): the peers
        making that call raise it naming this rank (Buffer::reject_inputs)."""
    def update_mask(self, *, rank: int, mask: bool, stream: int) -> None: ...
    def query_mask(self) -> torch.Tensor: ...
    def clean_mask(self, *, stream: int) -> None: ...
    def local_buffer_bytes(self, *, offset: int, num_bytes: int, rdma: bool) -> torch.Tensor: ...
