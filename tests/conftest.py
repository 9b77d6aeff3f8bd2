import os

import numpy as np
import pytest
from pyscf import gto

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, '..', '..', 'shared'))

ETHANOL = '''C -0.0484 0.5590 0.0000; C 1.2400 -0.2464 0.0000; O -1.1614 -0.3238 0.0000
H -0.0916 1.2043 0.8858; H -0.0916 1.2043 -0.8858; H 1.3020 -0.8873 0.8836
H 1.3020 -0.8873 -0.8836; H 2.1000 0.4317 0.0000; H -1.9524 0.2134 0.0000'''

WATER = 'O 0 0 0.1173; H 0 0.7572 -0.4692; H 0 -0.7572 -0.4692'


@pytest.fixture(scope='session')
def ethanol():
    return gto.M(atom=ETHANOL, basis='def2-svp', verbose=0)


@pytest.fixture(scope='session')
def shared_dir():
    if not os.path.isdir(os.path.join(SHARED, 'data')):
        pytest.skip('../shared (training data and reference molecules) is not present')
    return SHARED


def cartesian(mol):
    """A copy of ``mol`` (an auxiliary basis, say) with Cartesian functions."""
    cart = mol.copy()
    cart.cart = True
    cart.build(False, False)
    return cart


def random_rotation(seed):
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


@pytest.fixture(autouse=True, scope='session')
def densr_on_small_molecules():
    """The tests exercise the densr guess on small molecules and Hartree-Fock, where the
    package gives PySCF's own guess for speed (hook.MIN_NAO, hook.COVER_HF; tested on their
    own). Session-wide, so that module-scoped fixtures run under it too."""
    from pyscf_densr import hook
    old = hook.MIN_NAO, hook.COVER_HF
    hook.MIN_NAO, hook.COVER_HF = 0, True
    yield
    hook.MIN_NAO, hook.COVER_HF = old
