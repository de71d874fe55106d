"""``python -m epcomm.bench``: a benchmark and tuner in the style of DeepEP's test scripts.

For each mode it prints the time and GB/s of every configuration tried, the best ``Config`` for this
machine as a line to paste, and the baseline a PyTorch user writes without an EP library
(``all_to_all_single`` + ``index_select`` / ``index_add_``, NCCL on GPUs, gloo on the CPU) in the same
run. It writes the rows of BENCHMARKS.md ("Recording results", ``impl`` "epcomm" or
"torch_all_to_all", ``workload`` "python") with ``--json``, and a PNG (``--plot``) with an SM sweep
and a token sweep. On a machine without GPU it runs the CPU backend at a small size (seconds).

    python -m epcomm.bench                      # every GPU, DeepSeek-V3 shapes (BENCHMARKS.md)
    python -m epcomm.bench --backend cpu        # the CPU backend, small shapes
    python -m epcomm.bench --json rows.jsonl --plot sweep.png

Bytes as BENCHMARKS.md counts them: normal mode, the rows a rank receives (its own included) x
hidden x 2 (BF16; combine the same); low-latency dispatch FP8 per (token, slot) ``hidden + hidden /
128 * 4 + 16``, combine ``hidden * 2``. Times are CUDA-event spans with the GPU held busy while the
host queues the call (CPU: ``perf_counter``), median over iterations on each rank, then the median
over ranks. Kernel durations (CUPTI) are epcomm-bench's job (bench/results/README.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


HOLD_CYCLES = 400_000  # ~200 us of GPU clock before each timed call


# ---- command line ---------------------------------------------------------------------------------

@dataclass
class Settings:
    backend: str = "auto"          # cpu | cuda | auto
    ranks: int = 0                 # 0: one per GPU (cuda), 2 (cpu)
    modes: Tuple[str, ...] = ("normal", "low_latency")
    tokens: int = 0                # normal mode T per rank (0: 4096 on cuda, 64 on cpu)
    ll_tokens: int = 0             # low-latency T_max (0: 128 on cuda, 32 on cpu)
    hidden: int = 0                # 0: 7168 on cuda, 256 on cpu
    topk: int = 0                  # 0: 8 on cuda, 4 on cpu
    experts: int = 0               # 0: 256 on cuda, 4 per rank on cpu
    num_sms: Tuple[int, ...] = ()  # SM sweep (0: 8,16,24,32 on cuda, 8,16 on cpu)
    chunks: Tuple[int, ...] = ()   # Config.num_max_nvl_chunked_send_tokens tried per SM count
    token_sweep: Tuple[int, ...] = ()  # low-latency T values (<= ll_tokens)
    iters: int = 0                 # 0: 20 on cuda, 5 on cpu
    warmup: int = 0                # 0: 5 on cuda, 1 on cpu
    seed: int = 1
    json_path: str = ""
    plot_path: str = ""
    quiet: bool = False            # no progress line

    def resolved(self) -> "Settings":
        s = Settings(**asdict(self))
        cuda = s.backend == "cuda"
        if s.ranks == 0:
            s.ranks = torch.cuda.device_count() if cuda else 2
        s.tokens = s.tokens or (4096 if cuda else 64)
        s.ll_tokens = s.ll_tokens or (128 if cuda else 32)
        s.hidden = s.hidden or (7168 if cuda else 256)
        s.topk = s.topk or (8 if cuda else 4)
        s.experts = s.experts or (256 if cuda else 4 * s.ranks)
        s.num_sms = s.num_sms or ((8, 16, 24, 32) if cuda else (8, 16))
        s.chunks = s.chunks or ((4, 6, 8, 12, 16, 24) if cuda else (6, 12))
        sweep = s.token_sweep or ((1, 8, 32, 64, 128) if cuda else (1, 8, 32))
        s.token_sweep = tuple(t for t in sweep if t <= s.ll_tokens) or (s.ll_tokens,)
        s.iters = s.iters or (20 if cuda else 5)
        s.warmup = s.warmup or (5 if cuda else 1)
        return s


def _int_list(text: str) -> Tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got '{text}'")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def parse_args(argv: Optional[Sequence[str]] = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m epcomm.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("cpu", "cuda", "auto"), default="auto",
                   help="auto (default): cuda when a GPU is visible, else cpu")
    p.add_argument("-n", "--ranks", type=int, default=0, help="ranks (processes); default: one per GPU, 2 on cpu")
    p.add_argument("--modes", default="normal,low_latency", help="normal, low_latency or both (comma list)")
    p.add_argument("--tokens", type=int, default=0, help="normal-mode tokens per rank")
    p.add_argument("--ll-tokens", type=int, default=0, help="low-latency T_max")
    p.add_argument("--hidden", type=int, default=0)
    p.add_argument("--topk", type=int, default=0)
    p.add_argument("--experts", type=int, default=0)
    p.add_argument("--num-sms", type=_int_list, default=(), help="SM sweep, e.g. 8,16,24,32")
    p.add_argument("--chunks", type=_int_list, default=(), help="NVL send chunks tried per SM count")
    p.add_argument("--token-sweep", type=_int_list, default=(), help="low-latency token counts")
    p.add_argument("--iters", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", dest="json_path", default="", help="write BENCHMARKS.md rows (JSON lines)")
    p.add_argument("--plot", dest="plot_path", default="", help="write a PNG of the SM and token sweeps")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    a = p.parse_args(argv)
    modes = tuple(m for m in a.modes.split(",") if m)
    bad = [m for m in modes if m not in ("normal", "low_latency")]
    if bad or not modes:
        p.error(f"--modes: expected normal and/or low_latency, got '{a.modes}'")
    backend = a.backend
    if backend == "auto":
        backend = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu"
    if backend == "cuda" and not torch.cuda.is_available():
        p.error("--backend cuda: no CUDA device is visible")
    if a.ranks < 0 or a.iters < 0 or a.warmup < 0:
        p.error("--ranks, --iters and --warmup must not be negative")
    s = Settings(backend=backend, ranks=a.ranks, modes=modes, tokens=a.tokens, ll_tokens=a.ll_tokens,
                 hidden=a.hidden, topk=a.topk, experts=a.experts, num_sms=a.num_sms, chunks=a.chunks,
                 token_sweep=a.token_sweep, iters=a.iters, warmup=a.warmup, seed=a.seed, json_path=a.json_path,
                 plot_path=a.plot_path, quiet=a.quiet).resolved()
    if s.backend == "cuda" and s.ranks > torch.cuda.device_count():
        p.error(f"--ranks {s.ranks}: the cuda backend needs one GPU per rank ({torch.cuda.device_count()} visible; "
                "NCCL, used for the baseline, refuses two ranks on one GPU)")
    if s.experts % s.ranks != 0:
        p.error(f"--experts {s.experts} is not a multiple of the {s.ranks} ranks")
    if s.hidden % 128 != 0:
        p.error(f"--hidden {s.hidden} is not a multiple of 128")
    return s


# ---- one rank -------------------------------------------------------------------------------------

@dataclass
class Row:
    """One figure: BENCHMARKS.md's row, plus what was tried (config) for the table."""
    impl: str
    op: str
    dtype: Optional[str]
    num_sms: Optional[int]
    tokens: int
    time_us: float             # median over ranks of each rank's median
    time_us_min: float
    time_us_max: float
    gbps: Optional[float]
    config: Dict[str, int] = field(default_factory=dict)


