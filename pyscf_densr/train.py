"""Training and fine-tuning: grids from labelled shards, random crops, checkpoints.

``densr train CONFIG.yaml`` and ``densr finetune CONFIG.yaml`` run :func:`train`. The config
(YAML, TOML or JSON) holds everything; see ``docs/training.md`` and ``examples/train_cpu.yaml``.

Grids are made once per molecule from the shard's orbitals (the converged density) and
PySCF's minao guess (the SAD density), with the same box rules as inference
(:func:`pyscf_densr.grid.make_box`), and cached on disk as float32 ``.npy`` files. Training
draws random crops with random 90-degree rotations and reflections of input and target
together. Validation is the NMAE of full boxes of held-out molecules (normalised by the electron count,
the integral of the reference density).
"""

import functools
import glob
import json
import math
import os
import sys
import time

import numpy as np
import torch

from pyscf_densr import model as model_mod
from pyscf_densr import data

TRAIN_DEFAULTS = {
    'data': ['../shared/data/qm9_pbe_def2svp_*.h5'],
    'train_range': [0, 400],      # molecule indices (position in the SMILES list) to train on:
                                  # [lo, hi) or a list of such ranges; none may overlap
                                  # val_range or test_range
    'val_range': [400, 450],      # used to select the checkpoint
    'test_range': [450, 500],     # never touched in training; reported
    'max_val': 16,                # validation molecules evaluated per check
    'cache': 'cache/grids',
    'out': 'runs/default',
    'model': {},                  # overrides of model.DEFAULT_CONFIG
    'init': None,                 # a model to start from (fine-tuning)
    'loss': 'huber',              # 'huber' (smooth L1) or 'l1'; on delta-rho in 0.01 e/Bohr^3
    'huber_beta': 0.5,            # 0.005 e/Bohr^3: quadratic below, L1 (= NMAE) above
    'coulomb_weight': 0.0,        # + this times (e|e) / Eh, the Coulomb self-energy (x2) of
                                  # the error e = pred - target on the coarse grid: the guess's
                                  # cycles follow its Coulomb potential (docs/training.md)
    'select': 'val_nmae',         # the validation score that picks 'best': 'val_nmae' or
                                  # 'val_coulomb' (mean (e|e) / Eh of the model's error)
    'lr': 1e-3,
    'min_lr': 5e-5,
    'weight_decay': 0.0,
    'steps': 20000,
    'warmup_steps': 0,            # linear ramp of the rate over these first steps
    'max_minutes': None,          # stop (and export) after this wall time
    'run_minutes': None,          # stop this process after this wall time (checkpoint kept,
                                  # schedule untouched): one of several resumed runs, e.g.
                                  # one call of a GPU machine
    'schedule': 'steps',          # cosine from lr to min_lr over 'steps', or over 'minutes'
                                  # (max_minutes of wall time, summed over resumed runs): for a
                                  # fixed budget on hardware of unknown speed
    'batch': 4,
    'crop': 16,                   # coarse voxels of the core of each crop (edge); 0: whole boxes
    'crop_halo': 'auto',          # coarse voxels each side fed but not scored; 'auto': the
                                  # network's receptive field (fewer teaches it false edges)
    'augment': True,
    'val_every': 250,
    'seed': 0,
    'threads': None,
    'precision': 'auto',          # 'auto' (bf16 autocast on CUDA), 'fp32'
    'device': 'auto',
}


def _load_toml(text, path):
    try:
        import tomllib
    except ImportError:   # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            raise ImportError('%s: TOML configs need Python >= 3.11 or the tomli package '
                              '(pip install tomli); YAML and JSON work everywhere' % path)
    return tomllib.loads(text)


def load_config(path_or_dict):
    """The training config: file (YAML, TOML or JSON, by extension) or dict, on top of
    :data:`TRAIN_DEFAULTS`. TOML has no null: leave an option out to keep its default."""
    cfg = dict(TRAIN_DEFAULTS)
    if isinstance(path_or_dict, dict):
        user = path_or_dict
        base = os.getcwd()
    else:
        with open(path_or_dict) as f:
            text = f.read()
        if str(path_or_dict).endswith('.json'):
            user = json.loads(text)
        elif str(path_or_dict).endswith('.toml'):
            user = _load_toml(text, path_or_dict)
        else:
            import yaml
            user = yaml.safe_load(text) or {}
        base = os.path.dirname(os.path.abspath(path_or_dict))
    unknown = set(user) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ValueError('unknown training options: %s' % ', '.join(sorted(unknown)))
    cfg.update(user)
    if isinstance(cfg['data'], str):
        cfg['data'] = [cfg['data']]
    check_ranges(cfg)
    cfg['_base'] = base
    return cfg


