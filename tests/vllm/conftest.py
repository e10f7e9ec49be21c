"""tests/vllm runs under the vLLM venv (make setup-vllm: .venv-vllm):
``.venv-vllm/bin/python -m pytest -q tests/vllm``. vLLM must import: a missing or broken install
fails collection here, it never skips (these tests are the only check against vLLM's real classes)."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # kvlink from this checkout even where it is not installed in the venv
    sys.path.insert(0, _ROOT)

try:
    import vllm  # noqa: F401
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1  # noqa: F401
except Exception as exc:  # ImportError, or a broken install failing inside vLLM
    raise RuntimeError(f"tests/vllm need vLLM importable ({exc!r}); run them with .venv-vllm/bin/python "
                       "-m pytest tests/vllm after make setup-vllm") from exc
