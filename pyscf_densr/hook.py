"""PySCF integration: the ``'densr'`` key of ``mf.init_guess`` and the functional API.

Importing :mod:`pyscf_densr` wraps ``pyscf.scf.hf.SCF.get_init_guess`` once: the key
``'densr'`` (any case) runs :func:`init_guess`; every other key, and a density matrix
passed as ``init_guess``, goes to PySCF's own method unchanged. RHF, UHF, ROHF, their KS,
density-fitted and scanner variants all reach ``SCF.get_init_guess`` at call time; GHF/GKS
get their collinear twin's guess in PySCF's GHF layout.

Options are attributes of the SCF object, as PySCF's own are (declared in ``_keys`` on
``pyscf.scf.hf.SCF`` by :func:`register`, printed by ``dump_flags`` at verbose >= 4 when
``init_guess`` is ``'densr'``); the keyword arguments of :func:`init_guess` take precedence,
and :func:`options` merges them in one place. None means: the environment variable where
there is one (for what a user cannot set in code), else the model's setting.

``densr_model``        shipped model name or path to NAME.pt (``PYSCF_DENSR_MODEL``; default
                       ``densr-cpu``; ``densr-gpu``: the larger model, for GPU users)
``densr_device``       ``cpu``, ``cuda``, ``cuda:1``... (``PYSCF_DENSR_DEVICE``; default CUDA
                       if available)
``densr_fallback``     ``minao`` (default) or ``error`` (``PYSCF_DENSR_FALLBACK``): what
                       happens where the densr guess does not apply or cannot be made.
                       ``minao``: an SCF that densr does not cover by design
                       (:class:`NotApplicable`: under ``MIN_NAO`` basis functions,
                       Hartree-Fock (``COVER_HF``),
                       4-component or spinor methods, no atoms, only ghost atoms, no
                       electrons, a periodic cell) gets PySCF's own guess with a one-line
                       note in the log; a guess that fails (:class:`DensrError`: a bad model
                       file, NaN or absurd network output, out of memory, a box over the
                       limit, overlapping atoms, or any exception inside the guess, wrapped)
                       gets PySCF's own guess with a warning. ``error`` (strict): both
                       raise. Invalid option values raise ``ValueError`` either way.
``densr_fock_builds``  1 to 6 Fock builds in the guess (more than one: Anderson mixing of
                       the builds, :func:`builds.anderson_step`); default the model's
                       ``guess_fock_builds``, of which a third or later build is made,
                       where the guess's Coulomb builds are the SCF's own direct DF-J
                       passes, only while it costs less than the SCF cycles it saves
                       (:func:`builds.anderson_step`); set, exactly that many
``densr_refine_builds`` at most this many further Fock builds whose coarse XC is corrected
                       to the XC of finer grids (:func:`builds.refine`), stopped when
                       converged; default ``builds.REFINE_BUILDS``; 0: none. Made where
                       the guess's grids are coarser than the SCF's, exact exchange (if
                       any) is rebuilt (``densr_exchange`` auto or iterate; with ``sad``
                       only where set) and the guess's Coulomb builds are
                       cheap (3-centre integrals or the DF tensor in memory; on the SCF's
                       direct DF-J route where a build costs less than
                       ``builds.REFINE_PRICE`` SCF cycles)
``densr_symmetry``     1, 2, 8 or 48 network passes averaged over symmetry operations of the
                       box (:func:`model.predict`); default the model's ``symmetry``
``densr_mix``          the returned guess is P_SAD + mix (P_Fock - P_SAD), mix in (0, 1];
                       default the model's ``guess_mix``
``densr_exchange``     ``auto`` (default), ``sad`` or ``iterate``: exact exchange of the
                       guess from P_SAD or built from the first diagonalisation (which,
                       for DFT hybrids, takes Slater's exchange in its place)
``densr_metals``       False (default): molecules with open-shell d/f metals get minao's
                       guess, with a warning (one Fock build and an aufbau occupation send
                       PySCF's DIIS astray for such complexes: Fe(CO)5, PBE/def2-SVP, no
                       convergence in 50 cycles where minao needs 17); True: densr anyway

Memory follows ``mf.max_memory`` (MB), as PySCF's own buffers do: the guess's arrays may use
what it leaves free (:func:`grid.free_memory`). A box whose network pass would not fit there
(about ``NET_BYTES_PER_VOXEL`` per coarse voxel on the CPU), or larger than
``MAX_BOX_VOXELS`` (2e7 coarse voxels, about 108 Bohr a side: wrong units, mostly), is a
:class:`DensrError` raised before anything is allocated; on a GPU the network runs in tiles
of at most ``model.MAX_TILE_VOXELS`` coarse voxels; the blocked grid quadratures use at
most a quarter of the free memory, up to 200 MB.
"""