def check_ranges(cfg):
    """Raise ValueError if a training range overlaps the validation or test range."""
    for lo, hi in train_ranges(cfg):
        for name in ('val_range', 'test_range'):
            v0, v1 = cfg[name]
            if lo < v1 and v0 < hi:
                raise ValueError('train_range %s overlaps %s %s: held-out molecules must '
                                 'never be trained on' % ([lo, hi], name, [v0, v1]))


def train_ranges(cfg):
    """``cfg['train_range']`` as a list of [lo, hi) index ranges."""
    r = cfg['train_range']
    out = []
    for pr in (r if r and isinstance(r[0], (list, tuple)) else [r]):
        if len(pr) != 2 or not all(isinstance(x, (int, np.integer)) for x in pr) or pr[0] >= pr[1]:
            raise ValueError('train_range must be [lo, hi] or a list of them, not %r' % (r,))
        out.append([int(pr[0]), int(pr[1])])
    return out


def _path(cfg, p):
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(cfg['_base'], p))


def _shard_files(cfg):
    files = []
    for pat in cfg['data']:
        files += sorted(glob.glob(_path(cfg, pat)))
    if not files:
        raise FileNotFoundError('no data shards match %s' % cfg['data'])
    return files


def list_molecules(files, lo, hi):
    """(file, key) of complete molecules whose index is in [lo, hi)."""
    import h5py
    out = []
    for fn in files:
        with h5py.File(fn, 'r') as f:
            for key in f.keys():
                if key.isdigit() and lo <= int(key) < hi:
                    out.append((fn, key))
    return out


def data_elements(files, lo, hi):
    """Sorted atomic numbers present among the molecules with index in [lo, hi)."""
    import h5py
    found = set()
    for fn in files:
        with h5py.File(fn, 'r') as f:
            for key in f.keys():
                if key.isdigit() and lo <= int(key) < hi and 'numbers' in f[key]:
                    found.update(int(z) for z in np.unique(f[key]['numbers'][()]))
    return sorted(z for z in found if z > 0)


def make_grids(mol, dm_conv, config):
    """(rho_SAD on the coarse grid, delta-rho on the fine grid, coarse grid).

    ``dm_conv`` is the converged density matrix (spin-summed); rho_SAD is PySCF's minao guess,
    as at inference. delta-rho is evaluated in one pass from the difference of the matrices.
    """
    from pyscf.scf import hf
    from pyscf_densr import grid
    box = grid.make_box(mol.atom_coords(), config['spacing'], config['margin'])
    fine = box.refine(config['upsample'])
    dm_sad = hf.init_guess_by_minao(mol)
    rho_sad = grid.eval_density(mol, dm_sad, box)
    delta = grid.eval_density(mol, dm_conv - dm_sad, fine)
    return rho_sad.astype(np.float32), delta.astype(np.float32), box


def cache_dir(cfg, mcfg):
    tag = 's%g_m%g_u%d' % (mcfg['spacing'], mcfg['margin'], mcfg['upsample'])
    return os.path.join(_path(cfg, cfg['cache']), tag)


