"""From a density correction on a uniform grid back to a density matrix: the projection.

:func:`density_matrix_from_delta_rho` runs the three steps, each in its own module (all
PySCF-native):

1. :mod:`fit`: delta-rho (e/Bohr^3 on a uniform grid) projected onto the auxiliary basis
   of the Coulomb builds (through a least-squares fit of the grid values, or for large
   systems its potential by an FFT Poisson solve), and fitted there.
2. :mod:`potential`: Coulomb + XC (+ exact exchange) potential of rho_SAD + the fit.
3. :mod:`builds`: Fock build and aufbau occupation with the SCF object's own machinery,
   further builds combined by Anderson mixing, then builds whose coarse XC is corrected to
   finer grids (:func:`builds.refine`), optional damping towards P_SAD.

Open shells: delta-rho is a change of the total density, split equally between the spins;
the spin density comes from the spin-unrestricted (or restricted-open) Fock build and its
aufbau occupation.
"""

import time
import numpy as np
from pyscf.lib import logger

from pyscf_densr import builds, symmetry
from pyscf_densr.builds import (MAX_FOCK_BUILDS, anderson_step, density_matrix_from_veff,
                                refine, mix_with_sad, orthogonalizer)
from pyscf_densr.coulomb import coulomb_engine
from pyscf_densr.fit import DEFAULT_AUXBASIS, charges, coulomb_projection, make_auxmol
from pyscf_densr.potential import (_exchange_coeffs, add_exchange, guess_grids, keep_ao,
                                   local_potential, solvent_potential)