import os
import time
import threading

import numpy as np
from pyscf import lib, gto
from pyscf.lib import logger
from pyscf.scf import hf
# the guess runs numpy's and scipy's BLAS on one thread (PySCF's own is serial already):
# their threads woken by each small product or eigensolve fight PySCF's OpenMP threads for
# the cores (ethanol on two threads, guess 1.5 s against 0.4 s with them on one)
from threadpoolctl import threadpool_limits

from pyscf_densr import grid as grid_mod

KEY = 'densr'
MIN_DISTANCE = 0.2  # Bohr; closer atoms are an error, not a molecule
UNSEEN_RADIUS = 3.0  # Bohr; delta-rho is switched off within this distance of unseen elements
MAX_BOX_VOXELS = 2e7  # coarse voxels: larger boxes are an error (wrong units, mostly)
# peak host memory of one CPU network pass per coarse voxel (densr-cpu: 550-650 B measured on
# boxes of 64k and 343k voxels, input and float32 output included)
NET_BYTES_PER_VOXEL = 700
# host memory per coarse voxel when the network runs on a GPU: rho_SAD (float64, 8 B) and the
# float32 output on the 8 times finer grid (32 B), rounded up
HOST_BYTES_PER_VOXEL = 48
# Below this many basis functions a whole minao SCF takes about as long as the guess's fixed
# cost (network pass, grids, Fock builds: 0.3-0.5 s on one core), so no guess can pay for
# itself: such molecules get PySCF's own guess (docs/support.md, tools/support_table.py
# --all-sizes: under 40 functions 10 of 11 Kohn-Sham rows slower, 40-60 five of six faster)
MIN_NAO = 40
# Hartree-Fock (no XC functional): the guess's Fock builds converge Coulomb, not exact
# exchange, so densr saves about one cycle there (held-out 450-452, RHF/def2-SVP: 13 -> 12)
# and costs more than that (0.84x in wall time): such SCFs get PySCF's own guess. True:
# densr anyway (the tests and `densr compat` exercise it so)
COVER_HF = False

_models = {}
_models_lock = threading.Lock()


from pyscf_densr.errors import (DensrError, NotApplicable, ModelError, OptionError,  # noqa: F401
                                SCFOwnError)


def _device(device=None):
    import torch
    device = device or os.environ.get('PYSCF_DENSR_DEVICE')
    if not device:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return torch.device(device)


def load_model(model=None, device=None):
    """The network (cached per name and device): a shipped name, a path, or a module."""
    from pyscf_densr import model as model_mod
    if model is not None and not isinstance(model, (str, os.PathLike)):
        return model
    name = model or os.environ.get('PYSCF_DENSR_MODEL', model_mod.DEFAULT_MODEL)
    dev = _device(device)
    key = (str(name), str(dev))
    with _models_lock:
        if key not in _models:
            _models[key] = model_mod.from_pretrained(name, device=dev)
        return _models[key]


def check_molecule(mol):
    """Raise :class:`DensrError` for input the guess cannot or should not handle."""
    if getattr(mol, 'a', None) is not None or mol.__class__.__name__ == 'Cell':
        raise NotApplicable('densr guess supports molecules (pyscf.gto.Mole) only; got a '
                         'periodic Cell. Use a PBC guess such as minao for periodic systems.')
    if mol.natm == 0:
        raise NotApplicable('densr guess: the molecule has no atoms')
    coords = mol.atom_coords()
    if not np.all(np.isfinite(coords)):
        raise DensrError('densr guess: atomic coordinates contain NaN or inf')
    real = [i for i in range(mol.natm) if mol.atom_charge(i) > 0]
    if not real:
        raise NotApplicable('densr guess: the molecule has only ghost atoms')
    if mol.nelectron <= 0:
        raise NotApplicable('densr guess: the molecule has %d electrons (charge %s); there is '
                         'no density to guess' % (mol.nelectron, mol.charge))
    if len(real) > 1:
        # nearest neighbours by a k-d tree: O(N log N) time and O(N) memory for any size
        from scipy.spatial import cKDTree
        d, nn = cKDTree(coords[real]).query(coords[real], k=2)
        i = int(np.argmin(d[:, 1]))
        j = int(nn[i, 1])
        if d[i, 1] < MIN_DISTANCE:
            i, j = min(i, j), max(i, j)
            raise DensrError('densr guess: atoms %d (%s) and %d (%s) are %.3f Bohr apart; '
                             'check the geometry and its units' % (
                                 real[i], mol.atom_symbol(real[i]),
                                 real[j], mol.atom_symbol(real[j]), d[i, 1]))


