"""Uniform grids: the box around a molecule and chunked voxelization of densities.

Everything here is in Bohr and never imports torch. A coarse grid (the network's input)
and its ``r``-times finer companion (the network's output) share a box: fine voxel
``r*i + k`` (k = 0..r-1) subdivides coarse voxel ``i``, which is what a pixel shuffle
produces.
"""

import numpy as np
from pyscf import lib
from pyscf.dft import numint

BLKSIZE = numint.BLKSIZE


class UniformGrid:
    """A uniform grid of ``shape`` points, first point at ``origin`` (Bohr), spacing ``spacing``."""

    def __init__(self, origin, spacing, shape):
        self.origin = np.asarray(origin, dtype=float)
        self.spacing = float(spacing)
        self.shape = tuple(int(n) for n in shape)

    def __repr__(self):
        return 'UniformGrid(origin=%s, spacing=%g, shape=%s)' % (
            np.array2string(self.origin, precision=3), self.spacing, self.shape)

    @property
    def size(self):
        return int(np.prod(self.shape))

    @property
    def dv(self):
        """Volume of one voxel, Bohr^3."""
        return self.spacing ** 3

    def axes(self):
        """The 1D coordinates of the x, y and z planes (Bohr)."""
        return [self.origin[i] + self.spacing * np.arange(n) for i, n in enumerate(self.shape)]

    def coords(self, start=0, stop=None):
        """Cartesian coordinates (Bohr) of flat points ``start:stop`` in C order."""
        if stop is None:
            stop = self.size
        idx = np.arange(start, stop)
        ijk = np.stack(np.unravel_index(idx, self.shape), axis=1)
        return self.origin + ijk * self.spacing

    def refine(self, factor):
        """The ``factor``-times finer grid that subdivides every voxel of this one."""
        h = self.spacing / factor
        origin = self.origin - 0.5 * self.spacing + 0.5 * h
        return UniformGrid(origin, h, [n * factor for n in self.shape])


