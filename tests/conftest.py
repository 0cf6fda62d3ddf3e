import os

# No test may touch the network: Hugging Face libraries are told to stay offline,
# and downloads in the examples are tested against local files only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# On NVIDIA GPUs MLX runs float32 matmuls as TF32 by default (about 1e-3 relative
# error), which would hide real mistakes behind the parity tolerances. The tests
# compare full float32. This must be set before mlx is imported, and it reaches the
# scripts run in subprocesses too.
os.environ["MLX_ENABLE_TF32"] = "0"

import mlx.core as mx  # noqa: E402 (after the environment above)
import pytest  # noqa: E402
from helpers import drop_example_modules, example_modules  # noqa: E402


@pytest.fixture
def llama_on_path():
    """llama/'s modules import each other (quantize.py, batch.py, ...) from llama/, as
    `python llama/x.py` finds them; a test file asks for this with

        pytestmark = pytest.mark.usefixtures("llama_on_path")
    """
    with example_modules("llama"):
        yield


@pytest.fixture(autouse=True)
def no_example_module_left_behind():
    """After each test no example module stays importable by a bare name
    (see example_modules)."""
    yield
    drop_example_modules()


@pytest.fixture
def on_cpu():
    """Float32 parity and token-for-token equality are specified on the CPU, where CI
    runs; on a GPU machine the tests that ask for this compute there too."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)