def open_shell_metals(mol):
    """Symbols of the real atoms of groups 3-11 and of the f block (see densr_metals)."""
    out = set()
    for i in range(mol.natm):
        z = int(mol.atom_charge(i) and gto.charge(mol.atom_pure_symbol(i)))
        if 21 <= z <= 29 or 39 <= z <= 47 or 57 <= z <= 79 or 89 <= z <= 111:
            out.add(mol.atom_pure_symbol(i))
    return sorted(out)


def _unseen_atoms(mol, elements):
    """Real atoms whose element the model has not seen, or that carry an ECP.

    An ECP removes the core from PySCF's SAD density, an input the network never saw
    (it is trained on all-electron densities), so such atoms are treated as unseen.
    """
    seen = set(int(z) for z in elements)
    return [i for i in range(mol.natm) if mol.atom_charge(i) > 0 and (
        int(gto.charge(mol.atom_pure_symbol(i))) not in seen or mol.atom_nelec_core(i) > 0)]


def _unseen_mask(mol, fine, elements, out=None):
    """Weights in [0, 1] on ``fine`` that switch delta-rho off around unseen elements.

    With ``out`` (an array of ``fine.shape``) the weights multiply it in place, one
    x-plane at a time; without, the weights are returned. Returns (weights or out, atoms).
    """
    atoms = _unseen_atoms(mol, elements)
    if not atoms:
        return None, []
    if out is None:
        out = np.ones(fine.shape)
    ax = fine.axes()
    cut = UNSEEN_RADIUS * 2.0  # beyond twice the radius the weight is 1 - exp(-256)
    for i in atoms:
        R = mol.atom_coord(i)
        sel = [np.nonzero(np.abs(a - r) < cut)[0] for a, r in zip(ax, R)]
        if any(len(s) == 0 for s in sel):
            continue
        (y0, y1), (z0, z1) = [(s[0], s[-1] + 1) for s in sel[1:]]
        ryz = ((ax[1][y0:y1, None] - R[1]) ** 2 + (ax[2][None, z0:z1] - R[2]) ** 2)
        for ix in sel[0]:
            r2 = ryz + (ax[0][ix] - R[0]) ** 2
            out[ix, y0:y1, z0:z1] *= 1 - np.exp(-(r2 / UNSEEN_RADIUS ** 2) ** 4)
    return out, atoms


def _is_oom(e):
    if isinstance(e, MemoryError):
        return True
    msg = str(e).lower()
    return ('out of memory' in msg or "can't allocate memory" in msg
            or 'defaultcpuallocator' in msg or 'failed to allocate' in msg)