def build_cache(cfg, ranges=None, progress=True, workers=1):
    """Compute and store the grids of every molecule in ``ranges`` (default: all three).

    ``workers`` > 1 builds them in that many processes, each with an equal share of PySCF's
    threads (``lib.num_threads()``); entries already complete are skipped, so an interrupted
    build resumes.
    """
    mcfg = _model_config(cfg)
    cdir = cache_dir(cfg, mcfg)
    os.makedirs(cdir, exist_ok=True)
    files = _shard_files(cfg)
    if ranges is None:  # what training needs first: the validation molecules it scores
        v0, v1 = cfg['val_range']
        ranges = [[v0, min(v1, v0 + cfg['max_val'])]] + train_ranges(cfg) + \
            [cfg['val_range'], cfg['test_range']]
    todo, seen = [], set()
    for lo, hi in ranges:
        for fn, key in list_molecules(files, lo, hi):
            if key not in seen and not os.path.exists(os.path.join(cdir, key + '.json')):
                todo.append((fn, key))
            seen.add(key)
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc='grids', file=sys.stderr)
    opts = {'cdir': cdir, 'config': mcfg}
    if workers > 1:  # each process gets its share of PySCF's threads
        from pyscf import lib
        opts['threads'] = max(1, lib.num_threads() // workers)
    # data.run_tasks: the spawn process pool of `densr data`; tasks are (key, shard file)
    for res in data.run_tasks(_cache_one, [(key, fn) for fn, key in todo], opts, workers):
        if not res['ok']:
            raise RuntimeError('grids of molecule %s failed: %s' % (res['index'], res['reason']))
        if progress:
            bar.update()
    if progress:
        bar.close()
    return cdir


def _cache_one(key, shard, opts):
    """Grids of molecule ``key`` of ``shard`` into ``opts['cdir']`` (a :func:`data.run_tasks`
    task)."""
    import h5py
    from pyscf import lib
    if opts.get('threads'):
        lib.num_threads(opts['threads'])
    stem = os.path.join(opts['cdir'], key)
    with h5py.File(shard, 'r') as f:
        mol, dm = data.read_molecule(f[key])
    if dm.ndim == 3:
        dm = dm.sum(axis=0)
    rho_sad, delta, box = make_grids(mol, dm, opts['config'])
    np.save(stem + '.sad.npy', rho_sad)
    np.save(stem + '.delta.npy', delta)
    with open(stem + '.json', 'w') as f:  # written last: marks the entry complete
        json.dump({'origin': box.origin.tolist(), 'spacing': box.spacing,
                   'shape': box.shape, 'nelectron': mol.nelectron,
                   'file': os.path.basename(shard)}, f)
    return {'index': key, 'ok': True}


def _model_config(cfg):
    mcfg = dict(model_mod.DEFAULT_CONFIG)
    if cfg.get('init'):
        mcfg.update(model_mod.from_pretrained(_init_path(cfg)).config)
    mcfg.update(cfg.get('model') or {})
    return mcfg


def _init_path(cfg):
    p = cfg['init']
    cand = _path(cfg, p)
    return cand if os.path.exists(cand) or os.path.exists(cand + '.pt') else p


def cached_keys(cdir, lo, hi):
    keys = []
    for fn in glob.glob(os.path.join(cdir, '*.json')):
        k = os.path.basename(fn)[:-5]
        if k.isdigit() and lo <= int(k) < hi:
            keys.append(k)
    return sorted(keys)


def _train_keys(cdir, cfg):
    return sorted(set(k for lo, hi in train_ranges(cfg) for k in cached_keys(cdir, lo, hi)))


def random_symmetry(rng):
    """A random element of the 48 rotations/reflections of the cube: (axis order, flips)."""
    return rng.permutation(3), rng.random(3) < 0.5




class CropSampler:
    """Random crops (input with halo, scored target core) from the grid cache."""

    def __init__(self, cdir, keys, crop, halo, upsample, augment=True, seed=0):
        self.cdir, self.keys = cdir, list(keys)
        self.crop, self.halo, self.r = crop, halo, upsample
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        self.min_density = 0.01   # e/Bohr^3
        self._centres = {}

    def refresh(self, keys):
        self.keys = list(keys)

    def sample(self):
        key = self.keys[self.rng.integers(len(self.keys))]
        sad = np.load(os.path.join(self.cdir, key + '.sad.npy'), mmap_mode='r')
        delta = np.load(os.path.join(self.cdir, key + '.delta.npy'), mmap_mode='r')
        n_in = self.crop + 2 * self.halo
        # Centre crops on the molecule, where delta-rho lives: a random voxel of appreciable
        # SAD density, jittered; halo voxels outside the box are zero (vacuum).
        if key not in self._centres:
            self._centres[key] = np.argwhere(np.asarray(sad) > self.min_density)
        centres = self._centres[key]
        centre = centres[self.rng.integers(len(centres))] if len(centres) else \
            np.array(sad.shape) // 2
        start = []
        for c, n in zip(centre, sad.shape):
            c0 = int(c) - self.crop // 2 + int(self.rng.integers(-self.crop // 4, self.crop // 4 + 1))
            c0 = min(max(c0, 0), max(0, n - self.crop))
            start.append(c0 - self.halo)
        x = np.zeros((n_in,) * 3, dtype=np.float32)
        src, dst = [], []
        for s, n in zip(start, sad.shape):
            a0, a1 = max(s, 0), min(s + n_in, n)
            src.append(slice(a0, a1))
            dst.append(slice(a0 - s, a1 - s))
        x[tuple(dst)] = sad[tuple(src)]
        r = self.r
        y = np.zeros((self.crop * r,) * 3, dtype=np.float32)
        src, dst = [], []
        for s, n in zip(start, sad.shape):
            c0 = s + self.halo
            a0, a1 = c0, min(c0 + self.crop, n)
            src.append(slice(a0 * r, a1 * r))
            dst.append(slice(0, (a1 - a0) * r))
        y[tuple(dst)] = delta[tuple(src)]
        if self.augment:
            perm, flips = random_symmetry(self.rng)
            x, y = (model_mod.apply_symmetry(x, perm, flips),
                    model_mod.apply_symmetry(y, perm, flips))
        return x, y

    def batch(self, n):
        xs, ys = zip(*[self.sample() for _ in range(n)])
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))

    def sample_box(self):
        """A whole molecule's box (input, target), randomly rotated/reflected: exactly what
        the network sees at inference, vacuum margins included."""
        key = self.keys[self.rng.integers(len(self.keys))]
        x, y, _ = load_cached(self.cdir, key)
        if self.augment:
            perm, flips = random_symmetry(self.rng)
            x, y = (model_mod.apply_symmetry(x, perm, flips),
                    model_mod.apply_symmetry(y, perm, flips))
        return torch.from_numpy(x)[None], torch.from_numpy(y)[None]


