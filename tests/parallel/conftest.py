import pytest

from builders import write_pipeline_folder


@pytest.fixture(scope="session")
def pipeline_folders(tmp_path_factory):
    """{variant: diffusers-format folder of tiny random components}: 5b (3D RoPE) and 2b (additive sin-cos table)."""
    return {v: write_pipeline_folder(tmp_path_factory.mktemp(f"model-{v}"), v) for v in ("5b", "2b")}
