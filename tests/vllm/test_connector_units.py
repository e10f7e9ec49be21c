"""kvlink's vLLM connector against vLLM's real classes: the connector base, KV-cache specs, the CPU
cache kernel, ``Request``, ``SchedulerOutput``. Shapes follow what vLLM 0.32 registered in the
probes (/work/notes/17/probe-*.json): CPU attention ``[blocks, kv_heads, block, 2*head_dim]`` bf16
and Mamba pages ``int8 [blocks, 1, 1, state_bytes]`` strided by the padded page size."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm import _custom_ops as ops
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, SupportsHMA, supports_hma
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import KVConnectorBlockState, SchedulerOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, SlidingWindowSpec
from vllm.v1.request import Request

from kvlink.engine.vllm.connector import KvlinkConnector
from kvlink.engine.vllm.layout import build_layout
from kvlink.engine.vllm.meta import ConnectorConfig, LoadJob, SendJob
from kvlink.engine.vllm.proxy import parse_decode
from kvlink.engine.vllm.scheduler import SchedulerSide
from kvlink.errors import ConfigError, IncompatibleLayoutError
from kvlink.serde import CacheRef, Packer, Unpacker

HEADS, HEAD_DIM = 2, 64  # both probes: 2 KV heads of 64
MAMBA_SHAPES, MAMBA_DTYPES = ((3, 512), (4, 64, 64)), (torch.bfloat16, torch.float32)  # qwen3_next GDN
STATE_BYTES = 3 * 512 * 2 + 4 * 64 * 64 * 4  # 68608, the probe's last dim
# On CPUs with AMX tiles vLLM keeps bf16 blocks of 32k tokens in its AMX tile layout, which kvlink
# refuses (test_amx_bf16_layout_is_refused); the carried layouts are tested in float32 there.
AMX = torch.cpu._is_amx_tile_supported()
ATTN_DTYPE = torch.float32 if AMX else torch.bfloat16


# ---------------------------------------------------------------------------- 1. connector class
def test_connector_is_a_complete_hma_connector():
    assert issubclass(KvlinkConnector, KVConnectorBase_V1)
    assert issubclass(KvlinkConnector, SupportsHMA)
    assert KvlinkConnector.__abstractmethods__ == frozenset()
    assert supports_hma(KvlinkConnector)


# ---------------------------------------------------------------------------- caches as vLLM registers them
def _attn_spec(block: int) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=block, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=ATTN_DTYPE)


def _mamba_spec(block: int, page: int) -> MambaSpec:
    return MambaSpec(block_size=block, shapes=MAMBA_SHAPES, dtypes=MAMBA_DTYPES, page_size_padded=page)


def _attn_view(raw: torch.Tensor, blocks: int, block: int) -> torch.Tensor:
    """The CPU backend's view of a raw int8 page buffer (vLLM views its KVCacheTensor this way)."""
    return raw.view(ATTN_DTYPE)[: blocks * HEADS * block * 2 * HEAD_DIM].view(blocks, HEADS, block, 2 * HEAD_DIM)


def _mamba_view(raw: torch.Tensor, blocks: int, page: int) -> torch.Tensor:
    """``int8 [blocks, 1, 1, STATE_BYTES]`` with block stride ``page`` (probe-qwen3_next.json)."""
    return raw.as_strided((blocks, 1, 1, STATE_BYTES), (page, STATE_BYTES, STATE_BYTES, 1))


def hybrid_cache(blocks: int = 6, block: int = 160):
    """qwen3_next-like: two linear-attention layers (a group each) then one attention layer; every
    layer over its own raw buffer of ``blocks`` pages of the attention page size (81920 bytes)."""
    page = block * HEADS * 2 * HEAD_DIM * ATTN_DTYPE.itemsize
    assert page >= STATE_BYTES
    raws = [torch.zeros(blocks * page, dtype=torch.int8) for _ in range(3)]
    caches = {"model.layers.0.linear_attn": _mamba_view(raws[0], blocks, page),
              "model.layers.1.linear_attn": _mamba_view(raws[1], blocks, page),
              "model.layers.2.self_attn.attn": _attn_view(raws[2], blocks, block)}
    groups = [(["model.layers.0.linear_attn"], _mamba_spec(block, page)),
              (["model.layers.1.linear_attn"], _mamba_spec(block, page)),
              (["model.layers.2.self_attn.attn"], _attn_spec(block))]
    return caches, groups, raws


