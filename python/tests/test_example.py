"""examples/moe_layer.py: an MoE layer whose forward and backward run over epcomm matches the dense layer."""
from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "moe_layer.py"


def run_example(ctx: Any) -> float:
    spec = importlib.util.spec_from_file_location("moe_layer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_check(ctx.group, ctx.device)


def test_moe_layer_matches_dense(world) -> None:
    errors = world.run(run_example)
    assert max(errors) < 2e-2
