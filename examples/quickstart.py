"""The bundled example: ethanol at PBE/def2-SVP from PySCF's minao guess and from densr.

    python examples/quickstart.py [xyz file] [--xc pbe] [--basis def2-svp]

Prints SCF cycles, energies and the guess/SCF wall time of both runs. The network is loaded
once per process (torch and the weights) before the timed runs, as in a workflow of many
SCFs; that one-time cost is printed on its own.
"""
import argparse
import time

from pyscf import gto, dft, scf

import pyscf_densr

ETHANOL = '''C -0.0484 0.5590 0.0000; C 1.2400 -0.2464 0.0000; O -1.1614 -0.3238 0.0000
H -0.0916 1.2043 0.8858; H -0.0916 1.2043 -0.8858; H 1.3020 -0.8873 0.8836
H 1.3020 -0.8873 -0.8836; H 2.1000 0.4317 0.0000; H -1.9524 0.2134 0.0000'''


def run(mol, xc, guess):
    mf = scf.RHF(mol) if xc.lower() == 'hf' else dft.RKS(mol, xc=xc)
    t0 = time.perf_counter()
    dm0 = mf.get_init_guess(mol, guess)
    t1 = time.perf_counter()
    mf.kernel(dm0=dm0)
    t2 = time.perf_counter()
    return mf, t1 - t0, t2 - t1


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('xyz', nargs='?', help='molecule (xyz file, Angstrom); default ethanol')
    p.add_argument('--xc', default='pbe')
    p.add_argument('--basis', default='def2-svp')
    p.add_argument('--charge', type=int, default=0)
    a = p.parse_args()
    mol = gto.M(atom=a.xyz or ETHANOL, basis=a.basis, charge=a.charge, verbose=0)
    t0 = time.perf_counter()
    pyscf_densr.load_model()
    print('(densr model loaded once per process in %.2f s)' % (time.perf_counter() - t0))
    print('%s  %s/%s  %d atoms, %d basis functions' % (a.xyz or 'ethanol', a.xc, a.basis,
                                                       mol.natm, mol.nao))
    print('%-6s %7s %20s %9s %9s %9s' % ('guess', 'cycles', 'energy / Eh', 'guess/s',
                                        'scf/s', 'total/s'))
    ref = None
    for guess in ('minao', 'densr'):
        mf, tg, ts = run(mol, a.xc, guess)
        ref = mf.e_tot if ref is None else ref
        print('%-6s %7d %20.10f %9.2f %9.2f %9.2f' % (guess, mf.cycles, mf.e_tot, tg, ts,
                                                     tg + ts))
    print('|E(densr) - E(minao)| = %.1e Eh' % abs(mf.e_tot - ref))


if __name__ == '__main__':
    main()
