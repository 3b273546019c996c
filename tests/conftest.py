import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    """The real default model file (SmolLM2-135M-Instruct Q4_1 GGUF); .ci/run pulls it and sets the variable."""
    path = os.environ.get("LOLACHAT_TEST_GGUF")
    if not path:
        pytest.skip("LOLACHAT_TEST_GGUF is not set (path to SmolLM2-135M-Instruct.Q4_1.gguf)")
    return Path(path)
