"""What switching from DeepEP to epcomm needs beyond the call surface: the ``deep_ep`` module (the
same objects as epcomm's), the backend chosen by CUDA's availability rather than by the group, and
named errors for what DeepEP forks pass or pybind11 would reject with a bare TypeError."""
from __future__ import annotations

import importlib
import pathlib
import sys
from types import ModuleType
from typing import Any

import pytest
import torch

import epcomm
from _common import expect_error, low_latency_buffer, normal_buffer
from epcomm import _deep_ep_alias, _group

SHIM = pathlib.Path(__file__).resolve().parents[1] / "deep_ep_shim"


@pytest.fixture
def clean_deep_ep():
    """No deep_ep module and no alias importer before the test; both restored after it."""
    saved_modules = dict(sys.modules)
    saved_meta_path = list(sys.meta_path)
    for name in [n for n in sys.modules if n == "deep_ep" or n.startswith("deep_ep.")]:
        del sys.modules[name]
    if _deep_ep_alias._IMPORTER in sys.meta_path:
        sys.meta_path.remove(_deep_ep_alias._IMPORTER)
    yield
    for name in [n for n in sys.modules if n not in saved_modules]:
        del sys.modules[name]
    sys.modules.update(saved_modules)
    sys.meta_path[:] = saved_meta_path


def check_same_objects(deep_ep: ModuleType) -> None:
    assert deep_ep is epcomm
    import deep_ep.buffer
    import deep_ep.utils
    from deep_ep import Buffer, Config, EventOverlap
    from deep_ep.utils import EventHandle as UtilsEventHandle
    from deep_ep.utils import EventOverlap as UtilsEventOverlap
    assert deep_ep.utils is epcomm.utils and deep_ep.buffer is epcomm.buffer
    assert sys.modules["deep_ep.utils"] is epcomm.utils and sys.modules["deep_ep.event"] is epcomm.event
    assert (Buffer, Config, EventOverlap) == (epcomm.Buffer, epcomm.Config, epcomm.EventOverlap)
    assert UtilsEventOverlap is epcomm.event.EventOverlap and UtilsEventHandle is epcomm.event.EventHandle
    # Megatron's default async path: an EventOverlap made from deep_ep.utils is epcomm's
    assert isinstance(UtilsEventOverlap(UtilsEventHandle()), epcomm.EventOverlap)
    assert callable(deep_ep.utils.check_nvlink_connections)


def test_install_as_deep_ep(clean_deep_ep) -> None:
    assert epcomm.install_as_deep_ep() is epcomm
    assert epcomm.install_as_deep_ep() is epcomm  # idempotent
    check_same_objects(importlib.import_module("deep_ep"))
    # a submodule first imported through the alias is epcomm's, and keeps its own spec
    del sys.modules["deep_ep._errors"]
    errors = importlib.import_module("deep_ep._errors")
    assert errors is epcomm._errors and errors.__spec__.name == "epcomm._errors"
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("deep_ep.no_such_module")
    with pytest.raises(ImportError):
        exec("from deep_ep import HybridEPBuffer", {})  # what Megatron probes for; epcomm has none


def test_shim_package_is_epcomm(clean_deep_ep, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SHIM))
    check_same_objects(importlib.import_module("deep_ep"))


def test_install_refuses_another_deep_ep(clean_deep_ep) -> None:
    sys.modules["deep_ep"] = ModuleType("deep_ep")  # DeepEP itself, imported first
    expect_error(epcomm.Error, ("install_as_deep_ep", "another deep_ep"), epcomm.install_as_deep_ep)


