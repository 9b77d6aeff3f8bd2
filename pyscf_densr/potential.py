"""Step 2 of the projection: the effective potential of the guess density.

rho_guess = rho[P_SAD] + delta-rho. Coulomb from the density fit of P_SAD plus that of
delta-rho (:mod:`coulomb`); XC evaluated on coarse molecular grids
(``guess_grids``) with rho_guess (value and gradient) in place of a density matrix's.
Exact exchange (HF, hybrids, range-separated) needs a density matrix: it is taken from
P_SAD, or rebuilt once from the first diagonalisation (``add_exchange``).
"""

import numpy as np
from pyscf import lib
from pyscf.dft import numint

from pyscf_densr import grid as grid_mod
from pyscf_densr.fit import grid_density


def xc_potential(mf, dm_sad, grids=None, delta_grid=None):
    """XC energy and potential matrix of rho_guess = rho[dm_sad] + delta-rho.

    ``dm_sad`` is (nao, nao) for a restricted calculation or (2, nao, nao) for alpha/beta;
    delta-rho is split equally between the spins. Meta-GGA kinetic energy densities are
    taken from ``dm_sad`` alone. delta-rho is ``delta_grid = (delta_rho, grid, sad_scale)``,
    the grid field interpolated onto the molecular grid (:func:`fit.grid_density`, several
    times cheaper than evaluating the fitted auxiliary functions there) with rho[dm_sad]
    scaled by ``sad_scale`` (see :func:`project.density_matrix_from_delta_rho`); None:
    rho[dm_sad] alone, by PySCF's own XC (``mf._numint.nr_vxc``, whose screened kernels
    are 2-3 times faster from 40 atoms than the loop here, which adds the grid field). A
    ``dm_sad`` tagged with ``mo_coeff``/``mo_occ`` is evaluated from its occupied orbitals.
    Returns (exc, vxc) in Hartree.
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
    max_memory = max(500, grid_mod.free_memory(mf.max_memory))
    if delta_grid is None:   # from the orbitals where the tags are PySCF's layout
        dm = dm_sad if orbitals is not None else np.asarray(dm_sad)
        # PySCF's screened (sparse) AO kernels, which it takes only above 800 basis
        # functions: on the guess's coarse grids as fast at 71 atoms, 10% faster at 206
        with lib.temporary_env(numint, SWITCH_SIZE=0):
            exc, vxc = ni.nr_vxc(mol, grids, xc, dm, spin=int(dm.ndim == 3), hermi=1,
                                 max_memory=max_memory * .5)[1:]
        return exc, np.asarray(vxc)
    dm_sad = np.asarray(dm_sad)
    spin = 1 if dm_sad.ndim == 3 else 0
    dms = dm_sad if spin else dm_sad[None]
    nset = len(dms)
    nao = mol.nao
    ao_deriv = 0 if xctype == 'LDA' else 1
    vmat = np.zeros((nset, nao, nao))
    excsum = 0.0
    for ao, mask, weight, coords in ni.block_loop(mol, grids, nao, ao_deriv,
                                                   max_memory=max_memory * .5):
        if orbitals is None:
            rho = [ni.eval_rho(mol, ao, d, mask, xctype, hermi=1) for d in dms]
        else:
            rho = [ni.eval_rho2(mol, ao, mo, occ, mask, xctype) for mo, occ in orbitals]
        if delta_grid is None:
            drho = None
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

    if getattr(mf, 'with_df', None) is not None:
        dm = _factored(dm, mol.nao_nr())

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


def local_potential(mf, dm_sad, d_pred, delta_grid, aux, grids=None):
    """Coulomb + XC potential (Hartree) of the guess density; same shape as ``dm_sad``.

    Coulomb: ``aux.coulomb(d_pred)``, ``d_pred`` the guess density in the terms of the
    Coulomb engine ``aux`` (:func:`coulomb.coulomb_engine`): the fit of P_SAD plus the
    network's delta-rho. XC: :func:`xc_potential` of rho[P_SAD] and ``delta_grid``.
    """
    v = aux.coulomb(d_pred)
    if np.asarray(dm_sad).ndim == 3:
        v = np.array((v, v))
    if hasattr(mf, 'xc'):
        v = v + xc_potential(mf, dm_sad, grids, delta_grid)[1]
    return v


def solvent_potential(mf, dm):
    """The reaction potential (Hartree) of the SCF's implicit solvent (PySCF's solvent
    mixins: PCM, SMD, ddCOSMO, ddPCM) at ``dm``, as its SCF would add it; None without one.
    A frozen solvent gives its fixed potential."""
    solvent = getattr(mf, 'with_solvent', None)
    if solvent is None:
        return None
    if getattr(solvent, 'frozen', False):
        return solvent.v
    return solvent.kernel(dm)[1]


def _factored(dm, nao, cutoff=1e-12):
    """``dm`` tagged with dm = C diag(n) C^T (its eigenvectors and eigenvalues, those under
    ``cutoff`` of the largest set to zero), so that PySCF's density-fitted K contracts the
    3-centre integrals with the columns of n > 0 (about the occupied orbitals) and not with
    every basis function, as it does for an untagged matrix: the exchange of P_SAD, whose
    rank is that of the atoms' minimal basis, and of an aufbau matrix, of rank the
    occupied orbitals, costs that fraction of a full-rank one. ``dm`` itself where it is
    tagged already, complex, not (nao, nao) or (2, nao, nao), or not positive semidefinite
    (then PySCF's full-rank route is exact)."""
    if getattr(dm, 'mo_coeff', None) is not None:
        return dm
    dm = np.asarray(dm)
    if (np.iscomplexobj(dm) or dm.shape[-2:] != (nao, nao) or dm.ndim not in (2, 3)
            or (dm.ndim == 3 and dm.shape[0] != 2)):
        return dm
    cs, ns = [], []
    for p in dm.reshape(-1, nao, nao):
        if abs(p - p.T).max() > 1e-10:
            return dm
        n, c = np.linalg.eigh(p)
        top = max(abs(n).max(), 1e-300)
        if n.min() < -1e-8 * top:
            return dm
        n[n < cutoff * top] = 0
        cs.append(c)
        ns.append(n)
    if dm.ndim == 2:
        return lib.tag_array(dm, mo_coeff=cs[0], mo_occ=ns[0])
    return lib.tag_array(dm, mo_coeff=np.asarray(cs), mo_occ=np.asarray(ns))


def add_exchange(mf, v_local, dm):
    """v_local minus the exact-exchange potential of ``dm`` (PySCF's convention)."""
    vk = exchange_potential(mf, dm)
    return v_local - (vk if np.asarray(dm).ndim == 3 else 0.5 * vk)


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