def load_cached(cdir, key):
    """(rho_SAD on the coarse grid, delta-rho on the fine grid, metadata) of one cached molecule."""
    sad = np.load(os.path.join(cdir, key + '.sad.npy'))
    delta = np.load(os.path.join(cdir, key + '.delta.npy'))
    with open(os.path.join(cdir, key + '.json')) as f:
        meta = json.load(f)
    return sad, delta, meta


@torch.no_grad()
def evaluate_nmae(model, cdir, keys, device='cpu', coulomb=None, symmetry=None):
    """Mean over molecules of NMAE (%) of the model and of SAD alone, on full boxes. With a
    list ``coulomb``, also appends each molecule's (e|e) / Eh of the model's error to it.
    ``symmetry``: passes averaged (:func:`model.predict`; default the model's own)."""
    model.eval()
    nm, ns = [], []
    for k in keys:
        sad, delta, meta = load_cached(cdir, k)
        h = meta['spacing'] / model.config['upsample']
        pred = model_mod.predict(model, sad, device=device, symmetry=symmetry)
        nm.append(np.abs(pred - delta).sum() * h ** 3 / meta['nelectron'] * 100)
        ns.append(np.abs(delta).sum() * h ** 3 / meta['nelectron'] * 100)
        if coulomb is not None:
            err = torch.from_numpy(np.asarray(pred - delta, dtype=np.float32))[None]
            coulomb.append(float(coulomb_error(err, h, model.config['upsample'])[0]))
    return float(np.mean(nm)), float(np.mean(ns))


@functools.lru_cache(maxsize=8)
def _green_fft(shape, h, device):
    """FFT of 1/|r| on the doubled grid of ``shape`` (spacing ``h`` Bohr), for Hockney's
    free-space convolution; the r = 0 voxel holds the cube's mean of 1/|r| (2.3800774 / h).
    Cached for a few shapes only: whole boxes differ in shape, and each entry of a QM9 box
    is about 14 MB, while rebuilding one costs a single FFT."""
    ax = [torch.fft.fftfreq(2 * n, 1.0 / (2 * n), dtype=torch.float64) for n in shape]
    ix, iy, iz = torch.meshgrid(*ax, indexing='ij')
    r = h * torch.sqrt(ix ** 2 + iy ** 2 + iz ** 2)
    g = 1.0 / torch.where(r > 0, r, torch.ones_like(r))
    g[0, 0, 0] = 2.3800774 / h
    return torch.fft.rfftn(g.float()).to(device)


