"""The Coulomb side of the guess: its density fits and J builds, on PySCF's own DF objects.

Every Fock build of the guess needs J of a density given as a density matrix plus the
network's delta-rho (its projection (k|delta-rho), :func:`fit.coulomb_projection`), and the
fit of each new density matrix for the Anderson residuals. Both engines fit every density
the way PySCF's DF-J does, d = (k|l)^-1 (l|rho): ``fit(dm)`` from a density matrix,
``fit_projection(v)`` from a projection v = (k|rho). :func:`coulomb_engine` chooses where
those come from, in this order:

1. A density-fitted SCF (``mf.density_fit()``): PySCF's own DF tensor of ``mf.with_df``
   (:class:`CderiCoulomb`), built by PySCF once, in memory or on disk as PySCF decides,
   and kept on ``mf.with_df``, so the SCF uses the same tensor and builds nothing again
   (for a pure functional this also spares the SCF its screened direct DF-J passes).
   Where PySCF would not build that tensor (a pure functional whose tensor does not fit in
   memory, without ``mol.incore_anyway``, which makes PySCF build it on disk) the guess
   makes the screened direct passes of PySCF's direct DF-J on that DF object's own state
   (``with_df._vjopt``: screening and the metric's Cholesky factor), which it makes where
   the SCF has not yet and leaves for the SCF.
2. A conventional SCF: the guess's own fit (:class:`AuxCoulomb`): the 3-centre integrals in
   memory where they fit in half of what ``mf.max_memory`` leaves free, else screened
   direct passes with PySCF's 3-centre J driver (the two passes of ``df.df_jk.get_j``).

On both direct routes the guess first tries to hold its own copy of the 3-centre integrals
for the length of the guess: the shell pairs above :data:`HELD_TOL`, in single precision
(contracted in double), where they fit in :data:`HELD_MEMORY` of what the memory limit
leaves free. One integral evaluation then replaces the two or three passes of every Fock
build (verapamil, 71 atoms: 0.68 GB, 39% of the pairs); the copy goes with the guess.
Where it does not fit in memory it is written to a temporary file in PySCF's
``lib.param.TMPDIR`` (where PySCF keeps its own DF tensors on disk), within
:data:`HELD_DISK` of the disk space free there, read in blocks at each contraction by
``lib.num_threads()`` threads in parallel, and gone when the guess is made (it is removed
from the directory as soon as it is opened). Where it fits in neither, it is held in
memory for as many fitting functions as fit, and the passes skip those functions. The copy
is made one block of fitting functions per thread.
"""

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.linalg
from pyscf import gto, df, lib

from pyscf_densr.errors import DensrError

# the guess holds its screened single-precision 3-centre integrals where they fit in this
# fraction of what the memory limit leaves free (the rest is for the XC's AO blocks)
HELD_MEMORY = 0.6
# the copy keeps the shell pairs whose Schwarz bound times the largest auxiliary one reaches
# this (PySCF's passes keep those above mf.direct_scf_tol, 1e-13): the copy serves only the
# guess, and the pairs it leaves out change its J by no more than the single-precision
# copy's own rounding (propranolol, def2-SVP: 3.9e-7 Eh at most against the rounding's
# 5.1e-7; 1e-6 would be 3.6e-6); melittin (STO-3G) keeps 16% of its pairs, where 1e-8
# kept 18% and 1e-13 30%
HELD_TOL = 1e-7
# the copy is made in blocks of at most 8x this many bytes of double-precision integrals
# per tile
_HELD_CHUNK = 8e6
# rows of the copy converted to double precision at a time (bytes) for their sums
_DOUBLE_CHUNK = 8e6
# rows of a copy on disk read at a time (bytes, single precision)
_HELD_READ = 32e6
# where the copy does not fit in memory, it is written to a temporary file in PySCF's
# TMPDIR where it fits in this fraction of the disk space free there (0: never)
HELD_DISK = 0.5
# where the copy fits in neither, the functions of part of the fitting basis are held in
# memory where at least this fraction of them fits (their passes then skip them)
HELD_PART_MIN = 0.05


def _cart2sph_sparse(auxmol):
    """``auxmol.cart2sph_coeff()`` as a scipy.sparse matrix (block diagonal by shells)."""
    import scipy.sparse as sp
    c2s_l = {}
    blocks = []
    for ib in range(auxmol.nbas):
        l = auxmol.bas_angular(ib)
        if l not in c2s_l:
            c2s_l[l] = sp.csr_matrix(gto.cart2sph(l, normalized='sp'))
        blocks.extend([c2s_l[l]] * auxmol.bas_nctr(ib))
    return sp.block_diag(blocks, format='csr')


def _vj_opt(mol, auxmol, direct_scf_tol=1e-13, j2c=None):
    """PySCF's screened 3-centre J machinery (as in ``df.df_jk.get_j``) for mol x auxmol.

    The auxiliary Schwarz factors sqrt (k|k) come from ``j2c`` (the Coulomb metric) when it
    is at hand, else from each shell's own diagonal block.
    """
    from pyscf.scf import _vhf
    opt = _vhf._VHFOpt(mol, 'int3c2e', 'CVHFnr3c2e_schwarz_cond',
                       dmcondname='CVHFnr_dm_cond', direct_scf_tol=direct_scf_tol)
    opt.init_cvhf_direct(mol, 'int2e', 'CVHFnr_int2e_q_cond')
    aux_loc = auxmol.ao_loc_nr()
    if j2c is not None:
        diag = np.sqrt(abs(np.diag(j2c)))
        q_aux = np.array([diag[i0:i1].max() for i0, i1 in zip(aux_loc[:-1], aux_loc[1:])])
    else:
        q_aux = np.array([np.sqrt(abs(np.diag(auxmol.intor(
            'int2c2e', shls_slice=(i, i + 1, i, i + 1)))).max()) for i in range(auxmol.nbas)])
    opt.q_cond = np.hstack((opt.q_cond.ravel(), q_aux))
    bas_placeholder = np.array([0, 0, 1, 1, 0, 0, 0, 0], dtype=np.int32)
    fakemol = mol + auxmol
    fakemol._bas = np.vstack((fakemol._bas, bas_placeholder))
    opt.fakemol = fakemol
    return opt


