"""ASE calculator: PySCF HF/DFT energies and forces, seeded by the densr guess.

>>> from ase.build import molecule
>>> from pyscf_densr.ase import DensrCalculator
>>> atoms = molecule('H2O')
>>> atoms.calc = DensrCalculator(xc='pbe', basis='def2-svp', guess='densr+previous')
>>> atoms.get_potential_energy()          # eV
>>> atoms.get_forces()                    # eV/Angstrom
>>> atoms.calc.history[-1]['cycles']      # SCF cycles of the last step

The calculator keeps the converged density matrices of the last few steps, so an MD run or a
geometry optimisation can seed each SCF from the previous step (as PySCF's scanners do), from
an extrapolation over the last steps, or from a fresh densr prediction; see ``guess`` in
:class:`DensrCalculator`. Inside, everything is in atomic units (Bohr, Hartree); at the ASE
boundary, energies are in eV, forces in eV/Angstrom and dipoles in e*Angstrom.

The MD benchmark (mean SCF cycles and time per step for every guess policy on one trajectory)::

    python -m pyscf_densr.ase --bench --steps 50                 # ethanol, PBE/def2-SVP
    python -m pyscf_densr.ase --bench --steps 10 --molecule H2O --basis 6-31g
"""

import collections
import sys
import time
import warnings

import numpy as np
from ase.calculators.calculator import (Calculator, CalculatorSetupError, InputError,
                                        SCFError, all_changes)
from ase.units import Bohr, Hartree
from pyscf import gto, lib, scf, dft
from pyscf.lib import logger

__all__ = ['DensrCalculator', 'POLICIES', 'extrapolation_coefficients',
           'extrapolate_density', 'bench', 'main']

#: Guess policies and their (first-step guess, later-step guess).
POLICIES = {
    'minao': ('minao', None),
    'densr': ('densr', None),
    'previous': ('minao', 'previous'),
    'densr+previous': ('densr', 'previous'),
    'extrapolate': ('minao', 'extrapolate'),
    'densr+extrapolate': ('densr', 'extrapolate'),
}
_ALIASES = {'minao+previous': 'previous', 'minao+extrapolate': 'extrapolate'}

# Parameters that change the physics: a change drops results and the stored density matrices.
_PHYSICS = {'xc', 'basis', 'charge', 'spin', 'density_fit', 'auxbasis', 'grids_level',
            'method'}
# Parameters that change the numbers but not the state: a change drops the results only.
_NUMERICS = {'conv_tol', 'max_cycle', 'grid_response'}


def _policy(guess):
    key = str(guess).lower().replace(' ', '')
    key = _ALIASES.get(key, key)
    if key not in POLICIES:
        raise InputError('guess must be one of %s, not %r' % (', '.join(POLICIES), guess))
    return key


def extrapolation_coefficients(previous, new, rcond=1e-6):
    """Coefficients c (sum c = 1) with sum_k c_k R_k closest to ``new`` (least squares).

    ``previous``: geometries R_k, most recent first (each (natm, 3), any length unit);
    ``new``: the geometry to extrapolate to. For uniform linear motion with two previous
    steps this gives (2, -1), with three steps and uniform acceleration (3, -3, 1); for a
    repeated geometry (1, 0, ...). Directions the previous steps hardly span (singular
    values below ``rcond`` times the largest) are dropped, which keeps c bounded.
    """
    r1 = np.asarray(previous[0], dtype=float).ravel()
    if len(previous) == 1:
        return np.ones(1)
    a = np.stack([np.asarray(r, dtype=float).ravel() - r1 for r in previous[1:]], axis=1)
    b = np.asarray(new, dtype=float).ravel() - r1
    x = np.linalg.lstsq(a, b, rcond=rcond)[0]
    return np.concatenate([[1 - x.sum()], x])


def _ovlp_powers(s):
    """S^(1/2) and S^(-1/2) of the overlap matrix S."""
    w, v = np.linalg.eigh(s)
    if w[0] <= 0:
        raise CalculatorSetupError('the AO overlap matrix is singular (smallest eigenvalue '
                                   '%.2e); atoms too close or a linearly dependent basis'
                                   % w[0])
    return (v * np.sqrt(w)) @ v.T, (v / np.sqrt(w)) @ v.T


