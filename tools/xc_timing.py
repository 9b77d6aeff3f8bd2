"""One XC build of the guess against PySCF's ``nr_vxc`` of the same matrix on the same grids.

    python tools/xc_timing.py FILE.xyz|SMILES [--level pbe/def2-svp+df] [--grids-level 0] [--charge Q]

The matrix is the aufbau matrix of the core Hamiltonian, tagged with its orbitals (as the
guess's builds are). Times PySCF's ``mf._numint.nr_vxc`` (its second call), the guess's
``potential.xc_potential`` evaluating the AO values, and the same with them kept
(``potential.keep_ao``, the second call after the one that keeps them); prints the largest
difference of the matrices. One thread unless ``--threads``.
"""
import argparse
import time

from pyscf import lib

from pyscf_densr import bench, potential

import _molecule


def _timed(f):
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    _molecule.add_arguments(ap, 'pbe/def2-svp+df')
    ap.add_argument('--grids-level', type=int, default=0)
    a = ap.parse_args(argv)
    mol, level = _molecule.molecule(a)
    mf = bench.make_scf(mol, level)
    grids = potential.guess_grids(mf, a.grids_level)
    mo_e, mo = mf.eig(mf.get_hcore(), mf.get_ovlp())
    occ = mf.get_occ(mo_e, mo)
    dm = lib.tag_array(mf.make_rdm1(mo, occ), mo_coeff=mo, mo_occ=occ)
    spin = int(dm.ndim == 3)
    mf._numint.nr_vxc(mol, grids, mf.xc, dm, spin=spin)
    t_pyscf, (_, _, v_ref) = _timed(lambda: mf._numint.nr_vxc(mol, grids, mf.xc, dm, spin=spin))
    t_loop, (_, v) = _timed(lambda: potential.xc_potential(mf, dm, grids))
    potential.keep_ao(mf, grids)
    potential.xc_potential(mf, dm, grids)
    t_kept, (_, v_kept) = _timed(lambda: potential.xc_potential(mf, dm, grids))
    kept = potential._AO_CACHE.get(grids, {}).get(0 if mf._numint._xc_type(mf.xc) == 'LDA' else 1, [])
    print('%s, %s: %d atoms, %d basis functions, grids level %d (%d points), %d thread(s)'
          % (a.xyz, a.level, mol.natm, mol.nao, a.grids_level, grids.weights.size, a.threads))
    print('nr_vxc %.2f s; guess loop %.2f s; with the AO values kept %.2f s (%.2f GB kept); '
          'largest difference %.1e Eh' % (t_pyscf, t_loop, t_kept,
                                         sum(b[1].nbytes for b in kept) * 1e-9,
                                         max(abs(v - v_ref).max(), abs(v_kept - v_ref).max())))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
