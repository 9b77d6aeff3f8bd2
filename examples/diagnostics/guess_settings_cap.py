"""Which guess setting caps a better density: the projection fed the model's delta-rho and the
exact one, each at guess_mix 0.85 / 1.0 and guess grids level 0 / 1.

    python examples/diagnostics/guess_settings_cap.py [N] [FIRST] [MODEL] [--model-only]

Validation molecules FIRST.. (default 400, N of them, default 5), MODEL (name or path; default
the default model); --model-only skips the exact delta-rho. Prints per molecule, then summed:
cycles and E[P_guess] - E_conv (Eh) for each (density, mix, level).
"""
import itertools
import sys

import pyscf_densr
from pyscf_densr import bench, hook, project

import _validation

model_only = '--model-only' in sys.argv
args = [a for a in sys.argv[1:] if a != '--model-only']
n = int(args[0]) if len(args) > 0 else 5
first = int(args[1]) if len(args) > 1 else 400
name = args[2] if len(args) > 2 else pyscf_densr.model.DEFAULT_MODEL
net = pyscf_densr.load_model(name)
settings = list(itertools.product((0.85, 1.0), (0, 1)))
print('model %s, shipped guess_mix %s, guess_grids_level %s'
      % (name, hook.guess_mix(net), hook.guess_grids_level(net)), flush=True)
tot, nmol = {}, 0
for c in _validation.cases(net, n, first):
    m, mol, mf, dm_sad, e_ref, ref, level = c.m, c.mol, c.mf, c.dm_sad, c.e_ref, c.ref, c.level
    nmol += 1
    deltas = {'model': c.pred} if model_only else {'model': c.pred, 'exact': c.exact}
    res = {('minao', None, None): (mf.cycles, mf.energy_tot(dm_sad) - e_ref)}
    for (name, delta), (mix, glevel) in itertools.product(deltas.items(), settings):
        mf2 = bench.make_scf(mol, level)
        dm0 = project.density_matrix_from_delta_rho(
            mf2, delta, ref['grid'], dm_sad=dm_sad, auxbasis=net.config.get('auxbasis'),
            mix=mix, grids_level=glevel)
        eg = mf2.energy_tot(dm0) - e_ref
        mf2.kernel(dm0)
        assert abs(mf2.e_tot - e_ref) < 1e-6, (m['name'], name, mix, glevel)
        res[(name, mix, glevel)] = (mf2.cycles, eg)
    for k, (cy, e) in res.items():
        t = tot.setdefault(k, [0, 0.0])
        t[0] += cy
        t[1] += e
    print(m['name'], ' '.join('%s/%s/%s:%d(%.3f)' % (k + v) for k, v in res.items()),
          flush=True)
print('summed over %d molecules: density, guess_mix, guess grids level, cycles, '
      'E[P_guess] - E_conv / Eh' % nmol)
for (name, mix, glevel), (c, e) in tot.items():
    print('  %-6s %5s %5s %5d %9.4f' % (name, mix, glevel, c, e))
