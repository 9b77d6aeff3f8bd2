"""The guess's molecular grids (levels 0 and 1) and the SCF's own, built and timed.

    python tools/grids_timing.py FILE.xyz|SMILES [--level pbe/sto-3g+df] [--charge Q] [--scf]

Builds ``potential.guess_grids`` at levels 0 and 1 (the guess's coarse grids and those of
its corrected builds) and, with ``--scf``, the SCF's ``mf.grids`` (level 3 by default) as
the SCF makes them (with the AO screening masks); prints points and seconds of each. The
Becke partition makes most of the time. One thread unless ``--threads``.
"""
import argparse
import time

from pyscf_densr import bench, potential

import _molecule


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    _molecule.add_arguments(ap, 'pbe/sto-3g+df')
    ap.add_argument('--scf', action='store_true', help="also the SCF's own grids")
    a = ap.parse_args(argv)
    mol, level = _molecule.molecule(a)
    mf = bench.make_scf(mol, level)
    print('%s, %s: %d atoms' % (a.xyz, a.level, mol.natm), flush=True)
    for lv in (0, 1):
        t0 = time.perf_counter()
        g = potential.guess_grids(mf, lv)
        print('guess grids level %d: %d points, %.1f s' % (lv, g.weights.size,
                                                         time.perf_counter() - t0), flush=True)
    if a.scf:
        t0 = time.perf_counter()
        mf.grids.build(with_non0tab=True)
        print("SCF grids level %d: %d points, %.1f s" % (mf.grids.level, mf.grids.weights.size,
                                                       time.perf_counter() - t0))


if __name__ == '__main__':
    main()
