"""The molecule's point group, so that the guess has the symmetry of the molecule.

The network's grid box is not aligned with the molecule's symmetry elements and the network
is not exactly equivariant, so the predicted density breaks the point group at about 1e-7,
and an SCF started from it keeps that in quantities that vanish by symmetry (a dipole
component of water). :func:`point_group` finds the operations that map the atoms (same
label, so same basis and ECP) onto each other, whether or not ``mol.symmetry`` is set and in
any orientation, non-Abelian groups included; :class:`Symmetrizer` averages the guess's
Fock potentials over them, so every density matrix the guess returns is exactly as
symmetric as the geometry. An operation g is represented on the AOs by U_g,
(g chi_mu)(r) = chi_mu(R^-1 r) = sum_nu chi_nu(r) (U_g)_nu,mu, and a one-electron operator
matrix F is averaged as (1/|G|) sum_g U_g^T F U_g.
"""

import functools

import numpy as np
import scipy.sparse
from scipy.spatial import cKDTree

TOL = 1e-5  # Bohr: atoms this close to an image are equivalent (PySCF's own geometry tolerance)


def _atom_types(mol):
    """One integer per atom: equal for atoms with the same label (element, basis, ECP)."""
    labels = [a[0] for a in mol._atom]
    index = {s: i for i, s in enumerate(sorted(set(labels)))}
    return np.array([index[s] for s in labels])


def _images_ok(r, types, rot, tree, tol):
    """The atom permutation of the operation ``rot`` (r -> r rot^T), or None."""
    d, j = tree.query(r.dot(rot.T))
    if np.all(d < tol) and np.array_equal(types[j], types) and len(set(j)) == len(j):
        return j
    return None


def _rotation(axis, angle):
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k.dot(k)


def point_group(mol, tol=TOL):
    """Symmetry operations of the molecule: a list of (R (3, 3), perm), R orthogonal,
    atom i at r_i - c going to atom perm[i] at R (r_i - c), c the centroid of the atoms.

    Non-linear molecules: every operation is fixed by the images of two atoms whose
    positions (from c) are not parallel, so the candidates are pairs of images of the same
    label and distance from c, each checked against all atoms (a k-d tree). Linear molecules
    and single atoms, whose groups are continuous, get the finite subgroup that leaves
    exactly the invariant part of any matrix in the basis: rotations about the axis by
    2 pi k / n with n = 2 l_max + 2 (and the octahedral group for a single centre).
    """
    coords = mol.atom_coords()
    types = _atom_types(mol)
    r = coords - coords.mean(axis=0)
    tree = cKDTree(r)
    dist = np.linalg.norm(r, axis=1)
    scale = max(1.0, float(dist.max()))
    off = np.nonzero(dist > tol)[0]
    ops = []

    def add(rot):
        perm = _images_ok(r, types, rot, tree, tol)
        if perm is not None and not any(np.abs(rot - q).max() < 1e-6 for q, _ in ops):
            ops.append((rot, perm))

    def candidates(i):
        return [j for j in np.nonzero(types == types[i])[0] if abs(dist[j] - dist[i]) < tol]

    if len(off) == 0:   # all atoms at one point: the octahedral group (48 operations)
        for p in ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]):
            for signs in np.ndindex(2, 2, 2):
                add(np.eye(3)[p] * (1 - 2 * np.array(signs))[:, None])
        return ops
    ncand = {i: len(candidates(i)) for i in off}
    a = min(off, key=lambda i: (ncand[i], -dist[i]))
    ua = r[a] / dist[a]
    side = [i for i in off if np.linalg.norm(np.cross(ua, r[i])) > tol * 10]
    if not side:   # linear: rotations about the axis, a mirror plane, inversion
        lmax = int(mol._bas[:, 1].max()) if mol.nbas else 0
        n = 2 * lmax + 2
        perp = np.cross(ua, np.eye(3)[np.argmin(np.abs(ua))])
        perp /= np.linalg.norm(perp)
        mirror = np.eye(3) - 2 * np.outer(perp, perp)
        for k in range(n):
            rot = _rotation(ua, 2 * np.pi * k / n)
            for extra in (np.eye(3), mirror, -np.eye(3), -mirror):
                add(rot.dot(extra))
        return ops
    b = min(side, key=lambda i: (ncand[i], -dist[i]))
    m = np.column_stack((r[a], r[b], np.cross(r[a], r[b])))
    minv = np.linalg.inv(m)
    dot_ab = r[a].dot(r[b])
    for a2 in candidates(a):
        for b2 in candidates(b):
            if a2 == b2 or abs(r[a2].dot(r[b2]) - dot_ab) > tol * scale:
                continue
            for s in (1, -1):
                rot = np.column_stack((r[a2], r[b2], s * np.cross(r[a2], r[b2]))).dot(minv)
                if np.abs(rot.dot(rot.T) - np.eye(3)).max() < 1e-4:
                    add(rot)
    return ops