def predict_delta_rho(mol, dm_sad, model=None, device=None, log=None, symmetry=None,
                      max_memory=None):
    """The network's delta-rho (e/Bohr^3) and the fine grid it lives on.

    ``dm_sad`` is the (spin-summed) SAD density matrix. Voxelization honours
    ``lib.num_threads()`` and so does torch on the CPU. ``symmetry``: see
    :func:`guess_symmetry`. ``max_memory``: MB cap of the process (``mf.max_memory``;
    default ``mol.max_memory``).
    """
    import torch
    from pyscf_densr import model as model_mod
    log = log or logger.Logger(mol.stdout, mol.verbose)
    net = load_model(model, device)
    cfg = net.config
    nsym = guess_symmetry(net, symmetry)
    t0 = time.perf_counter()
    box = grid_mod.make_box(mol.atom_coords(), cfg['spacing'], cfg['margin'])
    limit = MAX_BOX_VOXELS
    if box.size > limit:
        ext = (np.asarray(box.shape) - 1) * box.spacing
        raise DensrError(
            'densr guess: the grid box around the atoms would be %s = %.3g voxels at %.2f Bohr '
            '(%.0f x %.0f x %.0f Bohr, %.3g voxels on the %dx finer output grid), more than '
            'the limit of %d (pyscf_densr.hook.MAX_BOX_VOXELS). Check the geometry and its '
            'units; raise the limit if the system really is that large.' % (
                'x'.join(map(str, box.shape)), box.size, box.spacing, ext[0], ext[1], ext[2],
                box.size * cfg['upsample'] ** 3, cfg['upsample'], int(limit)))
    dev = next(net.parameters()).device
    if max_memory is None:
        max_memory = mol.max_memory
    free = grid_mod.free_memory(max_memory)
    need = box.size * (NET_BYTES_PER_VOXEL if dev.type == 'cpu' else HOST_BYTES_PER_VOXEL) * 1e-6
    # the CPU pass fits in host memory (checked here); a GPU's memory is its own: tiles there
    # (the network's receptive field makes tiles overlap widely, so they cost extra passes)
    tile = box.size if dev.type == 'cpu' else model_mod.MAX_TILE_VOXELS
    if need > free:
        raise DensrError(
            'densr guess: the network pass on the %s box (%d voxels) needs about %.0f MB, '
            'and mf.max_memory (%.0f MB) leaves %.0f MB free in this process; raise '
            'mf.max_memory' % ('x'.join(map(str, box.shape)), box.size, need, max_memory,
                               free))
    rho_sad = grid_mod.eval_density(mol, dm_sad, box,
                                    max_memory=grid_mod.block_memory(max_memory))
    t1 = time.perf_counter()
    log.info('densr: SAD density on %s grid (%d voxels, %.2f Bohr) in %.2f s',
             'x'.join(map(str, box.shape)), box.size, box.spacing, t1 - t0)
    nthreads = torch.get_num_threads()
    if dev.type == 'cpu':
        torch.set_num_threads(max(1, lib.num_threads()))
    try:
        delta = model_mod.predict(net, rho_sad, device=dev, symmetry=nsym, max_voxels=tile)
    except (RuntimeError, MemoryError) as e:
        if _is_oom(e):
            raise DensrError('densr guess: the network ran out of memory on %s for a %s box '
                             '(%s) in tiles of %d voxels; pyscf_densr.model.MAX_TILE_VOXELS '
                             'sets smaller tiles, or densr_device=\'cpu\'' % (
                                 dev, 'x'.join(map(str, box.shape)),
                                 str(e).splitlines()[0][:200] if str(e) else type(e).__name__,
                                 tile)) from e
        raise
    finally:
        torch.set_num_threads(nthreads)
    t2 = time.perf_counter()
    log.info('densr: network %s on %s in %.2f s%s', os.path.basename(getattr(net, 'path', '?')),
             dev, t2 - t1, ' (%d symmetry-averaged passes)' % nsym if nsym > 1 else '')
    if not np.all(np.isfinite(delta)):
        raise DensrError('densr guess: the network returned NaN or inf (model %s)'
                         % getattr(net, 'path', '?'))
    fine = box.refine(cfg['upsample'])
    if tuple(delta.shape) != fine.shape:
        raise DensrError('densr guess: the network returned a %s grid for a %s box (expected '
                         '%s); model %s does not match its config' % (
                             delta.shape, box.shape, fine.shape, getattr(net, 'path', '?')))
    unseen = _unseen_atoms(mol, cfg.get('elements', []))
    if unseen:
        seen = set(int(z) for z in cfg.get('elements', []))
        syms = sorted(set(mol.atom_pure_symbol(i) for i in unseen
                          if int(gto.charge(mol.atom_pure_symbol(i))) not in seen))
        ecp = sorted(set(mol.atom_pure_symbol(i) for i in unseen if mol.atom_nelec_core(i) > 0))
        if syms:
            log.warn('densr: elements %s were not in the model\'s training data; the plain '
                     'SAD density is used around those atoms', ','.join(syms))
        if ecp:
            log.warn('densr: atoms of %s carry an ECP (no core density, unlike the model\'s '
                     'training data); the plain SAD density is used around them', ','.join(ecp))
        log.info('densr: delta-rho switched off near %d of %d atoms', len(unseen), mol.natm)
        delta = np.array(delta, copy=True) if not delta.flags.writeable else delta
        _unseen_mask(mol, fine, cfg.get('elements', []), out=delta)
    return delta, fine


def fit_charge(mol, dm_sad, s1e, log=None):
    """Electrons the fitted delta-rho must carry: N - Tr(P_SAD S), as a rule.

    PySCF's minao SAD superposes neutral atoms and loses a little in the projection onto
    the basis (0.02 e for ethanol/def2-SVP, 0.2 for sto-3g, about 1.7 for an iodine ECP), so
    delta-rho carries the ionic charge plus that loss and the guess density holds exactly N
    electrons. When the SAD lacks far more (more than 2 + 0.1 per atom: typically a
    valence-only basis such as def2-SVP on I or Ag used without its ECP, so that the core
    has no functions), spreading that many electrons over the fit would make an absurd
    density: delta-rho then carries the ionic charge only, and the aufbau occupation of the
    Fock build fills N electrons, as it does after minao's own first Fock build.
    """
    nsad = float(np.einsum('ij,ji->', dm_sad, s1e))
    deficit = mol.nelectron + mol.charge - nsad
    nreal = sum(1 for i in range(mol.natm) if mol.atom_charge(i) > 0)
    if abs(deficit) > 2 + 0.1 * nreal:
        if log is not None:
            log.warn('densr: the minao SAD density holds %.2f electrons, %.2f fewer than the '
                     'neutral atoms (a valence-only basis without its ECP?); delta-rho carries '
                     'the ionic charge only', nsad, deficit)
        return -float(mol.charge)
    return mol.nelectron - nsad


