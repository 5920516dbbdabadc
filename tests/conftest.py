import pytest
import torch

from tests.hub_server import hub  # noqa: F401  (the `hub` fixture: a Hub stand-in on 127.0.0.1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def tiny_kwargs(**kw):
    """A ViT small enough for tests that take milliseconds."""
    base = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    base.update(kw)
    return base
