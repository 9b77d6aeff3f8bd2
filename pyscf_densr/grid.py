"""Uniform grids: the box around a molecule and chunked voxelization of densities.

Everything here is in Bohr and never imports torch. A coarse grid (the network's input)
and its ``r``-times finer companion (the network's output) share a box: fine voxel
``r*i + k`` (k = 0..r-1) subdivides coarse voxel ``i``, which is what a pixel shuffle
produces.
"""

import copy

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
    evaluated in small cubic tiles, each with only the shells that reach it (and the
    matching block of ``dm``), so the cost grows linearly with the size of a large molecule
    and memory stays below ``max_memory`` MB (default: a quarter of ``mol.max_memory``, at
    most 200). Returns an array of ``grid.shape`` (float64, or the dtype of ``out``).
    """
    dm = np.asarray(dm)
    if dm.ndim == 3:
        dm = dm.sum(axis=0)
    dm = (dm + dm.T) * .5
    # Guess and difference density matrices of small molecules often have low rank
    # (minao's is the rank of the minimal basis): as signed "orbitals" they are cheaper.
    if mol.nao <= 1000:
        w, u = np.linalg.eigh(dm)
        keep = np.abs(w) > 1e-10 * max(np.abs(w).max(), 1e-300)
        if keep.sum() < 0.7 * len(w):
            return eval_orbital_density(mol, u[:, keep], w[keep], grid, max_memory, out)
    return _eval(mol, grid, max_memory, out, lambda sub, ao, mask, idx: numint.eval_rho(
        sub, ao, dm[np.ix_(idx, idx)], non0tab=mask, xctype='LDA', hermi=1))


def eval_orbital_density(mol, mo_coeff, mo_occ, grid, max_memory=None, out=None):
    """Density sum_i occ_i |phi_i|^2 of orbitals ``mo_coeff`` (nao, nmo) on ``grid``."""
    mo_coeff = np.asarray(mo_coeff, dtype=float)
    mo_occ = np.asarray(mo_occ, dtype=float)
    return _eval(mol, grid, max_memory, out, lambda sub, ao, mask, idx: numint.eval_rho2(
        sub, ao, mo_coeff[idx], mo_occ, non0tab=mask, xctype='LDA'))


def submol(mol, shls):
    """A shallow copy of ``mol`` with only shells ``shls`` (for evaluating a subset of AOs)."""
    sub = copy.copy(mol)
    sub._bas = np.asarray(mol._bas[shls], dtype=np.int32, order='C')
    return sub


def shell_ao_index(mol, shls):
    """AO indices (in ``mol``) of the functions of shells ``shls``."""
    ao_loc = mol.ao_loc_nr()
    if len(shls) == 0:
        return np.zeros(0, dtype=int)
    return np.concatenate([np.arange(ao_loc[i], ao_loc[i + 1]) for i in shls])


def _eval(mol, grid, max_memory, out, kernel):
    if max_memory is None:
        max_memory = min(getattr(mol, 'max_memory', 4000) * 0.25, 200)
    if out is None:
        out = np.empty(grid.shape)
    chunk = _chunk_size(mol.nao, max_memory)
    edge = max(4, min(16, int(chunk ** (1 / 3.))))
    ax = grid.axes()
    nx, ny, nz = grid.shape
    for x0 in range(0, nx, edge):
        for y0 in range(0, ny, edge):
            for z0 in range(0, nz, edge):
                x1, y1, z1 = min(x0 + edge, nx), min(y0 + edge, ny), min(z0 + edge, nz)
                coords = lib.cartesian_prod([ax[0][x0:x1], ax[1][y0:y1], ax[2][z0:z1]])
                mask = numint.make_mask(mol, coords)
                shls = np.nonzero(mask.any(axis=0))[0]
                if len(shls) == 0:
                    out[x0:x1, y0:y1, z0:z1] = 0
                    continue
                if len(shls) == mol.nbas:
                    sub, idx = mol, np.arange(mol.nao)
                else:
                    sub, idx = submol(mol, shls), shell_ao_index(mol, shls)
                    mask = np.asarray(mask[:, shls], order='C')
                ao = sub.eval_gto('GTOval', coords, non0tab=mask)
                out[x0:x1, y0:y1, z0:z1] = kernel(sub, ao, mask, idx).reshape(
                    x1 - x0, y1 - y0, z1 - z0)
    return out


def _cell_averages(t, a, lmax, h):
    """(1/h) int_{t-h/2}^{t+h/2} s^l exp(-a s^2) ds for l = 0..lmax at every offset ``t``
    (Bohr): the 1D factors of a Gaussian averaged over the voxels of a grid of spacing h."""
    from scipy.special import erf
    t0, t1 = t - .5 * h, t + .5 * h
    e0, e1 = np.exp(-a * t0 * t0), np.exp(-a * t1 * t1)
    sa = np.sqrt(a)
    out = [.5 * np.sqrt(np.pi) / sa * (erf(sa * t1) - erf(sa * t0))]
    if lmax >= 1:
        out.append((e0 - e1) / (2 * a))
    for l in range(2, lmax + 1):
        out.append((t0 ** (l - 1) * e0 - t1 ** (l - 1) * e1 + (l - 1) * out[l - 2]) / (2 * a))
    return [o / h for o in out]


# Gaussians with a h^2 above this are averaged over each voxel in cell-averaged quadratures
CELL_AVERAGE_MIN = 0.5


def cartesian_gto_factors(mol, axes, cell_average=False):
    """1D factors of the Cartesian Gaussians of ``mol`` on the grid lines ``axes``.

    A primitive Cartesian Gaussian is separable,
    x^a y^b z^c exp(-alpha r^2) = X(x) Y(y) Z(z), so a sum over a uniform grid of such a
    function times a field is three small contractions. Returns ``(fx, fy, fz, coef, owner)``:
    ``f?[p]`` are the 1D factors of primitive Cartesian term ``p`` on each axis, ``coef[p]``
    its weight and ``owner[p]`` the index of the Cartesian AO of ``mol`` (``mol.cart`` must be
    True) it belongs to. The normalisation is PySCF's, so that
    ``sum_p coef[p] fx[p] fy[p] fz[p]`` equals ``mol.eval_gto('GTOval_cart', ...)``.
    With ``cell_average`` the factors of Gaussians narrower than a voxel (alpha h^2 above
    :data:`CELL_AVERAGE_MIN`) are their averages over each voxel instead of point values,
    so that ``sum_r chi(r) f(r) dV`` integrates a tight function exactly against a smooth,
    voxel-constant ``f`` rather than sampling it at one or two points.
    """
    assert mol.cart
    ax, ay, az = axes
    h = float(ax[1] - ax[0]) if len(ax) > 1 else 1.0
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
                if cell_average and a * h * h > CELL_AVERAGE_MIN:
                    px, py, pz = (_cell_averages(d, a, l, h) for d in (dx, dy, dz))
                else:
                    gx, gy, gz = np.exp(-a * dx * dx), np.exp(-a * dy * dy), np.exp(-a * dz * dz)
                    px = [dx ** i * gx for i in range(l + 1)]
                    py = [dy ** i * gy for i in range(l + 1)]
                    pz = [dz ** i * gz for i in range(l + 1)]
                for k, (lx, ly, lz) in enumerate(lxyz):
                    fx.append(px[lx])
                    fy.append(py[ly])
                    fz.append(pz[lz])
                    coef.append(cs[ip, ic] * fac)
                    owner.append(ao0 + ic * len(lxyz) + k)
        ao0 += nctr * len(lxyz)
    return (np.array(fx), np.array(fy), np.array(fz), np.array(coef), np.array(owner))


PRIM_CUTOFF = 1e-15  # a 1D factor below this fraction of its own maximum counts as zero
BLOCK_PRIMS = 256     # primitive terms per block of the blocked quadratures
BLOCK_MEMORY = 200    # MB of blocks, where the caller gives no budget


def free_memory(max_memory):
    """MB the guess's own arrays may use: what ``max_memory`` (``mf.max_memory``, MB) leaves
    free in this process (negative when the process is over it)."""
    return float(max_memory) - lib.current_memory()[0]


def block_memory(max_memory):
    """MB of the guess's blocked grid work: a quarter of what ``max_memory`` leaves free, at
    most :data:`BLOCK_MEMORY`."""
    return max(1.0, min(BLOCK_MEMORY, free_memory(max_memory) / 4))


def _default_memory(max_memory):
    """Working memory (MB) of the blocked quadratures (default :data:`BLOCK_MEMORY`)."""
    if max_memory is None:
        max_memory = BLOCK_MEMORY
    return max(1.0, float(max_memory))


def _support(f, cutoff=PRIM_CUTOFF):
    """Index ranges [lo, hi) on which each row of ``f`` (nprim, n) is not negligible."""
    n = f.shape[1]
    lo = np.zeros(len(f), dtype=int)
    hi = np.zeros(len(f), dtype=int)
    for p0 in range(0, len(f), 4096):
        a = np.abs(f[p0:p0 + 4096])
        m = a.max(axis=1) if n else np.zeros(len(a))
        big = a > (cutoff * m)[:, None]
        has = big.any(axis=1) & (m > 0)
        lo[p0:p0 + 4096] = np.where(has, np.argmax(big, axis=1), 0)
        hi[p0:p0 + 4096] = np.where(has, n - np.argmax(big[:, ::-1], axis=1), 0)
    return lo, hi


def _prim_blocks(supports, nmax=BLOCK_PRIMS):
    """Groups of primitive terms that are close in space and alike in extent.

    ``supports`` are the (lo, hi) index ranges on the three axes. Terms are binned by
    the length of their widest range (powers of two) and, within a bin, by a spatial cell
    of that size, so a block's bounding box is not much larger than its members'.
    Returns a list of index arrays (terms with an empty range on any axis are left out).
    """
    (lx, hx), (ly, hy), (lz, hz) = supports
    ext = np.stack([hx - lx, hy - ly, hz - lz], axis=1)
    live = np.nonzero(ext.min(axis=1) > 0)[0]
    if len(live) == 0:
        return []
    size = 8 * 2 ** np.maximum(0, np.ceil(np.log2(np.maximum(ext[live].max(axis=1), 1) / 8.)))
    size = size.astype(np.int64)
    centre = np.stack([lx + hx, ly + hy, lz + hz], axis=1)[live] // 2
    cell = centre // size[:, None]
    order = np.lexsort((cell[:, 2], cell[:, 1], cell[:, 0], size))
    keys = np.stack([size, cell[:, 0], cell[:, 1], cell[:, 2]], axis=1)[order]
    brk = np.nonzero(np.any(np.diff(keys, axis=0) != 0, axis=1))[0] + 1
    blocks = []
    for grp in np.split(live[order], brk):
        for i in range(0, len(grp), nmax):
            blocks.append(grp[i:i + nmax])
    return blocks


def _bbox(supports, idx):
    return [(int(lo[idx].min()), int(hi[idx].max())) for lo, hi in supports]


def project_on_cartesian_gtos(mol, field, grid, max_memory=None, cell_average=False):
    """Quadrature ``sum_r chi_k(r) field(r) dV`` over ``grid`` for every Cartesian AO of ``mol``.

    ``field`` has ``grid.shape``. Uses the separability of Gaussians and their locality:
    primitive terms are taken in blocks of neighbours of similar extent, and each block is
    contracted with the part of ``field`` inside its bounding box only, one slab of
    x-planes at a time, so the working memory stays below ``max_memory`` MB (default
    :data:`BLOCK_MEMORY`) whatever the size of the molecule. ``cell_average``: tight
    functions averaged over each voxel (see :func:`cartesian_gto_factors`).
    """
    fx, fy, fz, coef, owner = cartesian_gto_factors(mol, grid.axes(), cell_average)
    field = np.asarray(field).reshape(grid.shape)
    budget = _default_memory(max_memory) * 1e6 / 8
    sup = [_support(f) for f in (fx, fy, fz)]
    t = np.zeros(len(coef))
    for blk in _prim_blocks(sup):
        (x0, x1), (y0, y1), (z0, z1) = _bbox(sup, blk)
        nb, ly, lz = len(blk), y1 - y0, z1 - z0
        fyb = fy[blk, y0:y1].T            # (ly, nb)
        fzb = fz[blk, z0:z1].T            # (lz, nb)
        cx = max(1, int(budget // (ly * (nb + lz) * 2)))
        acc = np.zeros(nb)
        for xa in range(x0, x1, cx):
            xb = min(xa + cx, x1)
            sub = np.asarray(field[xa:xb, y0:y1, z0:z1], dtype=float).reshape(-1, lz)
            tt = lib.dot(sub, fzb).reshape(xb - xa, ly, nb)
            tt = np.einsum('xyp,yp->xp', tt, fyb)
            acc += np.einsum('xp,px->p', tt, fx[blk, xa:xb])
        t[blk] = acc
    out = np.bincount(owner, weights=t * coef, minlength=mol.nao_cart())
    return out * grid.dv


def gram_of_cartesian_gtos(mol, grid, transform=None, max_memory=None):
    """Discrete Gram matrix ``sum_r chi_k(r) chi_l(r) dV`` over ``grid`` (Cartesian AOs of ``mol``).

    The least-squares fit to values on the grid uses this, not the analytic overlap: the
    quadrature error of tight functions then cancels between the two sides of the fit.

    With ``transform`` (a dense or scipy.sparse (nao_cart, m) matrix, e.g. the
    Cartesian-to-spherical map) the result is ``transform.T @ G @ transform``, accumulated
    block by block without the Cartesian matrix. The Gram of two primitive terms is a product
    of three 1D sums, zero when their supports do not meet; it is computed for pairs of blocks
    of neighbouring terms whose bounding boxes overlap, so the working memory beyond the
    (m, m) result stays below ``max_memory`` MB.
    """
    import scipy.sparse as sp
    fx, fy, fz, coef, owner = cartesian_gto_factors(mol, grid.axes())
    nprim, nao = len(coef), mol.nao_cart()
    m_map = sp.csr_matrix((coef, (np.arange(nprim), owner)), shape=(nprim, nao))
    if transform is not None:
        m_map = sp.csr_matrix(m_map.dot(sp.csr_matrix(transform)))
    nout = m_map.shape[1]
    gram = np.zeros((nout, nout))
    budget = _default_memory(max_memory) * 1e6 / 8
    sup = [_support(f) for f in (fx, fy, fz)]
    blocks = _prim_blocks(sup)
    boxes = np.array([_bbox(sup, b) for b in blocks]).reshape(-1, 3, 2)
    for ib, blk in enumerate(blocks):
        box = boxes[ib]
        later = boxes[ib:]
        meet = np.all((later[:, :, 0] < box[:, 1]) & (later[:, :, 1] > box[:, 0]), axis=1)
        cols = [blocks[ib + j] for j in np.nonzero(meet)[0]]
        # cols[0] is blk itself: its pairs are counted once, the others twice (G and G.T)
        ncol_max = max(len(blk), int(budget // (4 * len(blk))))
        m_a = m_map[blk]
        rows = np.unique(m_a.indices)
        m_a = m_a[:, rows].T.tocsr()                       # (len(rows), nb)
        (x0, x1), (y0, y1), (z0, z1) = box
        fa = (fx[blk, x0:x1], fy[blk, y0:y1], fz[blk, z0:z1])
        j = 0
        while j < len(cols):
            grp = [cols[j]]
            n = len(cols[j])
            j += 1
            while j < len(cols) and n + len(cols[j]) <= ncol_max:
                grp.append(cols[j])
                n += len(cols[j])
                j += 1
            q = np.concatenate(grp)
            g = lib.dot(fa[0], fx[q, x0:x1].T)
            g *= lib.dot(fa[1], fy[q, y0:y1].T)
            g *= lib.dot(fa[2], fz[q, z0:z1].T)
            if grp[0] is blk:
                g[:, :len(blk)] *= .5
            m_q = m_map[q]
            cq = np.unique(m_q.indices)
            c = m_a.dot(sp.csr_matrix(m_q[:, cq]).T.dot(g.T).T)   # (len(rows), len(cq))
            gram[np.ix_(rows, cq)] += c
            gram[np.ix_(cq, rows)] += c.T
    gram *= grid.dv
    return gram


# The self term of the discrete Coulomb kernel, in units of h^2: the integral of 1/|r| over
# the voxel itself (2.3800772 h^2) plus pi/6 h^2, the leading correction for a field given
# by point values rather than voxel averages (sum_j (rho(r) - rho_j) over the voxels around
# r_i is about h^2/24 of the Laplacian's potential, 4 pi rho_i): six times smaller errors
# of the potential of a smooth density at the same spacing
_SELF_TERM = 2.3800772 + np.pi / 6


def _even_fast_len(n):
    """The smallest even length >= n that FFTs handle fast."""
    import scipy.fft
    m = scipy.fft.next_fast_len(n, real=True)
    while m % 2:
        m = scipy.fft.next_fast_len(m + 1, real=True)
    return m


def hartree_potential(field, grid, workers=None):
    """Coulomb potential (Hartree) on ``grid`` of the charge density ``field`` (e/Bohr^3,
    ``grid.shape``), free-space boundary conditions; float32.

    The discrete convolution v_i = sum_j field_j dV / |r_i - r_j| (the self term
    :data:`_SELF_TERM`) by FFT on a grid padded to twice the box in each direction
    (Hockney's method), so that the images of the periodic FFT never meet: O(n log n)
    time. The kernel is even, so its transform is a type-I DCT of one octant. The
    transforms go one axis at a time, the padding of x (and of y on the way back) slab by
    slab, so the largest array is the field transformed along z and y (16 bytes per voxel
    of ``grid``): about 25 bytes per voxel at the peak, a fifth of a padded 3D FFT's.
    """
    import scipy.fft as fft
    n1, n2, n3 = shape = grid.shape
    m1, m2, m3 = pad = [_even_fast_len(2 * n - 1) for n in shape]
    h = grid.spacing
    workers = workers or lib.num_threads()
    # the kernel on the octant of offsets 0..m/2; offsets the box never spans are zero
    ax = []
    for n, m in zip(shape, pad):
        d = np.arange(m // 2 + 1, dtype=np.float32) * np.float32(h)
        d[n:] = np.inf
        ax.append(d)
    kernel = (ax[0][:, None, None] ** 2 + ax[1][None, :, None] ** 2
              + ax[2][None, None, :] ** 2)
    with np.errstate(divide='ignore'):
        np.sqrt(kernel, out=kernel)
        np.divide(np.float32(grid.dv), kernel, out=kernel)
    kernel[0, 0, 0] = _SELF_TERM * h * h
    kernel = fft.dctn(kernel, type=1, workers=workers, overwrite_x=True)
    fold1, fold2 = [np.minimum(np.arange(m), m - np.arange(m)) for m in pad[:2]]

    field = np.asarray(field)
    nz = m3 // 2 + 1
    a = np.empty((n1, m2, nz), dtype=np.complex64)
    step = max(1, n1 // 8)
    for x0 in range(0, n1, step):
        sub = np.asarray(field[x0:x0 + step], dtype=np.float32)
        a[x0:x0 + step] = fft.fft(fft.rfft(sub, n=m3, axis=2, workers=workers), n=m2,
                                  axis=1, workers=workers, overwrite_x=True)
    step = max(1, m2 // 16)
    for y0 in range(0, m2, step):
        blk = fft.fft(a[:, y0:y0 + step], n=m1, axis=0, workers=workers)
        blk *= kernel[fold1[:, None], fold2[None, y0:y0 + step]]
        a[:, y0:y0 + step] = fft.ifft(blk, axis=0, workers=workers, overwrite_x=True)[:n1]
    del kernel, blk
    v = np.empty(shape, dtype=np.float32)
    step = max(1, n1 // 8)
    for x0 in range(0, n1, step):
        sub = fft.ifft(a[x0:x0 + step], axis=1, workers=workers)[:, :n2]
        v[x0:x0 + step] = fft.irfft(sub, n=m3, axis=2, workers=workers)[:, :, :n3]
    return v
