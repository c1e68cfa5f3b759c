import pytest


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and a busy 2-core machine makes thread pools spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smoke_model(tmp_path_factory):
    """The whole tiny recipe at its toy scale, run once per session: (model folder, work folder, build result)."""
    import torch

    from cogvx_core.recipes.tiny import TinyRecipe, build

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("smoke-recipe")
    result = build(root / "model", root / "work", TinyRecipe.smoke(), say=lambda m: None)
    torch.set_num_threads(before)
    return root / "model", root / "work", result
