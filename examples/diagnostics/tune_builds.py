"""Choose guess_fock_builds on validation molecules (400-449): per molecule, minao's cycles
and, for each number of Fock builds, (cycles, E[P_guess] - E_conv in mEh, guess time in s).
With ``--symmetry 1 8`` every number of builds is run with each symmetry averaging of the
network (``init_guess(symmetry=)``), keyed "BUILDS/sN".

    python examples/diagnostics/tune_builds.py MODEL FIRST LAST [BUILDS ...] [--level pbe/def2-svp]
        [--symmetry N ...]
"""
import argparse, json, time
from pyscf import lib
lib.num_threads(1)
import pyscf_densr
from pyscf_densr import bench

ap = argparse.ArgumentParser()
ap.add_argument('model')
ap.add_argument('first', type=int)
ap.add_argument('last', type=int)
ap.add_argument('builds', type=int, nargs='*', default=[2, 3, 4])
ap.add_argument('--level', default='pbe/def2-svp')
ap.add_argument('--symmetry', type=int, nargs='+', default=[None])
args = ap.parse_args()
net = pyscf_densr.load_model(args.model)
level = bench.parse_level(args.level)
for m in bench.molecules_from_heldout('../shared/data', args.first, args.last):
    mol = bench.build_mol(m, level['basis'])
    ref = bench.make_scf(mol, level); ref.kernel()
    row = {'molecule': m['name'], 'level': args.level, 'minao': ref.cycles}
    for b in args.builds:
        for s in args.symmetry:
            mf = bench.make_scf(mol, level)
            t = time.perf_counter()
            dm = pyscf_densr.init_guess(mf, model=net, fock_builds=b, symmetry=s)
            tg = time.perf_counter() - t
            eg = mf.energy_tot(dm) - ref.e_tot
            mf.kernel(dm)
            assert abs(mf.e_tot - ref.e_tot) < 1e-6, (m['name'], b, s)
            key = str(b) if s is None else '%d/s%d' % (b, s)
            row[key] = (mf.cycles, round(eg * 1e3, 2), round(tg, 2))
    print(json.dumps(row), flush=True)
