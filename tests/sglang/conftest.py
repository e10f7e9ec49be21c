"""tests/sglang runs under the SGLang venv (make setup-sglang: .venv-sglang). SGLang must import:
a missing or broken install fails collection here, it never skips."""

import sys
import types
import importlib

import sglang.srt.mem_cache as _mem_cache
import sglang.srt.mem_cache.hicache_storage  # noqa: F401  (fails loudly when SGLang is absent)

# SGLang's pool_host/__init__ eagerly imports its device pools, whose model configs need a CUDA
# torchvision; the Mamba host pool module itself does not. Register the package by path only so
# its real submodules load without that __init__ (the classes used are SGLang's own).
_PKG = "sglang.srt.mem_cache.pool_host"
if _PKG not in sys.modules:
    _pkg = types.ModuleType(_PKG)
    _pkg.__path__ = [_mem_cache.__path__[0] + "/pool_host"]
    sys.modules[_PKG] = _pkg
importlib.import_module(_PKG + ".mamba")