def check_delta_rho(mol, delta, fine, expected, log=None):
    """Guard against absurd network output: its electron count, before the fit.

    ``expected`` is the number of electrons delta-rho should carry, N - Tr(P_SAD S). The
    fit conserves that number exactly whatever the network says, so an output whose own
    integral is far off (more than a quarter of the electrons plus two) would be forced
    into shape rather than corrected: that is a :class:`DensrError`. Returns the integral.
    """
    q = float(np.sum(delta, dtype=np.float64)) * fine.dv
    nelec = mol.nelectron
    if not np.isfinite(q) or abs(q - expected) > 0.25 * nelec + 2 or nelec + q - expected <= 0:
        raise DensrError('densr guess: the network\'s delta-rho integrates to %.4g electrons '
                         'where %.4g are expected (total %.4g of %d electrons): an absurd '
                         'density, so the model is not fit for this molecule' % (
                             q, expected, nelec + q - expected, nelec))
    if log is not None:
        log.debug('densr: delta-rho integrates to %.4f electrons (expected %.4f)', q, expected)
    return q


def guess_mix(net, mix=None):
    """The damping of the returned guess: ``mix``, else the model's ``guess_mix``."""
    if mix is None:
        mix = net.config.get('guess_mix', 1.0)
    try:
        mix = float(mix)
    except ValueError:
        raise OptionError('densr_mix must be a number in (0, 1], not %r' % mix) from None
    if not 0 < mix <= 1:
        raise OptionError('the guess mix must be in (0, 1], not %g' % mix)
    return mix


def guess_fock_builds(net, builds=None):
    """Fock builds of the projection (1 to MAX_FOCK_BUILDS; more than one:
    :func:`builds.anderson_step`): ``builds``, else the model's ``guess_fock_builds``
    (default 1)."""
    from pyscf_densr.builds import MAX_FOCK_BUILDS
    if builds is None:
        builds = net.config.get('guess_fock_builds', 1)
    try:
        builds = int(builds)
    except ValueError:
        raise OptionError('densr_fock_builds must be an integer from 1 to %d, not %r'
                          % (MAX_FOCK_BUILDS, builds)) from None
    if not 1 <= builds <= MAX_FOCK_BUILDS:
        raise OptionError('the guess\'s Fock builds must be from 1 to %d, not %d'
                         % (MAX_FOCK_BUILDS, builds))
    return builds


def guess_refine_builds(builds=None):
    """Most Fock builds corrected to finer grids (:func:`builds.refine`): ``builds``,
    else :data:`builds.REFINE_BUILDS`; 0 makes none."""
    from pyscf_densr.builds import REFINE_BUILDS
    if builds is None:
        return REFINE_BUILDS
    try:
        ok = int(builds) == float(builds) and int(builds) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok or isinstance(builds, bool):
        raise OptionError('densr_refine_builds must be an integer >= 0, not %r' % (builds,))
    return int(builds)


def guess_symmetry(net, symmetry=None):
    """Symmetry operations of the box the network's prediction is averaged over (1, 2, 8 or
    48; :func:`model.predict`): ``symmetry``, else the model's ``symmetry`` (default 1)."""
    from pyscf_densr.model import SYMMETRY_PASSES
    if symmetry is None:
        symmetry = net.config.get('symmetry') or 1
    try:
        symmetry = int(symmetry)
    except ValueError:
        symmetry = None
    if symmetry not in SYMMETRY_PASSES:
        raise OptionError('the symmetry averaging of the network (densr_symmetry) takes 1, '
                          '2, 8 or 48 operations of the box')
    return symmetry


def guess_grids_level(net):
    """The molecular grid level of the guess's XC step: the model's ``guess_grids_level``
    (default 1; see :func:`potential.guess_grids`)."""
    return int(net.config.get('guess_grids_level', 1))


# the guess's options: SCF attribute -> environment variable (None: set in code only), default
OPTIONS = {
    'densr_model': ('PYSCF_DENSR_MODEL', None),
    'densr_device': ('PYSCF_DENSR_DEVICE', None),
    'densr_fallback': ('PYSCF_DENSR_FALLBACK', 'minao'),
    'densr_fock_builds': (None, None),
    'densr_refine_builds': (None, None),
    'densr_symmetry': (None, None),
    'densr_mix': (None, None),
    'densr_exchange': (None, 'auto'),
    'densr_metals': (None, False),
}


