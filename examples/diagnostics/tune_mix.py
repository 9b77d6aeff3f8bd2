"""Choose guess_mix on validation molecules (400-449): cycles for each mix, PBE/def2-SVP."""
import sys, json, numpy as np
from pyscf import lib
lib.num_threads(1)
import pyscf_densr
from pyscf_densr import bench, project
model, lo, hi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ws = tuple(float(w) for w in sys.argv[4:]) or (1.0, 0.8, 0.7, 0.6, 0.5)
net = pyscf_densr.load_model(model)
level = bench.parse_level('pbe/def2-svp')
for m in bench.molecules_from_heldout('../shared/data', lo, hi):
    mol = bench.build_mol(m, 'def2-svp')
    ref = bench.make_scf(mol, level); ref.kernel()
    mf = bench.make_scf(mol, level)
    dm_sad = mf.init_guess_by_minao()
    dm1 = pyscf_densr.init_guess(mf, model=net, mix=1.0)
    row = {'molecule': m['name'], 'minao': ref.cycles}
    for w in ws:
        mf2 = bench.make_scf(mol, level)
        mf2.kernel(project.mix_with_sad(mf2, dm1, dm_sad, w))
        assert abs(mf2.e_tot - ref.e_tot) < 1e-6, (m['name'], w)
        row[str(w)] = mf2.cycles
    print(json.dumps(row), flush=True)