def coulomb_error(err, spacing, pool=1):
    """(e|e) = int int e(r) e(r') / |r - r'| in Hartree, per item of a batch of error
    densities ``err`` (B, X, Y, Z) in e/Bohr^3 on a grid of ``spacing`` Bohr; averaged over
    ``pool``^3 blocks first (the charge is kept; the Coulomb metric lives at low frequency)."""
    e = err.float()
    if pool > 1:
        e = torch.nn.functional.avg_pool3d(e[:, None], pool)[:, 0]
        spacing = spacing * pool
    shape = e.shape[1:]
    g = _green_fft(tuple(shape), float(spacing), str(e.device))
    ek = torch.fft.rfftn(e, s=[2 * n for n in shape])
    v = torch.fft.irfftn(ek * g, s=[2 * n for n in shape])[:, :shape[0], :shape[1], :shape[2]]
    return (e * v).sum(dim=(1, 2, 3)) * spacing ** 6


def _loss(pred, target, cfg, spacing=None, pool=1):
    """Training loss on delta-rho (e/Bohr^3), in units of 0.01 e/Bohr^3: O(1) numbers;
    plus ``coulomb_weight`` (e|e) / Eh of the error on the grid of ``spacing`` Bohr pooled
    ``pool``-fold when the weight is set."""
    if cfg['loss'] == 'l1':
        loss = (pred - target).abs().mean() * 100
    else:
        # pure L1 (the NMAE itself) barely moved a small network away from zero in a few
        # hundred steps; smooth L1 learns from the start and is L1 for large residuals
        loss = torch.nn.functional.smooth_l1_loss(pred * 100, target * 100,
                                                  beta=cfg['huber_beta'])
    w = float(cfg.get('coulomb_weight') or 0.0)
    if w:
        if spacing is None:
            raise ValueError('coulomb_weight needs the grid spacing')
        err = (pred - target).reshape(-1, *pred.shape[-3:])
        loss = loss + w * coulomb_error(err, spacing, pool).mean()
    return loss


def learning_rate(cfg, step, minutes):
    """The rate of step ``step`` (0-based) after ``minutes`` of training: a cosine from
    ``lr`` to ``min_lr`` over ``steps`` or over ``max_minutes`` (``schedule``), times a linear
    ramp over the first ``warmup_steps``: Adam's first steps move every weight by about the
    rate, which at 3e-4 took a trained model from 1.5 to 6% NMAE in one step."""
    if cfg['schedule'] == 'minutes':
        frac = min(1.0, minutes / cfg['max_minutes'])
    else:
        frac = min(1.0, step / cfg['steps'])
    lr = cfg['min_lr'] + 0.5 * (cfg['lr'] - cfg['min_lr']) * (1 + math.cos(math.pi * frac))
    warm = int(cfg.get('warmup_steps') or 0)
    if step < warm:
        lr *= (step + 1) / warm
    return float(lr)