def extrapolate_density(dms_orth, coeffs, s_inv_half, nocc, occ):
    """An idempotent density matrix from a linear combination of Lowdin-orthogonal ones.

    ``dms_orth``: per previous step, S_k^(1/2) P_k S_k^(1/2) for one spin channel, most
    recent first; ``coeffs``: weights (sum 1, see :func:`extrapolation_coefficients`);
    ``s_inv_half``: S^(-1/2) at the new geometry; ``nocc`` orbitals occupied by ``occ``
    electrons each (2 for a closed-shell density, 1 per spin channel).

    The combination is diagonalised and its ``nocc`` leading natural orbitals are occupied:
    the nearest projector (Frobenius norm) with the right electron count. They are mapped to
    the new AO basis with S^(-1/2), so the result is exactly idempotent in the new metric
    (P S P = occ P, Tr P S = nocc * occ). Returns (P, mo_coeff, mo_occ).
    """
    d = sum(c * dm for c, dm in zip(coeffs, dms_orth))
    w, v = np.linalg.eigh((d + d.T) * .5)
    v = v[:, ::-1]
    mo_coeff = s_inv_half @ v
    mo_occ = np.zeros(v.shape[1])
    mo_occ[:nocc] = occ
    dm = (mo_coeff[:, :nocc] * occ) @ mo_coeff[:, :nocc].T
    return dm, mo_coeff, mo_occ


class _State:
    """What the calculator carries between steps for one system (atoms, charge, spin)."""

    def __init__(self, key, mol, depth):
        self.key = key
        self.mol = mol                                  # template Mole, geometry of step 1
        self.steps = collections.deque(maxlen=depth)    # most recent first


