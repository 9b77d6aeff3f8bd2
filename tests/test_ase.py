"""The ASE calculator: forces, agreement with plain PySCF, guess policies, state, errors."""

import numpy as np
import pytest

pytest.importorskip('ase')

from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import CalculatorSetupError, InputError, SCFError
from ase.units import Bohr, Hartree, Debye
from pyscf import gto, scf, dft

from pyscf_densr.ase import (DensrCalculator, extrapolation_coefficients,
                             extrapolate_density, _ovlp_powers)


def _pyscf_mol(atoms, basis, charge=0, spin=0):
    return gto.M(atom=[(int(z), r) for z, r in zip(atoms.numbers, atoms.positions)],
                 unit='Angstrom', basis=basis, charge=charge, spin=spin, verbose=0)


def _fd_forces(atoms, calc, h=2e-3):
    """Central finite differences of the energy, eV/Angstrom."""
    f = np.zeros((len(atoms), 3))
    a = atoms.copy()
    a.calc = calc
    for i in range(len(atoms)):
        for k in range(3):
            e = []
            for s in (1, -1):
                a.positions = atoms.positions
                a.positions[i, k] += s * h
                e.append(a.get_potential_energy())
            f[i, k] = -(e[0] - e[1]) / (2 * h)
    return f


@pytest.mark.parametrize('name,xc', [('NH3', 'hf'), ('H2O', 'pbe')])
def test_forces_match_finite_differences(name, xc):
    atoms = molecule(name)
    atoms.rattle(0.02, seed=1)
    calc = DensrCalculator(xc=xc, basis='sto-3g', guess='previous', conv_tol=1e-11,
                           grid_response=True)
    atoms.calc = calc
    forces = atoms.get_forces()
    fd = _fd_forces(atoms, calc)
    assert np.abs(forces - fd).max() < 1e-3
    assert all(h['converged'] for h in calc.history)


@pytest.mark.parametrize('xc,basis,density_fit,charge,spin,guess', [
    ('pbe', '6-31g', False, 0, 0, 'densr'),
    ('hf', '6-31g', True, 0, 0, 'minao'),
    ('pbe', 'sto-3g', False, 1, 1, 'previous'),
])
def test_matches_plain_pyscf(xc, basis, density_fit, charge, spin, guess):
    atoms = molecule('H2O')
    atoms.rattle(0.02, seed=2)
    atoms.calc = DensrCalculator(xc=xc, basis=basis, density_fit=density_fit, charge=charge,
                                 spin=spin, guess=guess, conv_tol=1e-10)
    e = atoms.get_potential_energy()
    f = atoms.get_forces()
    dip = atoms.get_dipole_moment()
    q = atoms.get_charges()

    mol = _pyscf_mol(atoms, basis, charge, spin)
    if xc == 'hf':
        mf = scf.RHF(mol) if spin == 0 else scf.UHF(mol)
    else:
        mf = dft.RKS(mol, xc=xc) if spin == 0 else dft.UKS(mol, xc=xc)
    if density_fit:
        mf = mf.density_fit()
    mf.conv_tol = 1e-10
    mf.kernel()
    assert mf.converged
    assert abs(e - mf.e_tot * Hartree) < 1e-6
    assert np.abs(f + mf.nuc_grad_method().kernel() * Hartree / Bohr).max() < 1e-4
    assert np.allclose(dip, mf.dip_moment(verbose=0) * Debye, atol=1e-5)
    assert abs(q.sum() - charge) < 1e-8
    assert atoms.calc.get_property('free_energy') == e
    assert atoms.calc.history[-1]['cycles'] > 0
    assert atoms.calc.history[-1]['guess'] == {'previous': 'minao'}.get(guess, guess)


def _moves(atoms, calc, shifts):
    """Evaluate energies along ``shifts`` (Angstrom, applied to atom 0); the guesses used."""
    atoms = atoms.copy()
    atoms.calc = calc
    start = atoms.positions.copy()
    for s in shifts:
        atoms.positions = start
        atoms.positions[0] += s
        atoms.get_potential_energy()
    return [h['guess'] for h in calc.history]


SMALL, BIG = np.array([0, 0, .01]), np.array([0, 0, .5])


def test_policy_densr_previous():
    calc = DensrCalculator(xc='hf', basis='sto-3g', guess='densr+previous', jump_threshold=0.3)
    used = _moves(molecule('H2O'), calc, [0 * SMALL, SMALL, 2 * SMALL, BIG, BIG + SMALL])
    assert used == ['densr', 'previous', 'previous', 'densr', 'previous']
    h = calc.history
    assert h[1]['displacement'] < 0.3 < h[3]['displacement']
    assert h[0]['displacement'] is None
    assert h[1]['t_guess'] < h[0]['t_guess']