def _vj_slice(mol, auxmol):
    nbas, nbas1 = mol.nbas, mol.nbas + auxmol.nbas
    return (0, nbas, 0, nbas, nbas, nbas1, nbas1, nbas1 + 1)


def _vj_pass2(mol, auxmol, opt, c):
    from pyscf.scf import jk
    c = np.asarray(c, dtype=np.float64)
    aux_loc = auxmol.ao_loc_nr()
    with lib.temporary_env(opt, prescreen='CVHFnr3c2e_vj_pass2_prescreen', _dmcondname=None):
        opt.dm_cond = np.array([abs(c[i0:i1]).max() if i1 > i0 else 0.
                                for i0, i1 in zip(aux_loc[:-1], aux_loc[1:])])
        vj = jk.get_jk(opt.fakemol, c.reshape(1, 1, -1), ['ijkl,lk->ij'], 'int3c2e',
                       aosym='s2ij', hermi=1, shls_slice=_vj_slice(mol, auxmol), vhfopt=opt)
    return np.asarray(vj).reshape(mol.nao, mol.nao)


def _pair_schwarz(mol, tol=1e-13):
    """sqrt((ij|ij)) of every shell pair, (nbas, nbas): PySCF's direct-SCF bound."""
    from pyscf.scf import _vhf
    opt = _vhf._VHFOpt(mol, 'int2e', 'CVHFnr_schwarz_cond', direct_scf_tol=tol)
    opt.init_cvhf_direct(mol, 'int2e', 'CVHFnr_int2e_q_cond')
    return np.asarray(opt.q_cond).reshape(mol.nbas, mol.nbas)