class Rank:
    def __init__(self, s: Settings, rank: int, size: int, device: torch.device, progress: "Progress") -> None:
        self.s, self.rank, self.size, self.device, self.progress = s, rank, size, device, progress
        self.rows: List[Row] = []
        self.cuda = device.type == "cuda"

    # -- timing --
    def time(self, fn: Callable[[], Any], setup: Optional[Callable[[], Any]] = None) -> List[float]:
        """Microseconds of s.iters calls of fn, each after `setup` (untimed) and a barrier (CUDA events
        on GPUs)."""
        out = []
        for i in range(self.s.warmup + self.s.iters):
            if setup is not None:
                setup()
            dist.barrier()
            if self.cuda:
                torch.cuda.synchronize()
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                # keep the GPU busy while Python queues the call, so that the events time the GPU's
                # work and not the host's launch path (epcomm-bench holds the GPU the same way)
                torch.cuda._sleep(HOLD_CYCLES)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                us = start.elapsed_time(stop) * 1e3
            else:
                t0 = time.perf_counter()
                fn()
                us = (time.perf_counter() - t0) * 1e6
            if i >= self.s.warmup:
                out.append(us)
        return out

    def record(self, impl: str, op: str, dtype: Optional[str], num_sms: Optional[int], tokens: int,
               us: List[float], nbytes: Optional[float], config: Optional[Dict[str, int]] = None) -> Row:
        """Collective: the median over ranks of each rank's median; GB/s from each rank's bytes."""
        mine = (statistics.median(us), nbytes)
        every: List[Any] = [None] * self.size
        dist.all_gather_object(every, mine)
        times = [t for t, _ in every]
        rates = [b / t / 1e3 for t, b in every if b is not None and t > 0]
        row = Row(impl, op, dtype, num_sms, tokens, statistics.median(times), min(times), max(times),
                  statistics.median(rates) if len(rates) == self.size else None, dict(config or {}))
        self.rows.append(row)
        return row

    # -- inputs (BENCHMARKS.md routing: topk of |randn| + 1, per-rank seed) --
    def inputs(self, tokens: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.s.seed * 1000 + self.rank)
        x = torch.randn(tokens, self.s.hidden, generator=g).to(torch.bfloat16)
        scores = torch.randn(tokens, self.s.experts, generator=g).abs() + 1
        topk_idx = scores.topk(self.s.topk, dim=1).indices
        weights = torch.rand(tokens, self.s.topk, generator=g) + 0.1
        return x.to(self.device), topk_idx.to(self.device), weights.to(self.device)

    # -- normal mode --
    def normal_mode(self) -> None:
        import epcomm
        s = self.s
        x, topk_idx, weights = self.inputs(s.tokens)
        configs = [epcomm.Config(sms, chunk, max(256, 2 * chunk), 6, 128) for sms in s.num_sms for chunk in s.chunks]
        nvl_bytes = max(c.get_nvl_buffer_size_hint(s.hidden * 2, self.size) for c in configs)
        buffer = epcomm.Buffer(dist.group.WORLD, num_nvl_bytes=nvl_bytes, backend=s.backend)
        try:
            per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, s.experts)
            recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
                x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=weights, config=configs[0])
            nbytes = float(recv_x.size(0) * s.hidden * 2)
            for op, call in (("dispatch_cached", lambda c: buffer.dispatch(x, handle=handle, config=c)),
                             ("combine", lambda c: buffer.combine(recv_x, handle, config=c))):
                for c in configs:
                    self.progress.step(f"normal {op} SMs {c.num_sms} chunk {c.num_max_nvl_chunked_send_tokens}")
                    us = self.time(lambda: call(c))
                    self.record("epcomm", op, "bf16", c.num_sms, s.tokens, us, nbytes,
                                {"num_sms": c.num_sms, "nvl_chunk": c.num_max_nvl_chunked_send_tokens,
                                 "nvl_recv": c.num_max_nvl_chunked_recv_tokens})
        finally:
            buffer.destroy()
        self.baseline(x, topk_idx, "normal", s.tokens)

    # -- low-latency mode --
    def low_latency_mode(self) -> None:
        import epcomm
        s = self.s
        rdma = epcomm.Buffer.get_low_latency_rdma_size_hint(s.ll_tokens, s.hidden, self.size, s.experts)
        buffer = epcomm.Buffer(dist.group.WORLD, num_rdma_bytes=rdma, low_latency_mode=True, backend=s.backend)
        try:
            for tokens in s.token_sweep:
                x, topk_idx, weights = self.inputs(tokens)
                selections = float((topk_idx != -1).sum())
                def bf16_dispatch() -> Any:
                    return buffer.low_latency_dispatch(x, topk_idx, s.ll_tokens, s.experts, use_fp8=False)

                # identity experts: the BF16 dispatch's rows; the same routing puts rows in the same
                # places, so they fit the handle of any later dispatch (a handle lives two dispatches)
                expert_out = bf16_dispatch()[0].clone()
                latest: Dict[str, Any] = {}
                for op, dtype, nbytes, call, setup in (
                        ("ll_dispatch", "fp8", selections * (s.hidden + s.hidden // 128 * 4 + 16),
                         lambda: buffer.low_latency_dispatch(x, topk_idx, s.ll_tokens, s.experts, use_fp8=True), None),
                        ("ll_dispatch", "bf16", selections * s.hidden * 2, bf16_dispatch, None),
                        ("ll_combine", "bf16", selections * s.hidden * 2,
                         lambda: buffer.low_latency_combine(expert_out, topk_idx, weights, latest["handle"]),
                         lambda: latest.update(handle=bf16_dispatch()[2]))):
                    self.progress.step(f"low-latency {op} {dtype} T {tokens}")
                    self.record("epcomm", op, dtype, None, tokens, self.time(call, setup), nbytes)
                self.baseline(x, topk_idx, "low_latency", tokens)
        finally:
            buffer.destroy()

    # -- what a PyTorch user writes without an EP library --
    def baseline(self, x: torch.Tensor, topk_idx: torch.Tensor, mode: str, tokens: int) -> None:
        """all_to_all_single of the rows each rank needs (once per rank, index_select), then the way back
        and index_add_ into [T, hidden]. Rows travel as bytes (uint8), which NCCL and gloo both move."""
        s = self.s
        local = s.experts // self.size
        in_rank = torch.zeros(x.size(0), self.size, dtype=torch.bool, device=x.device)
        valid = topk_idx >= 0
        rows = torch.arange(x.size(0), device=x.device).unsqueeze(1).expand_as(topk_idx)
        in_rank[rows[valid], (topk_idx[valid] // local)] = True
        state: Dict[str, Any] = {}

        def route() -> None:  # the index computation and the count exchange
            order = in_rank.t().nonzero()  # (rank, token) pairs, by rank then token
            state["send_index"] = order[:, 1]
            send_counts = in_rank.sum(0).to(torch.int64)
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts)
            state["send_splits"] = send_counts.tolist()
            state["recv_splits"] = recv_counts.tolist()

        def exchange() -> None:
            send = x.index_select(0, state["send_index"]).view(torch.uint8)
            recv = torch.empty(sum(state["recv_splits"]), send.size(1), dtype=torch.uint8, device=x.device)
            dist.all_to_all_single(recv, send, state["recv_splits"], state["send_splits"])
            state["recv"] = recv

        def combine() -> None:
            back = torch.empty(len(state["send_index"]), state["recv"].size(1), dtype=torch.uint8, device=x.device)
            dist.all_to_all_single(back, state["recv"], state["send_splits"], state["recv_splits"])
            out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            out.index_add_(0, state["send_index"], back.view(torch.bfloat16).float())
            state["combined"] = out.to(torch.bfloat16)

        route()
        exchange()
        nbytes = float(sum(state["recv_splits"]) * s.hidden * 2)
        prefix = "" if mode == "normal" else "ll_"
        for op, call in ((f"{prefix}dispatch", lambda: (route(), exchange())), (f"{prefix}dispatch_cached", exchange),
                         (f"{prefix}combine", combine)):
            if mode != "normal" and op.endswith("cached"):
                continue
            self.progress.step(f"baseline {op} T {tokens}")
            self.record("torch_all_to_all", op.replace("ll_", ""), "bf16", None, tokens, self.time(call), nbytes,
                        {"mode": 0 if mode == "normal" else 1})


# ---- progress, report, plot -----------------------------------------------------------------------

class Progress:
    """A one-line progress indicator on stderr (rank 0)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled, self.start = total, 0, enabled, time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            elapsed = time.monotonic() - self.start
            sys.stderr.write(f"\r[{self.done}/{self.total}] {elapsed:6.1f} s  {what:<60.60}")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def count_steps(s: Settings) -> int:
    steps = 0
    if "normal" in s.modes:
        steps += 2 * len(s.num_sms) * len(s.chunks) + 3
    if "low_latency" in s.modes:
        steps += len(s.token_sweep) * (3 + 2)
    return steps


def _paste_line(row: Row) -> str:
    c = row.config
    return f"epcomm.Config({c['num_sms']}, {c['nvl_chunk']}, {c['nvl_recv']}, 6, 128)"


def print_report(rows: List[Row], s: Settings, out: Any = None) -> List[str]:
    """DeepEP-test-style lines; returns the best-config lines (also printed)."""
    out = out or sys.stdout
    best_lines = []
    w = out.write
    w(f"\nepcomm.bench: {s.backend}, {s.ranks} ranks, hidden {s.hidden}, top-{s.topk} of {s.experts} experts\n")
    for op in ("dispatch_cached", "combine"):
        tried = [r for r in rows if r.impl == "epcomm" and r.op == op]
        if not tried:
            continue
        w(f"\n[normal {op} bf16, {s.tokens} tokens per rank]\n")
        for r in tried:
            w(f"  [tuning] SMs {r.num_sms:3d}, NVL chunk {r.config['nvl_chunk']:3d}: "
              f"{r.gbps or 0:8.2f} GB/s (NVL), t: {r.time_us:10.1f} us (ranks {r.time_us_min:.1f}..{r.time_us_max:.1f})\n")
        best = max(tried, key=lambda r: (r.gbps or 0, -r.time_us))
        line = _paste_line(best)
        best_lines.append(f"{op}: {line}")
        w(f"  [tuning] best {op}: SMs {best.num_sms}, NVL chunk {best.config['nvl_chunk']}: "
          f"{best.gbps or 0:.2f} GB/s, {best.time_us:.1f} us\n  paste: {line}\n")
        base = next((r for r in rows if r.impl == "torch_all_to_all" and r.op == op and r.config.get("mode") == 0), None)
        if base:
            w(f"  baseline (all_to_all_single + index_select/index_add_): {base.time_us:.1f} us, "
              f"{base.gbps or 0:.2f} GB/s: epcomm {base.time_us / best.time_us:.2f}x faster\n")
    ll = [r for r in rows if r.op.startswith("ll_") and r.impl == "epcomm"]
    if ll:
        w(f"\n[low-latency, T_max {s.ll_tokens}]\n")
        for r in ll:
            w(f"  {r.op:12s} {r.dtype:5s} T {r.tokens:5d}: {r.time_us:10.1f} us, {r.gbps or 0:8.2f} GB/s\n")
        for t in sorted({r.tokens for r in ll}):
            ours = [r for r in ll if r.tokens == t and ((r.op, r.dtype) in (("ll_dispatch", "fp8"), ("ll_combine", "bf16")))]
            base = [r for r in rows if r.impl == "torch_all_to_all" and r.tokens == t and r.config.get("mode") == 1]
            if len(ours) == 2 and len(base) == 2:
                a, b = sum(r.time_us for r in ours), sum(r.time_us for r in base)
                w(f"  T {t:5d}: ll_dispatch fp8 + ll_combine {a:.1f} us vs baseline dispatch + combine {b:.1f} us: "
                  f"{b / a:.2f}x\n")
    out.flush()
    return best_lines


def machine_name(backend: str) -> str:
    if backend == "cuda":
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def commit_id() -> str:
    env = os.environ.get("EPCOMM_COMMIT")
    if env:
        return env
    try:
        import subprocess
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def json_rows(rows: List[Row], s: Settings) -> List[Dict[str, Any]]:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    machine, commit = machine_name(s.backend), commit_id()
    out = []
    for r in rows:
        ll = r.op.startswith("ll_") or r.config.get("mode") == 1
        out.append({"date": date, "machine": machine, "commit": commit, "impl": r.impl,
                    "workload": "python-ll" if ll else "python-normal", "op": r.op, "dtype": r.dtype,
                    "ranks": s.ranks, "num_sms": r.num_sms, "tokens": r.tokens, "hidden": s.hidden, "topk": s.topk,
                    "experts": s.experts, "time_us_median": round(r.time_us, 3), "time_us_min": round(r.time_us_min, 3),
                    "time_us_max": round(r.time_us_max, 3),
                    "gbps_median": None if r.gbps is None else round(r.gbps, 3), "timing": "event"})
    return out


def plot(rows: List[Row], s: Settings, path: str) -> None:
    """Left: best GB/s per SM count (normal mode) with the baseline; right: low-latency time per T."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for op, style in (("dispatch_cached", "o-"), ("combine", "s-")):
        tried = [r for r in rows if r.impl == "epcomm" and r.op == op]
        if tried:
            sms = sorted({r.num_sms for r in tried})
            best = [max((r.gbps or 0) for r in tried if r.num_sms == n) for n in sms]
            left.plot(sms, best, style, label=f"epcomm {op} (best chunk)")
        base = next((r for r in rows if r.impl == "torch_all_to_all" and r.op == op and r.config.get("mode") == 0), None)
        if base and base.gbps:
            left.axhline(base.gbps, linestyle="--", color="gray" if op == "combine" else "black",
                         label=f"all_to_all_single {op}")
    left.set(title=f"normal mode, {s.tokens} tokens/rank, {s.ranks} ranks ({s.backend})", xlabel="SMs",
             ylabel="GB/s (logical, received)")
    left.legend(fontsize=8)
    for (op, dtype), style in ((("ll_dispatch", "fp8"), "o-"), (("ll_dispatch", "bf16"), "^-"),
                               (("ll_combine", "bf16"), "s-")):
        pts = sorted((r.tokens, r.time_us) for r in rows if r.impl == "epcomm" and r.op == op and r.dtype == dtype)
        if pts:
            right.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"epcomm {op} {dtype}")
    for op, style in (("dispatch", "x--"), ("combine", "+--")):
        pts = sorted((r.tokens, r.time_us) for r in rows
                     if r.impl == "torch_all_to_all" and r.op == op and r.config.get("mode") == 1)
        if pts:
            right.plot([p[0] for p in pts], [p[1] for p in pts], style, color="gray", label=f"all_to_all_single {op}")
    right.set(title=f"low-latency mode, T_max {s.ll_tokens}", xlabel="tokens per rank", ylabel="time (us)")
    right.set_yscale("log")
    right.legend(fontsize=8)
    fig.suptitle(f"epcomm.bench: hidden {s.hidden}, top-{s.topk} of {s.experts} experts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- processes ------------------------------------------------------------------------------------

def _rank_main(rank: int, s: Settings, init_file: str, results: Any) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    try:
        cuda = s.backend == "cuda"
        if cuda:
            torch.cuda.set_device(rank)
        else:  # ranks share the cores: torch's own thread pool per rank would oversubscribe them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // s.ranks))
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=s.ranks, timeout=datetime.timedelta(seconds=300))
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        me = Rank(s, rank, s.ranks, device, Progress(count_steps(s), enabled=rank == 0 and not s.quiet))
        if "normal" in s.modes:
            me.normal_mode()
        if "low_latency" in s.modes:
            me.low_latency_mode()
        me.progress.finish()
        results.put((rank, True, [asdict(r) for r in me.rows] if rank == 0 else None))
    except BaseException as error:  # noqa: B902 - reported by the parent
        import traceback
        results.put((rank, False, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        results.close()
        results.join_thread()
        os._exit(0)  # skip destroy_process_group: peers may already be gone


def run(s: Settings, timeout_s: float = 1800) -> List[Row]:
    """Runs the benchmark on s.ranks processes; returns rank 0's rows (raises on any rank's failure)."""
    import multiprocessing as mp
    import queue
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="epcomm-bench-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [context.Process(target=_rank_main, args=(r, s, init_file, results), daemon=True)
                 for r in range(s.ranks)]
        for p in procs:
            p.start()
        outcomes: Dict[int, Tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(outcomes) < s.ranks:
            try:
                rank, ok, value = results.get(timeout=1.0)
                outcomes[rank] = (ok, value)
                continue
            except queue.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if r not in outcomes and not p.is_alive()]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    if p.is_alive():
                        p.kill()
                why = f"ranks {dead} died" if dead else f"not finished within {timeout_s} s"
                raise RuntimeError(f"epcomm.bench: {why}")
        for p in procs:
            p.join(timeout=30)
    failures = [f"rank {r}: {v}" for r, (ok, v) in sorted(outcomes.items()) if not ok]
    if failures:
        raise RuntimeError("epcomm.bench failed:\n" + "\n".join(failures))
    return [Row(**r) for r in outcomes[0][1]]


def main(argv: Optional[Sequence[str]] = None) -> int:
    s = parse_args(argv)
    rows = run(s)
    print_report(rows, s)
    if s.json_path:
        with open(s.json_path, "w") as f:
            for row in json_rows(rows, s):
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} rows to {s.json_path}")
    if s.plot_path:
        try:
            plot(rows, s, s.plot_path)
            print(f"wrote {s.plot_path}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install matplotlib; requirements-dev.txt)",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
