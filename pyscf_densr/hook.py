"""PySCF integration: the ``'densr'`` key of ``mf.init_guess`` and the functional API.

Importing :mod:`pyscf_densr` wraps ``pyscf.scf.hf.SCF.get_init_guess`` once: the key
``'densr'`` (any case) runs :func:`init_guess`; every other key, and a density matrix
passed as ``init_guess``, goes to PySCF's own method unchanged. RHF, UHF, ROHF, their KS,
density-fitted and scanner variants all reach ``SCF.get_init_guess`` at call time.

Options without code changes (environment variables):

``PYSCF_DENSR_MODEL``     shipped model name or path to NAME.pt (default ``densr-small``)
``PYSCF_DENSR_DEVICE``    ``cpu``, ``cuda``, ``cuda:1``... (default: CUDA if available)
``PYSCF_DENSR_FALLBACK``  ``error`` (default) or ``minao``: what to do when the guess
                          cannot be made (bad model file, NaN from the network, out of
                          memory). ``minao`` logs a warning and returns PySCF's minao guess.
``PYSCF_DENSR_EXCHANGE``  ``auto`` (default), ``sad`` or ``iterate``; see :mod:`project`.
"""

import os
import time
import threading

import numpy as np
from pyscf import lib, gto
from pyscf.lib import logger
from pyscf.scf import hf

from pyscf_densr import grid as grid_mod

KEY = 'densr'
MIN_DISTANCE = 0.2  # Bohr; closer atoms are an error, not a molecule
UNSEEN_RADIUS = 3.0  # Bohr; delta-rho is switched off within this distance of unseen elements

_models = {}
_models_lock = threading.Lock()


class DensrError(RuntimeError):
    """The densr guess cannot be made for this input."""


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
        raise DensrError('densr guess supports molecules (pyscf.gto.Mole) only; got a '
                         'periodic Cell. Use a PBC guess such as minao for periodic systems.')
    if mol.natm == 0:
        raise DensrError('densr guess: the molecule has no atoms')
    coords = mol.atom_coords()
    if not np.all(np.isfinite(coords)):
        raise DensrError('densr guess: atomic coordinates contain NaN or inf')
    real = [i for i in range(mol.natm) if mol.atom_charge(i) > 0]
    if not real:
        raise DensrError('densr guess: the molecule has only ghost atoms')
    if len(real) > 1:
        from scipy.spatial.distance import pdist, squareform
        d = squareform(pdist(coords[real]))
        np.fill_diagonal(d, np.inf)
        i, j = np.unravel_index(np.argmin(d), d.shape)
        if d[i, j] < MIN_DISTANCE:
            raise DensrError('densr guess: atoms %d (%s) and %d (%s) are %.3f Bohr apart; '
                             'check the geometry and its units' % (
                                 real[i], mol.atom_symbol(real[i]),
                                 real[j], mol.atom_symbol(real[j]), d[i, j]))


def _unseen_mask(mol, fine, elements):
    """Weights in [0, 1] on ``fine`` that switch delta-rho off around unseen elements."""
    seen = set(int(z) for z in elements)
    atoms = [i for i in range(mol.natm)
             if mol.atom_charge(i) > 0 and int(gto.charge(mol.atom_pure_symbol(i))) not in seen]
    if not atoms:
        return None, []
    w = np.ones(fine.shape)
    ax = fine.axes()
    for i in atoms:
        R = mol.atom_coord(i)
        r2 = ((ax[0][:, None, None] - R[0]) ** 2 + (ax[1][None, :, None] - R[1]) ** 2
              + (ax[2][None, None, :] - R[2]) ** 2)
        w *= 1 - np.exp(-(r2 / UNSEEN_RADIUS ** 2) ** 4)
    return w, atoms


def predict_delta_rho(mol, dm_sad, model=None, device=None, log=None):
    """The network's delta-rho (e/Bohr^3) and the fine grid it lives on.

    ``dm_sad`` is the (spin-summed) SAD density matrix. Voxelization honours
    ``lib.num_threads()`` and so does torch on the CPU.
    """
    import torch
    from pyscf_densr import model as model_mod
    log = log or logger.Logger(mol.stdout, mol.verbose)
    net = load_model(model, device)
    cfg = net.config
    t0 = time.perf_counter()
    box = grid_mod.make_box(mol.atom_coords(), cfg['spacing'], cfg['margin'])
    rho_sad = grid_mod.eval_density(mol, dm_sad, box)
    t1 = time.perf_counter()
    log.info('densr: SAD density on %s grid (%d voxels, %.2f Bohr) in %.2f s',
             'x'.join(map(str, box.shape)), box.size, box.spacing, t1 - t0)
    dev = next(net.parameters()).device
    nthreads = torch.get_num_threads()
    if dev.type == 'cpu':
        torch.set_num_threads(max(1, lib.num_threads()))
    try:
        delta = model_mod.predict(net, rho_sad, device=dev)
    except RuntimeError as e:
        if 'out of memory' in str(e).lower():
            raise DensrError('densr guess: the network ran out of memory on %s for a %s box; '
                             'set PYSCF_DENSR_MAX_VOXELS lower to run it in smaller tiles, '
                             'or PYSCF_DENSR_DEVICE=cpu' % (dev, box.shape)) from e
        raise
    finally:
        torch.set_num_threads(nthreads)
    t2 = time.perf_counter()
    log.info('densr: network %s on %s in %.2f s', os.path.basename(getattr(net, 'path', '?')),
             dev, t2 - t1)
    if not np.all(np.isfinite(delta)):
        raise DensrError('densr guess: the network returned NaN or inf (model %s)'
                         % getattr(net, 'path', '?'))
    fine = box.refine(cfg['upsample'])
    mask, unseen = _unseen_mask(mol, fine, cfg.get('elements', []))
    if unseen:
        syms = sorted(set(mol.atom_pure_symbol(i) for i in unseen))
        log.warn('densr: elements %s were not in the model\'s training data; the plain SAD '
                 'density is used around those %d atoms', ','.join(syms), len(unseen))
        delta = delta * mask
    return delta, fine


