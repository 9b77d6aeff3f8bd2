"""PySCF's own floor: cycles (verbose log) from the converged density matrix itself and from
the one-build guess of the exact delta-rho, validation molecule FIRST (default 400).

    python examples/diagnostics/scf_floor.py [FIRST]
"""
import sys

import pyscf_densr
from pyscf_densr import bench, project

import _validation

first = int(sys.argv[1]) if len(sys.argv) > 1 else 400
net = pyscf_densr.load_model()
for c in _validation.cases(net, 1, first):
    print('minao', c.mf.cycles)
    mf = bench.make_scf(c.mol, c.level)
    mf.verbose = 4
    mf.kernel(c.mf.make_rdm1())
    print('from the converged density matrix', mf.cycles)
    mf = bench.make_scf(c.mol, c.level)
    p = project.density_matrix_from_delta_rho(mf, c.exact, c.ref['grid'], dm_sad=c.dm_sad,
                                              grids_level=0)
    mf.verbose = 4
    mf.kernel(p)
    print('from the exact delta-rho, one build, undamped', mf.cycles)
