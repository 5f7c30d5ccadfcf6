import pytest

from brainrobust.data.synthetic import ensure_synthetic_nsd


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """The default synthetic NSD twin, written once per test session: (root, truth)."""
    root = tmp_path_factory.mktemp("synthetic_nsd")
    return root, ensure_synthetic_nsd(root)