def _device(cfg):
    if cfg['device'] != 'auto':
        return torch.device(cfg['device'])
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def train(cfg, log=print):
    """Train (or fine-tune, with ``init``) as described by ``cfg``; returns the exported path."""
    if not isinstance(cfg, dict) or '_base' not in cfg:
        cfg = load_config(cfg)
    ddp = int(os.environ.get('WORLD_SIZE', '1')) > 1
    rank = 0
    if ddp:
        import torch.distributed as dist
        backend = 'nccl' if torch.cuda.is_available() else 'gloo'
        dist.init_process_group(backend)
        rank = dist.get_rank()
    if cfg['threads']:
        torch.set_num_threads(int(cfg['threads']))
    device = _device(cfg)
    if ddp and device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    torch.manual_seed(cfg['seed'] + rank)
    mcfg = _model_config(cfg)
    out = _path(cfg, cfg['out'])
    os.makedirs(out, exist_ok=True)
    cdir = cache_dir(cfg, mcfg)
    if rank == 0:
        v0, v1 = cfg['val_range']
        build_cache(cfg, ranges=[[v0, min(v1, v0 + cfg['max_val'])]], progress=False)
    if ddp:
        torch.distributed.barrier()
    # the elements the exported model has seen (the guess switches delta-rho off near others):
    # those of the starting model plus those of the training range
    seen = set(int(z) for z in (mcfg.get('elements') or [])) if cfg.get('init') else set()
    files = _shard_files(cfg)
    for lo, hi in train_ranges(cfg):
        seen |= set(data_elements(files, lo, hi))
    mcfg['elements'] = sorted(seen)
    net = model_mod.build_model(mcfg)
    if cfg.get('init'):
        grown = model_mod.load_grown(net, model_mod.from_pretrained(_init_path(cfg)).state_dict())
        if grown:
            log('new parts of the network (%s) start as the identity' % ', '.join(grown))
    net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg['lr'], weight_decay=cfg['weight_decay'])
    if cfg['schedule'] not in ('steps', 'minutes'):
        raise ValueError("schedule must be 'steps' or 'minutes', not %r" % cfg['schedule'])
    if cfg['schedule'] == 'minutes' and not cfg['max_minutes']:
        raise ValueError("schedule: minutes needs max_minutes")
    if cfg['select'] not in ('val_nmae', 'val_coulomb'):
        raise ValueError("select must be 'val_nmae' or 'val_coulomb', not %r" % cfg['select'])
    step, best, minutes_before = 0, float('inf'), 0.0
    ckpt = os.path.join(out, 'checkpoint.pt')
    if os.path.exists(ckpt):
        st = torch.load(ckpt, map_location='cpu', weights_only=True)
        net.load_state_dict(st['model'])
        opt.load_state_dict(st['opt'])
        step, best = int(st['step']), float(st['best'])
        if cfg['schedule'] == 'minutes':
            minutes_before = float(st.get('minutes', 0.0))
        log('resumed from %s at step %d (best %s %.4g)' % (ckpt, step, cfg['select'], best))
        if st.get('select', 'val_nmae') != cfg['select']:
            # the stored best is in the other score's units: the next validation sets it
            log('select changed from %s to %s: the next validation sets the best checkpoint'
                % (st.get('select', 'val_nmae'), cfg['select']))
            best = float('inf')
    model = net
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == 'cuda' else None)
    amp = (cfg['precision'] == 'auto' and device.type == 'cuda')
    crop, r = int(cfg['crop'] or 0), mcfg['upsample']
    halo = net.halo if cfg['crop_halo'] in (None, 'auto') else int(cfg['crop_halo'])
    if crop and halo < net.halo and rank == 0:
        log('warning: crop_halo %d is below the receptive field (%d coarse voxels): the '
            'scored voxels see zero padding that full boxes do not have' % (halo, net.halo))
    train_keys = _train_keys(cdir, cfg)
    val_keys = cached_keys(cdir, *cfg['val_range'])[:cfg['max_val']]
    if not train_keys:
        raise RuntimeError('no cached training grids in %s: run `densr train --build-cache` '
                           'or let a cache build run first' % cdir)
    sampler = CropSampler(cdir, train_keys, crop, halo, r, cfg['augment'], cfg['seed'] + 1000 * rank + step)
    t_start = time.time() - 60 * minutes_before
    t_run = time.time()
    history = os.path.join(out, 'history.jsonl')

    def set_lr(step):
        for g in opt.param_groups:
            g['lr'] = learning_rate(cfg, step, (time.time() - t_start) / 60)
    set_lr(step)
    net.train()
    while step < cfg['steps']:
        opt.zero_grad(set_to_none=True)
        if crop:
            parts = [sampler.batch(cfg['batch'])]
        else:  # whole boxes differ in shape: one at a time, gradients accumulated
            parts = [sampler.sample_box() for _ in range(cfg['batch'])]
        loss = 0.0
        for x, y in parts:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                pred = model(x)
            core = pred.float()
            if crop:
                core = core[:, halo * r:(halo + crop) * r, halo * r:(halo + crop) * r,
                            halo * r:(halo + crop) * r]
            part = _loss(core, y, cfg, mcfg['spacing'] / r, r) / len(parts)
            part.backward()
            loss = loss + part.detach()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        set_lr(step)
        done = step >= cfg['steps'] or (cfg['max_minutes'] and
                                         time.time() - t_start > 60 * cfg['max_minutes'])
        done = done or bool(cfg['run_minutes'] and time.time() - t_run > 60 * cfg['run_minutes'])
        if ddp and (cfg['max_minutes'] or cfg['run_minutes']):
            # rank 0's clock decides for all: ranks that disagree would wait on each other
            flag = torch.tensor([float(done)], device=device)
            torch.distributed.broadcast(flag, 0)
            done = bool(flag.item())
        if rank == 0 and (step % cfg['val_every'] == 0 or done):
            coul = []
            # the network being trained, one pass: symmetry averaging is an inference option
            nmae, nsad = evaluate_nmae(net, cdir, val_keys, device, coulomb=coul, symmetry=1)
            net.train()
            rec = {'step': step, 'loss': float(loss.detach()), 'val_nmae': nmae, 'sad_nmae': nsad,
                   'val_coulomb': float(np.mean(coul)),
                   'lr': opt.param_groups[0]['lr'], 'minutes': (time.time() - t_start) / 60,
                   'ntrain': len(sampler.keys)}
            log(json.dumps(rec))
            with open(history, 'a') as f:
                f.write(json.dumps(rec) + '\n')
            if rec[cfg['select']] < best:
                best = rec[cfg['select']]
                model_mod.save_model(net, os.path.join(out, 'best'), {
                    'val_nmae': nmae, 'val_sad_nmae': nsad, 'val_coulomb': rec['val_coulomb'],
                    'step': step,
                    'train_range': cfg['train_range'], 'val_range': cfg['val_range'],
                    'test_range': cfg['test_range'], 'data': cfg['data']})
            torch.save({'model': net.state_dict(), 'opt': opt.state_dict(),
                        'step': step, 'best': best,
                        'select': cfg['select'],
                        'minutes': (time.time() - t_start) / 60}, ckpt + '.tmp')
            os.replace(ckpt + '.tmp', ckpt)
            sampler.refresh(_train_keys(cdir, cfg) or sampler.keys)
        if done:
            break
    if ddp:
        torch.distributed.destroy_process_group()
    return os.path.join(out, 'best')


