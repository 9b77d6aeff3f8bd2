"""From a density correction on a uniform grid back to a density matrix.

The path (all PySCF-native):

1. ``fit_delta_rho``: fit delta-rho (e/Bohr^3 on a uniform grid) with an auxiliary Gaussian
   basis, ``delta-rho(r) ~ sum_k c_k chi_k(r)``: least squares over the grid points, with the
   electron count conserved exactly (a Lagrange constraint). Both the right-hand side and
   the Gram matrix use the separability of Gaussians (see :mod:`grid`), so the fit costs a
   few matrix products instead of evaluating every function on every voxel.
2. ``local_potential``: the effective potential of rho_guess = rho_SAD + sum_k c_k chi_k. Coulomb
   from J[P_SAD] plus the 3-centre integrals (mu nu|k) c_k; XC evaluated on the SCF's own
   molecular grids with rho_guess (value and gradient) in place of the density matrix's.
   Exact exchange (HF, hybrids, range-separated) needs a density matrix: it is taken from
   P_SAD, and with ``exchange="iterate"`` (the default for such methods) rebuilt once from
   the first diagonalisation (``add_exchange``).
3. ``density_matrix_from_veff``: F = h + V, diagonalise and occupy with the SCF object's own
   ``eig``/``get_occ``/``make_rdm1``, so RHF/UHF/ROHF (and their KS variants) each get the
   occupation they would use themselves; the result carries ``mo_coeff`` and ``mo_occ``.
4. ``anderson_step`` (``fock_builds`` > 1): further Fock builds, each at the density of the
   last matrix, and the aufbau matrix of the Anderson (DIIS) combination of all the Fock
   matrices, which undoes most of the first step's overshoot.

Open shells: delta-rho is a change of the total density, split equally between the spins;
the spin density comes from the spin-unrestricted (or restricted-open) Fock build and its
aufbau occupation.
"""

import time
import numpy as np
import scipy.linalg
from pyscf import gto, df, lib
from pyscf.lib import logger
from pyscf.dft import numint

BLKSIZE = numint.BLKSIZE

from pyscf_densr import grid as grid_mod
from pyscf_densr import symmetry
from pyscf_densr.coulomb import _cart2sph_sparse, coulomb_engine, coulomb_of_aux
from pyscf_densr.errors import SCFOwnError

DEFAULT_AUXBASIS = 'def2-universal-jkfit'
# upper bound of the guess's Fock builds (project.anderson_step); each costs one DF-J and XC build
MAX_FOCK_BUILDS = 6


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


def _s_integrals(auxmol):
    """int chi_k(r) dr for every (spherical) auxiliary function: the charge of each."""
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


EIGH_MAX = 2500  # auxiliary functions up to which the fit uses a full eigendecomposition


