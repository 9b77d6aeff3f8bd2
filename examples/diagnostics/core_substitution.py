"""Which part of the network's error holds the guess back: the projection fed the model's
delta-rho with the exact one substituted next to the nuclei (rho_conv > CUT e/Bohr^3), or
everywhere else, or everywhere, all with the model's own guess_mix and guess grids (the
bench's oracle uses mix 1 and level-1 grids instead).

    python examples/diagnostics/core_substitution.py [N] [CUT]

Validation molecules 400.. (N of them, default 6); the default model. Prints per molecule
and summed: cycles, E[P_guess] - E_conv (Eh), NMAE of the fed density (%).
"""
import sys

import numpy as np

import pyscf_densr
from pyscf_densr import bench, hook, project

import _validation

n = int(sys.argv[1]) if len(sys.argv) > 1 else 6
cut = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
net = pyscf_densr.load_model()
mix, glevel = hook.guess_mix(net), hook.guess_grids_level(net)
tot, nmol = {}, 0
for c in _validation.cases(net, n):
    m, mol, mf, dm_sad, e_ref, ref, level = c.m, c.mol, c.mf, c.dm_sad, c.e_ref, c.ref, c.level
    fine, exact, pred = ref['grid'], c.exact, c.pred
    nmol += 1
    core = ref['rho_conv'] > cut
    variants = {'model': pred, 'exact core': np.where(core, exact, pred),
                'exact valence': np.where(core, pred, exact), 'exact': exact}
    res = {'minao': (mf.cycles, mf.energy_tot(dm_sad) - e_ref, None)}
    for name, delta in variants.items():
        mf2 = bench.make_scf(mol, level)
        dm0 = project.density_matrix_from_delta_rho(
            mf2, delta, fine, dm_sad=dm_sad, auxbasis=net.config.get('auxbasis'),
            mix=mix, grids_level=glevel)
        eg = mf2.energy_tot(dm0) - e_ref
        mf2.kernel(dm0)
        assert abs(mf2.e_tot - e_ref) < 1e-6
        nm = 100 * np.abs(delta - exact).sum() / ref['rho_conv'].sum()
        res[name] = (mf2.cycles, eg, nm)
    for k, v in res.items():
        t = tot.setdefault(k, [0, 0.0])
        t[0] += v[0]
        t[1] += v[1]
    print(m['name'], {k: (c, round(e, 4), None if x is None else round(x, 2))
                      for k, (c, e, x) in res.items()}, flush=True)
print('summed over %d molecules (cycles, E[P_guess] - E_conv / Eh):' % nmol)
for k, (c, e) in tot.items():
    print('  %-14s %4d  %8.4f' % (k, c, e))
