"""cProfile of one densr guess (qm9_000450, PBE/def2-SVP, one thread); run from the repository root."""
import cProfile, pstats
from pyscf import lib
lib.num_threads(1)
import pyscf_densr
from pyscf_densr import bench
m = bench.molecules_from_heldout('../shared/data', 450, 500, limit=1)[0]
mol = bench.build_mol(m, 'def2-svp')
mf = bench.make_scf(mol, bench.parse_level('pbe/def2-svp'))
pyscf_densr.init_guess(mf)
cProfile.run('pyscf_densr.init_guess(mf)', '/tmp/prof.out')
pstats.Stats('/tmp/prof.out').sort_stats('cumtime').print_stats(30)
