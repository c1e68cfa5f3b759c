import pytest

from builders import write_pipeline_folder


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    """model_folder(variant) -> a diffusers-format folder of tiny random components (made once per session)."""
    made = {}

    def get(variant: str = "5b"):
        if variant not in made:
            made[variant] = write_pipeline_folder(tmp_path_factory.mktemp(f"model-{variant}"), variant)
        return made[variant]

    return get


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models here gain nothing from threads, and a busy 2-core machine makes thread pools spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
