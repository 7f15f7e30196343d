"""Shared pytest fixtures."""

import pytest

TINY_SHAPES = {"num_train": 20, "num_val": 5, "num_test": 5, "image_size": 32, "seed": 0}


@pytest.fixture(scope="session")
def tiny_shapes_root(tmp_path_factory):
    """A tiny built-in shapes set (20/5/5 images, 32 px, seed 0), drawn once per test session.

    Treat it as read-only; tests that change files should copy it or generate their own.
    """
    from captioning.data.shapes import generate_shapes_dataset  # here, so collection stays light

    return generate_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", progress=False, **TINY_SHAPES)


@pytest.fixture(autouse=True)
def _forget_hydra():
    """Tests that compose configs register them as the running job's (HydraConfig); don't leak that."""
    yield
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session", autouse=True)
def _hugging_face_offline(tmp_path_factory):
    """Hugging Face datasets read offline, their caches in the session's temporary folder, not the user's home."""
    import os

    home = tmp_path_factory.mktemp("hf-home")
    patched = {"HF_HOME": str(home), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    saved = {key: os.environ.get(key) for key in patched}
    os.environ.update(patched)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
