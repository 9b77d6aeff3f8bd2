"""The guess's molecular grids (levels 0 and 1) and the SCF's, built and timed.

    python tools/grids_timing.py FILE.xyz|SMILES [--level pbe/sto-3g+df] [--charge Q]
                                 [--becke] [--scf]

Builds ``potential.guess_grids`` at levels 0 and 1 (the guess's coarse grids and those of
its corrected builds, under the local LKO partition, ``potential.lko_partition``); with
``--becke`` the same levels as PySCF builds them for an SCF (Becke's partition over all
atom pairs, ``mf.grids``' settings); with ``--scf`` the SCF's own ``mf.grids`` (level 3 by
default). Prints points and seconds of each (with the AO screening masks). One thread
unless ``--threads``.
"""
import argparse
import time

from pyscf_densr import bench, potential

import _molecule


def _timed(label, build):
    t0 = time.perf_counter()
    g = build()
    print('%s: %d points, %.1f s' % (label, g.weights.size, time.perf_counter() - t0),
          flush=True)


def _scf_grids(mf, level):
    """``guess_grids`` with the SCF's partition (as below ``LKO_MIN_ATOMS`` atoms)."""
    lko_min = potential.LKO_MIN_ATOMS
    potential.LKO_MIN_ATOMS = mf.mol.natm + 1
    try:
        return potential.guess_grids(mf, level)
    finally:
        potential.LKO_MIN_ATOMS = lko_min


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    _molecule.add_arguments(ap, 'pbe/sto-3g+df')
    ap.add_argument('--becke', action='store_true',
                    help="also levels 0 and 1 with the SCF's partition")
    ap.add_argument('--scf', action='store_true', help="also the SCF's own grids")
    a = ap.parse_args(argv)
    mol, level = _molecule.molecule(a)
    mf = bench.make_scf(mol, level)
    print('%s, %s: %d atoms' % (a.xyz, a.level, mol.natm), flush=True)
    for lv in (0, 1):
        _timed('guess grids level %d' % lv, lambda: potential.guess_grids(mf, lv))
        if a.becke:
            _timed("SCF's partition level %d" % lv, lambda: _scf_grids(mf, lv))
    if a.scf:
        _timed('SCF grids level %d' % mf.grids.level,
               lambda: mf.grids.build(with_non0tab=True))


if __name__ == '__main__':
    main()