def test_backend_follows_cuda_not_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EPCOMM_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_group._C, "backend_available", lambda name: True)
    assert _group.choose_backend(None) == "cuda"  # whatever group bootstraps the Buffer
    assert _group.choose_backend("cpu") == "cpu"
    monkeypatch.setenv("EPCOMM_BACKEND", "cpu")
    assert _group.choose_backend(None) == "cpu"
    assert _group.choose_backend("cuda") == "cuda", "the argument wins over the environment"
    monkeypatch.setenv("EPCOMM_BACKEND", "gpu")
    expect_error(epcomm.InvalidArgumentError, ("EPCOMM_BACKEND", "gpu"), lambda: _group.choose_backend(None))
    monkeypatch.delenv("EPCOMM_BACKEND")
    monkeypatch.setattr(_group._C, "backend_available", lambda name: name == "cpu")
    assert _group.choose_backend(None) == "cpu", "a CPU-only build runs the CPU backend"
    monkeypatch.setattr(_group._C, "backend_available", lambda name: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _group.choose_backend(None) == "cpu"


def test_is_sm90_compiled_on_this_build() -> None:
    hopper = any(a.strip().startswith("90") for a in epcomm._C.cuda_architectures.replace(",", ";").split(";"))
    assert epcomm.Buffer.is_sm90_compiled() == (epcomm._C.backend_available("cuda") and hopper)


def test_out_of_range_integers_name_the_argument() -> None:
    expect_error(epcomm.InvalidArgumentError, ("get_low_latency_rdma_size_hint", "num_experts", "2147483647"),
                 lambda: epcomm.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 2**31))
    expect_error(epcomm.InvalidArgumentError, ("get_dispatch_config", "num_ranks", "expected an integer"),
                 lambda: epcomm.Buffer.get_dispatch_config(8.5))


# ---- rank-side checks ----------------------------------------------------------------------------

def check_named_argument_errors(ctx: Any) -> None:
    buffer = normal_buffer(ctx, 128, poison=False)
    topk_idx = torch.randint(0, 2 * ctx.size, (6, 2), device=ctx.device)
    x = torch.randn(6, 128, device=ctx.device).to(torch.bfloat16)
    expect_error(epcomm.InvalidArgumentError, ("get_dispatch_layout", "num_experts", "2147483647", str(2**31)),
                 lambda: buffer.get_dispatch_layout(topk_idx, 2**31))
    layout = buffer.get_dispatch_layout(topk_idx, 2 * ctx.size)
    expect_error(epcomm.InvalidArgumentError, ("dispatch", "expert_alignment", "2147483647", str(2**40)),
                 lambda: buffer.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                                         num_tokens_per_expert=layout[2], topk_idx=topk_idx, expert_alignment=2**40))
    expect_error(epcomm.InvalidArgumentError, ("dispatch", "config.num_sms"),
                 lambda: buffer.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                                         num_tokens_per_expert=layout[2], topk_idx=topk_idx,
                                         config=epcomm.Config(num_sms=2**32)))
    buffer.destroy()


def check_fork_arguments(ctx: Any) -> None:
    hidden, max_tokens, num_experts = 128, 8, 2 * ctx.size
    buffer = low_latency_buffer(ctx, max_tokens, hidden, num_experts)
    x = torch.randn(4, hidden, device=ctx.device).to(torch.bfloat16)
    topk_idx = torch.randint(0, num_experts, (4, 2), device=ctx.device)
    weights = torch.rand(4, 2, device=ctx.device)

    def dispatch(**fork: Any):
        return buffer.low_latency_dispatch(x, topk_idx, max_tokens, num_experts, use_fp8=False, **fork)

    for name, value in (("use_nvfp4", True), ("x_global_scale", torch.ones(1, device=ctx.device))):
        expect_error(epcomm.UnsupportedError, ("low_latency_dispatch", name, "not supported"),
                     lambda: dispatch(**{name: value}))
    with pytest.raises(TypeError, match="no_such_argument"):
        dispatch(no_such_argument=1)
    # at their defaults they change nothing
    recv_x, _, handle, _, _ = dispatch(use_nvfp4=False, x_global_scale=None)
    signal = torch.zeros(4, dtype=torch.int32, device=ctx.device)
    sbo = {"overlap": True, "packed_recv_count": torch.zeros(2, dtype=torch.int32, device=ctx.device),
           "comp_signal": signal, "block_m": 128, "threshold": 2, "num_sms": 8, "src_signals": signal,
           "src_signal_expect_value": 1}
    for name, value in sbo.items():
        expect_error(epcomm.UnsupportedError, ("low_latency_combine", name),
                     lambda: buffer.low_latency_combine(recv_x, topk_idx, weights, handle, **{name: value}))
    message = expect_error(epcomm.UnsupportedError, ("overlap=True", "block_m=128", "comp_signal="),
                           lambda: buffer.low_latency_combine(recv_x, topk_idx, weights, handle, **sbo))
    assert "num_sms=8" in message
    combined, _, _ = buffer.low_latency_combine(recv_x, topk_idx, weights, handle, overlap=False, block_m=64,
                                                threshold=0, num_sms=3, packed_recv_count=None, comp_signal=None,
                                                src_signals=None, src_signal_expect_value=0)
    assert combined.shape == x.shape
    buffer.destroy()


