"""kvlink's vLLM v1 connector (``kvlink.engine.vllm.connector.KvlinkConnector``) and its parts.

Importing this package does not import vLLM; :mod:`~kvlink.engine.vllm.connector` does. See
docs/engine.md ("vLLM") for the server flags and the P/D proxy (``kvlink proxy``).
"""