class DensrCalculator(Calculator):
    r"""ASE calculator for PySCF Hartree-Fock and Kohn-Sham DFT with the densr guess.

    Properties: energy and free_energy (eV), forces (eV/Angstrom, PySCF analytic gradients),
    dipole (e*Angstrom, about the Cartesian origin), charges (Mulliken, e).

    ==================== ================= =======================================================
     Keyword              Default           Description
    ==================== ================= =======================================================
     xc                   'pbe'             Functional (any PySCF ``xc`` string) or 'hf'
     basis                'def2-svp'        Basis set (PySCF name or per-element dict)
     charge               None              Total charge; None: sum of the atoms' initial charges
     spin                 None              2S = N_alpha - N_beta; None: sum of the initial magnetic
                                            moments, or N_electrons mod 2 when those are all zero;
                                            spin 0 runs RHF/RKS, otherwise UHF/UKS
     density_fit          False             Density fitting (``mf.density_fit()``)
     auxbasis             None              DF auxiliary basis (None: PySCF's default)
     guess                'densr+extrapolate' Guess policy, see below
     jump_threshold       0.3               Angstrom; a larger atomic displacement from the last
                                            step (mean translation removed) is a jump. None: never
     extrapolation_steps  4                 Previous steps the extrapolation uses (1-8)
     model                None              densr model name or path (None: the shipped default)
     device               None              torch device of the network (None: CUDA if present)
     conv_tol             1e-9              SCF energy tolerance, Hartree (PySCF's default)
     max_cycle            50                SCF cycle limit
     grids_level          3                 DFT integration grid level (PySCF's default)
     grid_response        False             Grid response in DFT forces (slower; forces become
                                            the exact derivative of the energy)
     verbose              0                 PySCF verbosity (0: quiet, 4: per-cycle output)
     method               None              A ready PySCF SCF object (any functional, ECPs,
                                            dispersion, solvent, density fitting...), as
                                            PySCF's own ``pyscf_ase`` takes one: its
                                            molecule gives basis, ECP, charge and spin, its
                                            settings everything else; xc, basis, charge,
                                            spin, density_fit, auxbasis, grids_level,
                                            conv_tol, max_cycle and verbose are then unused.
                                            The atoms must have its molecule's elements in
                                            its order.
    ==================== ================= =======================================================

    Guess policies (``guess``):

    - ``'minao'``: PySCF's default guess every step (the plain baseline).
    - ``'densr'``: the densr prediction every step.
    - ``'previous'``: minao on the first step, then the previous step's converged density
      matrix used as is in the new AO basis (what PySCF's scanners do).
    - ``'densr+previous'``: densr on the first step and after a jump, previous otherwise.
    - ``'extrapolate'``: minao on the first step, previous on the second, then an
      extrapolation over the last ``extrapolation_steps`` density matrices: Lowdin-
      orthogonalised density matrices S^(1/2) P S^(1/2) are combined with the weights that
      best reproduce the new geometry from the previous ones
      (:func:`extrapolation_coefficients`: (2, -1) for uniform motion), then made
      idempotent by occupying the leading natural orbitals (:func:`extrapolate_density`).
    - ``'densr+extrapolate'`` (the default): the same with densr on the first step and after
      a jump. On a 50-step ethanol MD (PBE/def2-SVP, docs/benchmarks.md) it needed 4.2
      cycles per step against 7.0 for the previous density and 10.0 for minao, with the
      same energies (|dE| < 1e-9 Eh).

    The policies that use previous steps start over (first-step guess, then previous, then
    extrapolation) after a jump (see ``jump_threshold``). Changing xc, basis, charge, spin,
    density_fit, auxbasis or grids_level with :meth:`set`, or the atoms' numbers, charges
    or moments, starts afresh; conv_tol, max_cycle and grid_response drop the results only.

    Every SCF run appends a dict to :attr:`history`: ``step``, ``guess`` (the guess used:
    'minao', 'densr', 'previous' or 'extrapolate'), ``cycles`` (``mf.cycles``, summed over a
    retry), ``converged``, ``retried``, ``t_guess``, ``t_scf``, ``t_grad`` (s; t_grad None
    until forces are computed), ``energy`` (eV), ``displacement`` (Angstrom, from the
    previous step; None on the first). :meth:`reset` keeps the history.

    An SCF that does not converge is retried once from minao with a warning; if that fails
    too, :class:`ase.calculators.calculator.SCFError` is raised. The last converged SCF
    object is :attr:`mf`.
    """

    implemented_properties = ['energy', 'free_energy', 'forces', 'dipole', 'charges']

    default_parameters = {
        'xc': 'pbe',
        'basis': 'def2-svp',
        'charge': None,
        'spin': None,
        'density_fit': False,
        'auxbasis': None,
        'guess': 'densr+extrapolate',
        'jump_threshold': 0.3,
        'extrapolation_steps': 4,
        'model': None,
        'device': None,
        'conv_tol': 1e-9,
        'max_cycle': 50,
        'grids_level': 3,
        'grid_response': False,
        'verbose': 0,
        'method': None,
    }

    def __init__(self, atoms=None, **kwargs):
        self.history = []
        self.mf = None
        self._state = None
        Calculator.__init__(self, atoms=atoms, **kwargs)

    def set(self, **kwargs):
        """Set parameters; a change of physics (see :class:`DensrCalculator`) resets."""
        unknown = set(kwargs) - set(self.default_parameters) - {'parameters'}
        if unknown:
            raise InputError('DensrCalculator: unknown parameter(s) %s; known: %s'
                             % (', '.join(sorted(unknown)), ', '.join(self.default_parameters)))
        if 'guess' in kwargs:
            kwargs['guess'] = _policy(kwargs['guess'])
        if kwargs.get('extrapolation_steps', 2) not in range(1, 9):
            raise InputError('extrapolation_steps must be 1 to 8')
        changed = Calculator.set(self, **kwargs)
        if _PHYSICS & set(changed):
            self.reset()
        elif _NUMERICS & set(changed):
            self.atoms = None
            self.results = {}
        if 'extrapolation_steps' in changed and self._state is not None:
            self._state.steps = collections.deque(self._state.steps,
                                                  maxlen=int(changed['extrapolation_steps']))
        return changed

    def reset(self):
        """Drop results, the last SCF and the stored density matrices (not the history)."""
        Calculator.reset(self)
        self.mf = None
        self._state = None

    # -- setup ---------------------------------------------------------------------------

    def _check_atoms(self, atoms):
        if atoms is None or len(atoms) == 0:
            raise CalculatorSetupError('DensrCalculator needs atoms')
        if np.any(atoms.pbc):
            raise CalculatorSetupError(
                'DensrCalculator is molecular (pyscf.gto.Mole) but the atoms are periodic '
                '(pbc=%s); set atoms.pbc = False for a molecule in vacuum, or use '
                'pyscf.pbc for periodic systems' % list(atoms.pbc))

    def _charge_spin(self, atoms):
        p = self.parameters
        if p.method is not None:
            mol = p.method.mol
            if [int(z) for z in atoms.numbers] != [int(mol.atom_charge(i) + mol.atom_nelec_core(i))
                                                   for i in range(mol.natm)]:
                raise InputError('DensrCalculator: the atoms (%s) are not the elements of '
                                 'the method\'s molecule in its order' % atoms.get_chemical_formula())
            return int(mol.charge), int(mol.spin)
        charge = p.charge
        if charge is None:
            charge = int(round(atoms.get_initial_charges().sum()))
        spin = p.spin
        if spin is None:
            spin = int(round(abs(atoms.get_initial_magnetic_moments().sum())))
            if spin == 0:
                spin = (int(atoms.numbers.sum()) - charge) % 2
        return int(charge), int(spin)

    def _make_mol(self, atoms, charge, spin):
        p = self.parameters
        if p.method is not None:
            return p.method.mol.set_geom_(atoms.positions / Bohr, unit='Bohr', inplace=False)
        try:
            return gto.M(atom=[(int(z), r) for z, r in zip(atoms.numbers, atoms.positions / Bohr)],
                         unit='Bohr', basis=p.basis, charge=charge, spin=spin,
                         verbose=p.verbose, symmetry=False)
        except (RuntimeError, KeyError, ValueError) as e:
            raise InputError('DensrCalculator: cannot build the PySCF molecule: %s' % e) from e

    def _make_scf(self, mol):
        p = self.parameters
        if p.method is not None:
            # a fresh SCF of the user's configuration at this geometry, as PySCF's scanners
            # make one (reset drops everything tied to the old geometry)
            return p.method.copy().reset(mol)
        restricted = mol.spin == 0
        if str(p.xc).lower() == 'hf':
            mf = scf.RHF(mol) if restricted else scf.UHF(mol)
        else:
            mf = dft.RKS(mol, xc=p.xc) if restricted else dft.UKS(mol, xc=p.xc)
            mf.grids.level = p.grids_level
        if p.density_fit:
            mf = mf.density_fit(auxbasis=p.auxbasis)
        mf.conv_tol = p.conv_tol
        mf.max_cycle = p.max_cycle
        mf.verbose = p.verbose
        return mf

    def _mol_for(self, atoms):
        """The Mole for ``atoms``, reusing (or resetting) the stored state."""
        charge, spin = self._charge_spin(atoms)
        key = (tuple(int(z) for z in atoms.numbers), charge, spin)
        if self._state is None or self._state.key != key:
            if self._state is not None:
                self.mf = None
            self._state = _State(key, self._make_mol(atoms, charge, spin),
                                 max(1, int(self.parameters.extrapolation_steps)))
            return self._state.mol
        return self._state.mol.set_geom_(atoms.positions / Bohr, unit='Bohr', inplace=False)

    # -- guesses -------------------------------------------------------------------------

    def _displacement(self, coords):
        """Largest atomic displacement (Angstrom) from the last step, mean translation removed."""
        if not self._state.steps:
            return None
        d = coords - self._state.steps[0]['coords']
        d -= d.mean(axis=0)
        return float(np.sqrt((d ** 2).sum(axis=1)).max()) * Bohr

    def _choose(self, disp):
        first, later = POLICIES[self.parameters.guess]
        steps = self._state.steps
        if later is None or not steps:
            return first
        thr = self.parameters.jump_threshold
        if thr is not None and disp > thr:
            steps.clear()           # a jump: the older steps say nothing about this geometry
            return first
        if later == 'extrapolate' and len(steps) >= 2:
            return 'extrapolate'
        return 'previous'

    def _guess(self, mf, kind):
        if kind == 'minao':
            return mf.get_init_guess(mf.mol, 'minao')
        if kind == 'densr':
            from pyscf_densr.hook import init_guess
            return init_guess(mf, model=self.parameters.model, device=self.parameters.device)
        steps = self._state.steps
        if kind == 'previous':
            return steps[0]['dm']
        coords = mf.mol.atom_coords()
        c = extrapolation_coefficients([st['coords'] for st in steps], coords)
        _, s_inv_half = _ovlp_powers(mf.get_ovlp())
        if steps[0]['dm'].ndim == 2:
            nocc = mf.mol.nelectron // 2
            dm, mo, occ = extrapolate_density([st['dm_orth'] for st in steps], c,
                                              s_inv_half, nocc, 2)
        else:
            dms, mos, occs = [], [], []
            for sp, n in enumerate(mf.mol.nelec):
                dm, mo, occ = extrapolate_density([st['dm_orth'][sp] for st in steps], c,
                                                  s_inv_half, n, 1)
                dms.append(dm)
                mos.append(mo)
                occs.append(occ)
            dm, mo, occ = np.asarray(dms), np.asarray(mos), np.asarray(occs)
        logger.debug(mf, 'densr-ase: extrapolation coefficients %s', c)
        return lib.tag_array(dm, mo_coeff=mo, mo_occ=occ)

    def _remember(self, mf, coords):
        dm = np.asarray(mf.make_rdm1())
        s_half, _ = _ovlp_powers(mf.get_ovlp())
        if dm.ndim == 2:
            dm_orth = s_half @ dm @ s_half
        else:
            dm_orth = np.asarray([s_half @ d @ s_half for d in dm])
        self._state.steps.appendleft({'coords': coords, 'dm': dm, 'dm_orth': dm_orth})

    # -- calculation ---------------------------------------------------------------------

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        """Run the SCF (if the geometry changed) and the requested properties."""
        if not properties:
            properties = ['energy']
        Calculator.calculate(self, atoms, properties, system_changes)
        self._check_atoms(self.atoms)
        if system_changes or self.mf is None or 'energy' not in self.results:
            self._scf(self.atoms)
        if 'forces' in properties and 'forces' not in self.results:
            self._forces()

    def _scf(self, atoms):
        self.mf = None
        mol = self._mol_for(atoms)
        coords = mol.atom_coords()
        disp = self._displacement(coords)
        kind = self._choose(disp)
        record = {'step': len(self.history) + 1, 'guess': kind, 'cycles': 0,
                  'converged': False, 'retried': False, 't_guess': 0.0, 't_scf': 0.0,
                  't_grad': None, 'energy': None, 'displacement': disp}
        self.history.append(record)
        mf = self._make_scf(mol)
        t0 = time.perf_counter()
        dm0 = self._guess(mf, kind)
        t1 = time.perf_counter()
        mf.kernel(dm0=dm0)
        t2 = time.perf_counter()
        record.update(cycles=mf.cycles, converged=bool(mf.converged),
                      t_guess=t1 - t0, t_scf=t2 - t1)
        if not mf.converged:
            msg = ('DensrCalculator: SCF not converged in %d cycles from the %s guess '
                   '(conv_tol %g); retrying from minao' % (mf.cycles, kind, mf.conv_tol))
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            logger.warn(mf, msg)
            mf = self._make_scf(mol)
            t0 = time.perf_counter()
            dm0 = mf.get_init_guess(mol, 'minao')
            t1 = time.perf_counter()
            mf.kernel(dm0=dm0)
            t2 = time.perf_counter()
            record.update(cycles=record['cycles'] + mf.cycles, converged=bool(mf.converged),
                          retried=True, t_guess=record['t_guess'] + t1 - t0,
                          t_scf=record['t_scf'] + t2 - t1)
            if not mf.converged:
                raise SCFError('DensrCalculator: SCF not converged from the %s guess nor from '
                               'minao (max_cycle %d, conv_tol %g); raise max_cycle, check the '
                               'geometry, charge and spin' % (kind, mf.max_cycle, mf.conv_tol))
        self.mf = mf
        self._remember(mf, coords)
        energy = float(mf.e_tot) * Hartree
        record['energy'] = energy
        logger.note(mf, 'densr-ase step %d: guess %s, %d cycles, guess %.2f s, SCF %.2f s',
                    record['step'], kind, record['cycles'], record['t_guess'], record['t_scf'])
        self.results['energy'] = energy
        self.results['free_energy'] = energy
        self.results['dipole'] = np.asarray(mf.dip_moment(unit='AU', verbose=0)) * Bohr
        self.results['charges'] = np.asarray(mf.mulliken_pop(verbose=0)[1])

    def _forces(self):
        mf = self.mf
        t0 = time.perf_counter()
        g = mf.nuc_grad_method()
        g.verbose = self.parameters.verbose
        if hasattr(g, 'grid_response'):
            g.grid_response = bool(self.parameters.grid_response)
        grad = g.kernel()
        if self.history and self.history[-1]['t_grad'] is None:
            self.history[-1]['t_grad'] = time.perf_counter() - t0
        self.results['forces'] = -np.asarray(grad) * (Hartree / Bohr)