def dense_cache(blocks: int = 8, block: int = 32):
    """llama-like: two attention layers in one group, sharing one buffer (probe-llama.json)."""
    layer_bytes = blocks * HEADS * block * 2 * HEAD_DIM * ATTN_DTYPE.itemsize
    raw = torch.zeros(2 * layer_bytes, dtype=torch.int8)
    caches = {f"model.layers.{i}.self_attn.attn": _attn_view(raw[i * layer_bytes:], blocks, block) for i in range(2)}
    return caches, [(list(caches), _attn_spec(block))], raw


def _write_tokens(cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
    """vLLM's CPU attention writing new tokens (cpu_attn.py: the same view, chunk and kernel)."""
    nb, heads, bs, _ = cache.shape
    k_cache, v_cache = cache.view(nb, heads, bs * 2, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys, values, k_cache, v_cache, slots, _get_attn_isa(cache.dtype, bs, HEAD_DIM))


def _slots(block_ids: list[int], block: int, n: int) -> torch.Tensor:
    return torch.tensor([block_ids[t // block] * block + t % block for t in range(n)], dtype=torch.long)


def _owned_mask(like: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The elements vLLM's kernel writes for ``slots``: found by writing ones with the kernel itself."""
    mask = torch.zeros_like(like)
    ones = torch.ones(len(slots), HEADS, HEAD_DIM, dtype=like.dtype)
    _write_tokens(mask, ones, ones, slots)
    return mask != 0


# ---------------------------------------------------------------------------- 2. layout
@pytest.mark.parametrize("make, block", [(dense_cache, 32), (hybrid_cache, 160), (dense_cache, 16)])
def test_packer_reads_what_vllm_wrote_and_unpacker_writes_vllm_bytes(make, block):
    src_caches, groups, _ = make(block=block)
    dst_caches, _, _ = make(block=block)
    src, dst = build_layout(src_caches, groups, "m"), build_layout(dst_caches, groups, "m")
    n = 2 * block + 5  # two full blocks and a partial one
    src_ids, dst_ids = [3, 0, 5], [1, 4, 2]
    gen = torch.Generator().manual_seed(block)
    written = {}
    for name, t in src_caches.items():
        if t.dtype == ATTN_DTYPE:
            keys = torch.randn(n, HEADS, HEAD_DIM, generator=gen).to(ATTN_DTYPE)
            values = torch.randn(n, HEADS, HEAD_DIM, generator=gen).to(ATTN_DTYPE)
            _write_tokens(t, keys, values, _slots(src_ids, block, n))
            written[name] = (keys, values)
    assert written
    attn_layers = [src.layer_index[name] for name in written]
    payload = Packer(src.paged).pack(CacheRef(src_ids, n), attn_layers)
    by_segment = {(s.layer, s.component): d for s, d in zip(payload.header.segments, payload.datas)}
    for name, (keys, values) in written.items():
        layer = src.layer_index[name]
        for component, expected in enumerate((keys, values)):  # token-major [n, heads, head_dim]
            got = torch.frombuffer(bytearray(by_segment[(layer, component)]), dtype=ATTN_DTYPE)
            assert torch.equal(got.view(n, HEADS, HEAD_DIM), expected), (name, component)
    assert Unpacker(dst.paged).unpack(payload, CacheRef(dst_ids, n)) == sorted(attn_layers)
    for name in written:
        src_mask = _owned_mask(src_caches[name], _slots(src_ids, block, n))
        dst_mask = _owned_mask(dst_caches[name], _slots(dst_ids, block, n))
        s, d = src_caches[name], dst_caches[name]  # compared bit for bit (the masks are per element)
        if ATTN_DTYPE == torch.bfloat16:
            s, d = s.view(torch.int16), d.view(torch.int16)
        else:
            s, d = s.view(torch.int32), d.view(torch.int32)
        assert int(dst_mask.sum()) == 2 * n * HEADS * HEAD_DIM  # K and V of n tokens
        for sb, db in zip(src_ids, dst_ids):  # block by block: same bytes where vLLM keeps those tokens
            assert torch.equal(src_mask[sb], dst_mask[db]) and src_mask[sb].any()
            assert torch.equal(s[sb][src_mask[sb]], d[db][dst_mask[db]]), (name, sb, db)
        assert not d[~dst_mask].any(), name  # and nothing written anywhere else


def test_state_page_round_trips():
    src_caches, groups, src_raws = hybrid_cache()
    dst_caches, _, dst_raws = hybrid_cache()
    src, dst = build_layout(src_caches, groups, "qwen3_next"), build_layout(dst_caches, groups, "qwen3_next")
    assert [layer.variant for layer in src.spec.layers] == ["vllm-state", "vllm-state", "vllm-attention"]
    src_groups, dst_groups = ([1, 2], [0, 3], [4]), ([5, 1], [2, 4], [0])  # a state lives in the group's last block
    page = src_caches["model.layers.0.linear_attn"].stride(0)
    gen = torch.Generator().manual_seed(1)
    for name in ("model.layers.0.linear_attn", "model.layers.1.linear_attn"):
        src_caches[name].copy_(torch.randint(-128, 128, src_caches[name].shape, generator=gen, dtype=torch.int8))
    state_layers = [src.layer_index[n] for n in ("model.layers.0.linear_attn", "model.layers.1.linear_attn")]
    assert src.state_slots(src_groups) == {0: 2, 1: 3}
    payload = Packer(src.paged).pack(CacheRef(src.token_blocks(src_groups), 1, src.state_slots(src_groups)),
                                     state_layers)
    Unpacker(dst.paged).unpack(payload, CacheRef(dst.token_blocks(dst_groups), 1, dst.state_slots(dst_groups)))
    for i, (s_page, d_page) in enumerate([(2, 1), (3, 4)]):
        got = dst_raws[i].view(-1, page)
        assert torch.equal(got[d_page, :STATE_BYTES], src_raws[i].view(-1, page)[s_page, :STATE_BYTES])
        got[d_page, :STATE_BYTES] = 0
        assert not got.any()  # the padding and every other page untouched


def test_sliding_window_group_is_refused():
    caches, _, _ = dense_cache()
    swa = SlidingWindowSpec(block_size=32, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=torch.bfloat16,
                            sliding_window=128)
    with pytest.raises(IncompatibleLayoutError, match="SlidingWindowSpec"):
        build_layout(caches, [(list(caches), swa)], "gemma")


def test_two_attention_groups_are_refused():
    caches, _, _ = dense_cache()
    names = list(caches)
    with pytest.raises(IncompatibleLayoutError, match="2 KV-cache groups"):
        build_layout(caches, [([names[0]], _attn_spec(32)), ([names[1]], _attn_spec(32))], "llama")


def test_identical_caches_have_one_fingerprint():
    a, groups, _ = hybrid_cache()
    b, _, _ = hybrid_cache()
    fa = build_layout(a, groups, "qwen3_next").spec.fingerprint
    assert fa == build_layout(b, groups, "qwen3_next").spec.fingerprint
    assert fa != build_layout(b, groups, "qwen3_5").spec.fingerprint
    c, dgroups, _ = dense_cache()
    assert build_layout(c, dgroups, "qwen3_next").spec.fingerprint != fa


# ---------------------------------------------------------------------------- 3. settings
def test_config_defaults_and_good_values(monkeypatch):
    monkeypatch.delenv("KVLINK_SECRET", raising=False)
    assert ConnectorConfig.from_extra(None) == ConnectorConfig()
    cfg = ConnectorConfig.from_extra({"listen": "0.0.0.0:7200", "begin_timeout": "2.5", "load_timeout": 10,
                                      "send_timeout": 1e-3})
    assert cfg.listen == ("0.0.0.0", 7200)
    assert (cfg.begin_timeout, cfg.load_timeout, cfg.send_timeout) == (2.5, 10.0, 1e-3)
    assert ConnectorConfig.from_extra({"listen": "[::1]:7200"}).listen == ("::1", 7200)
    pooled = ConnectorConfig.from_extra({"pool": "127.0.0.1:7480:7481", "pool_model": "m", "spec_file": "/s.json"})
    assert (pooled.pool, pooled.pool_model, pooled.spec_file) == (("127.0.0.1", 7480, 7481), "m", "/s.json")


@pytest.mark.parametrize("extra", [
    {"lisen": "127.0.0.1:1"}, {"listen": "7200"}, {"listen": 7200}, {"listen": "h:port"}, {"listen": ":7200"},
    {"listen": "h:70000"}, {"listen": "h:-1"}, {"pool": "host:7480"}, {"pool": "host:x:7481"},
    {"pool": ":7480:7481"}, {"pool": "h:0:7481"}, {"pool_model": ""}, {"spec_file": 3},
    {"begin_timeout": 0}, {"load_timeout": -1}, {"send_timeout": "soon"}, {"send_timeout": None},
    {"begin_timeout": float("nan")},
])
def test_bad_config_is_a_config_error(extra):
    with pytest.raises(ConfigError):
        ConnectorConfig.from_extra(extra)


# ---------------------------------------------------------------------------- 4. scheduler side
def _request(n: int, params: dict | None, req_id: str = "r1") -> Request:
    extra = {"kv_transfer_params": params} if params is not None else None
    return Request(req_id, list(range(100, 100 + n)), SamplingParams(max_tokens=16, extra_args=extra), None)


def _to_prefill() -> dict:
    return {"do_remote_decode": True, "kvlink_transfer": "t1", "kvlink_decode": "127.0.0.1:7200"}


def _to_decode(tokens: int, start: int = 0) -> dict:
    return {"do_remote_prefill": True, "do_remote_decode": False, "kvlink_transfer": "t1", "kvlink_tokens": tokens,
            "kvlink_start": start}


def _scheduled(req_id: str, n: int, blocks: tuple[list[int], ...]) -> SchedulerOutput:
    out = SchedulerOutput.make_empty()
    out.num_scheduled_tokens = {req_id: n}
    out.total_num_scheduled_tokens = n
    out.kv_connector_block_state = KVConnectorBlockState(req_ids={req_id}, resolve_block_ids=lambda r: blocks,
                                                         boundary_state_offloads={})
    return out


def test_hybrid_prefill_prompt_loses_its_last_token_once():
    side = SchedulerSide(ConnectorConfig(), has_state=True)
    req = _request(10, _to_prefill())
    side.on_new_request(req)
    side.on_new_request(req)  # again (vLLM re-adds a preempted request): no second cut
    assert req.prompt_token_ids == list(range(100, 109)) and list(req.all_token_ids) == list(range(100, 109))
    assert (req.num_prompt_tokens, req.num_tokens, req.max_tokens) == (9, 9, 1)


def test_dense_prefill_keeps_its_prompt_and_stops_after_one_token():
    side = SchedulerSide(ConnectorConfig(), has_state=False)
    req = _request(10, _to_prefill())
    side.on_new_request(req)
    assert (req.num_prompt_tokens, req.num_tokens, req.max_tokens) == (10, 10, 1)


@pytest.mark.parametrize("params", [None, {"do_remote_decode": True}, {"kvlink_transfer": "t"}])
def test_requests_not_for_kvlink_prefill_are_untouched(params):
    side = SchedulerSide(ConnectorConfig(), has_state=True)
    req = _request(10, params)
    side.on_new_request(req)
    assert (req.num_prompt_tokens, req.max_tokens) == (10, 16)
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)


@pytest.mark.parametrize("has_state, tokens, expected", [(True, 9, (9, True)), (False, 10, (10, True))])
def test_decode_request_loads_asynchronously(has_state, tokens, expected):
    side = SchedulerSide(ConnectorConfig(), has_state=has_state)
    req = _request(10, _to_decode(tokens))
    side.on_new_request(req)
    assert req.num_prompt_tokens == 10  # the decode server keeps the whole prompt
    assert side.get_num_new_matched_tokens(req, 0) == expected


@pytest.mark.parametrize("has_state, params, computed", [
    (True, _to_decode(10), 0), (True, _to_decode(8), 0), (False, _to_decode(9), 0),  # token counts that do not match
    (True, _to_decode(9), 32), (False, _to_decode(10), 16),  # vLLM's own prefix hit
    (False, _to_decode(10, start=4), 0),  # a payload not from token 0: no prefix source here
    (False, {"do_remote_prefill": True, "kvlink_transfer": "t1"}, 0),  # no kvlink_tokens
    (False, _to_decode("ten"), 0), (False, _to_decode(10, start=11), 0),
])
def test_decode_request_that_does_not_match_computes_locally(has_state, params, computed):
    side = SchedulerSide(ConnectorConfig(), has_state=has_state)
    assert side.get_num_new_matched_tokens(_request(10, params), computed) == (0, False)


def test_decode_load_job_gets_every_group_of_the_allocated_blocks():
    side = SchedulerSide(ConnectorConfig(), has_state=True)
    req = _request(10, _to_decode(9))
    assert side.get_num_new_matched_tokens(req, 0) == (9, True)
    blocks = KVCacheBlocks(([KVCacheBlock(7)], [KVCacheBlock(2)], [KVCacheBlock(5), KVCacheBlock(6)]))
    side.update_state_after_alloc(req, blocks, 9)
    side.update_state_after_alloc(req, blocks, 0)  # vLLM's second admission, after the load: nothing new
    jobs = side.build_meta(SchedulerOutput.make_empty(), {req.request_id: req})
    assert jobs.loads == [LoadJob("r1", "t1", ([7], [2], [5, 6]), 9)] and jobs.sends == []
    assert side.build_meta(SchedulerOutput.make_empty(), {}).loads == []  # handed over once
    assert side.request_finished(req, ([7], [2], [5, 6])) == (False, None)  # the decode side holds nothing


def test_prefill_reports_params_only_after_its_send_job():
    side = SchedulerSide(ConnectorConfig(), has_state=True)
    req = _request(10, _to_prefill())
    requests = {req.request_id: req}
    side.on_new_request(req)
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)
    blocks = ([1], [2], [3])
    assert side.request_finished(req, blocks) == (False, None)  # aborted before any send: free at once
    assert side.build_meta(_scheduled("r1", 4, blocks), requests).sends == []  # a first chunk of 9: no send yet
    req.num_computed_tokens = 4
    jobs = side.build_meta(_scheduled("r1", 5, blocks), requests)
    assert jobs.sends == [SendJob("r1", "t1", ("127.0.0.1", 7200), ([1], [2], [3]), 9)]
    assert side.build_meta(_scheduled("r1", 1, blocks), requests).sends == []  # one send per request
    assert side.request_finished(req, blocks) == (True, _to_decode(9))
    assert side.request_finished(req, blocks) == (False, None)


def test_prefill_with_a_bad_decode_address_sends_nothing():
    side = SchedulerSide(ConnectorConfig(), has_state=False)
    req = _request(10, dict(_to_prefill(), kvlink_decode="nowhere"))
    side.on_new_request(req)
    assert side.build_meta(_scheduled("r1", 10, ([0],)), {"r1": req}).sends == []
    assert side.request_finished(req, ([0],)) == (False, None)


# ---------------------------------------------------------------------------- 5. proxy
def test_parse_decode_good():
    d = parse_decode("http://10.0.0.2:8100/=10.0.0.2:7200")
    assert (d.url, d.kv) == ("http://10.0.0.2:8100", ("10.0.0.2", 7200))
    assert parse_decode("https://h=[::1]:1").kv == ("::1", 1)


@pytest.mark.parametrize("text", ["http://h:8100", "h:8100=h:7200", "http://h:8100=h", "http://h:8100=h:x",
                                  "http://h:8100=:7200", "=h:7200", "http://h:8100=h:65536"])
def test_parse_decode_bad(text):
    with pytest.raises(ConfigError):
        parse_decode(text)


# ---------------------------------------------------------------------------- GPU layout (no GPU here)
def test_flash_attention_layout_round_trips_in_place():
    """vLLM's CUDA FlashAttention cache ``[2, blocks, block, kv_heads, head_dim]`` (NHD) is kvlink's
    ``kv_first``: built and carried through the same path (a CPU tensor of that shape; no GPU in CI)."""
    blocks, block = 6, 16
    groups = [(["l0"], _attn_spec(block))]
    src = {"l0": torch.randn(2, blocks, block, HEADS, HEAD_DIM).to(torch.bfloat16)}
    dst = {"l0": torch.zeros(2, blocks, block, HEADS, HEAD_DIM, dtype=torch.bfloat16)}
    a, b = build_layout(src, groups, "llama"), build_layout(dst, groups, "llama")
    assert a.spec.fingerprint == b.spec.fingerprint
    n = 2 * block + 3
    payload = Packer(a.paged).pack(CacheRef([4, 0, 5], n))
    Unpacker(b.paged).unpack(payload, CacheRef([1, 3, 2], n))
    for t in range(n):
        s, d = [4, 0, 5][t // block], [1, 3, 2][t // block]
        assert torch.equal(dst["l0"][:, d, t % block], src["l0"][:, s, t % block])
    assert int((dst["l0"] != 0).sum()) == 2 * n * HEADS * HEAD_DIM  # nothing else written


def test_worker_keeps_no_finished_ids_it_does_not_wait_for():
    """vLLM reports every finished request to the worker each step; the worker keeps only those
    whose send it still waits for (it kept them all: memory grew with every request served)."""
    from kvlink.engine.vllm.worker import WorkerSide

    caches, groups, _ = dense_cache()
    side = WorkerSide(build_layout(caches, groups, "llama"), ConnectorConfig(), listen=False)
    try:
        for step in range(100):
            assert side.transfer_results({f"req-{step}-{i}" for i in range(10)}) == (set(), set(), set())
        assert not side._finished_seen
    finally:
        side.close()


@pytest.mark.skipif(not AMX, reason="only CPUs with AMX tiles use vLLM's AMX cache layout")
def test_amx_bf16_layout_is_refused():
    """bf16 blocks of 32 on an AMX CPU: vLLM's kernel writes its tile layout, which kvlink does not
    read; the connector must refuse it with a typed error, never carry it wrongly."""
    from kvlink.engine.vllm.layout import check_cpu_interior

    with pytest.raises(IncompatibleLayoutError, match="amx"):
        check_cpu_interior(HEADS + 1, 32, HEAD_DIM, torch.bfloat16)
