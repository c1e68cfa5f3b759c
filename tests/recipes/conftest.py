import pytest


@pytest.fixture(scope="session")
def smoke_model(tmp_path_factory):
    """The whole tiny recipe at its toy scale, run once per session: (model folder, work folder, build result)."""
    from cogvx_core.recipes.tiny import TinyRecipe, build

    root = tmp_path_factory.mktemp("smoke-recipe")
    result = build(root / "model", root / "work", TinyRecipe.smoke(), say=lambda m: None)
    return root / "model", root / "work", result
