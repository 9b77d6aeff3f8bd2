"""densr as the default guess of every SCF: PySCF's own guess where densr does not apply,
no crash where minao works, and the molecule's point-group symmetry kept exactly."""

import numpy as np
import pytest
from pyscf import gto, scf, dft

import pyscf_densr
from pyscf_densr import compat, symmetry

WATER = 'O 0 0 0; H 0 -0.757 0.587; H 0 0.757 0.587'


def _ammonia():
    r, z = 1.78, 0.72   # Bohr: an exact C3v geometry
    h = [(r * np.cos(2 * np.pi * k / 3), r * np.sin(2 * np.pi * k / 3), 0.0) for k in range(3)]
    return [('N', (0.0, 0.0, z))] + [('H', p) for p in h]


def _rotated(atoms, seed=3):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return [(s, np.dot(q, p) + (0.4, -1.1, 0.7)) for s, p in atoms]


@pytest.mark.parametrize('atom,order', [
    (WATER, 4),
    (_rotated(_ammonia()), 6),                                          # C3v, non-Abelian
    (_rotated([('C', (0, 0, 0))] + [('H', (s * 1.19, t * 1.19, s * t * 1.19))
                                     for s, t in ((1, 1), (1, -1), (-1, 1), (-1, -1))]), 24),
    ('C 0 0 0; O 0 0 1.128', 12),                                       # linear: C6v subgroup
    ('O 0 0 0; F 0.3 0.7 0.9; Cl 1 0 2', 2),                            # planar: Cs
    ('H 0 0 0; F 0.3 0.7 0.9; Cl 1 0 2; H -1 0.4 0.1', 1),
])
def test_point_group_and_its_ao_representation(atom, order):
    """The operations found form the point group (in any orientation); each leaves the
    overlap and core Hamiltonian matrices invariant in the basis."""
    mol = gto.M(atom=atom, basis='cc-pvdz', unit='Bohr' if not isinstance(atom, str) else 'A',
                verbose=0)
    sym = symmetry.Symmetrizer(mol)
    assert sym.order == order
    for m in (mol.intor('int1e_ovlp'), scf.hf.get_hcore(mol)):
        for u in sym.us:
            assert abs(u.T.dot(u.T.dot(m.T).T) - m).max() < 1e-10
        assert abs(sym.operator(m) - m).max() < 1e-10


def _dipoles(make, mol):
    out = []
    for key in ('minao', 'densr'):
        mf = make(mol)
        mf.conv_tol = 1e-9
        mf.init_guess = key
        e = mf.kernel()
        out.append((e, mf.dip_moment(unit='au', verbose=0)))
    return out


@pytest.mark.parametrize('symm', [False, True])
def test_water_dipole_keeps_c2v(symm):
    """The converged dipole has no component off the C2 axis, to minao's precision."""
    mol = gto.M(atom=WATER, basis='cc-pvdz', symmetry=symm, verbose=0)
    (e0, d0), (e1, d1) = _dipoles(scf.RHF, mol)
    axis = np.argmax(abs(d0))
    off = [i for i in range(3) if i != axis]
    assert abs(e0 - e1) < 1e-8
    assert abs(d1[off]).max() < 2 * abs(d0[off]).max() + 1e-12


@pytest.mark.parametrize('make', [scf.RHF, lambda m: dft.RKS(m, xc='pbe')], ids=['rhf', 'pbe'])
def test_ammonia_dipole_keeps_c3v(make):
    """A non-Abelian group in an arbitrary orientation (PBE: PySCF's grids break it a
    little for minao too; densr adds nothing to that)."""
    atoms = _rotated(_ammonia())
    mol = gto.M(atom=atoms, unit='Bohr', basis='6-31g', verbose=0)
    (e0, d0), (e1, d1) = _dipoles(make, mol)
    axis = np.dot(np.array(atoms[0][1]) - np.mean([p for _, p in atoms[1:]], axis=0), 1)
    axis /= np.linalg.norm(axis)
    perp = lambda d: np.linalg.norm(d - d.dot(axis) * axis)  # noqa: E731
    assert abs(e0 - e1) < 1e-8
    assert perp(d1) < 2 * perp(d0) + 1e-12, (perp(d0), perp(d1))


def test_direct_scf_off_with_exact_exchange():
    """RHF with direct_scf off and no memory: PySCF's get_k alone has no screening object."""
    mol = gto.M(atom=WATER, basis='6-31g', verbose=0)
    e = []
    for key in ('minao', 'densr'):
        mf = scf.RHF(mol)
        mf.direct_scf = False
        mf.max_memory = 0
        mf.init_guess = key
        e.append(mf.kernel())
    assert abs(e[0] - e[1]) < 1e-8


def test_classify_compat_failures():
    assert compat.classify("AssertionError: -75.9839 != -75.9840 within 9 places "
                           "(1.2e-07 difference)") == 'tolerance'
    assert compat.classify("AssertionError: -75.9 != -75.1 within 9 places "
                           "(0.8 difference)") == 'real'
    assert compat.classify("AttributeError: 'NoneType' object has no attribute") == 'real'
    assert compat.classify("AssertionError: 7 != 12") == 'tolerance'
    assert compat.classify("AssertionError: np.float64(5.3e-07) != 0 within 6 places "
                           "(np.float64(5.3e-07) difference)") == 'tolerance'
    base = {'a::t1': ('passed', ''), 'a::t2': ('passed', ''), 'a::t3': ('failed', 'x')}
    densr = {'a::t1': ('passed', ''), 'a::t2': ('error', 'IndexError: list index'),
             'a::t3': ('failed', 'x')}
    rows = compat.compare(base, densr)
    assert rows == [('a::t2', 'real', 'IndexError: list index')]
    text = compat.report(rows, base, densr, [('a::t1', False, 'densr guess failed inside'),
                                             ('a::t3', True, 'densr guess: no atoms')])
    assert '| 3 | 2 | 0 | 2 | 1 tests |' in text and 'guess failed: densr guess' in text


