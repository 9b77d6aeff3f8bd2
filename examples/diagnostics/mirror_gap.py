"""How far a model's delta-rho is from equivariant: the water molecule of
tests/test_guess.py::test_symmetry_averaged_guess and its mirror image through a box plane
(y -> -y); the largest difference between the mirror's prediction and the mirrored
prediction, relative to the largest |delta-rho|, for each symmetry averaging.

    python examples/diagnostics/mirror_gap.py [MODEL] [--passes 1 2 8]
"""
import argparse
import numpy as np
from pyscf import gto, lib
lib.num_threads(1)
from pyscf_densr import hook

ap = argparse.ArgumentParser()
ap.add_argument('model', nargs='?', default=None)
ap.add_argument('--passes', type=int, nargs='+', default=[1, 2, 8])
args = ap.parse_args()
mol = gto.M(atom='O 0 0 0.1; H 0.1 0.75 -0.45; H -0.05 -0.8 -0.5', basis='def2-svp', verbose=0)
mirror = mol.copy()
c = mol.atom_coords()
c[:, 1] *= -1
mirror.set_geom_(c, unit='Bohr')
for n in args.passes:
    d1, _ = hook.predict_delta_rho(mol, mol.RKS().init_guess_by_minao(), args.model, symmetry=n)
    d2, _ = hook.predict_delta_rho(mirror, mirror.RKS().init_guess_by_minao(), args.model,
                                   symmetry=n)
    print('%s, %d pass(es): mirror gap %.2e' % (args.model or 'default model', n,
                                               np.abs(d1[:, ::-1, :] - d2).max() / np.abs(d1).max()))
