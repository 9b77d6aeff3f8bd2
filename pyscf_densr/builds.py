"""Step 3 of the projection: Fock builds, diagonalisation and the returned matrix.

``density_matrix_from_veff``: F = h + V, diagonalised and occupied with the SCF object's own
``eig``/``get_occ``/``make_rdm1``, so RHF/UHF/ROHF (and their KS variants) each get the
occupation they would use themselves; the result carries ``mo_coeff`` and ``mo_occ``.
``anderson_step``: further Fock builds, each at the density of the last matrix, and the
aufbau matrix of the Anderson (DIIS) combination of all the Fock matrices, which undoes most
of the first step's overshoot. ``mix_with_sad``: an optional damping towards P_SAD.
"""

import time

import numpy as np
import scipy.linalg
from pyscf import lib
from pyscf.lib import logger
from pyscf.scf import hf

from pyscf_densr.coulomb import fit_and_coulomb
from pyscf_densr.errors import SCFOwnError
from pyscf_densr.potential import add_exchange, xc_potential

# upper bound of the guess's Fock builds (anderson_step); each costs one DF-J and XC build
MAX_FOCK_BUILDS = 6
# SCF cycles saved by the guess's 2nd, 3rd, 4th... Fock build (PBE/def2-SVP: drug-like
# molecules of 40-50 atoms with DF, validation QM9 molecules 410-419; docs/method.md, step 7):
# on the SCF's direct DF-J route a further build is made only where it costs less than this
# many estimated SCF cycles
BUILD_GAINS = (1.7, 0.5, 0.4, 0.2, 0.2)
# the guess's builds corrected to the SCF's grids (:func:`refine`): at most this many, until
# the Coulomb norm of a build's residual is below REFINE_TOL (REFINE_TOL_EXCHANGE for
# methods with exact exchange, which those builds hold fixed). Below about 3e-4 the SCF's
# first gradient is set by its finer grids, not by the builds (verapamil, PBE/def2-SVP+DF:
# |g| 3.4e-4 in its first cycle from builds stopped at 1e-4 and at 1e-5, 5 cycles either
# way; stopped at 1e-3, 6); with exact exchange 3e-4 cost one of three held-out molecules
# a cycle (docs/method.md, step 8)
REFINE_BUILDS = 12
REFINE_TOL = 3e-4
REFINE_TOL_EXCHANGE = 1e-4
# grid level of the correction (the SCF's own grids where they are not finer)
REFINE_GRIDS_LEVEL = 1
# where the guess's builds make the SCF's direct DF-J passes, the corrected builds are made
# only where a build costs less than this many estimated SCF cycles
REFINE_PRICE = 0.3
# methods with exact exchange: after the corrected builds, at most this many rounds of an
# exchange build of their result and corrected builds again (each round a K build and
# a few cheap builds); a further round is made only while the last one's first residual
# was above EXCHANGE_ROUND_TOL (its K then still moved the density)
EXCHANGE_ROUNDS = 2
EXCHANGE_ROUND_TOL = 1e-3
# the corrected builds that another exchange round follows stop at this residual: the new
# K moves the density by about 1e-2 (the next round's first residual), so converging them
# below that is lost
REFINE_TOL_ROUND = 1e-3
# the corrected builds of an exchange round combine the last round's builds with their own
# (anderson_step's ``carry``)
CARRY_HISTORY = True
# Fock builds combined by the Anderson step (the newest; PySCF's DIIS keeps 8 too)
HISTORY = 8
# orbital energies (Eh) closer than this to the highest occupied one share its shell's
# electrons (:func:`spread_degenerate`)
DEGENERATE_TOL = 1e-6
# builds that stall: the corrected builds stop where STALL_BUILDS builds have not brought
# the residual's Coulomb norm below STALL_RATIO of what it was, and where the coarse builds
# end above STALL_RATIO of their first residual (a molecule whose aufbau occupations swap
# from build to build) the guess is minao's (project.density_matrix_from_delta_rho);
# converging ones gain 5-15x over the coarse builds and 10-100x over three corrected ones
STALL_RATIO = 0.5
STALL_BUILDS = 3
# and stop after the first or second where its residual is above REFINE_LIMIT times the
# coarse builds' first one: the finer grids' problem is then farther from the coarse
# builds' result than the network's density was from theirs (GTP-Mg at PBE/STO-3G, a
# gas-phase tetra-anion whose HOMO is above zero: the second corrected residual 55.5
# against 18.1; on ethanol, salicylic acid and propranolol the first is 12-16 times below
# it, the second 4-10). Not once: from a density near the SCF's (the exact delta-rho) the
# coarse builds start as near as the grids' correction moves it (held-out 452,
# PBE/def2-SVP: 0.0336 against 0.0334; with the coarse builds' result kept 8 SCF cycles,
# with the corrected builds 4)
REFINE_LIMIT = 2.0


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