def test_small_molecules_get_pyscf_guess(monkeypatch):
    """Below hook.MIN_NAO basis functions the SCF costs less than any guess: PySCF's own
    guess with a note (NotApplicable when strict); at or above it, the densr guess."""
    from pyscf_densr import hook
    monkeypatch.setattr(hook, 'MIN_NAO', 40)
    mol = gto.M(atom=WATER, basis='def2-svp', verbose=0)
    assert mol.nao < 40
    with pytest.raises(hook.NotApplicable, match='basis functions'):
        pyscf_densr.init_guess(scf.RHF(mol), fallback='error')
    assert np.allclose(pyscf_densr.init_guess(scf.RHF(mol)), scf.RHF(mol).init_guess_by_minao())
    big = gto.M(atom=WATER, basis='def2-tzvp', verbose=0)
    assert big.nao >= 40
    dm = pyscf_densr.init_guess(scf.RHF(big), fallback='error')
    assert not np.allclose(dm, scf.RHF(big).init_guess_by_minao(), atol=1e-3)


@pytest.mark.parametrize('cls', [scf.RHF, scf.UHF, scf.GHF])
def test_hartree_fock_gets_pyscf_guess(monkeypatch, cls):
    """Hartree-Fock (no XC): PySCF's own guess with a note, NotApplicable when strict;
    Kohn-Sham on the same molecule gets the densr guess."""
    from pyscf_densr import hook
    monkeypatch.setattr(hook, 'COVER_HF', False)
    mol = gto.M(atom=WATER, basis='def2-svp', verbose=0)
    with pytest.raises(hook.NotApplicable, match='Hartree-Fock'):
        pyscf_densr.init_guess(cls(mol), fallback='error')
    assert np.allclose(pyscf_densr.init_guess(cls(mol)), cls(mol).get_init_guess())
    dm = pyscf_densr.init_guess(dft.RKS(mol, xc='pbe'), fallback='error')
    assert not np.allclose(dm, dft.RKS(mol, xc='pbe').init_guess_by_minao(), atol=1e-3)


def test_bare_ghost_atom_with_its_own_basis():
    """A bare 'ghost' carrying H functions (PySCF's own test_ghost_atm_meta_lowdin): an
    even-tempered fitting set made from its basis, and minao's energy."""
    mol = gto.M(atom=[['O', (0., 0., 0.)], ['ghost', (0., -0.757, 0.587)],
                      [1, (0., 0.757, 0.587)]], spin=1, symmetry=True, verbose=0,
                basis={'O': 'ccpvdz', 'H': 'ccpvdz', 'GHOST': gto.basis.load('ccpvdz', 'H')})
    from pyscf_densr import fit
    assert fit.make_auxmol(mol).atom_nshells(1) > 0
    pyscf_densr.init_guess(scf.RHF(mol), fallback='error')
    e = []
    for key in ('minao', 'densr'):
        mf = scf.RHF(mol)
        mf.init_guess = key
        e.append(mf.kernel())
    assert abs(e[0] - e[1]) < 1e-8


@pytest.mark.parametrize('breaksym', [1, 'mix'])
def test_uhf_singlet_breaks_spin_symmetry_as_pyscf_does(breaksym):
    """UHF of stretched H2 with init_guess_breaksym: the densr guess is broken as PySCF's
    own guesses are, and reaches the same (broken-symmetry for 'mix') solution."""
    mol = gto.M(atom='H 0 0 0; H 0 0 4.0', basis='sto-3g', verbose=0)
    e = []
    for key in ('minao', 'densr'):
        mf = scf.UHF(mol)
        mf.init_guess_breaksym = breaksym
        mf.init_guess = key
        e.append(mf.kernel())
        dm0 = mf.get_init_guess(key=key)
        assert abs(dm0[0] - dm0[1]).max() > 1e-3
    assert abs(e[0] - e[1]) < 1e-8



def test_uks_singlet_break_as_strong_as_pyscf_gives_its_own_guess(ethanol):
    """UKS of closed-shell ethanol with PySCF's default init_guess_breaksym (1): the densr
    guess is broken by as much (alpha - beta, Frobenius norm) as PySCF breaks P_SAD, not by
    the full removal of the bonds' blocks from beta, and keeps fewer cycles than minao."""
    mf = dft.UKS(ethanol, xc='pbe')
    sad = mf.init_guess_by_minao()
    dm = mf.get_init_guess(key='densr')
    want = np.linalg.norm(sad[0] - sad[1])
    assert want > 1e-3
    assert abs(np.linalg.norm(dm[0] - dm[1]) - want) < 1e-8 * max(want, 1)
    ref = dft.UKS(ethanol, xc='pbe').run()
    mf.kernel(dm0=dm)
    assert mf.converged and abs(mf.e_tot - ref.e_tot) < 1e-6
    assert mf.cycles < ref.cycles, (mf.cycles, ref.cycles)


def test_scf_that_cannot_occupy_raises_its_own_error():
    """He triplet in one s function: PySCF's own occupation error, not a DensrError."""
    mol = gto.M(atom='He 0 0 1', basis=[[0, [.6, 1]]], spin=2, verbose=0)
    with pytest.raises(RuntimeError, match='mo_occ') as e:
        pyscf_densr.init_guess(mol.UHF(), fallback='error')
    assert not isinstance(e.value, pyscf_densr.DensrError)
    mf = mol.UHF()
    mf.init_guess = 'densr'
    with pytest.raises(RuntimeError):
        mf.run()
