"""The pool daemon serves layouts from spec files (an engine connector's own layout), checked first."""

import asyncio
import json

import pytest

from kvlink.config import DaemonConfig
from kvlink.daemon.client import PoolClient
from kvlink.daemon.server import load_spec_file
from kvlink.errors import ConfigError
from kvlink.spec import CacheSpec, FullAttention, LinearAttention

SPEC = CacheSpec("vllm:tiny", (FullAttention(2, 64), LinearAttention((4, 8, 8), "float32", (3, 16), "bfloat16")))


def test_spec_file_round_trip(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(SPEC.to_dict()))
    assert load_spec_file(str(path)).fingerprint == SPEC.fingerprint


@pytest.mark.parametrize("content", [None, "not json", "[1, 2]", '{"name": "x", "layers": [{"tokens": [["k"]]}]}'])
def test_bad_spec_files_are_config_errors(tmp_path, content):
    path = tmp_path / "spec.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match="spec file"):
        load_spec_file(str(path))


def test_spec_file_names_are_checked(tmp_path):
    with pytest.raises(ConfigError):
        DaemonConfig(spec_files={"../escape": str(tmp_path / "s.json")})
    with pytest.raises(ConfigError, match="both"):
        DaemonConfig(models=("llama-3-70b",), spec_files={"llama-3-70b": "s.json"})


def test_specs_table_in_toml(tmp_path):
    toml = tmp_path / "pool.toml"
    toml.write_text('[daemon]\nhttp_port = 7490\n[specs]\nvllm-tiny = "/models/tiny.json"\n')
    assert DaemonConfig.from_toml(toml).spec_files == {"vllm-tiny": "/models/tiny.json"}


def test_lookup_only_client_carries_no_data():
    client = PoolClient("vllm-tiny", lookup_only=True)
    assert client.fingerprint is None
    with pytest.raises(ConfigError, match="lookup-only"):
        asyncio.run(client._call({}, []))
    # a layout the daemon loaded from a file: the client names it with spec=
    assert PoolClient("vllm-tiny", spec=SPEC).fingerprint == SPEC.fingerprint