def _eigh_orth(h, s, overwrite=False, x=None):
    """PySCF's ``SCF._eigh`` (the solver its SCF classes share): with the orthogonalizer
    ``x`` the same standard problem, its two products on PySCF's threads (``lib.dot``) and
    LAPACK's divide-and-conquer solver (``driver='evd'``) in place of numpy's products and
    scipy's default MRRR: verapamil (652 functions), a diagonalisation and its matrix
    0.16 -> 0.11 s on one thread, 0.20 -> 0.10 s on two; two per build. With scipy's BLAS
    on one thread (as in the guess, :func:`hook.init_guess`) no slower at any size (two
    threads, random matrices: 72 functions 0.3 against 0.4 ms, 300: 7.5 against 10.2 ms,
    652: 52 against 77 ms)."""
    if x is None:
        return hf.eig(h, s.astype(h.dtype) if h.dtype != s.dtype else s, overwrite)
    e, c = scipy.linalg.eigh(lib.dot(x.conj().T, lib.dot(h, x)), driver='evd',
                             overwrite_a=True, check_finite=False)
    return e, hf._adjust_phase_(lib.dot(x, c))


def _eig(mf, fock, s1e, x):
    if x is not None:
        if getattr(type(mf), '_eigh', None) is hf.SCF._eigh and '_eigh' not in vars(mf):
            mf._eigh = _eigh_orth
            try:
                return mf.eig(fock, s1e, x=x)
            finally:
                del mf._eigh
        try:
            return mf.eig(fock, s1e, x=x)
        except TypeError:  # an eig without the x keyword (older PySCF, custom classes)
            pass
    return mf.eig(fock, s1e)


