"""Which potential carries the network's error to the cycles: the guess Fock matrix built
with the Coulomb potential of one delta-rho (the model's or the exact one) and the XC
potential of the other, undamped (mix 1) on level-1 guess grids (the oracle's settings).

    python examples/diagnostics/coulomb_xc_split.py [N] [FIRST]

Validation molecules FIRST.. (default 400, N of them, default 5), the default model, PBE/def2-SVP.
Prints per molecule, then summed: cycles and E[P_guess] - E_conv (Eh) for each (J, XC) pair,
and the error of the model's delta-rho in the L1 norm (NMAE, %) and in the Coulomb metric
(sqrt of (e|e), e the fitted error density, in sqrt(Eh)).
"""
import itertools
import sys

import numpy as np

import pyscf_densr
from pyscf_densr import bench, project

import _validation

n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
first = int(sys.argv[2]) if len(sys.argv) > 2 else 400
net = pyscf_densr.load_model()
tot, nmol = {}, 0
for cs in _validation.cases(net, n, first):
    m, mol, mf, dm_sad, e_ref, ref, level = (cs.m, cs.mol, cs.mf, cs.dm_sad, cs.e_ref, cs.ref,
                                             cs.level)
    nmol += 1
    grid, pred = ref['grid'], cs.pred
    deltas = {'model': pred, 'exact': cs.exact}
    auxmol = project.make_auxmol(mol, net.config.get('auxbasis'))
    s1e, h1e = mf.get_ovlp(), mf.get_hcore()
    nsad = float(np.einsum('ij,ji->', dm_sad, s1e))
    charge = mol.nelectron - nsad
    grids = project.guess_grids(mf, 1)
    x = project.orthogonalizer(mf, s1e)
    coef, vj, vxc = {}, {}, {}
    for name, d in deltas.items():
        c = coef[name] = project.fit_delta_rho(auxmol, d, grid, charge=charge)
        vj[name] = project.coulomb_of_guess(mol, auxmol, dm_sad, c)
        assert vj[name] is not None, "PySCF's 3-centre J driver is unavailable"
        q = charge - float(np.sum(d, dtype=np.float64)) * grid.dv
        vxc[name] = project.xc_potential(mf, dm_sad, auxmol, c, grids,
                                         (d, grid, 1 + q / nsad))[1]
    e = coef['model'] - coef['exact']
    coul = float(np.sqrt(e @ auxmol.intor('int2c2e') @ e))
    nmae = 100 * np.abs(pred - deltas['exact']).sum() / ref['rho_conv'].sum()
    res = {('minao', '-'): (mf.cycles, mf.energy_tot(dm_sad) - e_ref)}
    for a, b in itertools.product(deltas, deltas):
        mf2 = bench.make_scf(mol, level)
        dm0 = project.density_matrix_from_veff(mf2, vj[a] + vxc[b], dm_sad, h1e, s1e, x)
        eg = mf2.energy_tot(dm0) - e_ref
        mf2.kernel(dm0)
        assert abs(mf2.e_tot - e_ref) < 1e-6, (m['name'], a, b)
        res[(a, b)] = (mf2.cycles, eg)
    for k, (cy, eg) in res.items():
        t = tot.setdefault(k, [0, 0.0])
        t[0] += cy
        t[1] += eg
    print(m['name'], 'NMAE %.2f%% Coulomb error %.4f' % (nmae, coul),
          ' '.join('J %s/XC %s:%d(%.4f)' % (k + v) for k, v in res.items()), flush=True)
print('summed over %d molecules (J from, XC from, cycles, E[P_guess] - E_conv / Eh):' % nmol)
for (a, b), (cy, eg) in tot.items():
    print('  J %-6s XC %-6s %4d  %9.4f' % (a, b, cy, eg))
