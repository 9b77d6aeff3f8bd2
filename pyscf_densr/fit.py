"""Step 1 of the projection: delta-rho on a uniform grid in the terms of the Coulomb builds.

``coulomb_projection`` gives (k|delta-rho) for the auxiliary basis of the guess's Coulomb
engine (:mod:`coulomb`), from the potential of delta-rho (an FFT Poisson solve on the grid)
and a separable quadrature: the engine turns it into its fit coefficients, as PySCF's DF-J
does for a density matrix. ``grid_density`` interpolates the grid field itself at arbitrary
points (the molecular grids of the XC). ``make_auxmol`` is the auxiliary basis of a guess
that has no density-fitted SCF to borrow one from.
"""

import numpy as np
from pyscf import gto, df

from pyscf_densr import grid as grid_mod
from pyscf_densr.coulomb import _cart2sph_sparse

DEFAULT_AUXBASIS = 'def2-universal-jkfit'


def _element_of(symbol):
    """'O', 'O1', 'GHOST-O', 'ghost_O2', 'X-O' -> 'O'; a bare dummy 'X' -> ''."""
    s = str(symbol).strip()
    up = s.upper()
    if up.startswith('GHOST'):
        s = s[5:].lstrip('-_:')
    elif up.startswith('X-') or up.startswith('X_') or up.startswith('X:'):
        s = s[2:]
    s = ''.join(ch for ch in s if not ch.isdigit()).strip()
    if not s or s.upper() == 'X':
        return ''
    return gto.mole._std_symbol(s)


def make_auxmol(mol, auxbasis=DEFAULT_AUXBASIS):
    """The auxiliary (fitting) molecule, spherical functions, same atoms as ``mol``.

    Elements that ``auxbasis`` does not cover get PySCF's even-tempered basis
    (``df.aug_etb``, made from the atom's own AO basis) instead, so any element PySCF can
    handle can be fitted. Ghost atoms ('ghost-O', 'X-O') get their element's functions: the
    density near them is fitted like anywhere else; a bare ghost with a basis of its own
    ('ghost' with H functions, say) gets the even-tempered set of that basis. Bare dummy
    atoms without a basis get none.
    """
    if isinstance(auxbasis, str):
        basis = {}
        etb = None
        for symb in set(a[0] for a in mol._atom):
            elem = _element_of(symb)
            own = mol._basis.get(symb, mol._basis.get(elem) if elem else None)
            if not own:
                continue
            try:
                if not elem:
                    raise KeyError(symb)
                basis[symb] = gto.basis.load(auxbasis, elem)
            except Exception:
                etb = etb or df.aug_etb(mol)
                basis[symb] = etb.get(symb) or etb.get(elem)
        auxbasis = basis
    auxmol = df.make_auxmol(mol, auxbasis)
    if auxmol.cart:  # PySCF copies mol.cart; the fit and its charges assume spherical
        auxmol.cart = False
        auxmol.build(False, False)
    return auxmol


def charges(auxmol):
    """int chi_k(r) dr for every function of ``auxmol`` (spherical or Cartesian): the charge
    of each; zero but for s functions."""
    n = np.zeros(auxmol.nao)
    ao_loc = auxmol.ao_loc_nr()
    for ib in range(auxmol.nbas):
        if auxmol.bas_angular(ib) != 0:
            continue
        a = auxmol.bas_exp(ib)
        cs = auxmol._libcint_ctr_coeff(ib)
        q = np.einsum('pc,p->c', cs, (np.pi / a) ** 1.5) * 0.282094791773878143
        n[ao_loc[ib]:ao_loc[ib + 1]] = q
    return n


def coulomb_projection(auxmol, delta_rho, grid, max_memory=None):
    """(k|delta-rho) for every function chi_k of ``auxmol`` (Hartree): the right-hand side
    of the robust (Coulomb-metric) density fit, the one PySCF's DF-J makes of a density matrix.

    delta-rho (e/Bohr^3 on ``grid``) enters through its potential,
    (k|delta-rho) = int chi_k(r) v[delta-rho](r) dr: v by FFT on the grid
    (:func:`grid.hartree_potential`), the integral by the separable quadrature over the
    grid, each function narrower than a voxel averaged over the voxels
    (:func:`grid.project_on_cartesian_gtos`). Both grow as the grid (n log n and linearly);
    no (naux, naux) matrix is made. ``auxmol`` may be spherical or Cartesian; ``max_memory``
    (MB) bounds the quadrature's blocks.
    """
    v = grid_mod.hartree_potential(delta_rho, grid)
    if auxmol.cart:
        return grid_mod.project_on_cartesian_gtos(auxmol, v, grid, max_memory, True)
    cmol = auxmol.copy()
    cmol.cart = True
    cmol.build(False, False)
    b = grid_mod.project_on_cartesian_gtos(cmol, v, grid, max_memory, True)
    return _cart2sph_sparse(auxmol).T.dot(b)


def grid_density(field, grid, coords, deriv=0):
    """A field on a uniform ``grid`` at arbitrary ``coords`` (Bohr): (1, n), or (4, n) with the
    gradient for deriv=1. Trilinear interpolation; the gradient by central differences of
    one grid spacing; zero outside the box."""
    from scipy import ndimage
    frac = ((np.asarray(coords) - grid.origin) / grid.spacing).T
    out = np.empty((4 if deriv else 1, frac.shape[1]))

    def at(f):
        return ndimage.map_coordinates(field, f, order=1, mode='constant', cval=0.0,
                                       output=np.float64)
    out[0] = at(frac)
    if deriv:
        for i in range(3):
            f = frac.copy()
            f[i] += 1
            up = at(f)
            f[i] -= 2
            out[1 + i] = (up - at(f)) / (2 * grid.spacing)
    return out
