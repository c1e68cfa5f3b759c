import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The test models are tiny: one thread is fastest, and several OpenMP threads spin-wait badly whenever anything
# else shares the CPU (a tiled VAE test: 0.4 s on one thread, 17 s on two under load). Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
TEST_THREADS = int(os.environ.get("COGVX_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _test_threads():
    """Every test starts with the configured thread count, whatever an earlier one (a benchmark command run
    in-process) set."""
    torch.set_num_threads(TEST_THREADS)
    yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_caption_cache():
    """Caption upsampling caches results per process; each test starts without them."""
    caption = sys.modules.get("cogvx_core.caption")
    if caption is not None:
        caption.clear_cache()
    yield
    if caption is not None:
        caption.clear_cache()


@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs(size="512k", read_only=False) -> a freshly mounted small tmpfs folder, to fill up (a full disk) or to
    refuse writes (read-only). Needs root, as CI has; the test skips and says why when mounting fails."""
    import subprocess

    mounted = []

    def mount(size: str = "512k", read_only: bool = False) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        options = f"{'ro,' if read_only else ''}size={size}"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)