def options(mf, **kwargs):
    """The densr settings for SCF object ``mf``, merged in one place: a keyword argument
    (``model=``, ``fock_builds=``...), else the attribute ``mf.densr_<name>``, else its
    environment variable (model, device, fallback), else the default (None: the model's
    setting, resolved by :func:`init_guess`). Fallback and exchange are validated here."""
    out = {}
    for attr, (env, default) in OPTIONS.items():
        name = attr[len('densr_'):]
        value = kwargs.get(name)
        if value is None:
            value = getattr(mf, attr, None)
        if value is None and env:
            value = os.environ.get(env) or None
        out[name] = default if value is None else value
    out['fallback'] = str(out['fallback']).lower()
    if out['fallback'] not in ('error', 'minao'):
        raise OptionError("densr_fallback (PYSCF_DENSR_FALLBACK) must be 'minao' or 'error', "
                          "not %r" % out['fallback'])
    if out['exchange'] not in ('auto', 'sad', 'iterate'):
        raise OptionError("densr_exchange must be 'auto', 'sad' or 'iterate', not %r"
                          % out['exchange'])
    return out


def pyscf_guess(mf, mol=None):
    """PySCF's own default guess for ``mf`` (minao; the core Hamiltonian without atoms)."""
    get = _orig_get_init_guess or hf.SCF.get_init_guess
    return get(mf, mol or mf.mol, 'minao')


def init_guess(mf, mol=None, model=None, device=None, exchange=None, fallback=None, mix=None,
               fock_builds=None, symmetry=None, metals=None, refine_builds=None,
               details=None):
    """The densr initial guess density matrix for SCF object ``mf``.

    Args:
        mf: a molecular PySCF SCF object (RHF/UHF/ROHF/RKS/UKS/ROKS, GHF/GKS, DF, X2C or
            not). Others (4-component DHF/DKS, no atoms or electrons, periodic cells) get
            PySCF's own guess under the fallback policy.
        mol: the molecule (default ``mf.mol``).
        model, device, exchange, fallback, mix, fock_builds, symmetry, metals,
            refine_builds: the options
            of the module docstring; each overrides the SCF attribute ``densr_<name>``
            (:func:`options`). ``model`` may also be a loaded network.
        details: a dict to receive what the guess made on the way: ``delta_rho`` (the
            network's output, e/Bohr^3) and ``grid`` (the :class:`grid.UniformGrid` it lives
            on), ``fallback`` (the error whose fallback made the guess, or None),
            ``minao`` (whether the guess's Fock builds did not converge, so that minao's
            guess is returned, with a warning).

    Returns:
        The density matrix in ``mf``'s convention (2D for RHF/RKS, (2, nao, nao) otherwise)
        with ``mo_coeff``, ``mo_occ`` (and ``mo_energy``) attached. It has the point-group
        symmetry of the molecule (:mod:`symmetry`).
    """
    mol = mol or mf.mol
    log = logger.new_logger(mf)
    opts = options(mf, model=model, device=device, exchange=exchange, fallback=fallback,
                   mix=mix, fock_builds=fock_builds, symmetry=symmetry, metals=metals,
                   refine_builds=refine_builds)
    fallback = opts['fallback']
    details = {} if details is None else details
    details['fallback'] = None
    details['minao'] = False
    try:
        with threadpool_limits(limits=1, user_api='blas'):
            return _densr_guess(mf, mol, opts, log, details)
    except OptionError:
        raise
    except SCFOwnError as e:
        raise e.__cause__
    except DensrError as e:
        if fallback == 'error':
            raise
        details['fallback'] = e
        return _fall_back(mf, mol, e, log)
    except Exception as e:
        err = DensrError('densr guess failed inside (%s: %s); please report it with the '
                         'input' % (type(e).__name__, str(e).splitlines()[0][:200] if str(e)
                                    else ''))
        if fallback == 'error':
            raise err from e
        err.__cause__ = e
        details['fallback'] = err
        return _fall_back(mf, mol, err, log)


def _fall_back(mf, mol, err, log):
    """PySCF's own guess after ``err``: a note where densr does not apply by design
    (:class:`NotApplicable`), a warning where the guess failed."""
    if isinstance(err, NotApplicable):
        log.note('%s: PySCF\'s own guess is used', err)
    else:
        log.warn('%s; PySCF\'s own guess is used (fallback=minao)', err)
    return pyscf_guess(mf, mol)


