import pytest


@pytest.fixture(scope="session")
def qe_checkpoint(tmp_path_factory, random_model):
    """A tiny same-size stage-1 checkpoint file for CLI runs."""
    from vrestore.models import save

    path = tmp_path_factory.mktemp("model") / "qe.safetensors"
    save(random_model("basicvsrpp_c16n2_x1", noise=0.01), path)
    return path