def init_guess(mf, mol=None, model=None, device=None, exchange=None, fallback=None):
    """The densr initial guess density matrix for SCF object ``mf``.

    Args:
        mf: a molecular PySCF SCF object (RHF/UHF/ROHF/RKS/UKS/ROKS, DF or not).
        mol: the molecule (default ``mf.mol``).
        model: shipped model name, path to NAME.pt, or a loaded network.
        device: torch device for the network ('cpu', 'cuda', ...).
        exchange: 'auto', 'sad' or 'iterate' (see :func:`project.density_matrix_from_delta_rho`).
        fallback: 'error' or 'minao' (see the module docstring).

    Returns:
        The density matrix in ``mf``'s convention (2D for RHF/RKS, (2, nao, nao) otherwise)
        with ``mo_coeff``, ``mo_occ`` (and ``mo_energy``) attached.
    """
    from pyscf_densr import project
    from pyscf_densr.model import ModelError
    mol = mol or mf.mol
    log = logger.new_logger(mf)
    fallback = (fallback or os.environ.get('PYSCF_DENSR_FALLBACK', 'error')).lower()
    exchange = exchange or os.environ.get('PYSCF_DENSR_EXCHANGE', 'auto')
    if fallback not in ('error', 'minao'):
        raise ValueError("fallback must be 'error' or 'minao', not %r" % fallback)
    check_molecule(mol)
    t_start = time.perf_counter()
    try:
        dm_sad = mf.init_guess_by_minao(mol)
    except Exception as e:
        raise DensrError('densr guess needs PySCF\'s superposition of atomic densities '
                         '(minao), which failed for this molecule (elements %s): %s: %s' % (
                             ','.join(sorted(set(mol.elements))), type(e).__name__, e)) from e
    dm_sad_tot = np.asarray(dm_sad)
    if dm_sad_tot.ndim == 3:
        dm_sad_tot = dm_sad_tot.sum(axis=0)
    try:
        delta, fine = predict_delta_rho(mol, dm_sad_tot, model, device, log)
        net = load_model(model, device)
        t0 = time.perf_counter()
        dm = project.density_matrix_from_delta_rho(
            mf, delta, fine, dm_sad=dm_sad, auxbasis=net.config.get('auxbasis'),
            exchange=exchange, log=log)
        log.info('densr: projection to a density matrix in %.2f s', time.perf_counter() - t0)
    except (DensrError, ModelError, MemoryError) as e:
        if fallback == 'minao':
            log.warn('densr guess failed (%s); falling back to the minao guess as '
                     'PYSCF_DENSR_FALLBACK/fallback asks', e)
            return mf.init_guess_by_minao(mol)
        raise
    log.info('densr: initial guess in %.2f s', time.perf_counter() - t_start)
    return dm


_orig_get_init_guess = None


def _get_init_guess(self, mol=None, key='minao', **kwargs):
    if isinstance(key, str) and key.lower() == KEY:
        return init_guess(self, mol)
    return _orig_get_init_guess(self, mol, key, **kwargs)


def register():
    """Make ``'densr'`` a valid ``init_guess`` key (idempotent)."""
    global _orig_get_init_guess
    if _orig_get_init_guess is None:
        _orig_get_init_guess = hf.SCF.get_init_guess
        hf.SCF.get_init_guess = _get_init_guess
        _get_init_guess.__doc__ = _orig_get_init_guess.__doc__
    _register_gpu4pyscf()


def _register_gpu4pyscf():
    import sys
    mod = sys.modules.get('gpu4pyscf.scf.hf')
    if mod is None or getattr(mod.SCF, '_densr_wrapped', False):
        return
    orig = mod.SCF.get_init_guess

    def get_init_guess(self, mol=None, key='minao', **kwargs):
        if isinstance(key, str) and key.lower() == KEY:
            import cupy  # untested: no GPU build of PySCF was available to this project
            return cupy.asarray(init_guess(self.to_cpu(), mol))
        return orig(self, mol, key, **kwargs)
    mod.SCF.get_init_guess = get_init_guess
    mod.SCF._densr_wrapped = True
