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