def density_matrix_from_delta_rho(mf, delta_rho, grid, dm_sad=None, auxbasis=DEFAULT_AUXBASIS,
                                  exchange='auto', grids_level=1, log=None, charge=None,
                                  mix=1.0, fock_builds=1, price_builds=False,
                                  refine_builds=0, refine_exchange=False, details=None):
    """The whole projection: delta-rho on ``grid`` -> guess density matrix for ``mf``.

    Args:
        mf: a PySCF SCF object (RHF/UHF/ROHF/RKS/UKS/ROKS, density-fitted or not).
        delta_rho: rho_converged - rho_SAD predicted on ``grid`` (e/Bohr^3).
        dm_sad: the SAD density matrix (``mf.init_guess_by_minao()`` if None).
        auxbasis: the auxiliary basis of the guess's Coulomb builds where the SCF has no
            DF tensor to lend (a density-fitted SCF lends its own, :mod:`coulomb`).
        exchange: 'sad' builds exact exchange from P_SAD; 'iterate' builds it from the
            first diagonalisation (one more K build), which takes Slater's exchange in its
            place for DFT hybrids (:func:`potential.exchange_stand_in`) and K of P_SAD for
            Hartree-Fock and long-range-only hybrids; 'auto' iterates when the method has
            exact exchange.
        grids_level: level of the molecular grids for the guess's XC (see :func:`guess_grids`).
        charge: electrons the fitted delta-rho carries; default N - Tr(P_SAD S), so that the
            guess density holds exactly N electrons.
        mix: the returned matrix is P_SAD + mix (P_Fock - P_SAD); 1 returns the Fock build's
            aufbau matrix itself (see :func:`mix_with_sad`).
        fock_builds: 1, or up to MAX_FOCK_BUILDS: more Fock builds, each at the density of
            the last combined matrix, and their Anderson combination (:func:`anderson_step`),
            before damping.
        price_builds: ``fock_builds`` is the most; where the guess's Coulomb builds are the
            SCF's own direct DF-J passes (a pure functional whose DF tensor does not fit in
            memory), a third or later build is made only while it costs less than the SCF
            cycles it saves (:func:`anderson_step`, ``cycle_priced``).
        refine_builds: at most this many further builds corrected to the XC of finer grids
            (level ``builds.REFINE_GRIDS_LEVEL``, or the SCF's own where those are not finer;
            :func:`builds.refine`), where the guess's grids are coarser than the SCF's and
            its Coulomb builds cheap (the 3-centre integrals in memory); 0: none.
            With exact exchange (hybrids) they are made where it is rebuilt
            (``exchange`` 'iterate', the default for them), after one more exchange build.
        refine_exchange: make them also where the exact exchange stays that of P_SAD
            (``exchange`` 'sad').
        details: a dict that receives ``fock_builds``, the Fock builds made (the exchange
            rebuild counted), ``minao`` True where the guess is ``dm_sad``, and
            ``scf_setup_time``, the seconds spent making the SCF's own DF tensor or direct
            DF-J state, which the SCF then reuses (0 where it had them).
    Returns:
        dm with ``mo_coeff``/``mo_occ`` attached; ``dm_sad`` itself, logged as a warning,
        where the Fock builds do not converge (their last residual above
        ``builds.STALL_RATIO`` of their first).
    """
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
    fitmol = make_auxmol(mol, auxbasis or DEFAULT_AUXBASIS)
    aux = coulomb_engine(mf, fitmol, log)
    if details is not None:
        details['scf_setup_time'] = getattr(aux, 'scf_setup_time', 0.0)
    log.info('densr: Coulomb builds of the guess on %s (%s, %d functions)', aux.route,
             aux.auxmol.basis if isinstance(aux.auxmol.basis, str) else 'fitting basis',
             aux.auxmol.nao)
    priced = price_builds and getattr(aux, 'scf_direct', False)
    if getattr(aux, 'incore', True) is False and fock_builds > 1 and not priced:
        log.note('densr: the 3-centre integrals (%.1f GB) do not fit in half of what '
                 'mf.max_memory leaves free, so each of the %d further Fock builds makes three '
                 'screened integral passes%s; mf.densr_fock_builds = 1 makes one build%s',
                 aux.int3c_bytes * 1e-9, fock_builds - 1,
                 " (an SCF cycle's DF-J two)" if aux.scf_direct else '',
                 '' if aux.scf_direct else ', density fitting (mf.density_fit()) or a larger '
                 'mf.max_memory keeps the integrals in memory')
    nsad = float(np.einsum('ij,ji->', dm_tot, s1e))
    if charge is None:
        charge = mol.nelectron - nsad
    # the fit of delta-rho holds ``charge`` electrons exactly, whatever the grid field
    # integrates to (its own error, or an ion's charge it does not carry)
    d_sad, j_sad = aux.fit(dm_tot)
    b, route = coulomb_projection(aux.auxmol, delta_rho, grid, charge, fitmol, mf.max_memory)
    d_delta, j_delta = aux.fit_projection(b, charges(aux.auxmol), charge)
    pred = (d_sad + d_delta, j_sad + j_delta)
    # the XC density: rho[P_SAD] scaled by 1 + q / N_SAD, q the electrons the fit adds to the
    # field's own integral, so that it holds the fitted electrons
    q = charge - float(np.sum(delta_rho, dtype=np.float64)) * grid.dv
    sad_scale = 1 + q / nsad if nsad > 1e-8 else 1.0
    t1 = time.perf_counter()
    log.info('densr: density fit of P_SAD and delta-rho (%s, %d auxiliary functions) in '
             '%.2f s', route, aux.auxmol.nao, t1 - t0)
    if getattr(aux, 'copy_time', None) is not None:
        log.info('densr: of which the copy of the 3-centre integrals %.2f s', aux.copy_time)
    grids = guess_grids(mf, grids_level)
    if grids is not None and grids is not getattr(mf, 'grids', None):
        keep_ao(mf, grids)   # every build evaluates the XC on these grids
    omega, alpha, hyb = _exchange_coeffs(mf)
    if exchange == 'auto':
        exchange = 'iterate' if (abs(hyb) > 1e-14 or abs(alpha) > 1e-14) else 'sad'
    if exchange not in ('sad', 'iterate'):
        raise ValueError("exchange must be 'auto', 'sad' or 'iterate', not %r" % exchange)
    # where K is rebuilt from the first diagonalisation, Slater's exchange stands in for it
    # there (exchange_stand_in); K of P_SAD only where it stays
    v_local, v_stand = local_potential(mf, dm_sad, pred[0], (delta_rho, grid, sad_scale), aux,
                                       grids, stand_in=exchange == 'iterate')
    # an implicit solvent: its reaction potential, as fixed as the exchange of dm_x (one
    # solvent build costs about an SCF cycle's Fock build): made from P_SAD, then from the
    # exchange's density where that is rebuilt, and from the builds' result before the
    # corrected builds
    v_s = solvent_potential(mf, dm_sad)
    if v_s is not None:
        log.info('densr: the Fock builds include the reaction potential of %s',
                 type(mf.with_solvent).__name__)
    x = orthogonalizer(mf, s1e)
    sym = symmetry.Symmetrizer(mol)
    if sym.order > 1:
        log.info('densr: the guess is averaged over the %d operations of the point group',
                 sym.order)
    zero = np.zeros_like(np.asarray(v_local))
    v_k = v_stand if v_stand is not None else add_exchange(mf, zero, dm_sad)
    v_x = v_k if v_s is None else v_k + v_s
    dm = density_matrix_from_veff(mf, v_local + v_x, dm_sad, h1e, s1e, x, sym)
    t2 = time.perf_counter()
    log.info('densr: Coulomb + XC of the guess density%s, Fock build and diagonalisation '
             'in %.2f s', ' (Slater\'s exchange standing in for K)' if v_stand is not None
             else '', t2 - t1)
    dm_x = dm_sad
    if exchange == 'iterate':
        dm_x = np.asarray(dm)
        v_k = add_exchange(mf, zero, dm_x)
        v_x = v_k if v_s is None else v_k + solvent_potential(mf, dm_x)
        dm = density_matrix_from_veff(mf, v_local + v_x, dm_sad, h1e, s1e, x, sym)
        log.info('densr: exchange rebuilt from the first diagonalisation in %.2f s',
                 time.perf_counter() - t2)
    made = 1
    costs = {}
    norms = []
    if fock_builds > 1:
        t3 = time.perf_counter()
        dm, coeffs, made = anderson_step(mf, v_local, dm, dm_sad, pred, aux, grids, dm_x, h1e,
                                         s1e, x, log, fock_builds, v_x, sym, priced,
                                         costs=costs, norms=norms)
        log.info('densr: %d more Fock builds in %.2f s%s', made - 1, time.perf_counter() - t3,
                 '; a build %.3g s, an SCF cycle about %.3g s' % (costs['build'], costs['cycle'])
                 if costs else '')
    if len(norms) > 1 and norms[-1] > builds.STALL_RATIO * norms[0]:
        # builds whose aufbau occupations change from build to build: their result is one
        # of those occupations, a worse start than P_SAD (GTP-Mg, PBE/STO-3G with a level
        # shift: from it the SCF's energy rose by 2400 Eh in two cycles, from minao's it
        # fell for seven)
        log.warn('densr: the guess\'s Fock builds do not converge (Coulomb norm of the '
                 'residual %.3g after %.3g); the SCF starts from minao\'s guess', norms[-1],
                 norms[0])
        if details is not None:
            details['fock_builds'] = made + (exchange == 'iterate')
            details['minao'] = True
        _release(aux)
        return dm_sad
    # the corrected builds: where the guess's grids are coarser than the SCF's, with exact
    # exchange only where it is rebuilt before them (frozen at P_SAD's they gain nothing),
    # and where a build is cheap: 3-centre integrals in memory, or on the SCF's direct
    # DF-J route a priced build under REFINE_PRICE estimated SCF cycles
    has_x = abs(hyb) > 1e-14 or abs(alpha) > 1e-14
    wanted = (refine_builds and grids is not None and grids.level < mf.grids.level
              and (refine_exchange or not has_x or exchange == 'iterate'))
    cheap = getattr(aux, 'incore', True) or (
        priced and costs and costs['build'] < builds.REFINE_PRICE * costs['cycle'])
    if wanted and priced and not cheap:
        log.info('densr: no builds corrected to finer grids: a build costs %s estimated SCF '
                 'cycles, more than %.2g', '%.2f' % (costs['build'] / costs['cycle'])
                 if costs else 'an unmeasured part of', builds.REFINE_PRICE)
    if wanted and cheap:
        t3 = time.perf_counter()
        level = builds.REFINE_GRIDS_LEVEL
        level = level if grids.level < level else mf.grids.level
        if level >= mf.grids.level and mf.grids.coords is None:
            # the SCF's own grids, made as its first cycle would make them
            if hasattr(mf, 'initialize_grids'):
                mf.initialize_grids(mol, dm)
            else:
                mf.grids.build(with_non0tab=True)
        fine = guess_grids(mf, level)
        if exchange == 'iterate':   # exchange of the builds' result: the SCF's fixed point
            dm_x = np.asarray(dm)
            v_k = add_exchange(mf, zero, dm_x)
            v_x = v_k
            made += 1
        if v_s is not None:
            v_s = solvent_potential(mf, dm)
            v_x = v_k + v_s
        first = []
        coarse = dm
        tol = builds.REFINE_TOL_EXCHANGE if has_x else builds.REFINE_TOL
        rounds = builds.EXCHANGE_ROUNDS if exchange == 'iterate' else 0
        # looser where another exchange round would follow
        loose = (builds.EXCHANGE_ROUND_TOL, builds.REFINE_TOL_ROUND)
        limit = builds.REFINE_LIMIT * norms[0] if norms else None
        # each exchange round's corrected builds start with the last round's history
        carry = {} if rounds and builds.CARRY_HISTORY else None
        dm, more, shift = refine(mf, dm, dm_sad, aux, grids, fine, refine_builds, dm_x, h1e,
                                 s1e, x, log, v_x, sym, tol=tol, limit=limit, norms=first,
                                 tol_then=loose if rounds else None, carry=carry)
        made += more
        # no exchange rounds where refine kept the coarse builds' result
        rounds = rounds if dm is not coarse else 0
        while rounds and more > 1 and first and first[0] > builds.EXCHANGE_ROUND_TOL:
            # the exchange of the corrected builds' result, and those builds again: the
            # exact exchange is the one part they hold fixed; the XC correction is reused
            rounds -= 1
            dm_x = np.asarray(dm)
            v_x = add_exchange(mf, zero, dm_x) + (0 if v_s is None else v_s)
            first = []
            dm, n, _ = refine(mf, dm, dm_sad, aux, grids, fine, refine_builds, dm_x, h1e, s1e,
                              x, log, v_x, sym, tol=tol, shift=shift, norms=first,
                              tol_then=loose if rounds else None, carry=carry)
            log.info('densr: exchange rebuilt from the corrected builds\' result; %d more '
                     'corrected builds', n)
            made += 1 + n
            more += n
        log.info('densr: %d Fock builds corrected to finer grids in %.2f s', more,
                 time.perf_counter() - t3)
    if details is not None:
        details['fock_builds'] = made + (exchange == 'iterate')
    _release(aux)
    damped = mix_with_sad(mf, dm, dm_sad, mix, s1e, x)
    if damped is not dm:
        log.info('densr: guess = P_SAD + %.2f (P_Fock - P_SAD)', mix)
    return damped


def _release(aux):
    """The guess's own integrals go with it (a copy on disk is deleted now; the SCF's DF
    tensor stays with the SCF)."""
    if hasattr(aux, 'close'):
        aux.close()
