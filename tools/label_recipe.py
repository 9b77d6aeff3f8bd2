"""How far a cheaper label recipe moves the training labels, and what it saves.

    python tools/label_recipe.py ../shared/data --range 400 410 [--guess densr]
        [--density-fit] [--time-reference] [--threads 1]

Relabels stored molecules (default 400-409: the validation range, outside the held-out
450-499) with the recipe of ``densr data --guess G [--density-fit]`` and compares each new
label with the stored one (the reference recipe: minao guess, no density fitting):
|E_new - E_stored| per atom (Hartree) and the NMAE of the new density against the stored one on the
network's fine grid (percent, the measure of the network's own error). Cycles of the new
SCF against the stored ``cycles_minao``; with ``--time-reference`` the reference SCF is run
again beside it for the wall-time ratio. Prints one Markdown row per molecule and a summary
against ``data.LABEL_NMAE_TOLERANCE`` (the energy change is reported, not judged: a
density-fitted energy carries the fitting error, and the labels are densities).
"""
import argparse
import glob
import os
import time

import h5py
import numpy as np
from pyscf import lib

from pyscf_densr import bench, data, grid as grid_mod, hook


def _groups(folder, start, stop):
    for fn in sorted(glob.glob(os.path.join(folder, 'qm9_pbe_def2svp_*.h5'))):
        with h5py.File(fn, 'r') as f:
            for k in sorted(f.keys()):
                if k.isdigit() and start <= int(k) < stop:
                    yield fn, k


def relabel(fn, key, guess, density_fit, time_reference, config):
    with h5py.File(fn, 'r') as f:
        g = f[key]
        mol, dm_ref = data.read_molecule(g)
        e_ref = float(g.attrs['e_tot'])
        cycles_ref = int(g.attrs['cycles_minao'])
        level = dict(xc=f.attrs['xc'], grids_level=int(f.attrs['grids_level']),
                     conv_tol=float(f.attrs['conv_tol']))
    mf = data.make_scf(mol, level['xc'], level['grids_level'], level['conv_tol'], 100, guess,
                       density_fit)
    t0 = time.perf_counter()
    mf.kernel()
    wall = time.perf_counter() - t0
    row = dict(index=int(key), atoms=mol.natm, converged=bool(mf.converged),
               cycles=int(mf.cycles), cycles_ref=cycles_ref, wall=wall,
               dE=float(mf.e_tot) - e_ref)
    box = grid_mod.make_box(mol.atom_coords(), config['spacing'], config['margin']).refine(
        config['upsample'])
    dm_new = mf.make_rdm1()
    row['nmae'] = bench.nmae(grid_mod.eval_density(mol, bench._total(dm_new), box),
                             grid_mod.eval_density(mol, bench._total(dm_ref), box))
    if time_reference:
        ref = data.make_scf(mol, level['xc'], level['grids_level'], level['conv_tol'])
        t0 = time.perf_counter()
        ref.kernel()
        row['wall_ref'] = time.perf_counter() - t0
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('folder', help='folder of qm9_pbe_def2svp_*.h5 shards')
    ap.add_argument('--range', nargs=2, type=int, default=(400, 410), metavar=('START', 'STOP'))
    ap.add_argument('--guess', choices=data.GUESSES, default='densr')
    ap.add_argument('--density-fit', action='store_true')
    ap.add_argument('--time-reference', action='store_true',
                    help='run the reference recipe again for the wall-time ratio')
    ap.add_argument('--threads', type=int, default=1)
    a = ap.parse_args(argv)
    lib.num_threads(a.threads)
    config = hook.load_model().config   # the network's grid; loaded before any timing
    rows = [relabel(fn, k, a.guess, a.density_fit, a.time_reference, config)
            for fn, k in _groups(a.folder, *a.range)]
    if not rows:
        raise SystemExit('no stored molecules in %s with index in [%d, %d)' % (
            a.folder, a.range[0], a.range[1]))
    tol = data.LABEL_NMAE_TOLERANCE
    print('recipe: guess %s%s; reference: minao, no density fitting; tolerance NMAE < %.3f%%'
          % (a.guess, ', density-fitted' if a.density_fit else '', tol))
    cols = '| index | atoms | cycles new (stored minao) | wall new / s |%s |dE| / Eh | NMAE %% |'
    print(cols % (' wall reference / s |' if a.time_reference else ''))
    print('| ---: ' * (6 + bool(a.time_reference)) + '|')
    for r in rows:
        ref = ' %.1f |' % r['wall_ref'] if a.time_reference else ''
        print('| %d | %d | %d (%d) | %.1f |%s %.1e | %.4f |' % (
            r['index'], r['atoms'], r['cycles'], r['cycles_ref'], r['wall'], ref, abs(r['dE']),
            r['nmae']))
    ok = [r['converged'] and r['nmae'] < tol for r in rows]
    print('\n%d molecules; cycles %.2f (stored minao %.2f); max |dE| %.1e Eh per atom; max '
          'NMAE %.4f%%; within tolerance: %d of %d' % (
              len(rows), np.mean([r['cycles'] for r in rows]),
              np.mean([r['cycles_ref'] for r in rows]),
              max(abs(r['dE']) / r['atoms'] for r in rows),
              max(r['nmae'] for r in rows), sum(ok), len(rows)))
    if a.time_reference:
        print('wall time: reference %.1f s, new %.1f s in all (%.2fx)' % (
            sum(r['wall_ref'] for r in rows), sum(r['wall'] for r in rows),
            sum(r['wall_ref'] for r in rows) / sum(r['wall'] for r in rows)))
    return 0 if all(ok) else 1


if __name__ == '__main__':
    raise SystemExit(main())
