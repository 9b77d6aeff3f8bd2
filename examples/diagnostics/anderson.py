"""The second Fock build by hand: cycles from the one-build guess (damped 0.85 and undamped),
from fixed combinations F1 + w (F2 - F1), and from the Anderson combination that
project.anderson_step returns, with beta and the residual norms.

    python examples/diagnostics/anderson.py [N] [FIRST] [MODEL] [model,exact] [W,W,...]

Validation molecules FIRST.. (default 400, N of them, default 3), MODEL (default: the default
model), which delta-rho (the model's, the exact one or both), the fixed weights w (default 0.3).
F1 = h + v[rho_pred] (level-0 guess grids, DF-J), P1 its aufbau matrix, F2 = h + v[rho[P1]].
"""
import sys
import time

import numpy as np

import pyscf_densr
from pyscf_densr import bench, model, project

import _validation

n = int(sys.argv[1]) if len(sys.argv) > 1 else 3
first = int(sys.argv[2]) if len(sys.argv) > 2 else 400
name = sys.argv[3] if len(sys.argv) > 3 else model.DEFAULT_MODEL
which = sys.argv[4].split(',') if len(sys.argv) > 4 else ['model']
WS = [float(w) for w in sys.argv[5].split(',')] if len(sys.argv) > 5 else [0.3]
net = pyscf_densr.load_model(name)
tot = {}
for c in _validation.cases(net, n, first):
    mol, dm_sad, e_ref = c.mol, c.dm_sad, c.e_ref
    res = {'minao': (c.mf.cycles, None)}
    for dname in which:
        delta = c.pred if dname == 'model' else c.exact
        mf2 = bench.make_scf(mol, c.level)
        s1e, h1e = mf2.get_ovlp(), mf2.get_hcore()
        auxmol = project.make_auxmol(mol, net.config.get('auxbasis') or project.DEFAULT_AUXBASIS)
        nsad = float(np.einsum('ij,ji->', dm_sad, s1e))
        charge = mol.nelectron - nsad
        grid = c.ref['grid']
        cc = project.fit_delta_rho(auxmol, delta, grid, charge=charge)
        q = charge - float(np.sum(delta, dtype=np.float64)) * grid.dv
        g0 = project.guess_grids(mf2, 0)
        v1 = project.local_potential(mf2, dm_sad, auxmol, cc, g0, 'df', (delta, grid, 1 + q / nsad))
        x = project.orthogonalizer(mf2, s1e)
        p1 = project.density_matrix_from_veff(mf2, v1, dm_sad, h1e, s1e, x)
        v2 = project.local_potential(mf2, np.asarray(p1), auxmol, None, g0, 'df', None)

        def run(dm0, key):
            mf3 = bench.make_scf(mol, c.level)
            eg = mf3.energy_tot(dm0) - e_ref
            mf3.kernel(dm0)
            assert abs(mf3.e_tot - e_ref) < 1e-6, key
            res[key] = (mf3.cycles, eg)

        run(project.mix_with_sad(mf2, p1, dm_sad, 0.85, s1e, x), dname + '/one build, 0.85')
        run(p1, dname + '/one build')
        for w in WS:
            p2 = project.density_matrix_from_veff(mf2, (1 - w) * v1 + w * v2, dm_sad, h1e, s1e, x)
            run(p2, dname + '/F1+%.2f(F2-F1)' % w)
        t0 = time.perf_counter()
        p2, coeffs = project.anderson_step(mf2, v1, p1, dm_sad, auxmol, cc, g0, None, h1e, s1e, x)
        beta = coeffs[1]
        res[dname + '/Anderson %.3f, %.2f s' % (beta, time.perf_counter() - t0)] = None
        run(p2, dname + '/Anderson')
    print(c.m['name'], ' '.join('%s:%d(%s)' % (k, v[0], '' if v[1] is None else '%.4f' % v[1])
                                for k, v in res.items() if v is not None),
          ' '.join(k for k, v in res.items() if v is None), flush=True)
    for k, v in res.items():
        if v is not None:
            tot[k] = tot.get(k, 0) + v[0]
print('cycles summed:', tot)
