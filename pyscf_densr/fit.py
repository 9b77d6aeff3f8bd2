"""Step 1 of the projection: delta-rho on a uniform grid in the terms of the Coulomb builds.

``coulomb_projection`` gives (k|delta-rho) for the auxiliary basis of the guess's Coulomb
engine (:mod:`coulomb`), which turns it into its fit coefficients, as PySCF's DF-J does for a
density matrix: up to :data:`GRID_FIT_MAX` functions from a least-squares fit of the grid
values by Gaussians (``fit_delta_rho``; right-hand side and Gram matrix by the separability
of Gaussians, :mod:`grid`), above from the potential of delta-rho (an FFT Poisson solve)
and a separable quadrature, which grow as the grid. ``grid_density`` interpolates the grid
field itself at arbitrary points (the molecular grids of the XC). ``make_auxmol`` is the
auxiliary basis of a guess that has no density-fitted SCF to borrow one from.
"""

import numpy as np
import scipy.linalg
from pyscf import gto, df

from pyscf_densr import grid as grid_mod
from pyscf_densr.coulomb import _cart2sph_sparse

DEFAULT_AUXBASIS = 'def2-universal-jkfit'
EIGH_MAX = 2500  # auxiliary functions up to which the grid fit uses a full eigendecomposition
GRID_FIT_MAX = 6000  # auxiliary functions up to which delta-rho is fitted to the grid values


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


def _solve_metric(metric, rhs, cond, solver='auto', overwrite=False):
    """``metric^-1 rhs`` for a symmetric positive semi-definite ``metric``.

    'eigh' inverts in the subspace of eigenvalues above ``cond`` times the largest; 'cholesky'
    adds ``cond`` times the largest diagonal element to the diagonal (Tikhonov) and solves by
    Cholesky, about 7 times faster (2166 functions: 0.14 s against 1.0 s) and without a
    second (n, n) matrix when ``overwrite``. 'auto' takes 'eigh' up to :data:`EIGH_MAX`
    functions: the two agree to 1e-6 of the fit's Coulomb norm where the grid values carry
    the fit (held-out QM9, drug-like molecules), but where they are about zero and the
    charge constraint alone sets it (ZnCl2: every atom outside the network's elements, the
    delta-rho switched off) Tikhonov's softer cut lets functions the grid cannot resolve
    carry that charge, and the guess's Fock builds then stall.
    """
    n = len(metric)
    if solver == 'auto':
        solver = 'eigh' if n <= EIGH_MAX else 'cholesky'
    if solver == 'eigh':
        w, u = scipy.linalg.eigh(metric)
        keep = w > cond * w[-1]
        u, w = u[:, keep], w[keep]
        return u.dot(u.T.dot(rhs) / w[:, None])
    if solver != 'cholesky':
        raise ValueError('solver must be auto, eigh or cholesky, not %r' % solver)
    a = metric if overwrite else metric.copy()
    a[np.diag_indices(n)] += cond * max(float(np.max(np.diag(a))), 1e-300)
    # LAPACK works in place on a Fortran-ordered array: a symmetric C-ordered matrix is
    # its own transpose, so factorising a.T avoids a second (n, n) copy
    low = scipy.linalg.cho_factor(a.T if a.flags.c_contiguous else a, lower=True,
                                  overwrite_a=True, check_finite=False)
    return scipy.linalg.cho_solve(low, rhs, check_finite=False)