def _solve_metric(metric, rhs, cond, solver='auto', overwrite=False):
    """``metric^-1 rhs`` for a symmetric positive semi-definite ``metric``.

    'eigh' inverts in the subspace of eigenvalues above ``cond`` times the largest; 'cholesky'
    adds ``cond`` times the largest diagonal element to the diagonal (Tikhonov) and solves by
    Cholesky, about 20 times faster for large metrics and without a second (n, n) matrix when
    ``overwrite``. 'auto' takes 'eigh' up to :data:`EIGH_MAX` functions.
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
    n = _s_integrals(auxmol)
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


def aux_density(auxmol, c, coords, deriv=0, max_memory=None):
    """sum_k c_k chi_k at ``coords`` ((1, n) values, or (4, n) with the gradient for deriv=1).

    Points are taken in chunks (PySCF's molecular grids come grouped in space), and each
    chunk evaluates only the auxiliary shells that reach it, so the cost grows linearly
    with the size of a large molecule and the values never exceed ``max_memory`` MB
    (default ``PYSCF_DENSR_BLOCK_MEMORY`` or 200).
    """
    comp = 4 if deriv else 1
    intor = 'GTOval_sph_deriv1' if deriv else 'GTOval_sph'
    naux = auxmol.nao
    budget = grid_mod._default_memory(max_memory) * 1e6 / 8
    blk = max(BLKSIZE, min(int(budget // (comp * naux)), 2048) // BLKSIZE * BLKSIZE)
    out = np.zeros((comp, len(coords)))
    for p0 in range(0, len(coords), blk):
        p1 = min(p0 + blk, len(coords))
        mask = numint.make_mask(auxmol, coords[p0:p1])
        shls = np.nonzero(mask.any(axis=0))[0]
        if len(shls) == 0:
            continue
        sub = grid_mod.submol(auxmol, shls)
        idx = grid_mod.shell_ao_index(auxmol, shls)
        ao = sub.eval_gto(intor, coords[p0:p1], non0tab=np.asarray(mask[:, shls], order='C'))
        ao = ao.reshape(comp, p1 - p0, len(idx))
        ci = c[idx]
        for k in range(comp):  # per component: eval_gto's layout is not C order, no copy
            out[k, p0:p1] = ao[k].dot(ci)
    return out


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


def xc_potential(mf, dm_sad, auxmol, c, grids=None, delta_grid=None):
    """XC energy and potential matrix of rho_guess = rho[dm_sad] + delta-rho.

    ``dm_sad`` is (nao, nao) for a restricted calculation or (2, nao, nao) for alpha/beta;
    delta-rho is split equally between the spins. Meta-GGA kinetic energy densities are
    taken from ``dm_sad`` alone. delta-rho is the fitted sum_k c_k chi_k, or, when
    ``delta_grid = (delta_rho, grid, sad_scale)`` is given, the grid field itself
    interpolated onto the molecular grid (:func:`grid_density`, several times cheaper than
    evaluating the auxiliary functions there) with rho[dm_sad] scaled by ``sad_scale`` (see
    :func:`density_matrix_from_delta_rho`); ``c`` None and no ``delta_grid``: rho[dm_sad]
    alone. Returns (exc, vxc) in Hartree.
    """
    mol = mf.mol
    ni = mf._numint
    xc = mf.xc
    grids = grids or mf.grids
    if grids.coords is None:
        grids.build(with_non0tab=True)
    xctype = ni._xc_type(xc)
    if xctype not in ('LDA', 'GGA', 'MGGA'):
        raise NotImplementedError('densr guess for XC type %s' % xctype)
    orbitals = _occupied_orbitals(dm_sad)
    dm_sad = np.asarray(dm_sad)
    spin = 1 if dm_sad.ndim == 3 else 0
    dms = dm_sad if spin else dm_sad[None]
    nset = len(dms)
    nao = mol.nao
    ao_deriv = 0 if xctype == 'LDA' else 1
    vmat = np.zeros((nset, nao, nao))
    excsum = 0.0
    max_memory = max(500, mf.max_memory - lib.current_memory()[0])
    for ao, mask, weight, coords in ni.block_loop(mol, grids, nao, ao_deriv,
                                                   max_memory=max_memory * .5):
        if orbitals is None:
            rho = [ni.eval_rho(mol, ao, d, mask, xctype, hermi=1) for d in dms]
        else:
            rho = [ni.eval_rho2(mol, ao, mo, occ, mask, xctype) for mo, occ in orbitals]
        if delta_grid is None and c is None:
            drho = None
        elif delta_grid is None:
            drho = aux_density(auxmol, c, coords, deriv=ao_deriv) / nset
        else:
            field, fgrid, sad_scale = delta_grid
            drho = grid_density(field, fgrid, coords, ao_deriv) / nset
            for r in rho:
                r *= sad_scale
        for r in rho:
            if xctype == 'LDA':
                if drho is not None:
                    r += drho[0]
                np.maximum(r, 0, out=r)
            else:
                if drho is not None:
                    r[:4] += drho
                neg = r[0] < 1e-14
                r[:, neg] = 0
        rho = np.asarray(rho) if spin else rho[0]
        exc, vxc = ni.eval_xc_eff(xc, rho, deriv=1, xctype=xctype, spin=spin)[:2]
        den = (rho[0] + rho[1]) if spin else rho
        den = den if xctype == 'LDA' else den[0] if not spin else den[0]
        excsum += np.dot(den * weight, exc)
        vxc = vxc if spin else vxc[None]
        for s in range(nset):
            wv = weight * vxc[s]
            if xctype == 'LDA':
                aow = numint._scale_ao(ao, wv.reshape(-1) if wv.ndim > 1 else wv)
                vmat[s] += numint._dot_ao_ao(mol, ao, aow, mask, (0, mol.nbas), mol.ao_loc_nr())
            else:
                wv[0] *= .5
                aow = numint._scale_ao(ao[:4], wv[:4])
                v = numint._dot_ao_ao(mol, ao[0], aow, mask, (0, mol.nbas), mol.ao_loc_nr())
                vmat[s] += v + v.T
                if xctype == 'MGGA':
                    vmat[s] += numint._tau_dot(mol, ao, ao, wv[4] * .5, mask,
                                               (0, mol.nbas), mol.ao_loc_nr())
    return excsum, (vmat if spin else vmat[0])


def _occupied_orbitals(dm):
    """[(mo_coeff, mo_occ)] per spin block of a density matrix tagged by an aufbau build,
    or None (untagged, or ROHF's one set of orbitals for both spins). rho from the occupied
    orbitals costs nocc/nao of rho from the matrix."""
    mo, occ = getattr(dm, 'mo_coeff', None), getattr(dm, 'mo_occ', None)
    if mo is None or occ is None:
        return None
    mo, occ = np.asarray(mo), np.asarray(occ)
    if dm.ndim == 2 and mo.ndim == 2 and occ.ndim == 1:
        return [(mo, occ)]
    if dm.ndim == 3 and mo.ndim == 3 and occ.ndim == 2 and len(mo) == len(dm):
        return list(zip(mo, occ))
    return None


def _exchange_coeffs(mf):
    """(omega, alpha, hyb) of the functional, or HF's (0, 0, 1)."""
    if not hasattr(mf, 'xc'):
        return 0.0, 0.0, 1.0
    ni = mf._numint
    omega, alpha, hyb = ni.rsh_and_hybrid_coeff(mf.xc, spin=mf.mol.spin)
    return omega, alpha, hyb


def exchange_potential(mf, dm):
    """The exact-exchange part of the SCF's effective potential at ``dm``, PySCF's sign.

    For restricted ``dm`` (nao, nao) the returned matrix enters as ``-0.5 * vk``; for
    alpha/beta ``dm`` (2, nao, nao) as ``-vk[s]``. Zero for pure functionals.
    """
    omega, alpha, hyb = _exchange_coeffs(mf)
    mol = mf.mol
    if abs(hyb) < 1e-14 and abs(alpha) < 1e-14:
        return np.zeros_like(np.asarray(dm))

    def get_k(omega=None):
        if getattr(mf, 'direct_scf', True) is False and getattr(mf, 'with_df', None) is None:
            # PySCF's get_k alone needs the direct-SCF screening object, which
            # direct_scf=False leaves unset; its joint J/K route does not
            return mf.get_jk(mol, dm, omega=omega)[1]
        return mf.get_k(mol, dm, omega=omega)
    if omega == 0:
        vk = get_k() * hyb
    elif alpha == 0:  # LR=0, only SR exchange
        vk = get_k(-omega) * hyb
    elif hyb == 0:  # SR=0, only LR exchange
        vk = get_k(omega) * alpha
    else:
        vk = get_k() * hyb
        vk += get_k(omega) * (alpha - hyb)
    return vk


def local_potential(mf, dm_sad, auxmol, c, grids=None, coulomb='df', delta_grid=None, aux=None):
    """Coulomb + XC potential (Hartree) of the guess density; same shape as ``dm_sad``.

    ``coulomb='df'`` density-fits rho[P_SAD] (:func:`coulomb.coulomb_engine`);
    ``'exact'`` takes the SCF object's own ``get_j`` of P_SAD. ``delta_grid``: see
    :func:`xc_potential`. ``aux``: the guess's Coulomb engine (:func:`coulomb.coulomb_engine`)
    to reuse. ``c`` None: no delta-rho (the potential of rho[dm_sad] itself).
    """
    mol = mf.mol
    dm_sad = np.asarray(dm_sad)
    spin = dm_sad.ndim == 3
    dm_tot = dm_sad.sum(axis=0) if spin else dm_sad
    c0 = np.zeros(auxmol.nao) if c is None else c
    if coulomb == 'df' and aux is None:
        aux = coulomb_engine(mf, auxmol)
    if coulomb == 'df' and aux is not None:
        v = aux.coulomb(aux.fit(dm_tot)[0] + aux.coeffs(auxmol, c0))
    else:
        if coulomb == 'df':
            logger.info(mf, 'densr: PySCF\'s 3-centre J driver is unavailable; exact J of the '
                        'SAD density instead (same guess, slower)')
        jmol = auxmol
        if mol.cart:
            jmol = auxmol.copy()
            jmol.cart = True
            jmol.build(False, False)
        cj = c0 if jmol is auxmol else _cart2sph_sparse(auxmol).dot(c0)
        v = mf.get_j(mol, dm_tot) + coulomb_of_aux(mol, jmol, cj)
    if spin:
        v = np.array((v, v))
    if hasattr(mf, 'xc'):
        v = v + xc_potential(mf, dm_sad, auxmol, c, grids, delta_grid)[1]
    return v


def add_exchange(mf, v_local, dm):
    """v_local minus the exact-exchange potential of ``dm`` (PySCF's convention)."""
    vk = exchange_potential(mf, dm)
    return v_local - (vk if np.asarray(dm).ndim == 3 else 0.5 * vk)


def orthogonalizer(mf, s1e):
    """The SCF's own orthogonalizer of the overlap (canonical, dropping near-zero
    eigenvalues as PySCF's kernel does), or None where the SCF class has none."""
    check = getattr(mf, 'check_linear_dependency', None)
    if check is None:
        return None
    try:
        return check(s1e)
    except TypeError:
        return None


def _eig(mf, fock, s1e, x):
    if x is not None:
        try:
            return mf.eig(fock, s1e, x=x)
        except TypeError:  # an eig without the x keyword (older PySCF, custom classes)
            pass
    return mf.eig(fock, s1e)


def density_matrix_from_veff(mf, veff, dm_sad, h1e=None, s1e=None, x=None, sym=None):
    """Diagonalise F = h + veff with the SCF object's own machinery; the aufbau density matrix.

    ``x`` is the orthogonalizer of the overlap (:func:`orthogonalizer`); with it a nearly
    linearly dependent basis is handled exactly as PySCF's SCF kernel handles it. ``sym``: a
    :class:`symmetry.Symmetrizer`; ``veff`` is averaged over the point group first.
    """
    mol = mf.mol
    if h1e is None:
        h1e = mf.get_hcore(mol)
    if s1e is None:
        s1e = mf.get_ovlp(mol)
    if x is None:
        x = orthogonalizer(mf, s1e)
    if sym is not None:
        veff = sym.operator(veff)
    fock = mf.get_fock(h1e, s1e, veff, dm_sad)
    mo_energy, mo_coeff = _eig(mf, fock, s1e, x)
    try:
        mo_occ = mf.get_occ(mo_energy, mo_coeff)
    except Exception as e:
        raise SCFOwnError('%s.get_occ failed: %s' % (type(mf).__name__, e)) from e
    dm = mf.make_rdm1(mo_coeff, mo_occ)
    return lib.tag_array(dm, mo_coeff=mo_coeff, mo_occ=mo_occ, mo_energy=mo_energy)


def anderson_step(mf, v1, dm1, dm_sad, auxmol, c, grids=None, dm_x=None, h1e=None, s1e=None,
                  x=None, aux=None, log=None, builds=2, v_x=None, sym=None):
    """More Fock builds (``builds`` in all, counting the first), and the Anderson combination
    of the Fock matrices.

    ``v1`` is the local (Coulomb + XC) potential of the guess density
    rho_pred = rho[dm_sad] + sum_k c_k chi_k and ``dm1`` the aufbau matrix of h + v1 (minus
    the exact exchange of ``dm_x``, when the method has some). One Roothaan step from an
    approximate density overshoots: the error of rho[dm1] is the error of rho_pred amplified
    and of the other sign, for the long-wavelength part that J carries (docs/method.md,
    step 7). Here v2 is the potential of rho[dm1] (density-fitted J, XC on ``grids``) and
    dm2 the aufbau matrix of h + v2; the returned matrix is the aufbau matrix of
    h + (1 - beta) v1 + beta v2, beta minimising the Coulomb norm of the linearised residual
    (1 - beta) r1 + beta r2, r1 = rho[dm1] - rho_pred, r2 = rho[dm2] - rho[dm1]: Anderson
    mixing with two points, the history PySCF's DIIS lacks at its first step. beta is kept
    in [0, 1]. Each further build k takes the potential of the density of build k-1's
    combined matrix, and the combination uses the whole history
    (:func:`_anderson_coefficients`). Each build costs one DF-J and XC build, two
    diagonalisations and two density fits. Exact exchange stays that of ``dm_x``
    (``v_x``: its term, ``add_exchange(mf, 0, dm_x)``, where the caller has it). Returns
    (dm, coefficients of v1, v2, ...); ``dm1`` and None where the 3-centre driver is
    unavailable.
    """
    mol = mf.mol
    log = log or logger.new_logger(mf)
    if h1e is None:
        h1e = mf.get_hcore(mol)
    if s1e is None:
        s1e = mf.get_ovlp(mol)
    aux = aux or coulomb_engine(mf, auxmol, log)
    if aux is None:
        log.info('densr: no further Fock builds (PySCF\'s 3-centre J driver is unavailable)')
        return dm1, None
    cj = aux.coeffs(auxmol, c)

    def total(dm):
        dm = np.asarray(dm)
        return dm.sum(axis=0) if dm.ndim == 3 else dm

    # the exchange of dm_x is the same in every build: one K build, not two per build
    if v_x is None and dm_x is not None:
        v_x = add_exchange(mf, np.zeros_like(np.asarray(v1)), dm_x)

    def fock_dm(v):
        if v_x is not None:
            v = v + v_x
        return density_matrix_from_veff(mf, v, dm_sad, h1e, s1e, x, sym)

    d_sad, j_sad = aux.fit(total(dm_sad))
    d1, j1 = aux.fit(total(dm1))
    # history of input potentials and the residuals of their output densities, with the
    # residuals' metric images (k|l) r, so that norms need no second metric
    vs, rs, mrs = [np.asarray(v1)], [d1 - d_sad - cj], [j1 - j_sad - aux.metric_times(cj)]
    dm, d_in, j_in = dm1, d1, j1
    coeffs = np.ones(1)
    for k in range(2, builds + 1):
        v = aux.coulomb(d_in)
        if np.asarray(dm).ndim == 3:
            v = np.array((v, v))
        if hasattr(mf, 'xc'):
            v = v + xc_potential(mf, dm, auxmol, None, grids)[1]
        j_out = aux.project(total(fock_dm(v)))
        vs.append(v)
        mrs.append(j_out - j_in)
        rs.append(aux.solve(mrs[-1]))
        coeffs = _anderson_coefficients(rs, mrs)
        log.info('densr: Fock build %d; Coulomb norm of its residual %.3g; Anderson '
                 'coefficients %s', k, np.sqrt(max(float(rs[-1].dot(mrs[-1])), 0)),
                 np.array2string(coeffs, precision=3))
        if not coeffs[1:].any():   # beta clamped to 0: the first build's matrix itself
            dm = dm1
        else:
            dm = fock_dm(sum(a * v for a, v in zip(coeffs, vs)))
        if k < builds:
            d_in, j_in = aux.fit(total(dm))
    return dm, coeffs


def _anderson_coefficients(rs, mrs):
    """Coefficients a (sum 1) minimising the Coulomb norm of sum_i a_i r_i.

    Two points: a = (1 - beta, beta) with beta kept in [0, 1]. More: the constrained least
    squares of Pulay's DIIS; where it asks for extrapolation beyond twice the history's span
    (a coefficient above 2 or below -1), the two newest points alone are used.
    """
    n = len(rs)
    b = np.array([[float(ri.dot(mj)) for mj in mrs] for ri in rs])
    b = (b + b.T) / 2
    if n == 2:
        den = b[0, 0] - 2 * b[0, 1] + b[1, 1]
        beta = min(max((b[0, 0] - b[0, 1]) / den, 0.0), 1.0) if den > 1e-14 else 0.0
        return np.array((1 - beta, beta))
    scale = np.abs(np.diag(b)).max() or 1.0
    try:
        a = np.linalg.solve(np.block([[b / scale, np.ones((n, 1))],
                                      [np.ones((1, n)), np.zeros((1, 1))]]),
                            np.r_[np.zeros(n), 1.0])[:n]
    except np.linalg.LinAlgError:   # two equal residuals (a build that changed nothing)
        a = np.full(n, np.nan)
    if not np.all(np.isfinite(a)) or a.max() > 2 or a.min() < -1:
        a = np.zeros(n)
        a[-2:] = _anderson_coefficients(rs[-2:], mrs[-2:])
    return a


def mix_with_sad(mf, dm, dm_sad, mix, s1e=None, x=None):
    """P_SAD + mix (dm - P_SAD), tagged with its natural orbitals and occupations.

    P_SAD is first scaled (per spin) to the electron count of ``dm``, so the result holds
    exactly the electrons of ``dm``.

    A damped first step: the one-shot Fock build of an approximate density overshoots, as an
    undamped Roothaan step does, and PySCF's DIIS then starts without the history that would
    correct it. ``mix`` is chosen per model on validation molecules (``guess_mix`` in the
    model's config). The natural orbitals (S-orthonormal, occupations in about [0, 2] or
    [0, 1] per spin) are attached as ``mo_coeff``/``mo_occ`` because PySCF's numerical
    integration uses those tags in place of the matrix when they are present: tagging the
    mixed matrix with the Fock build's orbitals would silently change the density.
    Restricted open-shell objects, whose ``mo_coeff`` is one set for both spins, get the
    unmixed ``dm`` back. ``x`` is the orthogonalizer of ``s1e`` when the caller has it.
    """
    if mix is None or abs(mix - 1.0) < 1e-12:
        return dm
    from pyscf.scf import rohf
    if isinstance(mf, rohf.ROHF):   # ROKS too
        return dm
    dm1 = np.asarray(dm)
    dm_sad = np.asarray(dm_sad)
    if s1e is None:
        s1e = mf.get_ovlp()
    # P_SAD scaled to the electrons (per spin) of the Fock build's matrix, so that the
    # damped guess holds exactly N (minao's SAD loses about 0.01 e per atom to the basis)
    n1 = np.einsum('...ij,ji->...', dm1, s1e)
    ns = np.einsum('...ij,ji->...', dm_sad, s1e)
    scale = np.where(abs(ns) > 1e-8, n1 / np.where(abs(ns) > 1e-8, ns, 1), 1.0)
    dm_sad = dm_sad * np.asarray(scale)[..., None, None]
    mixed = dm_sad + mix * (dm1 - dm_sad)
    if x is None:
        x = orthogonalizer(mf, s1e)
    if x is None:
        from pyscf.scf import addons
        x = addons.canonical_orth_(s1e)
    sx = s1e.dot(x)
    mo, occ = [], []
    for p in mixed.reshape(-1, *mixed.shape[-2:]):   # one spin block at a time
        o, u = np.linalg.eigh(sx.T.dot(p).dot(sx))
        order = np.argsort(o)[::-1]
        mo.append(x.dot(u[:, order]))
        occ.append(o[order])
    mo, occ = np.asarray(mo).reshape(*mixed.shape[:-2], *mo[0].shape), np.asarray(occ)
    occ = occ.reshape(*mixed.shape[:-2], occ.shape[-1])
    mixed = np.einsum('...pi,...i,...qi->...pq', mo, occ, mo)
    return lib.tag_array(mixed, mo_coeff=mo, mo_occ=occ)


def guess_grids(mf, level=1):
    """Molecular grids for the guess's XC potential: ``mf.grids`` settings at ``level``.

    The guess needs the XC potential of an approximate density, not converged energies, and
    how fine a grid pays depends on how good the density is: on validation molecules 400-403
    (PBE/def2-SVP) the exact delta-rho gave 29 cycles in all at level 1 and 35 at level 0
    (minao 51), while the shipped model's gave 47 at either level; level 0 has about 4.5
    times fewer points and saves about 1 s per QM9 guess.
    The level is therefore a model setting (``guess_grids_level`` in its config, default 1).
    """
    from pyscf import dft
    if not hasattr(mf, 'xc'):
        return None
    if level is None or level >= mf.grids.level:
        return mf.grids
    g = dft.gen_grid.Grids(mf.mol)
    g.atom_grid = mf.grids.atom_grid
    g.prune = mf.grids.prune
    g.radi_method = mf.grids.radi_method
    g.becke_scheme = mf.grids.becke_scheme
    g.level = level
    return g.build(with_non0tab=True)


def density_matrix_from_delta_rho(mf, delta_rho, grid, dm_sad=None, auxbasis=DEFAULT_AUXBASIS,
                                  exchange='auto', grids_level=1, log=None, charge=None,
                                  coulomb='df', mix=1.0, xc_density='grid', fock_builds=1):
    """The whole projection: delta-rho on ``grid`` -> guess density matrix for ``mf``.

    Args:
        mf: a PySCF SCF object (RHF/UHF/ROHF/RKS/UKS/ROKS, density-fitted or not).
        delta_rho: rho_converged - rho_SAD predicted on ``grid`` (e/Bohr^3).
        dm_sad: the SAD density matrix (``mf.init_guess_by_minao()`` if None).
        exchange: 'sad' builds exact exchange from P_SAD; 'iterate' rebuilds it once from
            the first diagonalisation (one more K build); 'auto' iterates when the method
            has exact exchange.
        grids_level: level of the molecular grids for the guess's XC (see :func:`guess_grids`).
        charge: electrons the fitted delta-rho carries; default N - Tr(P_SAD S), so that the
            guess density holds exactly N electrons.
        coulomb: 'df' (J of P_SAD density-fitted in the auxiliary basis) or 'exact' (the SCF
            object's own J of P_SAD); see :func:`local_potential`.
        mix: the returned matrix is P_SAD + mix (P_Fock - P_SAD); 1 returns the Fock build's
            aufbau matrix itself (see :func:`mix_with_sad`).
        xc_density: delta-rho of the XC potential: 'grid' interpolates ``delta_rho`` onto
            the molecular grid, 'fit' evaluates the fitted auxiliary density there (see
            :func:`xc_potential`). Coulomb always uses the fit.
        fock_builds: 1, or up to MAX_FOCK_BUILDS: more Fock builds, each at the density of
            the last combined matrix, and their Anderson combination (:func:`anderson_step`),
            before damping.
    Returns:
        dm with ``mo_coeff``/``mo_occ`` attached.
    """
    if xc_density not in ('grid', 'fit'):
        raise ValueError("xc_density must be 'grid' or 'fit', not %r" % xc_density)
    if fock_builds not in range(1, MAX_FOCK_BUILDS + 1):
        raise ValueError('fock_builds must be an integer from 1 to %d, not %r'
                         % (MAX_FOCK_BUILDS, fock_builds))
    mol = mf.mol
    log = log or logger.new_logger(mf)
    if dm_sad is None:
        dm_sad = mf.init_guess_by_minao(mol)
    dm_sad = np.asarray(dm_sad)
    dm_tot = dm_sad.sum(axis=0) if dm_sad.ndim == 3 else dm_sad
    s1e = mf.get_ovlp(mol)
    h1e = mf.get_hcore(mol)
    t0 = time.perf_counter()
    auxmol = make_auxmol(mol, auxbasis or DEFAULT_AUXBASIS)
    nsad = float(np.einsum('ij,ji->', dm_tot, s1e))
    if charge is None:
        charge = mol.nelectron - nsad
    c = fit_delta_rho(auxmol, delta_rho, grid, charge=charge)
    t1 = time.perf_counter()
    log.info('densr: delta-rho fitted with %d auxiliary functions in %.2f s', auxmol.nao, t1 - t0)
    delta_grid = None
    if xc_density == 'grid':
        # rho[P_SAD] scaled by 1 + q / N_SAD, q the electrons the fit adds to the field's own
        # integral (an ion's charge, mostly), so the XC density holds the fitted electrons
        q = charge - float(np.sum(delta_rho, dtype=np.float64)) * grid.dv
        delta_grid = (delta_rho, grid, 1 + q / nsad if nsad > 1e-8 else 1.0)
    aux = coulomb_engine(mf, auxmol, log) if coulomb == 'df' else None
    if aux is not None:
        log.info('densr: Coulomb builds of the guess on %s (%s, %d functions)', aux.route,
                 aux.auxmol.basis if isinstance(aux.auxmol.basis, str) else 'fitting basis',
                 aux.auxmol.nao)
    if getattr(aux, 'incore', True) is False and fock_builds > 1:
        log.note('densr: the 3-centre integrals (%.1f GB) do not fit in half of what '
                 'mf.max_memory leaves free, so each of the %d further Fock builds makes two '
                 'screened integral passes; mf.densr_fock_builds = 1 makes one build, '
                 'density fitting (mf.density_fit()) or a larger mf.max_memory keeps the '
                 'integrals in memory', aux.int3c_bytes * 1e-9, fock_builds - 1)
    grids = guess_grids(mf, grids_level)
    v_local = local_potential(mf, dm_sad, auxmol, c, grids, coulomb, delta_grid, aux)
    x = orthogonalizer(mf, s1e)
    sym = symmetry.Symmetrizer(mol)
    if sym.order > 1:
        log.info('densr: the guess is averaged over the %d operations of the point group',
                 sym.order)
    zero = np.zeros_like(np.asarray(v_local))
    v_x = add_exchange(mf, zero, dm_sad)
    dm = density_matrix_from_veff(mf, v_local + v_x, dm_sad, h1e, s1e, x, sym)
    t2 = time.perf_counter()
    log.info('densr: Coulomb + XC of the guess density, Fock build and diagonalisation '
             'in %.2f s', t2 - t1)
    omega, alpha, hyb = _exchange_coeffs(mf)
    if exchange == 'auto':
        exchange = 'iterate' if (abs(hyb) > 1e-14 or abs(alpha) > 1e-14) else 'sad'
    if exchange not in ('sad', 'iterate'):
        raise ValueError("exchange must be 'auto', 'sad' or 'iterate', not %r" % exchange)
    dm_x = dm_sad
    if exchange == 'iterate':
        dm_x = np.asarray(dm)
        v_x = add_exchange(mf, zero, dm_x)
        dm = density_matrix_from_veff(mf, v_local + v_x, dm_sad, h1e, s1e, x, sym)
        log.info('densr: exchange rebuilt from the first diagonalisation in %.2f s',
                 time.perf_counter() - t2)
    if fock_builds > 1:
        t3 = time.perf_counter()
        dm = anderson_step(mf, v_local, dm, dm_sad, auxmol, c, grids, dm_x, h1e, s1e, x, aux,
                           log, fock_builds, v_x, sym)[0]
        log.info('densr: %d more Fock builds in %.2f s', fock_builds - 1,
                 time.perf_counter() - t3)
    damped = mix_with_sad(mf, dm, dm_sad, mix, s1e, x)
    if damped is not dm:
        log.info('densr: guess = P_SAD + %.2f (P_Fock - P_SAD)', mix)
    return damped
