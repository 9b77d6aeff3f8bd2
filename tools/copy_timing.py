"""The guess's screened 3-centre copy made two ways, for part of the fitting basis.

    python tools/copy_timing.py FILE.xyz|SMILES [--level pbe/sto-3g+df] [--charge Q] [--shells 300]

For the first ``--shells`` auxiliary shells of the SCF's fitting basis: the integrals of
all shell pairs at once (``mol.intor('int3c2e', aosym='s2ij')``) and then the kept pairs
picked out, against the blocks of :func:`coulomb._pair_tiles`, which skip the pairs the
copy leaves out (below ``coulomb.HELD_TOL``: what ``coulomb.AuxCoulomb`` does). Prints
both times and the largest difference (zero: the same integrals). One thread unless
``--threads``.
"""
import argparse
import time

import numpy as np
from pyscf import df, gto

from pyscf_densr import coulomb

import _molecule


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    _molecule.add_arguments(ap, 'pbe/sto-3g+df')
    ap.add_argument('--shells', type=int, default=300)
    a = ap.parse_args(argv)
    mol, level = _molecule.molecule(a)
    aux = df.addons.make_auxmol(mol, df.addons.make_auxbasis(mol))
    q_aux = np.sqrt(abs(aux.intor('int2c2e', hermi=1).diagonal()))
    keep, npair = coulomb._held_pairs(mol, coulomb._pair_schwarz(mol), q_aux.max())
    pairs = coulomb._pair_positions(mol, keep)
    nb, a1 = mol.nbas, min(a.shells, aux.nbas)
    fake = mol + aux
    t0 = time.perf_counter()
    whole = fake.intor('int3c2e', aosym='s2ij', shls_slice=(0, nb, 0, nb, nb, nb + a1))
    whole = whole.T[:, pairs].astype(np.float32)
    t1 = time.perf_counter()
    intor = fake._add_suffix('int3c2e')
    loc = gto.moleintor.make_loc(fake._bas, intor)
    opt = gto.moleintor.make_cintopt(fake._atm, fake._bas[:nb], fake._env, intor)
    tiled = np.empty_like(whole)
    for i0, i1, j0, j1, sel, cols in coulomb._pair_tiles(mol, keep, pairs):
        b = gto.moleintor.getints3c(intor, fake._atm, fake._bas, fake._env,
                                    (i0, i1, j0, j1, nb, nb + a1), 1, 's1', loc, opt)
        tiled[:, cols] = b.reshape(-1, whole.shape[0], order='F')[sel].T
    t2 = time.perf_counter()
    print('%s, %s: %d atoms, %d basis functions, %d fitting functions (%d of them here), '
          '%d%% of the pairs kept, %d thread(s)'
          % (a.xyz, a.level, mol.natm, mol.nao, aux.nao, whole.shape[0],
             round(100 * npair / (mol.nao * (mol.nao + 1) / 2)), a.threads))
    print('all pairs %.2f s; kept pairs in blocks %.2f s; largest difference %.1e'
          % (t1 - t0, t2 - t1, abs(tiled - whole).max()))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
