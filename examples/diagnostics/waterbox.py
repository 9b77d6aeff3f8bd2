import resource, time, sys, numpy as np
sys.path.insert(0, 'tests')
import pyscf_densr
from pyscf import gto, dft, lib
from pyscf_densr import project, grid
from test_robustness import _waters
mol = gto.M(atom=_waters(170), basis='sto-3g', verbose=0, max_memory=8000)
mf = dft.RKS(mol, xc='pbe').density_fit()
aux = project.make_auxmol(mol)
net = pyscf_densr.load_model()
box = grid.make_box(mol.atom_coords(), net.config['spacing'], net.config['margin'])
print('atoms %d AOs %d aux %d grid %s' % (mol.natm, mol.nao, aux.nao, 'x'.join(map(str, box.shape))), flush=True)
t, c = time.perf_counter(), time.process_time()
dm = pyscf_densr.init_guess(mf)
print('guess %.0f s wall, %.0f s CPU, peak RSS %.0f MB, %.6f electrons (of %d)' % (
    time.perf_counter() - t, time.process_time() - c,
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
    np.einsum('ij,ji', dm, mf.get_ovlp()), mol.nelectron), flush=True)