def _densr_guess(mf, mol, opts, log, details):
    """The data path: SAD -> grid -> network -> fit -> Fock builds -> density matrix."""
    from pyscf_densr import project
    from pyscf.scf import dhf, ghf
    if isinstance(mf, dhf.DHF):
        raise NotApplicable('densr guess: 4-component Dirac-Hartree-Fock/Dirac-Kohn-Sham (%s) '
                            'is not covered' % type(mf).__name__)
    check_molecule(mol)
    if not COVER_HF and not hasattr(mf, 'xc'):
        raise NotApplicable('densr guess: Hartree-Fock; the guess saves about one cycle there '
                            'and costs more (its Fock builds converge Coulomb, not exchange)')
    if isinstance(mf, ghf.GHF):
        return _generalized_guess(mf, mol, opts, log, details)
    if mol.nao < MIN_NAO:
        raise NotApplicable('densr guess: %d basis functions, fewer than %d: the SCF is '
                            'cheaper than the guess would cost' % (mol.nao, MIN_NAO))
    s1e = mf.get_ovlp(mol)
    if s1e.shape[-1] != mol.nao or np.iscomplexobj(s1e):
        raise NotApplicable('densr guess: %s works in a basis of %d %s functions, not the '
                            'molecule\'s %d real AOs (a spinor or two-component method)' % (
                                type(mf).__name__, s1e.shape[-1],
                                'complex' if np.iscomplexobj(s1e) else 'real', mol.nao))
    t_start = time.perf_counter()
    try:
        dm_sad = mf.init_guess_by_minao(mol)
    except Exception as e:
        raise DensrError('densr guess needs PySCF\'s superposition of atomic densities '
                         '(minao), which failed for this molecule (elements %s): %s: %s' % (
                             ','.join(sorted(set(mol.elements))), type(e).__name__, e)) from e
    metals = open_shell_metals(mol)
    if metals and not opts['metals']:
        log.warn('densr: %s: open-shell d/f metals; a guess made by one Fock build and an '
                 'aufbau occupation sends PySCF\'s SCF astray for such complexes, so the '
                 'minao guess is used (mf.densr_metals = True overrides)', ','.join(metals))
        return dm_sad
    dm_sad_tot = np.asarray(dm_sad)
    if dm_sad_tot.ndim == 3:
        dm_sad_tot = dm_sad_tot.sum(axis=0)
    net = load_model(opts['model'], opts['device'])
    settings = dict(mix=guess_mix(net, opts['mix']), grids_level=guess_grids_level(net),
                    fock_builds=guess_fock_builds(net, opts['fock_builds']),
                    price_builds=opts['fock_builds'] is None,
                    refine_builds=guess_refine_builds(opts['refine_builds']),
                    refine_exchange=opts['refine_builds'] is not None)
    nsym = guess_symmetry(net, opts['symmetry'])
    try:
        delta, fine = predict_delta_rho(mol, dm_sad_tot, net, opts['device'], log, nsym,
                                        mf.max_memory)
        details['delta_rho'], details['grid'] = delta, fine
        expected = fit_charge(mol, dm_sad_tot, s1e, log)
        check_delta_rho(mol, delta, fine, expected, log)
        t0 = time.perf_counter()
        dm = project.density_matrix_from_delta_rho(
            mf, delta, fine, dm_sad=dm_sad, auxbasis=net.config.get('auxbasis'),
            exchange=opts['exchange'], log=log, charge=expected, details=details,
            **settings)
        log.info('densr: projection to a density matrix in %.2f s', time.perf_counter() - t0)
    except MemoryError as e:
        raise DensrError('densr guess ran out of memory (%s); the guess\'s blocks follow '
                         'mf.max_memory: lower it to what this machine has' % (
                             str(e) or type(e).__name__)) from e
    log.info('densr: initial guess in %.2f s', time.perf_counter() - t_start)
    if details.get('minao'):   # the builds did not converge: minao's guess as it is
        return dm_sad
    return _break_spin_symmetry(mf, mol, dm, log, dm_sad)


