import numpy as np
from scipy import ndimage
from pyscf import lib, dft
lib.num_threads(1)
import pyscf_densr
from pyscf_densr import bench, hook
net = pyscf_densr.load_model()
def hartree(e, g, pad=True):
    if pad:
        e = np.pad(e, [(0, n) for n in e.shape])
    E = np.fft.rfftn(e) * g.dv
    ks = [2*np.pi*np.fft.fftfreq(n, g.spacing) for n in e.shape[:2]] + [2*np.pi*np.fft.rfftfreq(e.shape[2], g.spacing)]
    k2 = ks[0][:,None,None]**2 + ks[1][None,:,None]**2 + ks[2][None,None,:]**2
    k2[0,0,0] = np.inf
    V = np.prod(e.shape) * g.dv
    w = np.full(k2.shape, 2.0); w[..., 0] = 1; 
    if e.shape[2] % 2 == 0: w[..., -1] = 1
    return 0.5 / V * np.sum(w * 4*np.pi/k2 * np.abs(E)**2)
for m in bench.molecules_from_heldout('../shared/data', 450, 500, limit=2):
    mol = bench.build_mol(m, 'def2-svp')
    mf = dft.RKS(mol, xc='pbe'); mf.kernel(); dmc = mf.make_rdm1(); dm_sad = mf.init_guess_by_minao()
    ref = bench.reference_grids(mol, dmc, dm_sad, net.config); g = ref['grid']
    exact = ref['rho_conv'] - ref['rho_sad']
    pred, _ = hook.predict_delta_rho(mol, dm_sad, net)
    err = pred - exact
    cases = {'a0.8': 0.8*exact, 'a0.6': 0.6*exact, 'model': pred, 'exact+err_smooth': exact + ndimage.gaussian_filter(err, 2),
             'model_smooth1': ndimage.gaussian_filter(pred, 1.0), 'model*0.7': 0.7*pred, 'a0': 0*exact}
    EH = hartree(exact, g)
    for k, d in cases.items():
        e = d - exact
        print(m['name'], k, 'NMAE %.2f' % (100*np.abs(e).sum()/ref['rho_conv'].sum()), 'E_H[err] mHa %.2f' % (1000*hartree(e, g)), 'rel %.3f' % np.sqrt(hartree(e, g)/EH), 'q_err %.3f' % (e.sum()*g.dv), flush=True)