# -- benchmark ---------------------------------------------------------------------------

BENCH_POLICIES = ('minao', 'previous', 'extrapolate', 'densr', 'densr+previous',
                  'densr+extrapolate')


def _load_molecule(name):
    import os
    from ase.build import molecule as build_molecule
    aliases = {'ethanol': 'CH3CH2OH', 'water': 'H2O', 'ammonia': 'NH3', 'methane': 'CH4'}
    if os.path.exists(name):
        from ase.io import read
        atoms = read(name)
    else:
        atoms = build_molecule(aliases.get(name.lower(), name))
    atoms.pbc = False
    return atoms


def thermalize(atoms, temperature, seed):
    """Maxwell-Boltzmann momenta at ``temperature`` K (seeded), no net translation or rotation."""
    from ase.md import velocitydistribution as vd
    rng = np.random.default_rng(seed)
    if hasattr(vd, 'thermalize_momenta'):        # ASE >= 3.29
        vd.thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    vd.Stationary(atoms)
    vd.ZeroRotation(atoms)


def bench(molecule='ethanol', xc='pbe', basis='def2-svp', steps=50,
          policies=BENCH_POLICIES, timestep=0.5, temperature=300.0, seed=7,
          density_fit=False, model=None, device=None, conv_tol=1e-9, out=sys.stdout):
    """SCF cycles and time per MD step for each guess policy, on one shared trajectory.

    A velocity-Verlet trajectory (``timestep`` fs, Maxwell-Boltzmann start at
    ``temperature`` K, ``seed``) is run with the first policy; every other policy replays
    the same ``steps + 1`` geometries (energies only). Times are per step: guess, SCF and
    their sum (s); force evaluations are not timed. Returns one dict per policy.
    """
    from ase import units
    from ase.md.verlet import VelocityVerlet
    start = _load_molecule(molecule)
    if any(POLICIES[_policy(pol)][0] == 'densr' for pol in policies):
        from pyscf_densr.hook import load_model
        load_model(model, device)       # load once, outside the timings
    common = dict(xc=xc, basis=basis, density_fit=density_fit, model=model, device=device,
                  conv_tol=conv_tol)
    print('# %s (%d atoms), %s/%s%s, %d MD steps of %.2f fs from %g K, %d thread(s)'
          % (start.get_chemical_formula(), len(start), xc, basis, ' (DF)' if density_fit else '',
             steps, timestep, temperature, lib.num_threads()), file=out, flush=True)

    atoms = start.copy()
    thermalize(atoms, temperature, seed)
    frames = []
    calc = DensrCalculator(guess=policies[0], **common)
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep * units.fs)
    dyn.attach(lambda: frames.append(atoms.positions.copy()), interval=1)
    t0 = time.perf_counter()
    dyn.run(steps)
    print('# trajectory with %s: %.1f s' % (policies[0], time.perf_counter() - t0),
          file=out, flush=True)
    records = {policies[0]: [h for h in calc.history]}
    for pol in policies[1:]:
        calc = DensrCalculator(guess=pol, **common)
        atoms = start.copy()
        atoms.calc = calc
        for pos in frames:
            atoms.positions = pos
            atoms.get_potential_energy()
        records[pol] = calc.history
        print('# replayed %s' % pol, file=out, flush=True)

    ref_name = 'minao' if 'minao' in records else policies[0]
    ref = records[ref_name]
    rows = []
    for pol in policies:
        hist = records[pol]
        cyc = np.array([h['cycles'] for h in hist])
        tg = np.array([h['t_guess'] for h in hist])
        ts = np.array([h['t_scf'] for h in hist])
        de = max(abs(h['energy'] - r['energy']) for h, r in zip(hist, ref)) / Hartree
        rows.append({'policy': pol, 'scf_runs': len(hist), 'cycles_mean': cyc.mean(),
                     'cycles_first': int(cyc[0]),
                     'cycles_later_mean': cyc[1:].mean() if len(cyc) > 1 else float('nan'),
                     'guess_s': tg.mean(), 'scf_s': ts.mean(), 'total_s': (tg + ts).mean(),
                     'retries': sum(h['retried'] for h in hist), 'max_dE_Eh': de,
                     'guesses': dict(collections.Counter(h['guess'] for h in hist))})
    print('# max abs dE: largest |E - E(%s)| along the trajectory, Hartree' % ref_name,
          file=out)
    print(format_table(rows), file=out, flush=True)
    return rows