def fit_delta_rho(auxmol, delta_rho, grid, charge=0.0, metric=None, cond=1e-10,
                  solver='auto', max_memory=None):
    """Fit coefficients ``c`` so that sum_k c_k chi_k(r) ~ ``delta_rho`` on ``grid``.

    Args:
        auxmol: spherical auxiliary basis (from :func:`make_auxmol`).
        delta_rho: array of ``grid.shape`` in e/Bohr^3.
        grid: the :class:`grid.UniformGrid` delta_rho lives on.
        charge: the number of electrons the fitted density must integrate to exactly.
        metric: the metric of the fit; default the discrete Gram matrix of the auxiliary
            functions on ``grid`` (an unweighted least-squares fit to the grid values).
        cond: relative threshold of the (near) null space of the metric that is left out.
        solver: 'auto', 'eigh' or 'cholesky' (see :func:`_solve_metric`).
        max_memory: working memory (MB) of the blocked quadratures beyond the (naux, naux)
            metric itself (see :mod:`grid`).

    Returns:
        c, (naux,) array.
    """
    cmol = auxmol.copy()
    cmol.cart = True
    cmol.build(False, False)
    c2s = _cart2sph_sparse(auxmol)
    b = c2s.T.dot(grid_mod.project_on_cartesian_gtos(cmol, delta_rho, grid, max_memory))
    own = metric is None
    if own:
        metric = grid_mod.gram_of_cartesian_gtos(cmol, grid, transform=c2s,
                                                 max_memory=max_memory)
    n = charges(auxmol)
    # Solve S c = b - lambda n, n.c = charge, in the well-conditioned subspace of S.
    rhs = np.stack([b, n], axis=1)
    try:
        x = _solve_metric(metric, rhs, cond, solver, overwrite=own)
    except np.linalg.LinAlgError:
        # Cholesky met a numerically indefinite metric (only for nearly linearly dependent
        # auxiliary sets): the eigendecomposition drops the offending directions instead
        if own:
            metric = grid_mod.gram_of_cartesian_gtos(cmol, grid, transform=c2s,
                                                     max_memory=max_memory)
        x = _solve_metric(metric, rhs, cond, 'eigh')
    sinv_b, sinv_n = x[:, 0], x[:, 1]
    lam = (n.dot(sinv_b) - charge) / n.dot(sinv_n)
    return sinv_b - lam * sinv_n


def grid_fit_affordable(fitmol, max_memory):
    """Whether the least-squares fit of the grid values in ``fitmol`` is the route: at most
    :data:`GRID_FIT_MAX` functions, and its Gram matrix and Coulomb cross matrix (8 n^2
    bytes each) within half of ``max_memory`` (MB; what the SCF leaves free)."""
    n = fitmol.nao
    return n <= GRID_FIT_MAX and 16e-6 * n * n < 0.5 * max_memory


def coulomb_projection(auxmol, delta_rho, grid, charge=0.0, fitmol=None, max_memory=None):
    """(k|delta-rho) for every function chi_k of ``auxmol``: the right-hand side of the
    robust (Coulomb-metric) density fit, the one PySCF's DF-J makes of a density matrix.

    Two routes, chosen by :func:`grid_fit_affordable`:

    - grid fit (``fitmol`` given and affordable): delta-rho fitted to the grid values by the
      functions of ``fitmol`` (:func:`fit_delta_rho`, ``charge`` electrons), then its exact
      Coulomb projection onto ``auxmol`` (int2c2e). Gaussians with tight functions
      interpret the samples near nuclei as the sharp features they are; the Gram matrix and
      its solve grow as n_aux^2 and n_aux^3.
    - Poisson (larger systems): (k|delta-rho) = int chi_k v[delta-rho], v by FFT on the grid
      (:func:`grid.hartree_potential`), the integral by the separable quadrature, each
      function narrower than a voxel averaged over the voxels. Both grow as the grid
      (n log n and linearly); no (naux, naux) matrix is made. Sharp features near nuclei
      count as voxel averages: on held-out QM9 molecules the exact delta-rho needs 0.6
      cycles more this way (the shipped network's delta-rho the same cycles).

    ``auxmol`` may be spherical or Cartesian; ``max_memory`` is ``mf.max_memory`` (MB):
    what it leaves free decides whether the grid fit's matrices fit, and the quadrature's
    blocks follow :func:`grid.block_memory`.
    Returns (b, route): the projections and 'grid fit' or 'Poisson'.
    """
    if max_memory is None:
        free, blocks = np.inf, grid_mod.BLOCK_MEMORY
    else:
        free, blocks = grid_mod.free_memory(max_memory), grid_mod.block_memory(max_memory)
    if fitmol is not None and grid_fit_affordable(fitmol, free):
        c = fit_delta_rho(fitmol, delta_rho, grid, charge=charge, max_memory=blocks)
        jmol = fitmol
        if auxmol.cart and not fitmol.cart:
            jmol = fitmol.copy()
            jmol.cart = True
            jmol.build(False, False)
            c = _cart2sph_sparse(fitmol).dot(c)
        return gto.intor_cross('int2c2e', auxmol, jmol).dot(c), 'grid fit'
    v = grid_mod.hartree_potential(delta_rho, grid)
    if auxmol.cart:
        return grid_mod.project_on_cartesian_gtos(auxmol, v, grid, blocks, True), 'Poisson'
    cmol = auxmol.copy()
    cmol.cart = True
    cmol.build(False, False)
    b = grid_mod.project_on_cartesian_gtos(cmol, v, grid, blocks, True)
    return _cart2sph_sparse(auxmol).T.dot(b), 'Poisson'


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
