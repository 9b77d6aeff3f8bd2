"""Cycles and guess time of the projection's XC routes on validation molecules LO..HI-1.

Routes: delta-rho on the molecular grid from the auxiliary fit ('fit') or interpolated from
the network's grid ('grid'); guess grids level 1 (default) or 0. PBE/def2-SVP, one thread.
Usage: python examples/diagnostics/xc_route.py LO HI [oracle]
"""
import sys, json, time
import numpy as np
from pyscf import lib
lib.num_threads(1)
import pyscf_densr
from pyscf_densr import bench, hook, project
lo, hi = int(sys.argv[1]), int(sys.argv[2])
oracle = 'oracle' in sys.argv[3:]
net = pyscf_densr.load_model()
level = bench.parse_level('pbe/def2-svp')
routes = [('fit', 1), ('grid', 1), ('grid', 0), ('fit', 0)]
for m in bench.molecules_from_heldout('../shared/data', lo, hi):
    mol = bench.build_mol(m, 'def2-svp')
    ref = bench.make_scf(mol, level)
    ref.kernel()
    dm_sad = ref.init_guess_by_minao()
    if oracle:
        g = bench.reference_grids(mol, ref.make_rdm1(), dm_sad, net.config)
        delta, fine = g['rho_conv'] - g['rho_sad'], g['grid']
        mix = 1.0
    else:
        delta, fine = hook.predict_delta_rho(mol, dm_sad, net)
        mix = hook.guess_mix(net)
    charge = hook.fit_charge(mol, dm_sad, ref.get_ovlp())
    row = {'molecule': m['name'], 'natm': mol.natm, 'minao': ref.cycles}
    for xc, lvl in routes:
        mf = bench.make_scf(mol, level)
        t0 = time.perf_counter()
        dm = project.density_matrix_from_delta_rho(mf, delta, fine, dm_sad=dm_sad, mix=mix,
                                                   charge=charge, xc_density=xc,
                                                   grids_level=lvl)
        dt = time.perf_counter() - t0
        mf.kernel(dm)
        assert abs(mf.e_tot - ref.e_tot) < 1e-6, (m['name'], xc, lvl)
        row['%s%d' % (xc, lvl)] = mf.cycles
        row['t_%s%d' % (xc, lvl)] = round(dt, 2)
    print(json.dumps(row), flush=True)
