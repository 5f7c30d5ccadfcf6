import os
import sys
from pathlib import Path

import pytest
import torch

from brainrobust.data.synthetic import ensure_synthetic_nsd

# Refuse every connection that would leave the machine, here and in the processes tests start.
NETGUARD = Path(__file__).parent / "netguard"
sys.path.insert(0, str(NETGUARD))
import sitecustomize  # noqa: F401  (installs the guard in this process)

os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NETGUARD), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """The default synthetic NSD twin, written once per test session: (root, truth)."""
    root = tmp_path_factory.mktemp("synthetic_nsd")
    return root, ensure_synthetic_nsd(root)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation, which costs 20x wall time on a
    shared 2-core machine (modules opt in with pytestmark = usefixtures("one_thread"))."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