def make_box(coords, spacing, margin, multiple=1):
    """The uniform grid that covers ``coords`` (Bohr, (natm, 3)) plus ``margin`` Bohr.

    Each dimension is rounded up to a multiple of ``multiple`` points and the box is
    centred on the atoms' bounding box.
    """
    coords = np.asarray(coords, dtype=float).reshape(-1, 3)
    if coords.size == 0:
        raise ValueError('cannot build a grid box for a molecule without atoms')
    if not np.all(np.isfinite(coords)):
        raise ValueError('atomic coordinates contain NaN or inf')
    lo = coords.min(axis=0) - margin
    hi = coords.max(axis=0) + margin
    n = np.ceil((hi - lo) / spacing).astype(int) + 1
    n = ((n + multiple - 1) // multiple) * multiple
    centre = 0.5 * (lo + hi)
    origin = centre - 0.5 * (n - 1) * spacing
    return UniformGrid(origin, spacing, n)


def _chunk_size(nao, max_memory_mb):
    # AO values (and for GGA nothing more) of one chunk in float64, a multiple of BLKSIZE
    n = int(max_memory_mb * 1e6 / 8 / max(nao, 1) / 3)
    return max(BLKSIZE, (n // BLKSIZE) * BLKSIZE)


def eval_density(mol, dm, grid, max_memory=None, out=None):
    """Electron density (e/Bohr^3) of AO density matrix ``dm`` on every point of ``grid``.

    ``dm`` is (nao, nao) or a stack whose sum is taken (alpha + beta). Points are
    evaluated in chunks so memory stays below ``max_memory`` MB (default: ``mol.max_memory``).
    Returns an array of ``grid.shape`` (float64, or the dtype of ``out``).
    """
    dm = np.asarray(dm)
    if dm.ndim == 3:
        dm = dm.sum(axis=0)
    # Guess and difference density matrices have low rank (minao's is the rank of the
    # minimal basis): as signed "orbitals" they are cheaper to evaluate than nao^2 per point.
    w, u = np.linalg.eigh((dm + dm.T) * .5)
    keep = np.abs(w) > 1e-10 * max(np.abs(w).max(), 1e-300)
    if keep.sum() < 0.7 * len(w):
        return eval_orbital_density(mol, u[:, keep], w[keep], grid, max_memory, out)
    return _eval(mol, grid, max_memory, out, lambda ao, mask: numint.eval_rho(
        mol, ao, dm, non0tab=mask, xctype='LDA', hermi=1))


def eval_orbital_density(mol, mo_coeff, mo_occ, grid, max_memory=None, out=None):
    """Density sum_i occ_i |phi_i|^2 of orbitals ``mo_coeff`` (nao, nmo) on ``grid``."""
    mo_coeff = np.asarray(mo_coeff, dtype=float)
    mo_occ = np.asarray(mo_occ, dtype=float)
    return _eval(mol, grid, max_memory, out, lambda ao, mask: numint.eval_rho2(
        mol, ao, mo_coeff, mo_occ, non0tab=mask, xctype='LDA'))


def _eval(mol, grid, max_memory, out, kernel):
    if max_memory is None:
        max_memory = min(getattr(mol, 'max_memory', 4000) * 0.25, 200)
    if out is None:
        out = np.empty(grid.shape)
    flat = out.reshape(-1)
    chunk = _chunk_size(mol.nao, max_memory)
    for p0 in range(0, grid.size, chunk):
        p1 = min(p0 + chunk, grid.size)
        coords = grid.coords(p0, p1)
        mask = numint.make_mask(mol, coords)
        ao = mol.eval_gto('GTOval', coords, non0tab=mask)
        flat[p0:p1] = kernel(ao, mask)
    return out


def cartesian_gto_factors(mol, axes):
    """1D factors of the Cartesian Gaussians of ``mol`` on the grid lines ``axes``.

    A primitive Cartesian Gaussian is separable,
    x^a y^b z^c exp(-alpha r^2) = X(x) Y(y) Z(z), so a sum over a uniform grid of such a
    function times a field is three small contractions. Returns ``(fx, fy, fz, coef, owner)``:
    ``f?[p]`` are the 1D factors of primitive Cartesian term ``p`` on each axis, ``coef[p]``
    its weight and ``owner[p]`` the index of the Cartesian AO of ``mol`` (``mol.cart`` must be
    True) it belongs to. The normalisation is PySCF's, so that
    ``sum_p coef[p] fx[p] fy[p] fz[p]`` equals ``mol.eval_gto('GTOval_cart', ...)``.
    """
    assert mol.cart
    ax, ay, az = axes
    fx, fy, fz, coef, owner = [], [], [], [], []
    ao0 = 0
    for ib in range(mol.nbas):
        l = mol.bas_angular(ib)
        R = mol.bas_coord(ib)
        exps = mol.bas_exp(ib)
        cs = mol._libcint_ctr_coeff(ib)  # (nprim, nctr), includes the radial normalisation
        nctr = cs.shape[1]
        # PySCF's common factor for s and p Cartesian functions
        fac = 0.282094791773878143 if l == 0 else (0.488602511902919921 if l == 1 else 1.)
        lxyz = [(lx, ly, l - lx - ly) for lx in range(l, -1, -1) for ly in range(l - lx, -1, -1)]
        dx, dy, dz = ax - R[0], ay - R[1], az - R[2]
        for ic in range(nctr):
            for ip, a in enumerate(exps):
                gx, gy, gz = np.exp(-a * dx * dx), np.exp(-a * dy * dy), np.exp(-a * dz * dz)
                for k, (lx, ly, lz) in enumerate(lxyz):
                    fx.append(dx ** lx * gx)
                    fy.append(dy ** ly * gy)
                    fz.append(dz ** lz * gz)
                    coef.append(cs[ip, ic] * fac)
                    owner.append(ao0 + ic * len(lxyz) + k)
        ao0 += nctr * len(lxyz)
    return (np.array(fx), np.array(fy), np.array(fz), np.array(coef), np.array(owner))


def project_on_cartesian_gtos(mol, field, grid):
    """Quadrature ``sum_r chi_k(r) field(r) dV`` over ``grid`` for every Cartesian AO of ``mol``.

    ``field`` has ``grid.shape``. Uses the separability of Gaussians: the cost is one
    (nx*ny, nz) x (nz, nprim) matrix product, not an evaluation of every function on every point.
    """
    fx, fy, fz, coef, owner = cartesian_gto_factors(mol, grid.axes())
    nx, ny, nz = grid.shape
    f = np.asarray(field, dtype=float).reshape(nx * ny, nz)
    t = lib.dot(f, fz.T).reshape(nx, ny, -1)            # (nx, ny, nprim)
    t = lib.einsum('xyp,py->xp', t, fy)                  # (nx, nprim)
    t = lib.einsum('xp,px->p', t, fx) * coef
    out = np.zeros(mol.nao_cart())
    np.add.at(out, owner, t)
    return out * grid.dv


def gram_of_cartesian_gtos(mol, grid):
    """Discrete Gram matrix ``sum_r chi_k(r) chi_l(r) dV`` over ``grid`` (Cartesian AOs of ``mol``).

    The least-squares fit to values on the grid uses this, not the analytic overlap: the
    quadrature error of tight functions then cancels between the two sides of the fit.
    """
    fx, fy, fz, coef, owner = cartesian_gto_factors(mol, grid.axes())
    g = lib.dot(fx, fx.T)
    g *= lib.dot(fy, fy.T)
    g *= lib.dot(fz, fz.T)
    g *= coef[:, None] * coef
    nao = mol.nao_cart()
    b = np.zeros((len(owner), nao))
    b[np.arange(len(owner)), owner] = 1
    return b.T.dot(g).dot(b) * grid.dv