def check_low_latency_combine_rejects_a_normal_handle(ctx: Any) -> None:
    hidden = 128
    size = max(epcomm.Config().get_nvl_buffer_size_hint(hidden * 2, ctx.size), 1)
    ll_bytes = epcomm.Buffer.get_low_latency_rdma_size_hint(8, hidden, ctx.size, 2 * ctx.size)
    buffer = epcomm.Buffer(ctx.group, size, ll_bytes, low_latency_mode=True)
    x = torch.randn(4, hidden, device=ctx.device).to(torch.bfloat16)
    topk_idx = torch.randint(0, 2 * ctx.size, (4, 2), device=ctx.device)
    layout = buffer.get_dispatch_layout(topk_idx, 2 * ctx.size)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                                                 num_tokens_per_expert=layout[2], topk_idx=topk_idx)
    expert_x = torch.zeros(1, ctx.size * 8, hidden, dtype=torch.bfloat16, device=ctx.device)
    expect_error(epcomm.InvalidArgumentError, ("low_latency_combine", "handle", "normal-mode"),
                 lambda: buffer.low_latency_combine(expert_x, topk_idx, torch.rand(4, 2, device=ctx.device), handle))
    expect_error(epcomm.InvalidArgumentError, ("get_next_low_latency_combine_buffer", "handle", "normal-mode"),
                 lambda: buffer.get_next_low_latency_combine_buffer(handle))
    buffer.combine(recv_x, handle)
    buffer.destroy()


def check_nvlink_connections(ctx: Any) -> None:
    import epcomm.utils
    assert epcomm.utils.check_nvlink_connections(ctx.group) is None


def test_named_argument_errors(world) -> None:
    world.run(check_named_argument_errors)


@pytest.mark.worlds("cpu2", "cuda2")
def test_fork_arguments_are_named(world) -> None:
    world.run(check_fork_arguments)


@pytest.mark.worlds("cpu2", "cuda2")
def test_low_latency_combine_rejects_a_normal_handle(world) -> None:
    world.run(check_low_latency_combine_rejects_a_normal_handle)


def test_check_nvlink_connections(world) -> None:
    world.run(check_nvlink_connections)


def _stub_functions(body: list) -> dict:
    import ast
    functions = {}
    for node in body:
        is_property = isinstance(node, ast.FunctionDef) and any(
            isinstance(d, ast.Name) and d.id in ("property", "staticmethod") for d in node.decorator_list)
        if isinstance(node, ast.FunctionDef) and not is_property and not node.name.startswith("__"):
            names = [a.arg for a in node.args.args + node.args.kwonlyargs if a.arg != "self"]
            functions[node.name] = names
    return functions


def _binding_arguments(function: Any) -> list:
    import re
    signature = function.__doc__.splitlines()[0]
    inside = signature[signature.index("(") + 1:signature.rindex(")")]
    return [n for n in re.findall(r"(?:^|, )(\w+)(?=:|,|$)", inside) if n != "self"]


def test_stub_matches_the_binding() -> None:
    """epcomm/_C.pyi names every function and Buffer operation of _C with the binding's argument names."""
    import ast
    stub = ast.parse((pathlib.Path(epcomm.__file__).parent / "_C.pyi").read_text())
    buffer_class = next(n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "Buffer")
    checked = 0
    for owner, functions in ((epcomm._C, _stub_functions(stub.body)),
                             (epcomm._C.Buffer, _stub_functions(buffer_class.body))):
        for name, arguments in functions.items():
            assert hasattr(owner, name), f"_C.pyi declares {name}, which the binding lacks"
            assert _binding_arguments(getattr(owner, name)) == arguments, f"arguments of {name}"
            checked += 1
    bound = [n for n in dir(epcomm._C.Buffer) if not n.startswith("_") and callable(getattr(epcomm._C.Buffer, n))]
    assert sorted(bound) == sorted(_stub_functions(buffer_class.body)), "Buffer operations missing from _C.pyi"
    assert checked > 20
