from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Three 256x256 synthetic holograms (two to train on, one held out), many infected cells."""
    from cellavie_hpc.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("train-data") / "ds"
    generate_dataset(out, images=3, size=256, parasitemia=0.3, seed=1, workers=1, progress=False)
    return out