def _significant_shell_pairs(mol, q_pairs, q_aux, tol):
    """(mask, AO pairs): the shell pairs whose Schwarz bound ``q_pairs`` times the largest
    auxiliary one ``q_aux`` reaches ``tol`` (those PySCF's screened 3-centre passes can ever
    compute), and how many AO pairs i >= j they hold."""
    keep = q_pairs * q_aux >= tol
    nf = np.diff(mol.ao_loc_nr())
    diag = (np.diag(keep) * nf * (nf + 1) // 2).sum()
    return keep, int(nf.dot(np.tril(keep, -1)).dot(nf) + diag)


def _held_pairs(mol, q_pairs, q_aux, direct_scf_tol=1e-13):
    """:func:`_significant_shell_pairs` of the guess's copy: those above ``HELD_TOL`` (and
    never more than PySCF's passes keep at ``direct_scf_tol``)."""
    return _significant_shell_pairs(mol, q_pairs, q_aux, max(direct_scf_tol, HELD_TOL))


def _in_memory_fs(path, mounts='/proc/mounts'):
    """Whether ``path`` lies on a memory-backed file system (tmpfs, ramfs: Linux's
    ``mounts`` table), where a file takes memory, not disk."""
    try:
        with open(mounts) as f:
            mounts = [ln.split()[1:3] for ln in f if len(ln.split()) > 2]
    except OSError:
        return False
    path = os.path.realpath(path)
    best, kind = '', None
    for point, fstype in mounts:
        point = point.replace('\\040', ' ')
        inside = path == point or path.startswith(point.rstrip('/') + '/')
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind in ('tmpfs', 'ramfs')


def _disk_free():
    """Bytes free on the disk of PySCF's TMPDIR: 0 where it cannot be read or where TMPDIR
    is memory-backed (a file there would take the memory the copy does not fit in)."""
    import shutil
    try:
        if _in_memory_fs(lib.param.TMPDIR):
            return 0
        return shutil.disk_usage(lib.param.TMPDIR).free
    except OSError:
        return 0


def _pair_positions(mol, keep):
    """Positions in the packed lower triangle of (mu nu) of the AO pairs of shell pairs
    ``keep``."""
    shell = np.repeat(np.arange(mol.nbas), np.diff(mol.ao_loc_nr()))
    i, j = np.tril_indices(mol.nao)
    return np.flatnonzero(keep[shell[i], shell[j]])


def _pair_tiles(mol, keep, pairs):
    """The held shell pairs ``keep`` as blocks of 3-centre integrals, so that their copy is
    made without the pairs screened out: (i0, i1, j0, j1, sel, cols) for the shells i0..i1
    of one atom and each run j0..j1 of shells (j < i1) with a held pair among them (runs
    less than 4 shells apart merged); ``sel``: the held AO pairs i >= j among the block's
    (i, j) in Fortran order (as the integrals come), ``cols``: their columns in the copy,
    positions in ``pairs`` (:func:`_pair_positions`). Every held pair is in one block."""
    ao_loc = mol.ao_loc_nr()
    shell = np.repeat(np.arange(mol.nbas), np.diff(ao_loc))
    edges = np.concatenate(([0], np.flatnonzero(np.diff(mol._bas[:, gto.ATOM_OF])) + 1,
                            [mol.nbas]))
    tiles = []
    for i0, i1 in zip(edges[:-1], edges[1:]):
        js = np.flatnonzero(keep[i0:i1, :i1].any(axis=0))
        if js.size == 0:
            continue
        gap = np.flatnonzero(np.diff(js) > 4)
        for j0, j1 in zip(np.append(js[0], js[gap + 1]), np.append(js[gap], js[-1]) + 1):
            i = np.arange(ao_loc[i0], ao_loc[i1])[:, None]
            j = np.arange(ao_loc[j0], ao_loc[j1])[None, :]
            ok = (i >= j) & keep[shell[i], shell[j]]
            sel = np.flatnonzero(ok.ravel(order='F'))
            packed = (i * (i + 1) // 2 + j).ravel(order='F')[sel]
            tiles.append((i0, i1, j0, j1, sel, np.searchsorted(pairs, packed)))
    return tiles


def _double_chunks(rows):
    """(r0, rows r0.. in double precision) in chunks of about :data:`_DOUBLE_CHUNK` bytes,
    each converted into one reused buffer, so that the sums are made in double precision
    without a double-precision copy of all the rows. Summed in single precision instead,
    the sums' rounding (about 1e-7 relative) changes from build to build and stalls the
    guess's builds at residuals near 1e-2 (verapamil)."""
    k, p = rows.shape
    n = max(1, min(k, int(_DOUBLE_CHUNK // (8 * max(p, 1)))))
    buf = np.empty((n, p))
    for r0 in range(0, k, n):
        b = buf[:min(n, k - r0)]
        np.copyto(b, rows[r0:r0 + len(b)])
        yield r0, b


# einsum, not BLAS: numpy's BLAS starts its own threads inside each of the guess's and
# they contend (two threads on two cores: 3x slower); einsum on the converted chunks is
# 1.5x numpy.einsum on the single-precision rows, which casts element by element
def _rows_dot(rows, v):
    """rows @ v for single-precision ``rows``, in double precision."""
    out = np.empty(len(rows))
    for r0, b in _double_chunks(rows):
        out[r0:r0 + len(b)] = np.einsum('kp,p->k', b, v)
    return out


def _dot_rows(d, rows):
    """d @ rows for single-precision ``rows``, in double precision."""
    out = np.zeros(rows.shape[1])
    for r0, b in _double_chunks(rows):
        out += np.einsum('k,kp->p', d[r0:r0 + len(b)], b)
    return out


class _HeldFile:
    """The screened copy on disk: its rows of single-precision numbers, one after the other,
    in a temporary file in PySCF's ``lib.param.TMPDIR``, removed from the directory as soon
    as it is opened (nothing is left behind, even where the process is killed). Read with
    ``os.preadv``, which leaves the GIL, so that threads read their rows in parallel (h5py
    takes one lock for all its calls)."""
    def __init__(self, shape):
        fd, path = tempfile.mkstemp(prefix='densr-int3c-', dir=lib.param.TMPDIR)
        os.unlink(path)
        self.fd, self.shape = fd, shape

    def _bytes(self, r0, rows):
        return memoryview(rows).cast('B'), int(r0) * int(self.shape[1]) * 4

    def write(self, r0, rows):
        view, offset = self._bytes(r0, np.ascontiguousarray(rows, dtype=np.float32))
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def read(self, r0, out):
        """Rows r0 .. r0 + len(out) into ``out`` (C-contiguous, single precision)."""
        view, offset = self._bytes(r0, out)
        while view:
            n = os.preadv(self.fd, [view], offset)
            if n == 0:
                raise OSError('densr guess: its temporary file of 3-centre integrals ended '
                              'early')
            view, offset = view[n:], offset + n

    def close(self):
        os.close(self.fd)


def _factor_metric(auxmol, j2c):
    """('cd', Cholesky factor) of the metric ``j2c`` of ``auxmol``, made in place (for
    20 000 auxiliary functions the metric alone is 3 GB), or ('regular', the metric) where
    it is not numerically positive definite: PySCF's two kinds (``df.df_jk.get_j``)."""
    try:
        return 'cd', scipy.linalg.cho_factor(j2c, lower=True, overwrite_a=True)
    except scipy.linalg.LinAlgError:
        return 'regular', auxmol.intor('int2c2e', hermi=1)


class AuxCoulomb:
    """The Coulomb side of one guess in an auxiliary basis: PySCF's screened 3-centre passes
    and one Cholesky factor of the metric (k|l), shared by every fit and J build.

    The fit d = (k|l)^-1 (l|mu nu) P_mu nu is the robust DF approximation of rho[P] (the
    one PySCF's DF-J uses), so ``coulomb(fit(dm)[0])`` is its DF Coulomb matrix.

    ``project(dm)`` gives (k|rho[dm]), ``solve(v)`` the coefficients (k|l)^-1 v, ``fit(dm)``
    both, ``coulomb(d)`` the J matrix of sum_k d_k chi_k (Hartree). ``incore``: whether those
    are products with held integrals (all of them in double precision in memory, or the
    screened single-precision copy, in memory within :data:`HELD_MEMORY` or in a temporary
    file within :data:`HELD_DISK`), else screened direct passes. Where the integrals are
    not held, raises ImportError, AttributeError or TypeError if
    PySCF's private 3-centre driver is unavailable.
    """

    def __init__(self, mol, auxmol, direct_scf_tol=1e-13, max_memory=None, vjopt=None):
        self.mol, self.auxmol = mol, auxmol
        # (mu nu|k) held in memory where it fits in half of what PySCF may still use (as
        # PySCF's in-core DF does): one 3-centre pass' cost once, then every projection and
        # J build of the guess is a matrix product. Else each is a screened direct pass.
        if max_memory is None:
            max_memory = mol.max_memory
        free = max_memory - lib.current_memory()[0]
        self.int3c_bytes = mol.nao * (mol.nao + 1) // 2 * auxmol.nao * 8
        self.incore = vjopt is None and self.int3c_bytes * 1e-6 < 0.5 * free
        self._int3c = None
        self._pairs = None      # the held pairs (packed-triangle positions) where screened
        self._keep = None       # the shell pairs they come from
        self._held = None       # the auxiliary functions held, where only some fit
        self._held_budget = None  # (MB allowed, bytes of the whole copy) where not even
        #                           HELD_PART_MIN of it fits
        self._file = None       # the temporary file of a copy held on disk
        self._block_mb = None   # the most memory (MB) a block of it takes while it is made
        self.pass_time = None   # seconds of one whole J pass, where the others are partial
        self._reads = 0         # reads of the copy on disk
        self.copy_time = None   # seconds the copy took to make
        self._last = None
        if vjopt is not None:   # PySCF's own direct DF-J state, shared with the SCF
            self.opt = vjopt
            cd = vjopt.j2c_type == 'cd'
            self.cho, self.metric = (vjopt.j2c, None) if cd else (None, vjopt.j2c)
        else:
            j2c = auxmol.intor('int2c2e', hermi=1)
        if not self.incore:
            if vjopt is not None:   # its bounds: the shell pairs', then the auxiliary shells'
                q = np.asarray(vjopt.q_cond).ravel()
                q_pairs, q_aux = q[:mol.nbas**2].reshape(mol.nbas, mol.nbas), q[mol.nbas**2:]
            else:
                q_pairs = _pair_schwarz(mol, direct_scf_tol)
                q_aux = np.sqrt(abs(j2c.diagonal()))
            keep, npair = _held_pairs(mol, q_pairs, q_aux.max(), direct_scf_tol)
            nbytes = npair * auxmol.nao * 4
            self._keep = keep
            in_memory = nbytes * 1e-6 < HELD_MEMORY * free
            if in_memory or nbytes < HELD_DISK * _disk_free():
                self.incore, self._pairs = True, _pair_positions(mol, keep)
                self.int3c_bytes = nbytes
                if not in_memory:
                    self._file = _HeldFile((auxmol.nao, self._pairs.size))
                    self._block_mb = max(0.25 * free, 1.0)
            else:
                self._hold_part(keep, npair, HELD_MEMORY * free)
        # the SCF's own direct DF-J: its cycles make the same passes as the guess's builds
        self.scf_direct = vjopt is not None and not self.incore
        if vjopt is not None:
            return
        # the screened driver only where the passes are direct (before j2c is overwritten)
        self.opt = None if self.incore else _vj_opt(mol, auxmol, direct_scf_tol, j2c=j2c)
        kind, factor = _factor_metric(auxmol, j2c)
        self.cho, self.metric = (factor, None) if kind == 'cd' else (None, factor)

    def _hold_part(self, keep, npair, budget_mb):
        """Where the screened copy does not fit whole: hold it for as many auxiliary
        functions as fit in ``budget_mb``, the passes then skip those functions. The shells
        of most primitives go first, s before higher l: their integrals cost most per
        function (a pass of propranolol's fitting basis, per 100 functions: 1.3 s with one
        primitive, 2.0 with two, 6.6 with three, 12 with seven; s 4.3, p-g 1.5-2.6)."""
        auxmol = self.auxmol
        nrows = int(budget_mb / (npair * 4e-6))
        if nrows < HELD_PART_MIN * auxmol.nao:
            self._held_budget = (budget_mb, npair * auxmol.nao * 4)
            return
        aux_loc = auxmol.ao_loc_nr()
        size = np.diff(aux_loc)
        order = sorted(range(auxmol.nbas),
                       key=lambda i: (-auxmol.bas_nprim(i), auxmol.bas_angular(i), i))
        mask = np.zeros(auxmol.nbas, dtype=bool)
        n = 0
        for i in order:
            if n + size[i] > nrows:
                continue
            mask[i] = True
            n += size[i]
        self._held_shells = mask
        self._held = np.hstack([np.arange(aux_loc[i], aux_loc[i + 1])
                                for i in np.flatnonzero(mask)])
        self._pairs = _pair_positions(self.mol, keep)
        self.int3c_bytes = npair * auxmol.nao * 4

    @property
    def held_fraction(self):
        """The fraction of the auxiliary functions whose integrals are held (1 in memory)."""
        if self.incore:
            return 1.0
        return 0.0 if self._held is None else self._held.size / self.auxmol.nao

    def _ints(self):
        """(mu nu|k): all pairs as (pairs, k) in double precision, or the screened pairs as
        (k, pairs) in single precision (the held functions' rows only, where only some
        fit), made in blocks of auxiliary shells."""
        if self._int3c is None:
            t0 = time.perf_counter()
            mol, nbas = self.mol, self.mol.nbas
            fakemol = mol + self.auxmol
            if self._pairs is None:
                self._int3c = fakemol.intor(
                    'int3c2e', aosym='s2ij',
                    shls_slice=(0, nbas, 0, nbas, nbas, nbas + self.auxmol.nbas))
                return self._int3c
            aux_loc = self.auxmol.ao_loc_nr()
            shells = (np.ones(self.auxmol.nbas, dtype=bool) if self._held is None
                      else self._held_shells)
            nrow, npair = int(np.diff(aux_loc)[shells].sum()), self._pairs.size
            tiles = _pair_tiles(mol, self._keep, self._pairs)
            # functions per block: each tile's double-precision integrals within
            # 8 * _HELD_CHUNK, a block on its way to disk within a quarter of the free memory
            ao_loc = mol.ao_loc_nr()
            most = max((ao_loc[i1] - ao_loc[i0]) * (ao_loc[j1] - ao_loc[j0])
                       for i0, i1, j0, j1, _, _ in tiles)
            blk = max(int(_HELD_CHUNK / most), 1)
            # the blocks of auxiliary shells are made by lib.num_threads() threads, one
            # block each (PySCF's integral driver leaves the GIL), at least four per thread
            nthreads = lib.num_threads()
            if self._file is None:
                held = np.empty((nrow, npair), dtype=np.float32)
            else:
                held = self._file
                blk = min(blk, int(self._block_mb * 1e6 / (npair * 4) / nthreads))
            blk = max(min(blk, -(-nrow // (4 * nthreads))), 1)
            intor = fakemol._add_suffix('int3c2e')
            atm, bas, env = fakemol._atm, fakemol._bas, fakemol._env
            loc = gto.moleintor.make_loc(bas, intor)
            opt = gto.moleintor.make_cintopt(atm, bas[:nbas], env, intor)
            blocks, a0, r0 = [], 0, 0
            while a0 < self.auxmol.nbas:
                if not shells[a0]:
                    a0 += 1
                    continue
                a1 = a0 + 1
                while (a1 < self.auxmol.nbas and shells[a1]
                       and aux_loc[a1 + 1] - aux_loc[a0] <= blk):
                    a1 += 1
                r1 = r0 + aux_loc[a1] - aux_loc[a0]
                blocks.append((a0, a1, r0, r1))
                a0, r0 = a1, r1

            def make(block):
                a0, a1, r0, r1 = block
                out = held[r0:r1] if self._file is None else np.empty((r1 - r0, npair),
                                                                      dtype=np.float32)
                with lib.with_omp_threads(1 if nthreads > 1 else None):
                    for i0, i1, j0, j1, sel, cols in tiles:
                        b = gto.moleintor.getints3c(intor, atm, bas, env,
                                                    (i0, i1, j0, j1, nbas + a0, nbas + a1),
                                                    1, 's1', loc, opt)
                        out[:, cols] = b.reshape(-1, r1 - r0, order='F')[sel].T
                if self._file is not None:
                    held.write(r0, out)
            if nthreads > 1:
                with ThreadPoolExecutor(nthreads) as ex:
                    list(ex.map(make, blocks))
            else:
                for block in blocks:
                    make(block)
            self._int3c = held
            self.copy_time = time.perf_counter() - t0
        return self._int3c

    def close(self):
        """Free the held integrals (and delete their file where they are on disk)."""
        self._int3c = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _held_blocks(self, f):
        """``f(r0, rows)`` over blocks of the held copy in single precision (``rows`` from
        row r0 on), on ``lib.num_threads()`` threads, each over its own rows (einsum and the
        reads of a copy on disk leave the GIL); returns each thread's sum of what ``f``
        returned. From disk each thread reads blocks of :data:`_HELD_READ` bytes into its
        own buffer, every other call last block first."""
        held = self._ints()
        nrow, npair = held.shape
        nthreads = min(lib.num_threads(), max(nrow // 8, 1))
        edges = np.linspace(0, nrow, nthreads + 1).astype(int)
        if self._file is None:
            def run(a, b):
                return f(a, held[a:b])
        else:
            step = max(1, int(_HELD_READ / (npair * 4)))
            # where the file is larger than the page cache, a read then begins with the
            # blocks the last one left there
            self._reads += 1
            backwards = self._reads % 2 == 0

            def run(a, b):
                buf = np.empty((max(min(step, b - a), 0), npair), dtype=np.float32)
                starts = range(a, b, step)
                total = 0
                for r0 in (reversed(starts) if backwards else starts):
                    n = min(step, b - r0)
                    held.read(r0, buf[:n])
                    total = total + f(r0, buf[:n])
                return total
        if nthreads < 2:
            return [run(0, nrow)]
        with ThreadPoolExecutor(nthreads) as ex:
            return list(ex.map(run, edges[:-1], edges[1:]))

    def _held_functions(self, r0, n):
        """The auxiliary functions of held rows r0 .. r0 + n."""
        return slice(r0, r0 + n) if self._held is None else self._held[r0:r0 + n]

    def _held_project(self, dm, out):
        """``out`` with (k|rho[dm]) of the held functions filled in from the held rows."""
        # s2ij pairs i >= j carry P_ij + P_ji off the diagonal
        tril = lib.pack_tril(dm + dm.T - np.diag(dm.diagonal()))[self._pairs]

        def f(r0, rows):
            out[self._held_functions(r0, len(rows))] = _rows_dot(rows, tril)
            return 0
        self._held_blocks(f)
        return out

    def _held_coulomb(self, d):
        """The J matrix of the held functions' coefficients in ``d``."""
        held = sum(self._held_blocks(
            lambda r0, rows: _dot_rows(d[self._held_functions(r0, len(rows))], rows)))
        tril = np.zeros(self.mol.nao * (self.mol.nao + 1) // 2)
        tril[self._pairs] = held
        return lib.unpack_tril(tril)

    def project(self, dm):
        mol = self.mol
        dm = np.asarray(dm, dtype=np.float64, order='C').reshape(mol.nao, mol.nao)
        if self.incore and self._pairs is None:
            return self._ints().T.dot(lib.pack_tril(dm + dm.T - np.diag(dm.diagonal())))
        if self.incore:
            return self._held_project(dm, np.empty(self.auxmol.nao))
        if self._held is None:
            return self._pass1(dm)
        # a pass over the functions not held, the held rows for the others
        q = np.array(self.opt.q_cond, copy=True).ravel()
        q[mol.nbas**2:][self._held_shells] = 0
        with lib.temporary_env(self.opt, q_cond=q):
            out = self._pass1(dm)
        return self._held_project(dm, out)

    def _pass1(self, dm):
        from pyscf.scf import jk
        mol = self.mol
        with lib.temporary_env(self.opt, prescreen='CVHFnr3c2e_vj_pass1_prescreen'):
            jaux = jk.get_jk(self.opt.fakemol, dm.reshape(1, mol.nao, mol.nao), ['ijkl,ji->kl'],
                             'int3c2e', aosym='s2ij', hermi=0,
                             shls_slice=_vj_slice(mol, self.auxmol), vhfopt=self.opt)
        return np.asarray(jaux).reshape(-1)

    def solve(self, v):
        if self.cho is not None:
            return scipy.linalg.cho_solve(self.cho, v, check_finite=False)
        return scipy.linalg.lstsq(self.metric, v, cond=1e-12)[0]

    @classmethod
    def of_scf(cls, with_df, auxmol=None, direct_scf_tol=1e-13, max_memory=None):
        """The engine of the direct DF-J of ``with_df`` (a ``df.DF`` without its tensor):
        PySCF's own state of that route (``with_df._vjopt``: the screening and the Cholesky
        factor of the metric, made here as ``df.df_jk.get_j`` makes it where the SCF has not
        yet), so that the SCF's DF-J takes it from the guess and neither makes it twice.
        The guess's own screened integrals are held within ``max_memory`` (MB; the SCF's).
        ``auxmol``: ``with_df``'s fitting basis where the caller has made it."""
        if with_df._vjopt is None:
            mol = with_df.mol
            if auxmol is None:
                auxmol = df.addons.make_auxmol(mol, with_df.auxbasis)
            j2c = auxmol.intor('int2c2e', hermi=1)
            opt = _vj_opt(mol, auxmol, direct_scf_tol, j2c=j2c)
            opt.j2c_type, opt.j2c = _factor_metric(auxmol, j2c)
            with_df.auxmol, with_df._vjopt = auxmol, opt
        return cls(with_df.mol, with_df.auxmol, direct_scf_tol, max_memory,
                   vjopt=with_df._vjopt)

    def metric_times(self, d):
        """(k|l) d, from the Cholesky factor (the metric itself was overwritten)."""
        if self.cho is None:
            return self.metric.dot(d)
        from scipy.linalg import blas
        low = self.cho[0]
        return blas.dtrmv(low, blas.dtrmv(low, d, lower=1, trans=1), lower=1)

    def fit(self, dm):
        """(coefficients, (k|rho[dm])); the last one is remembered (the guess fits P_SAD
        for its Coulomb matrix and again for the second build's residual)."""
        dm = np.asarray(dm)
        last = self._last
        if last is not None and last[0].shape == dm.shape and np.array_equal(last[0], dm):
            return last[1], last[2]
        v = self.project(dm)
        d = self.solve(v)
        self._last = (dm.copy(), d, v)
        return d, v

    def coulomb(self, d):
        d = np.asarray(d, dtype=np.float64)
        if self.incore and self._pairs is None:
            return lib.unpack_tril(self._ints().dot(d))
        if self.incore:
            return self._held_coulomb(d)
        if self._held is None:
            return _vj_pass2(self.mol, self.auxmol, self.opt, d)
        if self.pass_time is None:
            # the first J a whole pass, timed: what each of an SCF cycle's passes costs
            t0 = time.perf_counter()
            vj = _vj_pass2(self.mol, self.auxmol, self.opt, d)
            self.pass_time = time.perf_counter() - t0
            return vj
        # the pass screens out the held functions (their coefficients zero), the held rows
        # add theirs
        rest = d.copy()
        rest[self._held] = 0
        return _vj_pass2(self.mol, self.auxmol, self.opt, rest) + self._held_coulomb(d)

    @property
    def route(self):
        part = ''
        if self._held_budget is not None:
            budget, whole = self._held_budget
            part = (', none of its screened integrals held (all of them %.1f GB in single '
                    'precision, over the disk space allowed in %s; %d%% of them %.2f GB, '
                    'over the %.2f GB of memory allowed: a larger mf.max_memory holds them)'
                    % (whole * 1e-9, lib.param.TMPDIR, round(100 * HELD_PART_MIN),
                       HELD_PART_MIN * whole * 1e-9, budget * 1e-3))
        if self._held is not None:
            part = (', the screened integrals of %d%% of its fitting functions held (single '
                    'precision, %.2f GB)' % (round(100 * self.held_fraction),
                                             self.held_fraction * self.int3c_bytes * 1e-9))
        if self.scf_direct:
            return "the SCF's direct DF-J" + part
        if part:
            return 'guess 3c direct' + part
        if self._pairs is not None:
            return ('guess 3c %s (%d%% of the pairs, single precision, %.2f GB)'
                    % ('in memory' if self._file is None else
                       'on disk, in a temporary file in %s' % lib.param.TMPDIR,
                       round(100 * self._pairs.size * 2 / self.mol.nao / (self.mol.nao + 1)),
                       self.int3c_bytes * 1e-9))
        return 'guess 3c in memory' if self.incore else 'guess 3c direct'

    def fit_projection(self, v, n=None, charge=None):
        """(coefficients, (k|fit)) of the density whose projection (k|rho) is ``v``; with
        the functions' charges ``n`` (:func:`fit.charges`), the fit that holds ``charge``
        electrons, closest to it in the Coulomb norm (a Lagrange constraint)."""
        d = self.solve(v)
        if n is not None:
            dn = self.solve(n)
            lam = (n.dot(d) - charge) / n.dot(dn)
            d, v = d - lam * dn, v - lam * n
        return d, v


def _coulomb_auxmol(mol, auxmol):
    """``auxmol`` as the 3-centre integrals need it: they take one cart flag for AO and
    auxiliary shells alike, so a Cartesian basis gets Cartesian auxiliary functions
    (coefficients through :func:`_coeffs_in`)."""
    if not (mol.cart and not auxmol.cart):
        return auxmol
    jmol = auxmol.copy()
    jmol.cart = True
    jmol.build(False, False)
    return jmol


def _aux_coulomb(mol, auxmol, max_memory=None):
    """An :class:`AuxCoulomb` for ``mol`` on ``auxmol`` as the 3-centre passes need it
    (:func:`_coulomb_auxmol`); a :class:`DensrError` where the integrals do not fit in
    memory and PySCF's private 3-centre driver is unavailable."""
    try:
        return AuxCoulomb(mol, _coulomb_auxmol(mol, auxmol), max_memory=max_memory)
    except (ImportError, AttributeError, TypeError, OSError) as e:
        raise DensrError('densr guess: its 3-centre integrals do not fit in mf.max_memory '
                         'and PySCF\'s screened 3-centre J driver is unavailable (%s: %s)'
                         % (type(e).__name__, e)) from e



class CderiCoulomb:
    """The guess's Coulomb side on PySCF's DF tensor B = X (k|mu nu) of ``with_df``.

    X is PySCF's own decomposition of the metric (k|l) (``df.incore.cholesky_eri``: the
    inverse Cholesky factor, or the eigen route for a near-singular metric). Densities are
    represented by e = X (k|rho): the fit of a density matrix is e = B P, its Coulomb
    matrix B^T e, and e.e its Coulomb self-energy norm, so the interface of
    :class:`AuxCoulomb` holds with ``solve`` and ``metric_times`` the identity.
    """
    route = 'SCF DF tensor'

    def __init__(self, with_df):
        if with_df._cderi is None:
            with_df.build()
        if with_df.auxmol is None:
            raise ValueError('a DF tensor without its auxiliary basis')
        self.with_df = with_df
        self.mol, self.auxmol = with_df.mol, with_df.auxmol
        j2c = self.auxmol.intor('int2c2e', hermi=1)
        try:
            self.low, self.cd = scipy.linalg.cholesky(j2c, lower=True), True
        except scipy.linalg.LinAlgError:
            from pyscf.df.incore import _eig_decompose, LINEAR_DEP_THR
            self.low, self.cd = _eig_decompose(self.mol, j2c, LINEAR_DEP_THR), False
        self.naux = self.low.shape[0]
        if self.naux != with_df.get_naoaux():
            raise ValueError('the DF tensor has %d rows, its metric decomposes into %d' % (
                with_df.get_naoaux(), self.naux))
        self._last = None

    def _x(self, v):
        if self.cd:
            return scipy.linalg.solve_triangular(self.low, v, lower=True)
        return self.low.dot(v)

    def fit_projection(self, v, n=None, charge=None):
        """(e, e) of the density whose projection (k|rho) is ``v``: e = X v; with the
        functions' charges ``n``, the e closest to it that holds ``charge`` electrons
        (n.d = (X n).e)."""
        e = self._x(np.asarray(v, dtype=np.float64))
        if n is not None:
            xn = self._x(np.asarray(n, dtype=np.float64))
            e = e - (xn.dot(e) - charge) / xn.dot(xn) * xn
        return e, e

    def project(self, dm):
        dm = np.asarray(dm, dtype=np.float64).reshape(self.mol.nao, self.mol.nao)
        tril = lib.pack_tril(dm + dm.T - np.diag(dm.diagonal()))
        out, p0 = np.empty(self.naux), 0
        for b in self.with_df.loop():
            out[p0:p0 + len(b)] = b.dot(tril)
            p0 += len(b)
        return out

    def solve(self, v):
        return v

    def metric_times(self, d):
        return d

    def fit(self, dm):
        dm = np.asarray(dm)
        last = self._last
        if last is not None and last[0].shape == dm.shape and np.array_equal(last[0], dm):
            return last[1], last[1]
        e = self.project(dm)
        self._last = (dm.copy(), e)
        return e, e

    def coulomb(self, e):
        e = np.asarray(e, dtype=np.float64)
        out, p0 = 0, 0
        for b in self.with_df.loop():
            out = out + e[p0:p0 + len(b)].dot(b)
            p0 += len(b)
        return lib.unpack_tril(out)

    def fit_coulomb(self, dm):
        """(e, e, J) of ``dm``: its fit and the Coulomb matrix of that fit, :meth:`fit` then
        :meth:`coulomb`, in one pass over a tensor held in memory (rows of about
        :data:`_FUSED_BYTES` each, read once for both products: a third less memory traffic
        than two passes); two passes where PySCF keeps the tensor on disk."""
        cderi = self.with_df._cderi
        if not isinstance(cderi, np.ndarray) or cderi.ndim != 2:
            e = self.fit(dm)[0]
            return e, e, self.coulomb(e)
        dm = np.asarray(dm, dtype=np.float64).reshape(self.mol.nao, self.mol.nao)
        tril = lib.pack_tril(dm + dm.T - np.diag(dm.diagonal()))
        e, out = np.empty(self.naux), np.zeros(cderi.shape[1])
        rows = max(1, int(_FUSED_BYTES // (8 * cderi.shape[1])))
        for p0 in range(0, self.naux, rows):
            b = cderi[p0:p0 + rows]
            e[p0:p0 + len(b)] = eb = b.dot(tril)
            out += eb.dot(b)
        self._last = (dm.copy(), e)
        return e, e, lib.unpack_tril(out)


# rows of the DF tensor read together by CderiCoulomb.fit_coulomb: a few MB, so that the
# second product finds them in cache (oseltamivir's 100576 pairs: 7 rows; 0.08 s against
# two passes' 0.11 s on one core)
_FUSED_BYTES = 6e6


def fit_and_coulomb(aux, dm):
    """(d, j, v): the fit of ``dm`` in the terms of the Coulomb engine ``aux`` and, where
    the engine makes both in one pass (:meth:`CderiCoulomb.fit_coulomb`), the Coulomb
    matrix of that fit; else v is None (``aux.coulomb(d)`` when it is needed: the priced
    builds of :func:`builds.anderson_step` time that pass apart)."""
    if hasattr(aux, 'fit_coulomb'):
        return aux.fit_coulomb(dm)
    return aux.fit(dm) + (None,)


def _scf_needs_k(mf):
    """Whether the SCF builds exact exchange from its DF tensor (so PySCF builds it anyway)."""
    if getattr(mf, 'only_dfj', False):
        return False
    if not hasattr(mf, 'xc'):
        return True
    omega, alpha, hyb = mf._numint.rsh_and_hybrid_coeff(mf.xc, spin=mf.mol.spin)
    return abs(hyb) > 1e-14 or abs(alpha) > 1e-14


def coulomb_engine(mf, auxmol, log=None):
    """The Coulomb side of the guess for SCF object ``mf`` (see the module docstring).
    ``auxmol``: the auxiliary basis where the SCF has no DF tensor to lend. Its
    ``scf_setup_time`` (s) is what making the SCF's own one-time state took (PySCF's DF
    tensor, or its direct DF-J state), which the SCF then reuses: 0 where it was there."""
    mol = mf.mol
    with_df = getattr(mf, 'with_df', None)
    if isinstance(with_df, df.DF) and with_df.mol is mol:
        # PySCF's own rule (df.df_jk.get_jk): the SCF uses the tensor where it has one, needs
        # exchange, or mol.incore_anyway asks for it (built in memory or on disk as
        # with_df.build decides)
        build = with_df._cderi is not None or _scf_needs_k(mf) or bool(mol.incore_anyway)
        if not build:
            aux = with_df.auxmol or df.addons.make_auxmol(mol, with_df.auxbasis)
            nbytes = mol.nao * (mol.nao + 1) // 2 * aux.nao * 8
            # PySCF's own rule for a tensor in memory (df.DF.build)
            build = nbytes * 1e-6 < .9 * (with_df.max_memory - lib.current_memory()[0])
            if not build:
                if log is not None:
                    log.info('densr: the DF tensor (%.1f GB) does not fit in memory; the '
                             'SCF makes screened 3-centre passes (direct DF-J)', nbytes * 1e-9)
                try:
                    made = with_df._vjopt is None
                    t0 = time.perf_counter()
                    engine = AuxCoulomb.of_scf(with_df, aux,
                                               getattr(mf, 'direct_scf_tol', 1e-13),
                                               mf.max_memory)
                    engine.scf_setup_time = time.perf_counter() - t0 if made else 0.0
                    if made and log is not None:
                        log.info('densr: PySCF\'s direct DF-J state (screening, Cholesky '
                                 'factor of the metric) made for the guess and the SCF in '
                                 '%.2f s', engine.scf_setup_time)
                    return engine
                except (ImportError, AttributeError, TypeError, OSError) as e:
                    raise DensrError('densr guess: PySCF\'s screened 3-centre J driver is '
                                     'unavailable (%s: %s)' % (type(e).__name__, e)) from e
        if build:
            try:
                made = with_df._cderi is None
                t0 = time.perf_counter()
                engine = CderiCoulomb(with_df)
                engine.scf_setup_time = time.perf_counter() - t0 if made else 0.0
                if made and log is not None:
                    log.info('densr: the DF tensor built for the guess and the SCF in %.2f s',
                             engine.scf_setup_time)
                return engine
            except (ValueError, scipy.linalg.LinAlgError) as e:
                if log is not None:
                    log.info('densr: the SCF\'s DF tensor cannot serve the guess (%s); the '
                             'guess fits on its own', e)
    return _aux_coulomb(mol, auxmol, mf.max_memory)
