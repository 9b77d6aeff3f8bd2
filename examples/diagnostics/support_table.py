"""Cycles minao / densr for each class of docs/support.md with the default model.

Run from the repository root: ``OMP_NUM_THREADS=1 python examples/diagnostics/support_table.py``
(about 15 minutes on one thread). PySCF defaults (conv_tol 1e-9, grids level 3), def2-SVP
unless a case says otherwise; prints one markdown row per case and fails loudly if a densr
run lands in another state than minao's.
"""
import sys, time
from pyscf import gto, scf, dft, lib
lib.num_threads(1)
import pyscf_densr

ETHANOL = '''C -0.0484 0.5590 0.0000; C 1.2400 -0.2464 0.0000; O -1.1614 -0.3238 0.0000
H -0.0916 1.2043 0.8858; H -0.0916 1.2043 -0.8858; H 1.3020 -0.8873 0.8836
H 1.3020 -0.8873 -0.8836; H 2.1000 0.4317 0.0000; H -1.9524 0.2134 0.0000'''
WATER = 'O 0 0 0.1173; H 0 0.7572 -0.4692; H 0 -0.7572 -0.4692'
METHYL = 'C 0 0 0; H 1.08 0 0; H -0.54 0.935 0; H -0.54 -0.935 0'
GLYCINE = ('N 0 0 0; H 0 0.94 0.33; H 0.82 -0.47 0.33; H -0.82 -0.47 0.33; C 0 0 -1.49; '
           'H 0.89 0.51 -1.87; H -0.89 0.51 -1.87; C 0 -1.41 -2.06; O 1.04 -2.06 -2.04; '
           'O -1.08 -1.78 -2.58')
rks = lambda xc: (lambda m: dft.RKS(m, xc=xc))   # noqa: E731
uks = lambda xc: (lambda m: dft.UKS(m, xc=xc))   # noqa: E731
roks = lambda xc: (lambda m: dft.ROKS(m, xc=xc))  # noqa: E731
CASES = [
    ('RKS (GGA)', 'ethanol, PBE', ETHANOL, 0, 0, {}, rks('pbe')),
    ('RHF', 'ethanol', ETHANOL, 0, 0, {}, scf.RHF),
    ('hybrid', 'ethanol, B3LYP', ETHANOL, 0, 0, {}, rks('b3lyp')),
    ('range-separated hybrid', 'ethanol, wB97X', ETHANOL, 0, 0, {}, rks('wb97x')),
    ('meta-GGA', 'ethanol, TPSS', ETHANOL, 0, 0, {}, rks('tpss')),
    ('density fitting', 'ethanol, DF-PBE', ETHANOL, 0, 0, {}, lambda m: rks('pbe')(m).density_fit()),
    ('UKS radical', 'methyl, PBE', METHYL, 0, 1, {}, uks('pbe')),
    ('UHF radical', 'methyl', METHYL, 0, 1, {}, scf.UHF),
    ('ROHF radical', 'methyl', METHYL, 0, 1, {}, scf.ROHF),
    ('ROKS radical', 'methyl, PBE', METHYL, 0, 1, {}, roks('pbe')),
    ('triplet', 'O2, UKS PBE', 'O 0 0 0; O 0 0 1.21', 0, 2, {}, uks('pbe')),
    ('radical cation', 'H2O+, UKS PBE', WATER, 1, 1, {}, uks('pbe')),
    ('anion', 'OH-, PBE', 'O 0 0 0; H 0 0 0.97', -1, 0, {}, rks('pbe')),
    ('cation', 'NH4+, PBE', 'N 0 0 0; H 0.63 0.63 0.63; H -0.63 -0.63 0.63; '
     'H -0.63 0.63 -0.63; H 0.63 -0.63 -0.63', 1, 0, {}, rks('pbe')),
    ('anion', 'formate, PBE', 'C 0 0 0; O 0 1.06 0.62; O 0 -1.06 0.62; H 0 0 -1.10', -1, 0,
     {}, rks('pbe')),
    ('zwitterion', 'glycine NH3+CH2COO-, PBE', GLYCINE, 0, 0, {}, rks('pbe')),
    ('unseen element S', 'H2S, PBE', 'S 0 0 0; H 0 0.96 0.93; H 0 -0.96 0.93', 0, 0, {},
     rks('pbe')),
    ('unseen element Cl', 'HCl, PBE', 'H 0 0 0; Cl 0 0 1.275', 0, 0, {}, rks('pbe')),
    ('unseen element P', 'PH3, PBE', 'P 0 0 0; H 1.19 0 0.77; H -0.6 1.03 0.77; '
     'H -0.6 -1.03 0.77', 0, 0, {}, rks('pbe')),
    ('unseen element F', 'CH3F, PBE', 'C 0 0 0; F 0 0 1.38; H 1.03 0 -0.36; '
     'H -0.52 0.89 -0.36; H -0.52 -0.89 -0.36', 0, 0, {}, rks('pbe')),
    ('unseen element Br', 'HBr, PBE', 'H 0 0 0; Br 0 0 1.41', 0, 0, {}, rks('pbe')),
    ('unseen element Mg', 'MgCl2, PBE', 'Mg 0 0 0; Cl 0 0 2.18; Cl 0 0 -2.18', 0, 0, {},
     rks('pbe')),
    ('unseen element S', 'SO2, PBE', 'S 0 0 0; O 0 1.25 0.72; O 0 -1.25 0.72', 0, 0, {},
     rks('pbe')),
    ('ECP (I, def2 ECP)', 'CH3I, PBE', 'C 0 0 0; I 0 0 2.14; H 1.03 0 -0.36; '
     'H -0.52 0.89 -0.36; H -0.52 -0.89 -0.36', 0, 0, {'ecp': {'I': 'def2-svp'}}, rks('pbe')),
    ('ECP (I)', 'HI, PBE', 'H 0 0 0; I 0 0 1.61', 0, 0, {'ecp': {'I': 'def2-svp'}}, rks('pbe')),
    ('d10 metal', 'ZnCl2, PBE (all-electron)', 'Zn 0 0 0; Cl 0 0 2.07; Cl 0 0 -2.07', 0, 0, {},
     rks('pbe')),
    ('ghost atoms', 'water + ghost water (counterpoise), PBE',
     WATER + '; ghost-O 0 0 3.0; ghost-H 0 0.76 3.6; ghost-H 0 -0.76 3.6', 0, 0, {},
     rks('pbe')),
]


def run(make, mol, guess):
    mf = make(mol)
    mf.init_guess = guess
    t0 = time.perf_counter()
    mf.kernel()
    assert mf.converged, (guess, mol.atom)
    return mf, time.perf_counter() - t0


only = sys.argv[1:]
print('| class | molecule (def2-SVP unless noted) | cycles minao / densr | dE / Eh |')
print('| --- | --- | --- | --- |')
tot = [0, 0]
for cls, name, atom, charge, spin, kw, make in CASES:
    if only and not any(o.lower() in (cls + name).lower() for o in only):
        continue
    mol = gto.M(atom=atom, basis='def2-svp', charge=charge, spin=spin, verbose=0, **kw)
    ref, _ = run(make, mol, 'minao')
    mf, _ = run(make, mol, 'densr')
    de = mf.e_tot - ref.e_tot
    assert abs(de) < 1e-6, (cls, name, de)
    tot[0] += ref.cycles
    tot[1] += mf.cycles
    print('| %s | %s | %d / %d | %.1e |' % (cls, name, ref.cycles, mf.cycles, de), flush=True)
print('| total | | %d / %d | |' % tuple(tot))