@pytest.mark.parametrize('policy,jump,expected', [
    ('minao', 0.3, ['minao'] * 5),
    ('previous', 0.3, ['minao', 'previous', 'previous', 'minao', 'previous']),
    ('previous', None, ['minao', 'previous', 'previous', 'previous', 'previous']),
    ('extrapolate', 0.3, ['minao', 'previous', 'extrapolate', 'minao', 'previous']),
    ('extrapolate', None, ['minao', 'previous', 'extrapolate', 'extrapolate', 'extrapolate']),
])
def test_policy_switches(policy, jump, expected):
    calc = DensrCalculator(xc='hf', basis='sto-3g', guess=policy, jump_threshold=jump)
    used = _moves(molecule('H2O'), calc, [0 * SMALL, SMALL, 2 * SMALL, BIG, BIG + SMALL])
    assert used == expected
    assert all(h['converged'] and not h['retried'] for h in calc.history)


def test_extrapolate_saves_cycles_on_smooth_path():
    atoms = molecule('H2O')
    cycles = {}
    for policy in ('previous', 'extrapolate'):
        calc = DensrCalculator(xc='hf', basis='6-31g', guess=policy)
        _moves(atoms, calc, [k * np.array([0, .004, .008]) for k in range(6)])
        cycles[policy] = sum(h['cycles'] for h in calc.history[3:])
    assert cycles['extrapolate'] <= cycles['previous']


def test_extrapolation_coefficients():
    rng = np.random.default_rng(0)
    r0, v, acc = rng.normal(size=(3, 4, 3))
    line = [r0 + t * v for t in range(4)]
    path = [r0 + t * v + t * t * acc for t in range(4)]
    assert np.allclose(extrapolation_coefficients([line[2], line[1]], line[3]), [2, -1])
    assert np.allclose(extrapolation_coefficients(path[2::-1], path[3]), [3, -3, 1])
    assert np.allclose(extrapolation_coefficients([path[2], path[1]], path[2]), [1, 0])
    assert np.allclose(extrapolation_coefficients([path[0]], path[3]), [1])
    c = extrapolation_coefficients([path[2], path[1], path[0]], path[1])
    assert abs(c.sum() - 1) < 1e-12


@pytest.mark.parametrize('spin', [0, 2])
def test_extrapolated_density_is_idempotent(spin):
    atoms = molecule('H2O')
    base = _pyscf_mol(atoms, 'sto-3g', spin=spin)
    dms, ss = [], []
    for dz in (0, .02, .04):
        coords = base.atom_coords()
        coords[0, 2] += dz / Bohr
        mol = base.set_geom_(coords, unit='Bohr', inplace=False)
        mf = scf.RHF(mol) if spin == 0 else scf.UHF(mol)
        mf.kernel()
        s_half, _ = _ovlp_powers(mf.get_ovlp())
        dm = np.asarray(mf.make_rdm1())
        dms.append(s_half @ dm @ s_half if spin == 0 else
                   np.asarray([s_half @ d @ s_half for d in dm]))
        ss.append(mf.get_ovlp())
        nelec = mol.nelec
    s = ss[-1]
    _, s_inv_half = _ovlp_powers(s)
    c = [2., -1.]
    if spin == 0:
        channels = [([dms[1], dms[0]], nelec[0], 2)]
    else:
        channels = [([dms[1][k], dms[0][k]], nelec[k], 1) for k in range(2)]
    for d, nocc, occ in channels:
        p, mo, mo_occ = extrapolate_density(d, c, s_inv_half, nocc, occ)
        assert np.allclose(p @ s @ p, occ * p, atol=1e-10)
        assert abs(np.trace(p @ s) - nocc * occ) < 1e-10
        assert np.allclose(mo.T @ s @ mo, np.eye(len(s)), atol=1e-10)
        assert mo_occ.sum() == nocc * occ


def test_set_resets_state():
    atoms = molecule('H2O')
    calc = DensrCalculator(xc='hf', basis='sto-3g', guess='previous')
    atoms.calc = calc
    e1 = atoms.get_potential_energy()
    atoms.positions[0, 2] += .01
    atoms.get_potential_energy()
    assert [h['guess'] for h in calc.history] == ['minao', 'previous']

    assert calc.set(verbose=0) == {}           # unchanged: nothing happens
    calc.set(max_cycle=60)                    # numerics: results go, the state stays
    assert calc.results == {} and calc._state is not None
    atoms.get_potential_energy()
    assert calc.history[-1]['guess'] == 'previous'
    assert calc.history[-1]['displacement'] == 0

    calc.set(basis='6-31g')                   # physics: everything goes
    assert calc.results == {} and calc._state is None and calc.mf is None
    e2 = atoms.get_potential_energy()
    assert calc.history[-1]['guess'] == 'minao'
    assert e2 < e1

    atoms.set_initial_charges([1, 0, 0])       # charge from the atoms: a new system
    atoms.set_initial_magnetic_moments([1, 0, 0])
    atoms.get_potential_energy()
    assert calc.history[-1]['guess'] == 'minao'
    assert calc.mf.mol.charge == 1 and calc.mf.mol.spin == 1

    nh3 = molecule('NH3')                     # other atoms: a new system
    nh3.calc = calc
    nh3.get_potential_energy()
    assert calc.history[-1]['guess'] == 'minao'
    assert len(calc.history) == 6


