"""EngineConfig: every engine option, validated once."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.errors import invalid

if TYPE_CHECKING:  # torch is imported where a device or dtype is resolved, so that `loraplex --help` needs none
    import torch

KERNEL_BACKENDS = ("auto", "torch", "triton")
LOAD_FORMATS = ("auto", "dummy")  # dummy: random weights of the checkpoint's shapes, none read (benchmarks)
DTYPES = ("float32", "float16", "bfloat16")  # names of torch dtypes
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
DEFAULT_GPU_KV_CACHE_FRACTION = 0.85
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20,
               "gib": 1 << 30}


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # checkpoint directory; None = the demo model in data_dir
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    kernel_backend: str = "auto"  # auto (triton on CUDA, torch elsewhere) | torch | triton (interpreted on the CPU)
    load_format: str = "auto"  # auto: the checkpoint's weights | dummy: random weights of config.json's shapes
    max_model_len: int | None = None  # prompt + output tokens; None = the model's own limit
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    block_size: int = 16
    kv_cache_memory: str | int | float | None = None  # bytes ("4GiB"), or a fraction of free GPU memory
    enable_prefix_caching: bool = True
    max_loras: int = 8  # adapter slots on the device = distinct adapters in one batch; 0 = no adapters
    max_lora_rank: int = 16
    max_cpu_adapters: int = 64  # parsed adapters kept in host memory
    max_compositions: int = 64  # per-request compositions kept registered (least recently used dropped)
    max_sparse_density: float = 0.05  # sparse adapter parts: nnz / (out·in), per module and over the adapter
    max_sparse_memory: str | int = "1GiB"  # device pool for the slots' sparse parts; 0 = no sparse adapters
    seed: int = 0
    threads: int | None = None  # torch's CPU threads; None = every core this process may use (engine/threads.py)
    chat_template: str | None = None  # a Jinja file that replaces the model's chat template
    served_model_name: str | None = None
    data_dir: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            optional = value is None and "None" in f.type
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if f.type in ("int", "int | None") and not optional and not is_int:
                raise invalid(f.name, f"must be an integer, got {value!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise invalid("dtype", f"{self.dtype!r} is not one of auto, {', '.join(DTYPES)}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise invalid("kernel_backend", f"{self.kernel_backend!r} is not one of {', '.join(KERNEL_BACKENDS)}")
        if self.load_format not in LOAD_FORMATS:
            raise invalid("load_format", f"{self.load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise invalid("device", f"{self.device!r} must be auto, cpu, cuda or cuda:N")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_lora_rank", "max_cpu_adapters",
                     "max_compositions"):
            if getattr(self, name) < 1:
                raise invalid(name, f"must be at least 1, got {getattr(self, name)}")
        if self.max_loras < 0:
            raise invalid("max_loras", f"must be 0 (no adapters) or more, got {self.max_loras}")
        if self.max_cpu_adapters < self.max_loras:
            raise invalid("max_cpu_adapters", f"must be at least max_loras ({self.max_loras}), "
                          f"got {self.max_cpu_adapters}")
        if self.block_size & (self.block_size - 1):
            raise invalid("block_size", f"must be a power of two, got {self.block_size}")
        density = self.max_sparse_density
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise invalid("max_sparse_density", f"must be in (0, 1], got {density!r}")
        self.sparse_memory_bytes()
        if self.threads is not None and self.threads < 1:
            raise invalid("threads", f"must be at least 1, got {self.threads}")
        if self.chat_template is not None and not Path(self.chat_template).expanduser().is_file():
            raise invalid("chat_template", f"{self.chat_template} is not a file; give a Jinja chat template file")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise invalid("max_model_len", f"must be at least 2, got {self.max_model_len}")
        if self.kv_cache_memory is not None:
            parse_memory(self.kv_cache_memory)

    @classmethod
    def from_options(cls, **options) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**options)

    def resolved_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise invalid("device", "cuda was asked for but torch sees no CUDA device; use --device cpu")
        return device

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir or os.environ.get("LORAPLEX_HOME") or Path.home() / ".cache" / "loraplex")

    def sparse_memory_bytes(self) -> int:
        """Bytes of the sparse pool (0: none)."""
        value = self.max_sparse_memory
        if value in (0, "0"):
            return 0
        amount = parse_memory(value, "max_sparse_memory")
        if isinstance(amount, float):
            raise invalid("max_sparse_memory", f"must be a size such as 512MiB, or 0; got {value!r}")
        return amount

    def kv_cache_is_share(self, device: torch.device) -> bool:
        """Whether the KV cache is a share of free GPU memory (the default on CUDA), not a size."""
        if self.kv_cache_memory is None:
            return device.type == "cuda"
        return isinstance(parse_memory(self.kv_cache_memory), float)

    def kv_cache_bytes(self, device: torch.device) -> int:
        """Bytes for the KV cache: as given, or a share of the device's free memory."""
        value = self.kv_cache_memory
        if value is None:
            value = DEFAULT_GPU_KV_CACHE_FRACTION if device.type == "cuda" else DEFAULT_CPU_KV_CACHE_BYTES
        amount = parse_memory(value)
        if isinstance(amount, float):
            if device.type != "cuda":
                raise invalid("kv_cache_memory", "a fraction applies to GPU memory only; on the CPU give "
                              "bytes, e.g. 2GiB")
            import torch

            free, _ = torch.cuda.mem_get_info(device)
            return int(free * amount)
        return amount


