"""Cycles and wall time of minao and densr for each class of docs/support.md.

    python tools/support_table.py [--threads 1] [--model NAME] [--all-sizes] [FILTER ...]

PySCF defaults (conv_tol 1e-9, grids level 3), def2-SVP unless a case says otherwise; one
Markdown row per case (FILTER: only cases whose class or molecule contains it), and an
error if a densr run lands in another state than minao's. Times are wall seconds of the
whole ``mf.kernel()`` (guess included), each case run minao, densr, minao, densr in one
process after a warm-up densr run (model loaded), the faster of each pair kept.
"""
import argparse
import time
from pyscf import gto, scf, dft, lib
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


def run(make, mol, guess, model=None):
    mf = make(mol)
    mf.init_guess = guess
    t0 = time.perf_counter()
    if guess == 'densr' and model:
        mf.kernel(pyscf_densr.init_guess(mf, model=model))
    else:
        mf.kernel()
    assert mf.converged, (guess, mol.atom)
    return mf, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('only', nargs='*', help='only cases whose class or molecule contain it')
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--model', default=None, help='densr model (default: the shipped one)')
    ap.add_argument('--all-sizes', action='store_true',
                    help='the densr guess however small the molecule, and for '
                         'Hartree-Fock (hook.MIN_NAO = 0, hook.COVER_HF = True)')
    a = ap.parse_args(argv)
    if a.all_sizes:
        from pyscf_densr import hook
        hook.MIN_NAO, hook.COVER_HF = 0, True
    lib.num_threads(a.threads)
    run(CASES[0][-1], gto.M(atom=WATER, basis='def2-svp', verbose=0), 'densr', a.model)
    print('| class | molecule (def2-SVP unless noted) | cycles minao / densr | '
          'time minao / densr / s | speedup | dE / Eh |')
    print('| --- | --- | --- | --- | --- | --- |')
    tot = [0, 0, 0., 0.]
    ratios = []
    for cls, name, atom, charge, spin, kw, make in CASES:
        if a.only and not any(o.lower() in (cls + name).lower() for o in a.only):
            continue
        mol = gto.M(atom=atom, basis='def2-svp', charge=charge, spin=spin, verbose=0, **kw)
        ref, t0 = run(make, mol, 'minao')
        mf, t1 = run(make, mol, 'densr', a.model)
        t0 = min(t0, run(make, mol, 'minao')[1])
        t1 = min(t1, run(make, mol, 'densr', a.model)[1])
        de = mf.e_tot - ref.e_tot
        assert abs(de) < 1e-6, (cls, name, de)
        tot = [tot[0] + ref.cycles, tot[1] + mf.cycles, tot[2] + t0, tot[3] + t1]
        ratios.append(t0 / t1)
        print('| %s | %s | %d / %d | %.2f / %.2f | %.2f | %.1e |' % (
            cls, name, ref.cycles, mf.cycles, t0, t1, t0 / t1, de), flush=True)
    ratios.sort()
    med = ratios[len(ratios) // 2] if len(ratios) % 2 else sum(
        ratios[len(ratios) // 2 - 1:len(ratios) // 2 + 1]) / 2
    print('| total (speedup: median of the rows; sum) | | %d / %d | %.1f / %.1f | %.2f; %.2f | |'
          % (tot[0], tot[1], tot[2], tot[3], med, tot[2] / tot[3]))


if __name__ == '__main__':
    main()