def _break_spin_symmetry(mf, mol, dm, log, dm_sad=None):
    """UHF/UKS of a singlet: PySCF's own guesses break the alpha/beta symmetry as
    ``mf.init_guess_breaksym`` says (default 1: beta keeps only the atoms' diagonal blocks),
    so that a broken-symmetry solution (a stretched bond) can be reached; the densr guess
    does the same, with PySCF's own function. With 1, the break is scaled to the size
    (Frobenius norm of alpha - beta) of PySCF's break of P_SAD, ``dm_sad``: P_SAD is nearly
    block-diagonal by atom, a bonded density is not, and the full break would throw away
    the guess's bonds in beta (ethanol, UKS PBE/def2-SVP: 11 cycles against minao's 10,
    scaled 9, unbroken 4). The result is a plain matrix, as theirs."""
    from pyscf.scf import uhf
    breaksym = getattr(mf, 'init_guess_breaksym', None)
    dm = np.asarray(dm) if not hasattr(dm, 'mo_coeff') else dm
    if not breaksym or not isinstance(mf, uhf.UHF) or mol.spin != 0 or np.ndim(dm) != 3:
        return dm
    dma, dmb = uhf._break_dm_spin_symm(mol, dm, breaksym)
    if dma is dm[0] and dmb is dm[1]:
        return dm
    if breaksym == 1 and dm_sad is not None and np.ndim(dm_sad) == 3:   # 1 or True
        want = np.linalg.norm(np.asarray(dm_sad[0]) - np.asarray(dm_sad[1]))
        have = np.linalg.norm(dma - dmb)
        if have > want:
            dmb = dma + (want / have) * (dmb - dma)
            log.debug('densr: alpha/beta break scaled by %.3g to that of P_SAD', want / have)
    log.debug('densr: alpha/beta symmetry broken as init_guess_breaksym=%s asks', breaksym)
    return np.array((dma, dmb))


def _collinear_twin(mf, mol):
    """The RHF/RKS (closed shell) or UHF/UKS twin of a GHF/GKS object: same functional,
    density fitting and scalar-relativistic Hamiltonian (spin-orbit X2C becomes sf-X2C)."""
    from pyscf import scf, dft
    xc = getattr(mf, 'xc', None)
    if xc is None:
        twin = scf.UHF(mol) if mol.spin else scf.RHF(mol)
    else:
        twin = dft.UKS(mol, xc=xc) if mol.spin else dft.RKS(mol, xc=xc)
        twin.nlc = getattr(mf, 'nlc', '')
    if getattr(mf, 'with_x2c', None) is not None:
        twin = twin.sfx2c1e()
    with_df = getattr(mf, 'with_df', None)
    if with_df is not None:
        twin = twin.density_fit(auxbasis=getattr(with_df, 'auxbasis', None))
    twin.verbose = mf.verbose
    twin.stdout = mf.stdout
    twin.max_memory = mf.max_memory
    return twin


def _generalized_guess(mf, mol, opts, log, details):
    """GHF/GKS: the total density of the collinear twin's guess (:func:`_collinear_twin`),
    laid out as PySCF lays out its own minao guess for GHF: half in each spin block, plus
    an alpha-beta coupling of 5% of the diagonal. Keeping the twin's spin polarisation
    instead led an open-shell spin-orbit (X2C) GHF to another state than minao's."""
    from pyscf.scf import ghf
    dm = np.asarray(init_guess(_collinear_twin(mf, mol), mol, details=details, **opts))
    if dm.ndim == 3:
        dm = dm[0] + dm[1]
    log.info('densr: GHF/GKS guess from the total density of the %s twin',
             'UHF/UKS' if mol.spin else 'RHF/RKS')
    return ghf._from_rhf_init_dm(dm)


_orig_get_init_guess = None


def _get_init_guess(self, mol=None, key='minao', **kwargs):
    if isinstance(key, str) and key.lower() == KEY:
        return init_guess(self, mol)
    return _orig_get_init_guess(self, mol, key, **kwargs)


_orig_dump_flags = None


def _dump_flags(self, verbose=None):
    out = _orig_dump_flags(self, verbose)
    key = getattr(self, 'init_guess', None)
    if isinstance(key, str) and key.lower() == KEY:
        log = logger.new_logger(self, verbose)
        if log.verbose >= logger.INFO:
            for attr in OPTIONS:
                log.info('%s = %s', attr, getattr(self, attr, None))
    return out


def register():
    """Make ``'densr'`` a valid ``init_guess`` key and declare the ``densr_*`` options on
    PySCF's SCF class (idempotent)."""
    global _orig_get_init_guess, _orig_dump_flags
    if _orig_get_init_guess is None:
        _orig_get_init_guess = hf.SCF.get_init_guess
        hf.SCF.get_init_guess = _get_init_guess
        _get_init_guess.__doc__ = _orig_get_init_guess.__doc__
        _orig_dump_flags = hf.SCF.dump_flags
        hf.SCF.dump_flags = _dump_flags
        _dump_flags.__doc__ = _orig_dump_flags.__doc__
        for attr in OPTIONS:
            setattr(hf.SCF, attr, None)
        hf.SCF._keys = set(hf.SCF._keys) | set(OPTIONS)
