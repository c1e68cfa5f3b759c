import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


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
