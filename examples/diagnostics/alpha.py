import sys, time, numpy as np
from pyscf import lib
from scipy import ndimage
import pyscf_densr
from pyscf_densr import bench, project, hook, grid as grid_mod
lib.num_threads(1)
mols = bench.molecules_from_heldout('../shared/data', 450, 500, limit=int(sys.argv[1]) if len(sys.argv)>1 else 3)
net = pyscf_densr.load_model()
level = bench.parse_level('pbe/def2-svp')
for m in mols:
    mol = bench.build_mol(m, 'def2-svp')
    mf = bench.make_scf(mol, level); mf.kernel()
    ncyc_minao = mf.cycles; dm_conv = mf.make_rdm1(); e_ref = mf.e_tot
    dm_sad = mf.init_guess_by_minao(mol)
    ref = bench.reference_grids(mol, dm_conv, dm_sad, net.config)
    fine = ref['grid']; exact = ref['rho_conv'] - ref['rho_sad']
    pred, fine2 = hook.predict_delta_rho(mol, dm_sad, net)
    err = pred - exact
    res = {'minao': ncyc_minao}
    def cyc(delta):
        mf2 = bench.make_scf(mol, level)
        dm0 = project.density_matrix_from_delta_rho(mf2, delta, fine, dm_sad=dm_sad)
        mf2.kernel(dm0); assert abs(mf2.e_tot - e_ref) < 1e-6
        return mf2.cycles
    nm = lambda d: 100*np.abs(d-exact).sum()/ref['rho_conv'].sum()
    for a in (1.0, 0.8, 0.6, 0.3, 0.0):
        res['a%.1f' % a] = (cyc(a*exact), round(nm(a*exact),2))
    res['model'] = (cyc(pred), round(nm(pred), 2))
    res['exact+err_smooth'] = (cyc(exact + ndimage.gaussian_filter(err, 2)), round(nm(exact + ndimage.gaussian_filter(err, 2)),2))
    sm = ndimage.gaussian_filter(pred, 1.0)
    res['model_smooth1'] = (cyc(sm), round(nm(sm),2))
    res['model*0.7'] = (cyc(0.7*pred), round(nm(0.7*pred),2))
    print(m['name'], res, flush=True)
