"""Where the densr guess time goes, and what the 3-centre route costs.

    python examples/diagnostics/profile_guess.py [--index 450 | --xyz FILE --charge Q]
        [--level pbe/def2-svp] [--fock-builds N ...] [--route incore direct] [--cprofile]
        [--repeat 2]

For each Fock-build count and 3-centre route ('incore': (mu nu|k) held in memory, the default
where it fits; 'direct': one screened pass per fit and J build, the large-system route),
prints the guess time (best of ``--repeat`` after a warm-up, one thread; ``--repeat 1``: one
guess each and no warm-up, for large systems). --cprofile prints the
cProfile of the first setting instead. Run from the repository root.
"""
import argparse, cProfile, pstats, time
from pyscf import lib
lib.num_threads(1)
import pyscf_densr
from pyscf_densr import bench, project

ap = argparse.ArgumentParser()
ap.add_argument('--index', type=int, default=450)
ap.add_argument('--level', default='pbe/def2-svp')
ap.add_argument('--fock-builds', type=int, nargs='*', default=[None])
ap.add_argument('--route', nargs='*', default=['incore'], choices=['incore', 'direct'])
ap.add_argument('--cprofile', action='store_true')
ap.add_argument('--xyz')
ap.add_argument('--charge', type=int, default=0)
ap.add_argument('--repeat', type=int, default=2)
args = ap.parse_args()
level = bench.parse_level(args.level)
if args.xyz:
    m = bench.molecules_from_xyz([args.xyz], charge=args.charge)[0]
else:
    m = bench.molecules_from_heldout('../shared/data', args.index, args.index + 1, limit=1)[0]
mol = bench.build_mol(m, level['basis'])
mf = bench.make_scf(mol, level)
aux_coulomb = project._aux_coulomb


def guess(builds, route):
    # the direct route forced for the guess alone: no memory for the integrals
    project._aux_coulomb = (aux_coulomb if route == 'incore' else
                            lambda mol, auxmol, max_memory=None: aux_coulomb(mol, auxmol, 0))
    try:
        return pyscf_densr.init_guess(mf, fock_builds=builds)
    finally:
        project._aux_coulomb = aux_coulomb


if args.repeat > 1:
    guess(args.fock_builds[0], args.route[0])   # warm-up: model load, grids
if args.cprofile:
    cProfile.run('guess(args.fock_builds[0], args.route[0])', '/tmp/prof.out')
    pstats.Stats('/tmp/prof.out').sort_stats('cumtime').print_stats(30)
else:
    print('%s, %s (%d atoms, nao %d), one thread' % (m['name'], args.level, mol.natm, mol.nao))
    print('| Fock builds | 3-centre route | guess / s |')
    print('| ---: | --- | ---: |')
    for b in args.fock_builds:
        for r in args.route:
            ts = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                guess(b, r)
                ts.append(time.perf_counter() - t)
            print('| %s | %s | %.2f |' % (b or 'model default', r, min(ts)), flush=True)
