"""SCF cycles against the number of Fock builds inside the densr guess, one molecule at a time.

    python tools/builds_scan.py --heldout ../shared/data --range 410 420 [--level pbe/def2-svp]
    python tools/builds_scan.py --smiles-file docs/bench/size_scan_drugs.smi --level pbe/def2-svp+df
    python tools/builds_scan.py ... --builds 4 --refine 0 12
    python tools/builds_scan.py ... --level b3lyp/def2-svp --builds 4 --rounds 0 1 2 3
    python tools/builds_scan.py ... --builds 4 --refine 12 --refine-tol 1e-4 3e-4

For each molecule: minao's SCF (the reference energy and cycles), then the densr guess with
``mf.densr_fock_builds`` = 1, 2, ... (``--builds``), ``mf.densr_refine_builds`` = each of
``--refine`` (default 0: the coarse builds alone) and, for methods with exact exchange,
``builds.EXCHANGE_ROUNDS`` = each of ``--rounds`` (default the package's; recorded as 0
where the method has none), ``builds.REFINE_TOL`` and ``REFINE_TOL_EXCHANGE`` = each of
``--refine-tol`` (default the package's, recorded as 0), and its SCF. One CSV row per run,
with the Fock builds the guess made (``--csv``, resumable). How the Fock-build policy of a
route is chosen: the cycles each further build saves against what it costs on that route
(docs/method.md, steps 7-8).
"""
import argparse
import csv
import os
import time

from pyscf import lib

import pyscf_densr
from pyscf_densr import bench, builds
from pyscf_densr.potential import _exchange_coeffs

TOLS = builds.REFINE_TOL, builds.REFINE_TOL_EXCHANGE
FIELDS = ('molecule', 'level', 'natm', 'nao', 'guess', 'builds', 'refine', 'rounds', 'cycles',
          'converged', 'e_tot', 'de', 'guess_time', 'scf_time', 'refine_tol', 'fock_builds')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--heldout', metavar='DIR')
    ap.add_argument('--range', nargs=2, type=int, default=(410, 420))
    ap.add_argument('--smiles-file')
    ap.add_argument('--level', default='pbe/def2-svp')
    ap.add_argument('--builds', nargs='+', type=int, default=(1, 2, 3, 4))
    ap.add_argument('--refine', nargs='+', type=int, default=(0,),
                    help='densr_refine_builds of each run (0: none)')
    ap.add_argument('--rounds', nargs='+', type=int, default=(builds.EXCHANGE_ROUNDS,),
                    help='builds.EXCHANGE_ROUNDS of each run (methods with exact exchange)')
    ap.add_argument('--refine-tol', nargs='+', type=float, default=None,
                    help='builds.REFINE_TOL and REFINE_TOL_EXCHANGE of each run (default the '
                         'package\'s)')
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--csv', default='builds_scan.csv')
    a = ap.parse_args(argv)
    lib.num_threads(a.threads)
    if a.heldout:
        mols = bench.molecules_from_heldout(a.heldout, *a.range)
    else:
        lines = [ln.split() for ln in open(a.smiles_file) if ln.strip() and ln[0] != '#']
        mols = bench.molecules_from_smiles([ln[0] for ln in lines],
                                           names=[ln[1] if len(ln) > 1 else None for ln in lines])
    level = bench.parse_level(a.level)
    done, fields = {}, FIELDS
    if os.path.exists(a.csv):
        with open(a.csv, newline='') as f:
            rows = csv.DictReader(f)
            fields = tuple(rows.fieldnames or FIELDS)
            # files written before the last two columns: resumed at the package's tolerance
            if fields not in (FIELDS, FIELDS[:-2]) or (fields != FIELDS and a.refine_tol):
                raise SystemExit('%s has other columns than %s' % (a.csv, ', '.join(FIELDS)))
            done = {(r['molecule'], r['guess'], r['builds'], r['refine'], r['rounds'],
                     r.get('refine_tol', '0')): r for r in rows}
    out = open(a.csv, 'a', newline='')
    w = csv.DictWriter(out, fields, extrasaction='ignore')
    if not done:
        w.writeheader()
    pyscf_densr.load_model()
    for m in mols:
        mol = bench.build_mol(m, level['basis'])
        ref = done.get((m['name'], 'minao', '0', '0', '0', '0'))
        e_ref = float(ref['e_tot']) if ref else None
        exact = any(abs(c) > 1e-14 for c in _exchange_coeffs(bench.make_scf(mol, level))[1:])
        runs = [('minao', 0, 0, 0, 0)] + [('densr', k, n, r if exact else 0, t)
                                          for k in a.builds for n in a.refine
                                          for r in (a.rounds if exact else (0,))
                                          for t in ((a.refine_tol or (0,)) if n else (0,))]
        for guess, k, n, r, t in runs:
            if (m['name'], guess, str(k), str(n), str(r), '%g' % t) in done:
                continue
            mf = bench.make_scf(mol, level)
            t0 = time.perf_counter()
            if guess == 'minao':
                dm0 = mf.get_init_guess(key='minao')
            else:
                mf.densr_fock_builds, mf.densr_refine_builds = k, n
                builds.EXCHANGE_ROUNDS = r
                builds.REFINE_TOL, builds.REFINE_TOL_EXCHANGE = (t, t) if t else TOLS
                made = {}
                dm0 = pyscf_densr.init_guess(mf, fallback='error', details=made)
            t1 = time.perf_counter()
            mf.kernel(dm0)
            t2 = time.perf_counter()
            if guess == 'minao':
                e_ref = mf.e_tot
            row = dict(molecule=m['name'], level=a.level, natm=mol.natm, nao=mol.nao,
                       guess=guess, builds=k, refine=n, rounds=r, cycles=mf.cycles,
                       converged=mf.converged,
                       e_tot='%.10f' % mf.e_tot, de='%.2e' % (mf.e_tot - e_ref),
                       guess_time='%.1f' % (t1 - t0), scf_time='%.1f' % (t2 - t1),
                       refine_tol='%g' % t,
                       fock_builds=made.get('fock_builds', 0) if guess == 'densr' else 0)
            w.writerow(row)
            out.flush()
            print(' '.join('%s=%s' % kv for kv in row.items()), flush=True)


if __name__ == '__main__':
    main()
