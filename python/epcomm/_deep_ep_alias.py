"""``deep_ep`` as a second name of epcomm, for code written against DeepEP (``import deep_ep``).

``install_as_deep_ep()`` makes ``deep_ep`` *the same module object* as ``epcomm``, and every
``deep_ep.<name>`` the same object as ``epcomm.<name>``. Aliasing only the top-level name is not
enough: ``import deep_ep.utils`` would then load epcomm/utils.py a second time as a new module,
with a second copy of ``EventOverlap``, and Megatron-Core's ``isinstance(previous_event,
EventOverlap)`` would fail with "expected an EventOverlap, got EventOverlap".
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Optional, Sequence

ALIAS = "deep_ep"
PACKAGE = "epcomm"
#: Set on a module named deep_ep that may be replaced by epcomm (python/deep_ep_shim's package).
SHIM_MARK = "__epcomm_deep_ep_shim__"


class _AliasImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``deep_ep.<rest>`` as the module ``epcomm.<rest>`` (importing that one once)."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        if not fullname.startswith(ALIAS + "."):
            return None
        real_name = PACKAGE + fullname[len(ALIAS):]
        if real_name not in sys.modules and importlib.util.find_spec(real_name) is None:
            return None  # deep_ep.<rest> does not exist: the usual ModuleNotFoundError follows
        return importlib.machinery.ModuleSpec(fullname, self, loader_state=real_name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(spec.loader_state)
        spec.loader_state = (spec.loader_state, module.__spec__)
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system stamped the alias spec on the real module: give it back its own, so that
        # its later relative imports and importlib.reload keep working under the epcomm name.
        real_name, real_spec = module.__spec__.loader_state
        module.__spec__ = real_spec


_IMPORTER = _AliasImporter()


def install_as_deep_ep() -> ModuleType:
    """Makes ``import deep_ep`` (and ``from deep_ep.utils import EventOverlap``, ``deep_ep.buffer``,
    ...) give epcomm's own modules, for code that cannot change its imports. Call it before anything
    imports deep_ep; idempotent. Returns the epcomm module.

    Raises ``epcomm.Error`` when another ``deep_ep`` (DeepEP itself) was imported already.
    """
    epcomm = sys.modules[PACKAGE]
    existing = sys.modules.get(ALIAS)
    if existing is not None and existing is not epcomm and not getattr(existing, SHIM_MARK, False):
        from ._C import Error
        where = getattr(existing, "__file__", None) or repr(existing)
        raise Error(f"epcomm: install_as_deep_ep: another deep_ep module ({where}) is imported already; call "
                    f"install_as_deep_ep() before anything imports deep_ep")
    sys.modules[ALIAS] = epcomm
    for name, module in list(sys.modules.items()):  # the submodules imported so far, by the same objects
        if name.startswith(PACKAGE + ".") and module is not None:
            sys.modules[ALIAS + name[len(PACKAGE):]] = module
    if _IMPORTER not in sys.meta_path:
        sys.meta_path.insert(0, _IMPORTER)  # the submodules imported later
    return epcomm
