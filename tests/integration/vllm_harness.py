"""Helpers for tests that run real vLLM (CPU build) servers: tiny random-weight models, a server
process wrapper and a greedy completion call.

Tests run in the main venv; vLLM lives in its own venv (``KVLINK_VLLM_PYTHON`` or
``<repo>/.venv-vllm/bin/python``), so the model builder runs as ``python -m
tests.integration.vllm_harness build KIND OUT_DIR`` under that interpreter. Top-level imports are
stdlib only for that reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MARKER = "kvlink-tiny.json"
KINDS = ("llama", "qwen3_next")
# Bump when the builder changes so cached models are rebuilt.
BUILD_VERSION = 1


class HarnessError(Exception):
    """A vLLM harness step failed (build, start, request)."""


def _harness_error() -> type[Exception]:
    # kvlink.errors imports fine in either venv; fall back so the builder never depends on it.
    try:
        from kvlink.errors import KvlinkError
    except ImportError:  # pragma: no cover
        return HarnessError

    class _Err(HarnessError, KvlinkError):
        pass

    return _Err


VllmHarnessError = _harness_error()


def vllm_python() -> str:
    """Interpreter of the vLLM venv."""
    return os.environ.get("KVLINK_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")


def _subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    # Unbuffered: tests read the servers' log lines as the servers write them.
    env.update({"PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


# ---------------------------------------------------------------- models

def build_tiny_model(kind: str, out_dir: str | os.PathLike) -> Path:
    """Build (or reuse) the tiny ``kind`` model under ``out_dir/kind`` with the vLLM venv's python."""
    if kind not in KINDS:
        raise VllmHarnessError(f"unknown tiny model kind {kind!r}; known: {KINDS}")
    path = Path(out_dir) / kind
    if _marker_ok(path, kind):
        return path
    proc = subprocess.run(
        [vllm_python(), "-m", "tests.integration.vllm_harness", "build", kind, str(path)],
        cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0 or not _marker_ok(path, kind):
        raise VllmHarnessError(f"building {kind} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return path


def _marker_ok(path: Path, kind: str) -> bool:
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("kind") == kind and meta.get("version") == BUILD_VERSION


_TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "KV caches move between prefill and decode servers across datacenters over plain Ethernet. "
    "Linear attention keeps a recurrent state; full attention keeps keys and values per token. "
    "0123456789 one two three four five six seven eight nine ten eleven twelve. "
)


def _build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_TEXT] * 50, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>",
    )
    fast.model_max_length = 4096
    fast.save_pretrained(out)


def _config(kind: str):
    common = dict(
        vocab_size=512, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        initializer_range=0.2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )
    if kind == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(intermediate_size=512, num_hidden_layers=2, **common)
    from transformers import Qwen3NextConfig

    cfg = Qwen3NextConfig(
        intermediate_size=512, num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        linear_conv_kernel_dim=4, linear_key_head_dim=64, linear_value_head_dim=64,
        linear_num_key_heads=2, linear_num_value_heads=4,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
        shared_expert_intermediate_size=128, decoder_sparse_step=1, **common,
    )
    cfg.full_attention_interval = 4  # older readers derive layer_types from this
    return cfg


def _build(kind: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    torch.manual_seed(0)
    cfg = _config(kind)
    # Initialise in float32 on a fixed seed, then cast: the weights do not depend on bf16 init paths.
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out)
    _build_tokenizer(out)
    (out / MARKER).write_text(json.dumps({"kind": kind, "version": BUILD_VERSION}))


# ---------------------------------------------------------------- servers

class Server:
    """A vLLM OpenAI API server in its own process group; ``with`` stops it."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, host: str = "127.0.0.1"):
        self.proc, self.port, self.log_path, self.host = proc, port, log_path, host
        self.started = time.monotonic()
        self.ready_after: float | None = None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 240.0) -> float:
        """Poll ``GET /health`` until 200; return seconds since start. Raise if it died or timed out."""
        deadline = time.monotonic() + timeout
        url = f"http://{self.host}:{self.port}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise VllmHarnessError(
                    f"vLLM server exited with {self.proc.returncode} before ready:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        self.ready_after = time.monotonic() - self.started
                        return self.ready_after
            except (urllib.error.URLError, OSError):
                pass
            # Polling interval of a readiness probe, not synchronisation between our own threads.
            self.proc_wait(0.5)
        raise VllmHarnessError(f"vLLM server not ready after {timeout}s:\n{self.log_tail()}")

    def proc_wait(self, seconds: float) -> None:
        try:
            self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pass

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the group, then SIGKILL what is left after ``grace`` seconds."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Engine-core children may outlive the API process: kill the whole group regardless.
        self._signal(signal.SIGKILL)
        self.proc.wait()

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def server_dtype() -> str:
    """bfloat16, except on CPUs with AMX tiles: there vLLM's CPU attention stores bf16 blocks in its
    AMX tile layout, which kvlink refuses with a typed error (test_amx_layout_is_refused), so the
    servers run float32 and keep the K-transposed layout the connector carries."""
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "float32" if amx else "bfloat16"


def server_args(model_path: str | os.PathLike, port: int, kv_config: dict | None,
                extra_args: tuple[str, ...] | list[str] = (), host: str = "127.0.0.1") -> list[str]:
    args = [
        vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
        "--dtype", server_dtype(), "--block-size", "32", "--enforce-eager", "--max-model-len", "4096",
        # Small token budget so a ~600-token prompt is prefilled in several chunks.
        "--max-num-batched-tokens", "256", "--served-model-name", "tiny",
        "--host", host, "--port", str(port),
    ]
    if kv_config is not None:
        args += ["--kv-transfer-config", json.dumps(kv_config)]
    return args + list(extra_args)


def start_server(model_path: str | os.PathLike, port: int, *, kv_config: dict | None, cpu: int,
                 env_extra: dict[str, str] | None = None, extra_args: tuple[str, ...] | list[str] = (),
                 log_path: str | os.PathLike | None = None, host: str = "127.0.0.1",
                 wrap: tuple[str, ...] | list[str] = ()) -> Server:
    """Start a vLLM server pinned to ``cpu`` listening on ``host``, its command prefixed by
    ``wrap`` (e.g. ``ip netns exec NS``); call ``wait_ready`` before use."""
    log = Path(log_path) if log_path else Path(model_path).parent / f"vllm-{port}.log"
    env = _subprocess_env({
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": str(cpu), **(env_extra or {}),
    })
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*wrap, *server_args(model_path, port, kv_config, extra_args, host)], cwd=REPO,
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(proc, port, log, host)


def complete(port: int, prompt: str | list[int], max_tokens: int, timeout: float = 300.0,
             **extra) -> dict:
    """Greedy ``/v1/completions``; the response carries ``prompt_token_ids`` and ``token_ids``.

    ``ignore_eos`` defaults to True so a random model always yields ``max_tokens`` tokens.
    """
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "return_token_ids": True, "ignore_eos": True, **extra}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise VllmHarnessError(f"completion failed: HTTP {e.code}: {e.read()[:2000]!r}") from e


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "build" and argv[1] in KINDS:
        _build(argv[1], Path(argv[2]))
        return 0
    print(f"usage: python -m tests.integration.vllm_harness build {{{','.join(KINDS)}}} OUT_DIR",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
