import numpy as np, sys
from pyscf import lib, dft
lib.num_threads(1)
import pyscf_densr
from pyscf_densr import bench
level = bench.parse_level('pbe/def2-svp')
for m in bench.molecules_from_heldout('../shared/data', 450, 500, limit=int(sys.argv[1]))[int(sys.argv[2]):]:
    mol = bench.build_mol(m, 'def2-svp')
    mf = bench.make_scf(mol, level)
    dm_sad = mf.init_guess_by_minao()
    dm1 = pyscf_densr.init_guess(mf)
    res = {}
    for w in (1.0, 0.7, 0.5):
        mf2 = bench.make_scf(mol, level)
        mf2.kernel(dm_sad + w * (np.asarray(dm1) - dm_sad))
        res[w] = (mf2.cycles, round(mf2.e_tot, 8))
    print(m['name'], res, flush=True)