@functools.lru_cache(maxsize=None)
def _shell_functions(l, cart):
    """One shell of angular momentum ``l`` at the origin, and random points to fit on."""
    from pyscf import gto
    mol = gto.M(atom='X 0 0 0', basis={'X': [[l, [1.0, 1.0]]]}, cart=cart, unit='Bohr',
                verbose=0)
    pts = np.random.default_rng(7).normal(size=(4 * (l + 1) ** 2 + 8, 3))
    return mol, pts, mol.eval_gto('GTOval', pts)


def shell_rotations(rots, lmax, cart=False):
    """For each operation R of ``rots`` and each l <= ``lmax``, D with
    chi_m(R^-1 x) = sum_m' chi_m'(x) D_m'm for the angular functions of one shell in
    PySCF's order and normalisation (least squares on random points, one evaluation per l)."""
    out = [[None] * (lmax + 1) for _ in rots]
    for l in range(lmax + 1):
        mol, pts, ao = _shell_functions(l, bool(cart))
        # rows x -> R^-1 x = R^T x
        big = mol.eval_gto('GTOval', np.vstack([pts.dot(r) for r in rots]))
        pinv = np.linalg.pinv(ao)
        for i in range(len(rots)):
            out[i][l] = pinv.dot(big[i * len(pts):(i + 1) * len(pts)])
    return out


def ao_representation(mol, rot, perm, d=None):
    """U_g as a sparse (nao, nao) matrix for the operation (rot, perm) of :func:`point_group`
    (``d``: its :func:`shell_rotations`, where the caller has them)."""
    ao_loc = mol.ao_loc_nr()
    if d is None:
        lmax = int(mol._bas[:, 1].max()) if mol.nbas else 0
        d = shell_rotations([rot], lmax, mol.cart)[0]
    shells = [mol.atom_shell_ids(i) for i in range(mol.natm)]
    rows, cols, vals = [], [], []
    for i in range(mol.natm):
        for src, dst in zip(shells[i], shells[perm[i]]):
            l, nctr = mol.bas_angular(src), mol.bas_nctr(src)
            nf = d[l].shape[0]
            for k in range(nctr):
                c0, r0 = ao_loc[src] + k * nf, ao_loc[dst] + k * nf
                ii, jj = np.nonzero(np.abs(d[l]) > 1e-12)
                rows.append(r0 + ii)
                cols.append(c0 + jj)
                vals.append(d[l][ii, jj])
    nao = mol.nao
    return scipy.sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows),
                                                           np.concatenate(cols))),
                                   shape=(nao, nao))


class Symmetrizer:
    """Group averages of one-electron matrices over the point group of ``mol``."""

    def __init__(self, mol, tol=TOL):
        ops = point_group(mol, tol) if mol.natm else []
        self.order = len(ops)
        self.us = []
        if self.order > 1:
            lmax = int(mol._bas[:, 1].max()) if mol.nbas else 0
            ds = shell_rotations([q for q, _ in ops], lmax, mol.cart)
            self.us = [ao_representation(mol, q, p, d) for (q, p), d in zip(ops, ds)]

    def _average(self, a, left):
        if not self.us:
            return a
        a = np.asarray(a)
        if a.ndim == 3:
            return np.array([self._average(x, left) for x in a])
        out = np.zeros_like(a)
        for u in self.us:
            m = u.T if left else u
            out += m.dot(m.dot(a.T).T)   # M a M^T without a dense M
        return out / len(self.us)

    def operator(self, f):
        """(1/|G|) sum_g U_g^T F U_g for F (nao, nao) or a stack of them (Fock, potential)."""
        return self._average(f, True)

    def density(self, p):
        """(1/|G|) sum_g U_g P U_g^T for a density matrix P (or a stack)."""
        return self._average(p, False)
