"""Langevin MD and a BFGS optimisation with the densr ASE calculator, one run per guess policy.

Prints the SCF cycles of every step, then a summary (mean cycles, guess and SCF time per
step). With the defaults (water, PBE/def2-SVP, 10 MD steps) it takes about a minute on two
cores; ethanol at PBE/def2-SVP a few minutes:

    OMP_NUM_THREADS=2 python examples/md_and_opt.py
    OMP_NUM_THREADS=2 python examples/md_and_opt.py --molecule ethanol --steps 20
    python examples/md_and_opt.py --policies previous,densr+extrapolate --xc b3lyp

For the MD benchmark table (all policies on one shared trajectory) see
``python -m pyscf_densr.ase --bench``.
"""

import argparse
import time

import numpy as np
from ase import units
from ase.io import read
from ase.build import molecule
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from ase.optimize import BFGS

from pyscf_densr.ase import DensrCalculator, POLICIES, thermalize


def load(name):
    aliases = {'ethanol': 'CH3CH2OH', 'water': 'H2O', 'ammonia': 'NH3'}
    try:
        atoms = molecule(aliases.get(name.lower(), name))
    except KeyError:
        atoms = read(name)
    atoms.pbc = False
    return atoms


def run_md(atoms, calc, steps, timestep, temperature, seed):
    """Langevin MD (fs, K); returns the calculator's history for these steps."""
    atoms = atoms.copy()
    atoms.calc = calc
    thermalize(atoms, temperature, seed)
    atoms.set_constraint(FixCom())
    dyn = Langevin(atoms, timestep * units.fs, temperature_K=temperature, friction=0.01,
                   fixcm=False, rng=np.random.default_rng(seed))
    n0 = len(calc.history)
    dyn.run(steps)
    return calc.history[n0:]


def run_opt(atoms, calc, fmax, steps, seed):
    """BFGS from a rattled geometry (fmax in eV/Angstrom); returns the history of the run."""
    atoms = atoms.copy()
    atoms.rattle(0.05, seed=seed)
    atoms.calc = calc
    n0 = len(calc.history)
    BFGS(atoms, logfile=None).run(fmax=fmax, steps=steps)
    return calc.history[n0:]


def summary(name, hist):
    cyc = [h['cycles'] for h in hist]
    tg = np.mean([h['t_guess'] for h in hist])
    ts = np.mean([h['t_scf'] for h in hist])
    return '%-18s %-4s %4d %7.2f %8.3f %8.3f %8.3f' % (name[0], name[1], len(hist), np.mean(cyc),
                                                    tg, ts, tg + ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--molecule', default='water', help='ase.build.molecule name or a file')
    ap.add_argument('--steps', type=int, default=10, help='MD steps')
    ap.add_argument('--opt-steps', type=int, default=30, help='maximum BFGS steps')
    ap.add_argument('--fmax', type=float, default=0.05, help='BFGS force threshold, eV/A')
    ap.add_argument('--timestep', type=float, default=0.5, help='fs')
    ap.add_argument('--temperature', type=float, default=300.0, help='K')
    ap.add_argument('--xc', default='pbe')
    ap.add_argument('--basis', default='def2-svp')
    ap.add_argument('--policies', default=','.join(POLICIES))
    ap.add_argument('--seed', type=int, default=1)
    args = ap.parse_args()

    atoms = load(args.molecule)
    print('%s, %s/%s, %d MD steps of %g fs, BFGS to %g eV/A'
          % (atoms.get_chemical_formula(), args.xc, args.basis, args.steps, args.timestep,
             args.fmax))
    rows = []
    for policy in args.policies.split(','):
        t0 = time.perf_counter()
        calc = DensrCalculator(xc=args.xc, basis=args.basis, guess=policy)
        md = run_md(atoms, calc, args.steps, args.timestep, args.temperature, args.seed)
        calc.reset()           # the optimisation starts elsewhere: start over
        opt = run_opt(atoms, calc, args.fmax, args.opt_steps, args.seed)
        print('%-18s MD  cycles: %s' % (policy, ' '.join(str(h['cycles']) for h in md)))
        print('%-18s opt cycles: %s' % ('', ' '.join(str(h['cycles']) for h in opt)))
        print('%-18s guesses   : %s   (%.1f s)' % ('', ' '.join(h['guess'][0] for h in md + opt),
                                                  time.perf_counter() - t0))
        rows += [summary((policy, 'MD'), md), summary((policy, 'opt'), opt)]
    print('\n%-18s %-4s %4s %7s %8s %8s %8s' % ('policy', 'run', 'SCFs', 'cycles', 'guess s',
                                               'SCF s', 'total s'))
    print('\n'.join(rows))
    print('guesses: m = minao, d = densr, p = previous, e = extrapolate; times are per step')


if __name__ == '__main__':
    main()
