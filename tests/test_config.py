"""EngineConfig validation and parse_memory."""

from __future__ import annotations

import pytest
import torch

from loraplex.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig, ServerConfig, parse_memory

CPU = torch.device("cpu")


def test_defaults_are_valid():
    config = EngineConfig()
    assert config.block_size == 16 and config.max_num_seqs == 256
    assert config.resolved_dtype(CPU) is torch.float32
    assert config.kv_cache_bytes(CPU) == DEFAULT_CPU_KV_CACHE_BYTES


@pytest.mark.parametrize(
    "field, value",
    [
        ("dtype", "fp16"),
        ("dtype", "float64"),
        ("dtype", "int8"),
        ("device", "gpu"),
        ("device", "cuda:"),
        ("device", "cuda:x"),
        ("device", "mps"),
        ("device", " cpu"),
        ("block_size", 0),
        ("block_size", -16),
        ("block_size", 12),
        ("block_size", 3),
        ("max_num_seqs", 0),
        ("max_num_seqs", -1),
        ("max_num_batched_tokens", 0),
        ("max_model_len", 1),
        ("kv_cache_memory", "lots"),
        ("kv_cache_memory", "2 GiB of RAM"),
        ("kv_cache_memory", -5),
        ("kv_cache_memory", 0),
        ("kv_cache_memory", 0.0),
    ],
)
def test_bad_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        EngineConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("dtype", "auto"), ("dtype", "float32"), ("dtype", "float16"), ("dtype", "bfloat16"),
        ("device", "auto"), ("device", "cpu"), ("device", "cuda"), ("device", "cuda:1"),
        ("block_size", 1), ("block_size", 8), ("block_size", 32),
        ("max_num_seqs", 1), ("max_model_len", 2), ("kv_cache_memory", "2GiB"), ("kv_cache_memory", 0.9),
    ],
)
def test_good_values_are_accepted(field, value):
    assert getattr(EngineConfig(**{field: value}), field) == value


def test_resolved_dtype():
    assert EngineConfig(dtype="bfloat16").resolved_dtype(CPU) is torch.bfloat16
    assert EngineConfig(dtype="auto").resolved_dtype(torch.device("cuda")) is torch.bfloat16
    assert EngineConfig(dtype="auto").resolved_dtype(CPU) is torch.float32


def test_cuda_without_a_gpu_is_rejected_at_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, wherever this runs
    with pytest.raises(ValueError, match="^device: "):
        EngineConfig(device="cuda").resolved_device()
    assert EngineConfig(device="auto").resolved_device() == CPU


def test_from_options_rejects_unknown_options():
    with pytest.raises(TypeError, match="blocksize"):
        EngineConfig.from_options(blocksize=16)
    assert EngineConfig.from_options(block_size=32).block_size == 32


def test_config_is_frozen():
    config = EngineConfig()
    with pytest.raises(AttributeError):
        config.block_size = 32  # type: ignore[misc]


# -- parse_memory ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("2GiB", 2 * 2**30),
        ("2gib", 2 * 2**30),
        (" 2 GiB ", 2 * 2**30),
        ("512MB", 512 * 10**6),
        ("512MiB", 512 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("0.5GiB", 2**29),
        ("64KiB", 65536),
        ("10kb", 10_000),
        ("3GB", 3 * 10**9),
        ("4096", 4096),
        ("100B", 100),
        (1073741824, 2**30),
        (4096, 4096),
    ],
)
def test_parse_memory_sizes(value, expected):
    result = parse_memory(value)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize("value, expected", [(0.5, 0.5), (0.9, 0.9), (1.0, 1.0), ("0.5", 0.5), ("0.85", 0.85)])
def test_parse_memory_fractions(value, expected):
    result = parse_memory(value)
    assert result == pytest.approx(expected)
    assert type(result) is float


@pytest.mark.parametrize(
    "value",
    ["", "GiB", "lots", "2 GiBs", "2TiB", "2g", "-1GiB", "1e9", "2GiB2", "0.0", "0", -1, 0, 0.0, -0.5, True],
)
def test_parse_memory_rejects_bad_values(value):
    with pytest.raises(ValueError, match="^kv_cache_memory: "):
        parse_memory(value)


@pytest.mark.parametrize("value", ["0GiB", "0MB", "0B", "0.0000001KB"])
def test_parse_memory_rejects_zero_sizes_with_a_unit(value):
    # 0 and 0.0 are rejected ("must be positive"); a size with a unit that comes to 0 bytes must be too.
    with pytest.raises(ValueError, match="^kv_cache_memory: "):
        parse_memory(value)


def test_kv_cache_bytes_on_cpu():
    assert EngineConfig(kv_cache_memory="256MiB").kv_cache_bytes(CPU) == 256 * 2**20
    assert EngineConfig(kv_cache_memory=12345).kv_cache_bytes(CPU) == 12345


@pytest.mark.parametrize("fraction", [0.5, "0.5", 1.0])
def test_kv_cache_fraction_on_cpu_is_rejected(fraction):
    config = EngineConfig(kv_cache_memory=fraction)  # valid in itself: it may run on a GPU
    with pytest.raises(ValueError, match="^kv_cache_memory: .*GPU"):
        config.kv_cache_bytes(CPU)


@pytest.mark.parametrize(("field", "value"), [
    ("timeout_keep_alive", 0), ("timeout_keep_alive", -1.0), ("timeout_keep_alive", float("inf")),
    ("timeout_keep_alive", "5"), ("header_timeout", 0.0), ("header_timeout", float("nan")),
    ("header_timeout", True), ("body_timeout", 0), ("body_timeout", float("inf")),
    ("max_connections", 0), ("max_connections", 8.0), ("max_connections", True),
])
def test_bad_connection_options_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        ServerConfig(**{field: value})


def test_connection_options_accept_fractions_of_a_second():
    config = ServerConfig(timeout_keep_alive=0.5, header_timeout=2, max_connections=1)
    assert (config.timeout_keep_alive, config.header_timeout, config.max_connections) == (0.5, 2, 1)


def test_config_errors_are_typed_with_their_field():
    from loraplex.errors import ErrorKind, LoraplexError

    for make, field in ((lambda: EngineConfig(block_size=3), "block_size"),
                        (lambda: EngineConfig(kv_cache_memory="lots"), "kv_cache_memory"),
                        (lambda: ServerConfig(max_waiting=2, max_choices=4), "max_waiting")):
        with pytest.raises(LoraplexError) as info:
            make()
        assert info.value.field == field and info.value.kind is ErrorKind.INVALID
        assert str(info.value).startswith(f"{field}: ")
