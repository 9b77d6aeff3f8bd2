"""Guess time against one SCF cycle of the same SCF, for one molecule, in one process.

    python tools/guess_vs_cycle.py FILE.xyz|SMILES [--charge Q] [--level pbe/sto-3g+df]
                                   [--threads 1] [--log] [--guess minao] [--max-memory MB]
                                   [--parts]

Times ``pyscf_densr.init_guess(mf)`` (the network already loaded), then one Fock build of
the same SCF object at the guess (``mf.get_veff``: J and XC on the SCF's own grids, after
its grids and, with density fitting, the DF tensor the guess left are in place) and one
diagonalisation: what one SCF cycle costs. Prints the guess's time and peak memory as soon
as it is made, then both times. For molecules whose full SCF is too long to benchmark on a
small machine. ``--guess minao`` times PySCF's minao guess instead (the SCF's one-time
direct DF-J set-up, which the densr guess makes and leaves to the SCF, is then made before
the cycle is timed), to measure the cycle alone.
"""
import argparse
import resource
import time

from pyscf import lib

import pyscf_densr
from pyscf_densr import bench, coulomb

import _molecule


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    _molecule.add_arguments(ap, 'pbe/sto-3g+df')
    ap.add_argument('--log', action='store_true', help="the guess's own log (each stage's time)")
    ap.add_argument('--guess', default='densr', choices=('densr', 'minao'))
    ap.add_argument('--parts', action='store_true',
                    help="also time the cycle's J and XC apart (one more cycle's time)")
    ap.add_argument('--max-memory', type=float, default=None,
                    help="mf.max_memory in MB (default PySCF's, 4000)")
    ap.add_argument('--held-memory', type=float, default=None,
                    help="coulomb.HELD_MEMORY, the share of the free memory the guess may "
                         "hold its 3-centre integrals in (default 0.6)")
    ap.add_argument('--held-disk', type=float, default=None,
                    help="coulomb.HELD_DISK, the share of the free disk space the guess may "
                         "hold them in where they do not fit in memory (default 0.5; with "
                         "--held-memory 0, 0 makes whole passes)")
    a = ap.parse_args(argv)
    if a.held_memory is not None:
        coulomb.HELD_MEMORY = a.held_memory
    if a.held_disk is not None:
        coulomb.HELD_DISK = a.held_disk
    mol, level = _molecule.molecule(a)
    mf = bench.make_scf(mol, level)
    if a.max_memory:
        mol.max_memory = mf.max_memory = a.max_memory
        if getattr(mf, 'with_df', None) is not None:
            mf.with_df.max_memory = a.max_memory
    if a.guess == 'densr':
        pyscf_densr.load_model()
    if a.log:
        mf.verbose = 4
    t0 = time.perf_counter()
    made = {}
    if a.guess == 'densr':
        dm = pyscf_densr.init_guess(mf, details=made)
    else:
        dm = mf.get_init_guess(key='minao')
    t1 = time.perf_counter()
    mf.verbose = 0
    print('%s, %s: %d atoms, %d basis functions, %d thread(s), max_memory %.0f MB' % (
        a.xyz, a.level, mol.natm, mol.nao, lib.num_threads(), mf.max_memory))
    print('%s guess %.1f s (%d Fock builds); peak memory %.0f MB' % (
        a.guess, t1 - t0, made.get('fock_builds', 0),
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), flush=True)
    with_df = getattr(mf, 'with_df', None)
    if (a.guess != 'densr' and with_df is not None and with_df._cderi is None
            and not coulomb._scf_needs_k(mf)):
        coulomb.coulomb_engine(mf, None)   # the direct DF-J state (or tensor) the SCF uses
    if getattr(mf, 'grids', None) is not None:
        # as the SCF makes them: with the AO screening masks (non0tab), without which
        # PySCF's XC evaluates every AO at every point
        mf.initialize_grids(mol, dm)
    if a.parts:
        tj = time.perf_counter()
        mf.get_j(mol, dm)
        tx = time.perf_counter()
        if getattr(mf, 'xc', None) is not None:
            mf._numint.nr_vxc(mol, mf.grids, mf.xc, dm, spin=int(getattr(dm, 'ndim', 2) == 3))
        print('SCF cycle parts: J %.1f s, XC %.1f s' % (tx - tj, time.perf_counter() - tx),
              flush=True)
    t2 = time.perf_counter()
    veff = mf.get_veff(mol, dm)
    fock = mf.get_fock(dm=dm, vhf=veff)
    mf.eig(fock, mf.get_ovlp())
    t3 = time.perf_counter()
    ratio = ('; guess / cycle %.2f' % ((t1 - t0) / (t3 - t2))) if a.guess == 'densr' else ''
    print('%s guess %.1f s; SCF grids %.1f s; one SCF cycle (Fock build + '
          'diagonalisation) %.1f s%s; peak memory %.0f MB' % (
              a.guess, t1 - t0, t2 - t1, t3 - t2, ratio,
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


if __name__ == '__main__':
    main()
