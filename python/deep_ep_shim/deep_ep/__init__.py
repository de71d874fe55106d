"""``import deep_ep`` gives epcomm (the package ``epcomm-deep-ep``, python/deep_ep_shim).

After this import, ``deep_ep`` *is* the ``epcomm`` module and ``deep_ep.utils``, ``deep_ep.buffer``,
... are epcomm's own submodules (``epcomm.install_as_deep_ep()``), so code written against DeepEP
(Megatron-Core, SGLang, vLLM) runs on epcomm unchanged.
"""
__epcomm_deep_ep_shim__ = True  # lets install_as_deep_ep() replace this module by epcomm

import epcomm as _epcomm  # noqa: E402

_epcomm.install_as_deep_ep()  # sys.modules["deep_ep"] is epcomm now: the import statement returns it
