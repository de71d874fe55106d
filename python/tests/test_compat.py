"""A script written against DeepEP's ``deep_ep`` runs unchanged after ``import epcomm as deep_ep``."""
from __future__ import annotations

import pathlib
import tokenize
from typing import Any

SCRIPT = pathlib.Path(__file__).with_name("deep_ep_compat_script.py")


def run_script(ctx: Any) -> None:
    import deep_ep_compat_script
    deep_ep_compat_script.main(ctx.group)


def test_script_mentions_epcomm_only_in_its_import() -> None:
    with tokenize.open(SCRIPT) as source:
        tokens = list(tokenize.generate_tokens(source.readline))
    lines = [t.line.strip() for t in tokens if t.type == tokenize.NAME and t.string == "epcomm"]
    assert lines == ["import epcomm as deep_ep  # the only line that differs from a DeepEP script"]


def test_deep_ep_script_runs_unchanged(world) -> None:
    world.run(run_script)