def main_finetune(argv=None):
    """``densr finetune CONFIG``: :func:`train` starting from ``init`` (default: the shipped
    default model), whose architecture and grid settings are kept."""
    return main(argv, finetune=True)


def main(argv=None, finetune=False):
    import argparse
    prog = 'densr finetune' if finetune else 'densr train'
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n')[0])
    p.add_argument('config', help='training config (YAML, TOML or JSON)')
    p.add_argument('--build-cache', action='store_true',
                   help='only compute the grid cache of all ranges, then exit')
    p.add_argument('--evaluate', metavar='MODEL', default=None,
                   help='print the NMAE of MODEL (name or path) on the cached test range '
                        '(and SAD\'s), building missing grids first; no training')
    p.add_argument('--workers', type=int, default=1,
                   help='processes for building grids (--build-cache, --evaluate); each gets '
                        'an equal share of PySCF\'s threads (default 1)')
    p.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE',
                   help='override config entries (values parsed as YAML)')
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    import yaml
    for kv in a.set:
        k, v = kv.split('=', 1)
        cfg[k] = yaml.safe_load(v)
    check_ranges(cfg)
    if finetune and not cfg.get('init'):
        cfg['init'] = model_mod.DEFAULT_MODEL
    if a.build_cache:
        build_cache(cfg, workers=a.workers)
        return
    if a.evaluate:
        net = model_mod.from_pretrained(a.evaluate)
        cfg['model'] = dict(net.config)
        build_cache(cfg, ranges=[cfg['test_range']], progress=False, workers=a.workers)
        keys = cached_keys(cache_dir(cfg, net.config), *cfg['test_range'])
        coul = []
        nmae, nsad = evaluate_nmae(net, cache_dir(cfg, net.config), keys, coulomb=coul)
        print('test range %s: %d molecules, NMAE %.2f%% (SAD %.2f%%), Coulomb error '
              '(e|e) mean %.4f median %.4f Eh (%d network pass(es) averaged over symmetries '
              'of the box: the model\'s "symmetry")' % (
                  cfg['test_range'], len(keys), nmae, nsad, float(np.mean(coul)),
                  float(np.median(coul)), net.config.get('symmetry', 1)))
        return
    train(cfg)


if __name__ == '__main__':
    main()
