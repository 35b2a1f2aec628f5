"""Small fixtures for the screening tests: two 512x512 holograms and a chain with an untrained classifier.

Plumbing tests use the physics refocus and threshold segmentation (no learned stage decides which
cells are found), so their cell counts can be checked against the ground truth.
"""
import pytest


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    from cellavie_hpc.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("screen") / "sample-a"
    generate_dataset(root, images=2, size=512, parasitemia=0.05, seed=5, workers=1, progress=False,
                     defocus_m=(10e-6, 20e-6))
    return root


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    import keras

    from cellavie_hpc.models.registry import build_model
    from cellavie_hpc.screen.models_dir import ChainSpec, NetworkEntry, save_chain

    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("models")
    spec = ChainSpec(classifier=NetworkEntry(name="classifier", file="classifier.keras", patch=64),
                     infected_threshold=0.5)
    save_chain(root, spec, {"classifier": build_model("classifier", "tiny", 64, 1)})
    return root