def format_table(rows):
    """A Markdown table of :func:`bench` rows."""
    lines = ['| policy | SCF runs | cycles/step | first step | later steps | guess s/step '
             '| SCF s/step | total s/step | max abs dE (Eh) | retries |',
             '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for r in rows:
        lines.append('| %s | %d | %.2f | %d | %.2f | %.3f | %.3f | %.3f | %.1e | %d |' % (
            r['policy'], r['scf_runs'], r['cycles_mean'], r['cycles_first'],
            r['cycles_later_mean'], r['guess_s'], r['scf_s'], r['total_s'], r['max_dE_Eh'],
            r['retries']))
    return '\n'.join(lines)


def main(argv=None):
    """``python -m pyscf_densr.ase --bench [options]``: the MD guess-policy benchmark."""
    import argparse
    import json
    ap = argparse.ArgumentParser(prog='python -m pyscf_densr.ase',
                                 description='MD benchmark of the DensrCalculator guess policies')
    ap.add_argument('--bench', action='store_true', help='run the benchmark')
    ap.add_argument('--molecule', default='ethanol',
                    help='ase.build.molecule name (or ethanol/water/ammonia) or a file')
    ap.add_argument('--xc', default='pbe')
    ap.add_argument('--basis', default='def2-svp')
    ap.add_argument('--steps', type=int, default=50, help='MD steps (SCF runs = steps + 1)')
    ap.add_argument('--timestep', type=float, default=0.5, help='fs')
    ap.add_argument('--temperature', type=float, default=300.0, help='K')
    ap.add_argument('--seed', type=int, default=7)
    ap.add_argument('--policies', default=','.join(BENCH_POLICIES),
                    help='comma-separated; the first drives the trajectory')
    ap.add_argument('--density-fit', action='store_true')
    ap.add_argument('--conv-tol', type=float, default=1e-9)
    ap.add_argument('--model', default=None)
    ap.add_argument('--device', default=None)
    ap.add_argument('--json', default=None, help='also write the rows to this JSON file')
    args = ap.parse_args(argv)
    if not args.bench:
        ap.print_help()
        return 2
    rows = bench(args.molecule, args.xc, args.basis, args.steps,
                 [_policy(s) for s in args.policies.split(',') if s.strip()],
                 args.timestep, args.temperature, args.seed, args.density_fit,
                 args.model, args.device, args.conv_tol)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1, default=float)
    return 0


if __name__ == '__main__':
    sys.exit(main())