def density_matrix_from_veff(mf, veff, dm_sad, h1e=None, s1e=None, x=None, sym=None):
    """Diagonalise F = h + veff with the SCF object's own machinery; the aufbau density matrix.

    ``x`` is the orthogonalizer of the overlap (:func:`orthogonalizer`); with it a nearly
    linearly dependent basis is handled exactly as PySCF's SCF kernel handles it. ``sym``: a
    :class:`symmetry.Symmetrizer`; ``veff`` is averaged over the point group first. With an
    implicit solvent ``veff`` holds its reaction potential already
    (:func:`potential.solvent_potential`, which the projection adds to ``v_x``).
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
    if getattr(mf, 'with_solvent', None) is not None and getattr(veff, 'v_solvent', None) is None:
        # PySCF's solvent get_fock would otherwise replace veff by its own Fock build of
        # dm_sad
        veff = lib.tag_array(veff, v_solvent=0)
    fock = mf.get_fock(h1e, s1e, veff, dm_sad)
    mo_energy, mo_coeff = _eig(mf, fock, s1e, x)
    try:
        mo_occ = mf.get_occ(mo_energy, mo_coeff)
    except Exception as e:
        raise SCFOwnError('%s.get_occ failed: %s' % (type(mf).__name__, e)) from e
    mo_occ = spread_degenerate(mo_energy, mo_occ)
    dm = mf.make_rdm1(mo_coeff, mo_occ)
    return lib.tag_array(dm, mo_coeff=mo_coeff, mo_occ=mo_occ, mo_energy=mo_energy)


def spread_degenerate(mo_energy, mo_occ, tol=DEGENERATE_TOL):
    """``mo_occ`` with the electrons of a shell that is degenerate at the Fermi level (within
    ``tol`` Eh) shared equally among its orbitals, per spin channel; unchanged where no
    such shell is partly filled, or where the occupations are not those of one kind of
    orbital (ROHF's doubly and singly occupied ones).

    Aufbau fills one of the degenerate orbitals, which one decided by rounding (superoxide's
    beta pi*: one electron, two orbitals), so build after build could fill a different
    one and the builds would not converge; the shared occupation keeps the matrix
    symmetric and the builds smooth, and the SCF's first diagonalisation breaks the
    symmetry as it does from minao's guess."""
    mo_energy = np.asarray(mo_energy)
    occ = np.array(mo_occ, dtype=float)
    if occ.shape != mo_energy.shape:
        return mo_occ
    for e, n in zip(mo_energy.reshape(-1, occ.shape[-1]), occ.reshape(-1, occ.shape[-1])):
        top = n.max() if n.size else 0
        if top <= 0 or np.any((n > 1e-12) & (abs(n - top) > 1e-12)) or n.min() > 0:
            continue
        homo = e[n > 0].max()
        shell = abs(e - homo) < tol
        if np.all(n[shell] > 0):
            continue
        n[shell] = n[shell].sum() / shell.sum()
    return occ


def scf_grid_ratio(mf, grids):
    """Points of the SCF's grids (``mf.grids``) over those of the guess's ``grids``, from
    PySCF's atomic grids (no partitioning: cheap at any size); 1 where they are the same."""
    from pyscf.dft import gen_grid
    if grids is None or grids is getattr(mf, 'grids', None):
        return 1.0

    def points(g):
        atom = gen_grid.gen_atomic_grids(g.mol, g.atom_grid, g.radi_method, g.level, g.prune)
        return sum(len(atom[g.mol.atom_symbol(i)][1]) for i in range(g.mol.natm))
    return points(mf.grids) / max(points(grids), 1)


def anderson_step(mf, v1, dm1, dm_sad, pred, aux, grids=None, dm_x=None, h1e=None, s1e=None,
                  x=None, log=None, builds=2, v_x=None, sym=None, cycle_priced=False,
                  xc_shift=None, tol=0.0, costs=None, norms=None, stall=False,
                  limit=None, tol_then=None, carry=None):
    """More Fock builds (``builds`` in all, counting the first), and the Anderson combination
    of the Fock matrices.

    ``v1`` is the local (Coulomb + XC) potential of the guess density rho_pred and ``dm1``
    the aufbau matrix of h + v1 (minus the exact exchange of ``dm_x``, when the method has
    some); ``pred`` = (d, v) is rho_pred in the terms of the Coulomb engine ``aux``
    (:func:`coulomb.coulomb_engine`: fit coefficients and projection (k|rho_pred)). One
    Roothaan step from an approximate density overshoots: the error of rho[dm1] is the error
    of rho_pred amplified and of the other sign, for the long-wavelength part that J carries
    (docs/method.md, step 7). Here v2 is the potential of rho[dm1] (density-fitted J, XC on
    ``grids``) and dm2 the aufbau matrix of h + v2; the returned matrix is the aufbau matrix
    of h + (1 - beta) v1 + beta v2, beta minimising the Coulomb norm of the linearised
    residual (1 - beta) r1 + beta r2, r1 = rho[dm1] - rho_pred, r2 = rho[dm2] - rho[dm1]:
    Anderson mixing with two points, the history PySCF's DIIS lacks at its first step.
    beta is kept in [0, 1]. Each further build k takes the potential of the density of
    build k-1's combined matrix, and the combination uses the whole history
    (:func:`_anderson_coefficients`). Each build costs an XC build, two
    diagonalisations and three 3-centre contractions (the fit of its input, its J, the fit
    of its output; the first two in one pass where the engine can,
    :func:`coulomb.fit_and_coulomb`). Where ``aux`` makes each contraction a screened
    3-centre pass (``aux.incore`` False), the fitted input of a build is instead the same
    combination of the fitted outputs (equal to first order, as Pulay's density mixing
    takes it): two passes a build, as in an SCF cycle's DF-J. Exact exchange stays that of ``dm_x``
    (``v_x``: its term, ``add_exchange(mf, 0, dm_x)``, where the caller has it).

    ``cycle_priced``: where ``aux`` makes the SCF's own direct DF-J passes, a build costs
    two passes and a coarse XC build, an SCF cycle two passes and XC on ``mf.grids``; each
    build's time is measured and a further build made only while it costs less than the
    cycles it is expected to save (:data:`BUILD_GAINS`) times the estimated SCF cycle (the
    build's passes, its XC scaled by :func:`scf_grid_ratio`, one diagonalisation). The
    second build is always made: it saves more (1.7 cycles) than a build can cost (at most
    about one cycle, where the passes are all of both).

    ``costs``: a dict that receives the priced build's time and the estimated SCF cycle
    (``build``, ``cycle``, seconds) where builds are priced.
    ``xc_shift`` is added to every build's XC potential (:func:`refine`); the builds stop
    once the Coulomb norm of a build's residual is below ``tol``, and with ``stall`` once
    :data:`STALL_BUILDS` builds have not brought it below :data:`STALL_RATIO` of what it
    was; the combination uses at most the :data:`HISTORY` newest builds. Where the first
    build's residual (rho[dm1] - rho_pred) or the second's is above ``limit`` no more
    builds are made. ``norms``: a list that receives the residual norms of the builds after
    the first (and the first's, where it stops them). ``tol_then`` = (above, loose): where
    the second build's residual is above ``above`` the builds stop at ``loose`` instead
    (an exchange round follows them, :func:`project.density_matrix_from_delta_rho`).
    Returns (dm, the coefficients of the newest builds, the number of builds made).
    """
    mol = mf.mol
    log = log or logger.new_logger(mf)
    if h1e is None:
        h1e = mf.get_hcore(mol)
    if s1e is None:
        s1e = mf.get_ovlp(mol)

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

    linear = getattr(aux, 'incore', True) is False
    # the next build's J in the same pass where the engine can
    d1, j1, v_in = fit_and_coulomb(aux, total(dm1))
    # history of input potentials and the residuals of their output densities, with the
    # residuals' metric images (k|l) r, so that norms need no second metric; where the
    # passes are direct, the fitted outputs too (the next input combines them)
    v1 = np.asarray(v1)
    vs, rs, mrs = [v1], [d1 - pred[0]], [j1 - pred[1]]
    old = carry.get('builds') if carry else None
    outs = [(d1, j1)]
    dm, d_in, j_in = dm1, d1, j1
    coeffs = np.ones(1)
    ratio = scf_grid_ratio(mf, grids) if cycle_priced else None
    norms = [] if norms is None else norms
    first = len(norms)
    if limit is not None:
        norm = np.sqrt(max(float(rs[0].dot(mrs[0])), 0))
        log.debug('densr: Coulomb norm of the residual of the first build %.3g', norm)
        if norm > limit:
            norms.append(norm)
            return dm1, coeffs, 1
    k = 1
    while k < builds:
        k += 1
        t0 = time.perf_counter()
        v = aux.coulomb(d_in) if v_in is None else v_in
        v_in = None
        t_j = time.perf_counter() - t0
        if np.asarray(dm).ndim == 3:
            v = np.array((v, v))
        t_xc = time.perf_counter()
        if hasattr(mf, 'xc'):
            v = v + xc_potential(mf, dm, grids)[1]
            if xc_shift is not None:
                v = v + xc_shift
        t_d = time.perf_counter()
        t_xc = t_d - t_xc
        dm_out = fock_dm(v)
        t_d = time.perf_counter() - t_d
        j_out = aux.project(total(dm_out))
        vs.append(v)
        mrs.append(j_out - j_in)
        rs.append(aux.solve(mrs[-1]))
        outs.append((d_in + rs[-1], j_out))
        del vs[:-HISTORY], rs[:-HISTORY], mrs[:-HISTORY], outs[:-HISTORY]
        if old:
            both = _anderson_coefficients(old['rs'] + rs, old['mrs'] + mrs, len(old['rs']))
            coeffs, c_old = both[len(old['rs']):], both[:len(old['rs'])]
        else:
            coeffs, c_old = _anderson_coefficients(rs, mrs), ()
        norm = np.sqrt(max(float(rs[-1].dot(mrs[-1])), 0))
        norms.append(norm)
        log.info('densr: %sFock build %d; Coulomb norm of its residual %.3g; Anderson '
                 'coefficients %s', '' if xc_shift is None else 'corrected ', k, norm,
                 np.array2string(coeffs, precision=3))
        if not coeffs[1:].any() and vs[0] is v1 and not np.any(c_old):
            dm = dm1   # beta clamped to 0: the first build's matrix itself
        else:
            dm = fock_dm(sum(a * v for a, v in zip(coeffs, vs))
                         + sum(a * v for a, v in zip(c_old, old['vs'] if old else ())))
        if tol_then is not None and len(norms) - first == 1 and norm > tol_then[0]:
            tol = max(tol, tol_then[1])
        if norm < tol:
            log.info('densr: Fock builds converged (residual %.3g below %.3g)', norm, tol)
            break
        if limit is not None and len(norms) - first == 1 and norm > limit:
            break
        if (stall and len(norms) - first > STALL_BUILDS
                and norm > STALL_RATIO * norms[-STALL_BUILDS - 1]):
            log.info('densr: Fock builds stall (residual %.3g, %.3g %d builds before); no '
                     'more', norm, norms[-STALL_BUILDS - 1], STALL_BUILDS)
            break
        if k < builds and cycle_priced:
            # a build: its two passes, XC and two diagonalisations (and, where its input is
            # fitted, a third pass, which the next build would make first)
            t_build = time.perf_counter() - t0 + (0 if linear else t_j)
            # where the guess holds part of the integrals its passes are partial: the
            # SCF's cost the timed whole pass
            t_pass = getattr(aux, 'pass_time', None) or t_j
            t_cycle = 2 * t_pass + ratio * t_xc + t_d
            log.debug('densr: Fock build %d costs %.3g s; an SCF cycle about %.3g s', k,
                      t_build, t_cycle)
            if costs is not None:
                costs.update(build=t_build, cycle=t_cycle)
            if t_build >= BUILD_GAINS[k - 1] * t_cycle:
                log.info('densr: no Fock build %d: a build costs %.3g s, %.2f estimated SCF '
                         'cycles (%.3g s each), more than the %.2g cycles it saves', k + 1,
                         t_build, t_build / t_cycle, t_cycle, BUILD_GAINS[k - 1])
                break
        if k < builds and linear:
            both = list(zip(coeffs, outs)) + list(zip(c_old, old['outs'] if old else ()))
            d_in = sum(a * o[0] for a, o in both)
            j_in = sum(a * o[1] for a, o in both)
        elif k < builds:
            d_in, j_in, v_in = fit_and_coulomb(aux, total(dm))
    if carry is not None:   # this call's builds, for the next round
        carry['builds'] = dict(vs=vs, rs=rs, mrs=mrs, outs=outs) if len(vs) > 1 else None
    return dm, coeffs, k


def refine(mf, dm, dm_sad, aux, grids, fine_grids, builds, dm_x=None, h1e=None, s1e=None,
           x=None, log=None, v_x=None, sym=None, tol=None, limit=None, shift=None,
           norms=None, tol_then=None, carry=None):
    """Fock builds on the coarse guess ``grids`` corrected to the XC of ``fine_grids``.

    The guess's builds converge the Kohn-Sham problem whose XC lives on its coarse grids,
    whose solution is not the SCF's (PBE/def2-SVP, propranolol: an SCF on level-3 grids
    needs 9 cycles from the converged level-0 solution, 5 from level 1). Here the XC
    potential of ``dm`` is made on both grids once, and their difference ``shift`` is
    added to the coarse XC of every further build (a two-grid defect correction): the
    builds then converge towards the fine grids' solution at the coarse grids' price. The
    first build is the fine potential of ``dm`` itself; up to ``builds`` in all, stopped
    once a residual's Coulomb norm is below ``tol`` (default :data:`REFINE_TOL`) or where
    the builds stall (:func:`anderson_step`). Where the first or second residual is above
    ``limit`` (the projection passes :data:`REFINE_LIMIT` times the coarse builds' first)
    the builds stop there and ``dm`` itself is
    returned. ``shift``: the correction returned by an earlier call, reused where only the
    exact exchange has changed since (the exchange rounds of
    :func:`project.density_matrix_from_delta_rho`);
    ``norms``: a list that receives the residual norms; ``tol_then``, ``carry``: see
    :func:`anderson_step` (the exchange rounds pass one ``carry`` and the same ``shift``).
    Returns (dm, builds made, shift).
    """
    mol = mf.mol
    log = log or logger.new_logger(mf)
    tol = REFINE_TOL if tol is None else tol
    if h1e is None:
        h1e = mf.get_hcore(mol)
    if s1e is None:
        s1e = mf.get_ovlp(mol)
    dm_tot = np.asarray(dm)
    dm_tot = dm_tot.sum(axis=0) if dm_tot.ndim == 3 else dm_tot
    t0 = time.perf_counter()
    reused = shift is not None
    if not reused:
        v_fine = xc_potential(mf, dm, fine_grids)[1]
        shift = v_fine - xc_potential(mf, dm, grids)[1]
    else:
        v_fine = xc_potential(mf, dm, grids)[1] + shift
    t1 = time.perf_counter()
    d, j, v = fit_and_coulomb(aux, dm_tot)
    if v is None:
        v = aux.coulomb(d)
    if np.asarray(dm).ndim == 3:
        v = np.array((v, v))
    v = v + v_fine
    dm1 = density_matrix_from_veff(mf, v if v_x is None else v + v_x, dm_sad, h1e, s1e, x, sym)
    if not reused:
        log.info('densr: XC of the guess on finer grids (%d points, the guess\'s %d) in '
                 '%.2f s; largest correction %.3g Eh', fine_grids.weights.size,
                 grids.weights.size, t1 - t0, float(abs(shift).max()))
    if builds < 2:
        return dm1, 1, shift
    norms = [] if norms is None else norms
    dm_out, _, made = anderson_step(mf, v, dm1, dm_sad, (d, j), aux, grids, dm_x, h1e, s1e,
                                    x, log, builds, v_x, sym, xc_shift=shift, tol=tol,
                                    stall=True, norms=norms, limit=limit,
                                    tol_then=tol_then, carry=carry)
    if limit is not None and norms and norms[0] > limit:
        log.info('densr: the corrected builds move away (residual %.3g, above the limit '
                 '%.3g set by the coarse builds\' first); the coarse builds\' result is kept',
                 norms[0], limit)
        return dm, made, shift
    return dm_out, made, shift


def _anderson_coefficients(rs, mrs, carried=0):
    """Coefficients a minimising the Coulomb norm of sum_i a_i r_i: those of the points
    after the first ``carried`` sum to 1, those of the ``carried`` first (another round's
    builds, :func:`anderson_step`) to 0.

    Two points: a = (1 - beta, beta) with beta kept in [0, 1]. More: the constrained least
    squares of Pulay's DIIS; where it asks for extrapolation beyond twice the history's span
    (a coefficient above 2 or below -1), the two newest points alone are used.
    """
    n = len(rs)
    b = np.array([[float(ri.dot(mj)) for mj in mrs] for ri in rs])
    b = (b + b.T) / 2
    if n == 2 and not carried:
        den = b[0, 0] - 2 * b[0, 1] + b[1, 1]
        beta = min(max((b[0, 0] - b[0, 1]) / den, 0.0), 1.0) if den > 1e-14 else 0.0
        return np.array((1 - beta, beta))
    scale = np.abs(np.diag(b)).max() or 1.0
    groups = [np.r_[np.zeros(carried), np.ones(n - carried)]]
    if carried:
        groups.append(np.r_[np.ones(carried), np.zeros(n - carried)])
    c = np.array(groups)
    m = len(groups)
    try:
        a = np.linalg.solve(np.block([[b / scale, c.T], [c, np.zeros((m, m))]]),
                            np.r_[np.zeros(n), 1.0, np.zeros(m - 1)])[:n]
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