def test_forces_reuse_scf():
    atoms = molecule('H2O')
    atoms.calc = DensrCalculator(xc='hf', basis='sto-3g', guess='minao')
    atoms.get_potential_energy()
    atoms.get_forces()
    atoms.get_dipole_moment()
    assert len(atoms.calc.history) == 1
    assert atoms.calc.history[0]['t_grad'] is not None


def test_pbc_raises():
    atoms = molecule('H2O', vacuum=3.0)
    atoms.pbc = True
    atoms.calc = DensrCalculator(xc='hf', basis='sto-3g')
    with pytest.raises(CalculatorSetupError, match='periodic'):
        atoms.get_potential_energy()


def test_bad_parameters():
    with pytest.raises(InputError, match='unknown parameter'):
        DensrCalculator(functional='pbe')
    with pytest.raises(InputError, match='guess must be one of'):
        DensrCalculator(guess='sad')
    assert DensrCalculator(guess='minao+previous').parameters.guess == 'previous'


def test_unconverged_retries_then_raises():
    atoms = Atoms('H2O', positions=molecule('H2O').positions)
    atoms.calc = DensrCalculator(xc='hf', basis='sto-3g', guess='minao', max_cycle=2,
                                 conv_tol=1e-12)
    with pytest.warns(RuntimeWarning, match='retrying from minao'):
        with pytest.raises(SCFError, match='not converged'):
            atoms.get_potential_energy()
    h = atoms.calc.history[-1]
    assert h['retried'] and not h['converged'] and h['cycles'] == 4
    assert atoms.calc.mf is None


def test_unconverged_guess_recovers_from_minao(monkeypatch):
    atoms = molecule('H2O')
    mol = _pyscf_mol(atoms, 'sto-3g')
    ref = scf.RHF(mol)
    ref.kernel()
    hcore = scf.RHF(mol)
    hcore.kernel(hcore.get_init_guess(key='1e'))
    if hcore.cycles <= ref.cycles:
        pytest.skip('the core guess is not slower than minao here')
    calc = DensrCalculator(xc='hf', basis='sto-3g', guess='minao', max_cycle=ref.cycles)
    monkeypatch.setattr(calc, '_guess', lambda mf, kind: mf.get_init_guess(key='1e'))
    atoms.calc = calc
    with pytest.warns(RuntimeWarning, match='retrying from minao'):
        e = atoms.get_potential_energy()
    h = calc.history[-1]
    assert h['retried'] and h['converged']
    assert h['cycles'] == ref.cycles * 2
    assert abs(e - ref.e_tot * Hartree) < 1e-6


def test_wraps_a_ready_pyscf_method():
    """A configured PySCF method (here a density-fitted hybrid on coarse grids)
    drives the calculator: its energy at each geometry is that method's, the densr policies
    apply, the wrong elements are refused, and a new method resets the state."""
    from pyscf import gto, dft
    atoms = molecule('H2O')
    mol = gto.M(atom=[(s, p) for s, p in zip(atoms.get_chemical_symbols(), atoms.positions)],
                basis='def2-svp', verbose=0)
    method = dft.RKS(mol, xc='b3lyp').density_fit()
    method.grids.level = 1
    method.conv_tol = 1e-10
    calc = DensrCalculator(method=method, guess='densr+previous')
    atoms.calc = calc
    for shift in (0.0, 0.02):
        atoms.positions[0, 2] += shift
        e = atoms.get_potential_energy()
        ref = dft.RKS(mol.set_geom_(atoms.positions, inplace=False), xc='b3lyp').density_fit()
        ref.grids.level = 1
        ref.conv_tol = 1e-10
        assert abs(e / Hartree - ref.kernel()) < 1e-8
    assert [h['guess'] for h in calc.history] == ['densr', 'previous']
    assert calc.mf.xc == 'b3lyp' and calc.mf.grids.level == 1
    calc.set(method=dft.RKS(mol, xc='pbe'))
    assert calc._state is None
    with pytest.raises(InputError, match='elements'):
        bad = molecule('NH3')
        bad.calc = DensrCalculator(method=method)
        bad.get_potential_energy()
