import os
import sys
from pathlib import Path

# Triton decides between its CPU interpreter and the compiler when a kernel is defined, i.e. when the
# first test module imports lolachat.kernels: set it before any of them is collected (no GPU in CI).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    """The real default model file (SmolLM2-135M-Instruct Q4_1 GGUF); .ci/run pulls it and sets the variable."""
    path = os.environ.get("LOLACHAT_TEST_GGUF")
    if not path:
        pytest.skip("LOLACHAT_TEST_GGUF is not set (path to SmolLM2-135M-Instruct.Q4_1.gguf)")
    return Path(path)


@pytest.fixture(autouse=True, scope="session")
def _float32_on_cpu():
    """`dtype="auto"` on a CPU is chosen by a timing probe; tests must not depend on machine load."""
    import torch

    from lolachat import engine

    original = engine.faster_cpu_dtype
    engine.faster_cpu_dtype = lambda: torch.float32
    yield
    engine.faster_cpu_dtype = original