@dataclass(frozen=True)
class ServerConfig:
    """Options of `loraplex serve` beyond the engine's."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # inference needs `Authorization: Bearer <api_key>`
    admin_key: str | None = None  # adapter uploads and deletes need this key instead
    max_adapter_size: str | int = "1GiB"  # one upload, all files together, uncompressed
    max_body_size: str | int = "16MiB"  # any other request body
    max_waiting: int = 4096  # queued sequences; beyond, requests get 429
    max_choices: int = 64  # sequences one request may start (prompts x n)
    allowed_local_adapter_dir: str | None = None  # what /v1/load_lora_adapter may read
    shutdown_grace: float = 30.0  # seconds in-flight requests get to finish on SIGTERM
    metrics_max_adapters: int = 32  # the most requested adapters get their own metrics label; others `other`
    # Connections. An idle keep-alive connection is closed after timeout_keep_alive seconds (uvicorn's
    # default); a request's headers (a few hundred bytes, one packet for any real client) must all arrive
    # within header_timeout seconds of the connection opening or of their first byte, so a client that
    # trickles them (slowloris) or sends nothing is dropped; beyond max_connections open connections a new
    # one is answered 503 and closed at once, so idle connections cannot use up the file descriptors.
    # A request body must keep arriving: at most body_timeout seconds between its chunks (a request whose
    # body stalls is answered 408 and its connection closed).
    timeout_keep_alive: float = 5.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1024
    # CORS: origins whose browser pages may call the API ("*" for any); none by default (no CORS headers)
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535 or isinstance(self.port, bool):
            raise invalid("port", f"must be in 0..65535, got {self.port!r}")
        for name in ("timeout_keep_alive", "header_timeout", "body_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise invalid(name, f"must be a positive number of seconds, got {value!r}")
        if isinstance(self.max_connections, bool) or not isinstance(self.max_connections, int):
            raise invalid("max_connections", f"must be an integer, got {self.max_connections!r}")
        for name in ("max_waiting", "max_choices", "max_connections"):
            if getattr(self, name) < 1:
                raise invalid(name, f"must be at least 1, got {getattr(self, name)}")
        if self.max_waiting < self.max_choices:
            raise invalid("max_waiting", f"{self.max_waiting} is below max_choices ({self.max_choices}), so a "
                          "request of max_choices sequences could never be queued; raise it or lower max_choices")
        if self.metrics_max_adapters < 0:
            raise invalid("metrics_max_adapters", f"must be 0 or more, got {self.metrics_max_adapters}")
        if self.shutdown_grace < 0:
            raise invalid("shutdown_grace", f"must be 0 or more seconds, got {self.shutdown_grace}")
        for name in ("api_key", "admin_key"):
            key = getattr(self, name)
            if key is not None and (len(key) < 8 or not key.isprintable() or " " in key):
                raise invalid(name, "use at least 8 printable characters without spaces")
        for name in ("max_adapter_size", "max_body_size"):
            parse_size(getattr(self, name), name)
        origins = self.allowed_origins
        if not isinstance(origins, tuple) or not all(
                isinstance(o, str) and (o == "*" or re.fullmatch(r"https?://[^/\s]+", o)) for o in origins):
            raise invalid("allowed_origins", f"must be origins such as https://app.example.com (scheme and host, "
                          f"no path) or *, got {self.allowed_origins!r}")

    @property
    def max_adapter_bytes(self) -> int:
        return parse_size(self.max_adapter_size, "max_adapter_size")

    @property
    def max_body_bytes(self) -> int:
        return parse_size(self.max_body_size, "max_body_size")


def parse_size(value: str | int, field: str) -> int:
    """'512MiB' / '2GB' / 1048576 -> bytes."""
    amount = parse_memory(value, field)
    if isinstance(amount, float):
        raise invalid(field, f"{value!r} is a fraction; give a size in bytes, e.g. 512MiB")
    return amount


def parse_memory(value: str | int | float, field: str = "kv_cache_memory") -> int | float:
    """'2GiB' / '512MB' / 1073741824 -> bytes (int); 0.9 -> a fraction (float in (0, 1])."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise invalid(field, f"{value!r} is not a size; write e.g. 2GiB, 512MB, or 0.9")
        number = float(match.group(1)) * _SIZE_UNITS[unit]
        if unit == "" and number <= 1:
            return _fraction(number, field)
        if number < 1:
            raise invalid(field, f"{value!r} comes to less than one byte")
        return int(number)
    if isinstance(number, float) and number <= 1:
        return _fraction(number, field)
    if number < 1:
        raise invalid(field, f"must be positive, got {value!r}")
    return int(number)


def _fraction(number: float, field: str) -> float:
    if not 0 < number <= 1:
        raise invalid(field, f"a fraction must be in (0, 1], got {number}")
    return float(number)
