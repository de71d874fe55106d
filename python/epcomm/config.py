"""``Config``: per-call tuning of high-throughput mode (SPEC §3.5, §6)."""
from __future__ import annotations

from typing import Dict, Optional

from . import _C
from ._group import resolve_ranks_per_node


class Config:
    """SM count and chunk sizes of high-throughput dispatch / combine.

    ``Config(**json.load(f))`` works with a JSON object of these names (what SGLang's tuned configs are).

    Arguments (all ``int``, accepted as given and checked when used):
        num_sms: streaming multiprocessors the kernels may occupy (even, >= 2); honoured exactly.
        num_max_nvl_chunked_send_tokens: tokens a sender moves per step inside a node.
        num_max_nvl_chunked_recv_tokens: capacity (tokens) of a receive queue inside a node.
        num_max_rdma_chunked_send_tokens: same between nodes.
        num_max_rdma_chunked_recv_tokens: same between nodes.
    """

    __slots__ = ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                 "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens")

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 128) -> None:
        self.num_sms = int(num_sms)
        self.num_max_nvl_chunked_send_tokens = int(num_max_nvl_chunked_send_tokens)
        self.num_max_nvl_chunked_recv_tokens = int(num_max_nvl_chunked_recv_tokens)
        self.num_max_rdma_chunked_send_tokens = int(num_max_rdma_chunked_send_tokens)
        self.num_max_rdma_chunked_recv_tokens = int(num_max_rdma_chunked_recv_tokens)

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of ``num_nvl_bytes`` always enough for dispatch / combine with this config.

        Arguments:
            hidden_bytes: bytes of one token (``hidden * 2`` for bf16; pass the bf16 size for FP8 too).
            num_ranks: ranks of the group (a size for ``num_ranks`` ranks in one NVLink domain, which is
                also enough when the group spans several nodes).
        """
        return _C.nvl_buffer_size_hint(config=self._as_dict(), hidden_bytes=int(hidden_bytes), num_ranks=int(num_ranks))

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int,
                                  ranks_per_node: Optional[int] = None) -> int:
        """Bytes of ``num_rdma_bytes`` always enough for normal mode across nodes (0 within one node).

        ``ranks_per_node`` defaults as for ``Buffer`` ($EPCOMM_RANKS_PER_NODE, $LOCAL_WORLD_SIZE, else
        ``min(num_ranks, 8)``).
        """
        rpn = resolve_ranks_per_node(int(num_ranks), ranks_per_node)
        return _C.rdma_buffer_size_hint(config=self._as_dict(), hidden_bytes=int(hidden_bytes),
                                        num_ranks=int(num_ranks), ranks_per_node=rpn)

    def _as_dict(self) -> Dict[str, int]:
        """The fields by name, as epcomm._C takes a config."""
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def _from_dict(cls, fields: Dict[str, int]) -> "Config":
        return cls(**fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._as_dict() == other._as_dict()

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)}" for name in self.__slots__)
        return f"Config({fields})"
