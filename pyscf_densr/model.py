"""The super-resolution network, its config, and loading/saving of shipped models.

The network maps the SAD density on a coarse uniform grid (spacing ``config['spacing']``
Bohr) to delta-rho = rho_converged - rho_SAD on the ``config['upsample']``-times finer grid
of the same box. It is fully convolutional, so any box size works; large boxes run in
overlapping tiles (:func:`predict`). This module never imports PySCF.

A model on disk is two files side by side: ``NAME.pt`` (a plain ``state_dict``, loadable
with ``torch.load(weights_only=True)``) and ``NAME.json`` (the config below plus metadata).
"""

import itertools
import json
import math
import os
import copy

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from pyscf_densr.errors import ModelError  # noqa: F401 (raised here, part of this API)

MODEL_DIR = os.path.join(os.path.dirname(__file__), 'models')
DEFAULT_MODEL = 'densr-cpu'
# coarse voxels of one network pass on a GPU: larger boxes run in overlapping tiles
MAX_TILE_VOXELS = 2000000

DEFAULT_CONFIG = {
    'arch': 'ResUpNet3d',
    'channels': 16,         # feature channels of the body
    'blocks': 6,            # residual blocks (two convolutions each)
    'dilations': None,      # per-block dilation (None: all 1); dilated blocks widen the
                            # receptive field at the cost of a plain block
    'kernel': 3,            # cubic kernel edge, voxels
    'coarse_blocks': 0,     # residual blocks of the half-resolution branch (0: none)
    'coarse_channels': 32,  # its channels: at 1/8 of the voxels, twice the channels cost
                            # half of what a full-resolution block does
    'coarse_dilations': None,   # per-block dilation of the branch (None: all 1)
    'upsample': 2,          # output grid is this many times finer than the input grid
    'spacing': 0.4,         # input grid spacing, Bohr
    'margin': 5.669,        # box margin around the atoms, Bohr (3 Angstrom)
    'output': 'relative',   # 'relative': delta-rho = m(rho_SAD upsampled) * output / scale
    'rho_cap': 0.3,         # e/Bohr^3; m(rho) = rho * cap / (rho + cap)
    'target_scale': 10.0,   # 'absolute': delta-rho = output / scale
    'rho_floor': 1e-6,      # e/Bohr^3, floor of the log-density input channel
    'elements': [1, 6, 7, 8],   # atomic numbers seen in training
    'auxbasis': 'def2-universal-jkfit',
}


def input_features(rho, floor=1e-6):
    """The network's input channels from a SAD density (e/Bohr^3), shape (..., X, Y, Z).

    Two transformed scales of one density: rho^(1/4) resolves the valence region, a scaled
    log resolves the tails; both stay O(1) at nuclear cusps.
    """
    rho = rho.clamp(min=0)
    a = rho ** 0.25
    b = (torch.log10(rho + floor) - math.log10(floor)) / 6.0
    return torch.stack([a, b], dim=-4)


def pixel_shuffle_3d(x, r):
    """(B, C*r^3, X, Y, Z) -> (B, C, r*X, r*Y, r*Z)."""
    b, c, nx, ny, nz = x.shape
    c_out = c // r ** 3
    x = x.view(b, c_out, r, r, r, nx, ny, nz)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c_out, nx * r, ny * r, nz * r)


def block_dilations(config, prefix=''):
    """The dilation of each residual block (config ``dilations``, default all 1); with
    ``prefix='coarse_'`` those of the half-resolution branch."""
    n = int(config.get(prefix + 'blocks') or 0)
    d = config.get(prefix + 'dilations')
    if d is None:
        return [1] * n
    d = [int(x) for x in d]
    if len(d) != n or (d and min(d) < 1):
        raise ModelError('model config: %sdilations %r must list one dilation >= 1 per block '
                         '(%sblocks = %d)' % (prefix, d, prefix, n))
    return d


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs on oneDNN on the CPU whatever the box size in inference.

    PyTorch sends a 3D convolution to oneDNN only when batch x channels x the first two
    axes exceed 20480 (``use_mkldnn`` in ATen); below that, QM9-sized boxes (about 30 coarse
    voxels a side) take a slow im2col path, several times slower than oneDNN (0.05 s
    against 0.007 s for one 16-channel layer on a 30x30x34 box, one thread). Training,
    which needs gradients, keeps PyTorch's own choice.
    """

    def forward(self, x):
        if (x.device.type == 'cpu' and x.dtype == torch.float32 and self.padding_mode == 'zeros'
                and not torch.is_grad_enabled() and torch.backends.mkldnn.is_available()):
            return torch.mkldnn_convolution(x.contiguous(), self.weight, self.bias,
                                            self.padding, self.stride, self.dilation,
                                            self.groups)
        return super().forward(x)


class ResBlock(nn.Module):
    """x + conv(act(conv(x))); the second convolution starts at zero, so a new block is
    the identity until trained (a trained model can grow blocks without changing its output)."""

    def __init__(self, channels, kernel, dilation=1):
        super().__init__()
        pad = dilation * (kernel // 2)
        self.conv1 = Conv3d(channels, channels, kernel, padding=pad, dilation=dilation)
        self.conv2 = Conv3d(channels, channels, kernel, padding=pad, dilation=dilation)
        self.act = nn.SiLU()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


class CoarseBranch(nn.Module):
    """Residual blocks at half the resolution, added back to the full-resolution features.

    A stride-2 convolution goes down, :class:`ResBlock` s work on 1/8 of the voxels with more
    channels, a zero-initialised 1x1 convolution and trilinear interpolation come back up: a
    new branch is the identity of the network it is added to. Each axis is padded to an odd
    length first, so the coarse voxels sit exactly on every other fine one, with no
    half-voxel shift (the interpolation is exact there), and the same voxels are sampled
    when an axis of odd length is flipped. The last voxel of an even axis sees the padding
    (vacuum margin, where the relative output is multiplied by rho_SAD ~ 0).
    """

    def __init__(self, channels, coarse_channels, kernel, dilations):
        super().__init__()
        self.down = Conv3d(channels, coarse_channels, kernel, stride=2, padding=kernel // 2)
        self.blocks = nn.Sequential(*[ResBlock(coarse_channels, kernel, d) for d in dilations])
        self.up = Conv3d(coarse_channels, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = nn.SiLU()

    def forward(self, h):
        n = h.shape[-3:]
        pad = []
        for m in reversed(n):
            pad += [0, 1 - m % 2]
        hp = F.pad(h, pad)
        c = self.up(self.act(self.blocks(self.act(self.down(hp)))))
        c = F.interpolate(c, size=hp.shape[-3:], mode='trilinear', align_corners=True)
        return c[..., :n[0], :n[1], :n[2]]


class ResUpNet3d(nn.Module):
    """Residual 3D CNN at the coarse resolution followed by one 3D pixel shuffle."""

    def __init__(self, config):
        super().__init__()
        self.config = dict(config)
        ch, k, r = config['channels'], config['kernel'], config['upsample']
        self.head = Conv3d(2, ch, k, padding=k // 2)
        self.body = nn.Sequential(*[ResBlock(ch, k, d) for d in block_dilations(config)])
        cd = block_dilations(config, 'coarse_')
        self.branch = CoarseBranch(ch, int(config['coarse_channels']), k, cd) if cd else None
        self.tail = Conv3d(ch, ch, k, padding=k // 2)
        self.up = Conv3d(ch, r ** 3, k, padding=k // 2)
        nn.init.zeros_(self.up.weight)   # start from delta-rho = 0, i.e. from SAD
        nn.init.zeros_(self.up.bias)
        self.act = nn.SiLU()

    @property
    def halo(self):
        """Receptive-field radius in coarse voxels: the overlap needed between tiles."""
        k = self.config['kernel'] // 2
        halo = k * (2 * sum(block_dilations(self.config)) + 3)
        if self.branch is not None:
            # down-convolution, two convolutions per coarse block at twice the spacing, and
            # the interpolation; even, so tiles start on the coarse branch's own grid
            halo += k + 4 * k * sum(block_dilations(self.config, 'coarse_')) + 2
            halo += halo % 2
        return halo

    def forward(self, rho_sad):
        """rho_sad: (B, X, Y, Z) e/Bohr^3 -> delta-rho (B, rX, rY, rZ) e/Bohr^3."""
        x = input_features(rho_sad, self.config['rho_floor'])
        h = self.act(self.head(x))
        b = self.body(h)
        if self.branch is not None:
            b = b + self.branch(b)
        h = h + self.tail(b)
        r = self.config['upsample']
        out = pixel_shuffle_3d(self.up(self.act(h)), r)[:, 0] / self.config['target_scale']
        if self.config.get('output', 'absolute') == 'relative':
            # a relative change of the SAD density: zero in vacuum by construction, the same
            # O(0.1) scale in the valence region as in the tails; capped at nuclei, whose
            # huge densities would otherwise dominate the gradients
            rho = F.interpolate(rho_sad.clamp(min=0)[:, None], scale_factor=r,
                                mode='trilinear', align_corners=False)[:, 0]
            cap = self.config.get('rho_cap', 0.3)
            out = out * (rho * cap / (rho + cap))
        return out


ARCHS = {'ResUpNet3d': ResUpNet3d}


def build_model(config=None, **overrides):
    """A freshly initialised network from ``config`` (defaults: :data:`DEFAULT_CONFIG`)."""
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    cfg.update(config or {})
    cfg.update(overrides)
    if cfg['arch'] not in ARCHS:
        raise ModelError('unknown architecture %r (known: %s)' % (cfg['arch'], sorted(ARCHS)))
    return ARCHS[cfg['arch']](cfg)


def _resolve(name_or_path):
    """Paths of (weights, config) for a shipped model name or a path to either file."""
    p = str(name_or_path)
    if os.sep not in p and not p.endswith(('.pt', '.json')):
        p = os.path.join(MODEL_DIR, p)
    stem = p[:-3] if p.endswith('.pt') else p[:-5] if p.endswith('.json') else p
    return stem + '.pt', stem + '.json'


def available_models():
    """Names of the models shipped inside the package."""
    if not os.path.isdir(MODEL_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(MODEL_DIR)
                  if f.endswith('.json') and os.path.exists(os.path.join(MODEL_DIR, f[:-5] + '.pt')))


def from_pretrained(name_or_path=None, device='cpu'):
    """Load a model: a shipped name (see :func:`available_models`) or a path to NAME.pt/.json.

    Raises :class:`ModelError` naming the file when it is missing, corrupt or mismatched.
    """
    if name_or_path is None:
        name_or_path = os.environ.get('PYSCF_DENSR_MODEL', DEFAULT_MODEL)
    wpath, cpath = _resolve(name_or_path)
    for p in (wpath, cpath):
        if not os.path.exists(p):
            raise ModelError('densr model file not found: %s (shipped models: %s)'
                             % (p, ', '.join(available_models()) or 'none'))
    try:
        with open(cpath) as f:
            meta = json.load(f)
        config = meta['config'] if 'config' in meta else meta
    except (ValueError, KeyError, OSError) as e:
        raise ModelError('densr model config %s is not a valid model config: %s' % (cpath, e))
    if config.get('symmetry', 1) not in SYMMETRY_PASSES:
        raise ModelError('densr model config %s: symmetry must be 1, 2, 8 or 48, not %r'
                         % (cpath, config['symmetry']))
    try:
        state = torch.load(wpath, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ModelError('densr model weights %s cannot be read (corrupt or not a '
                         'state_dict): %s' % (wpath, e))
    model = build_model(config)
    try:
        state = dequantize_state(state)
        model.load_state_dict(state)
    except Exception as e:
        raise ModelError('densr model weights %s do not match the architecture in %s: %s'
                         % (wpath, cpath, e))
    for k, v in state.items():
        if torch.is_floating_point(v) and not torch.isfinite(v).all():
            raise ModelError('densr model weights %s contain NaN or inf in %s' % (wpath, k))
    model.meta = meta
    model.path = wpath
    return model.to(device).eval()


QSCALE = '.qscale'


def quantize_state(state):
    """``state`` with every weight of two or more dimensions stored as int8 with one float32
    scale per output channel (key + ``QSCALE``), other tensors as float16: a quarter of the
    float32 size, for shipped files (``densr-gpu``); :func:`from_pretrained` undoes it."""
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if torch.is_floating_point(v) and v.dim() >= 2:
            w = v.float().reshape(v.shape[0], -1)
            scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-30)
            out[k] = torch.round(w / scale[:, None]).to(torch.int8).reshape(v.shape)
            out[k + QSCALE] = scale
        else:
            out[k] = v.half() if torch.is_floating_point(v) else v
    return out


def dequantize_state(state):
    """Float32 weights from a state_dict that :func:`quantize_state` wrote (others pass)."""
    if not any(k.endswith(QSCALE) for k in state):
        return state
    out = {}
    for k, v in state.items():
        if k.endswith(QSCALE):
            continue
        if k + QSCALE in state:
            scale = state[k + QSCALE].float()
            v = v.float() * scale.reshape(-1, *([1] * (v.dim() - 1)))
        out[k] = v
    return out


def _widened(fresh, old):
    """``old`` copied into the leading slice of ``fresh`` (a tensor at least as large in its
    first two dimensions, equal in the others), or None where that is not possible.

    Old output channels get zero weights on the new input channels, so they compute what
    they did; new output channels keep their fresh (random) initialisation, so they carry a
    signal that the zero weights reading it can learn from (two zero sides would never move).
    """
    if fresh.dim() != old.dim() or fresh.shape[2:] != old.shape[2:] or any(
            f < o for f, o in zip(fresh.shape[:2], old.shape[:2])):
        return None
    new = fresh.clone()
    if old.dim() == 1:
        new[:old.shape[0]] = old
    else:
        new[:old.shape[0]] = 0
        new[:old.shape[0], :old.shape[1]] = old
    return new


def load_grown(net, state):
    """Load ``state`` into ``net``, which may have more residual blocks than ``state``, a
    half-resolution branch that ``state`` lacks, or more channels.

    The extra blocks keep their initialisation (the identity, see :class:`ResBlock` and
    :class:`CoarseBranch`); extra channels are added so that no old channel reads them (see
    :func:`_widened`). Either way the grown network computes what the smaller one did.
    Returns the names of the new parts (blocks, 'branch', or 'widened' tensors). Any other
    mismatch raises :class:`ModelError`.
    """
    own = net.state_dict()
    unexpected = [k for k in state if k not in own]
    widened = {k: _widened(own[k], state[k]) for k in state
               if k in own and own[k].shape != state[k].shape}
    # only hidden channels may grow: the input features (head) and the sub-voxels of the
    # pixel shuffle (up; another upsample factor) must match, or the outputs mean other things
    outer = {'head.weight': 1, 'up.weight': 0, 'up.bias': 0}
    bad = [k for k, v in widened.items()
           if v is None or (k in outer and own[k].shape[outer[k]] != state[k].shape[outer[k]])]
    missing = [k for k in own if k not in state]
    if unexpected or bad or any(not k.startswith(('body.', 'branch.')) for k in missing):
        raise ModelError('cannot start from this model: unexpected %s, shape mismatch %s, '
                         'missing %s' % (unexpected, bad, missing))
    state = dict(state)
    state.update(widened)
    net.load_state_dict(state, strict=False)
    # a whole new branch is named 'branch'; blocks added to an existing one 'branch.blocks.N'
    new_branch = 'branch.down.weight' in missing
    names = {'branch' if new_branch and k.startswith('branch.')
             else '.'.join(k.split('.')[:3 if k.startswith('branch.') else 2]) for k in missing}
    if widened:
        names.add('widened')
    # numeric order: branch.blocks.8 before branch.blocks.10
    return sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in n.split('.')])


def save_model(model, path, meta=None):
    """Write ``path``.pt (state_dict) and ``path``.json (config + ``meta``)."""
    wpath, cpath = _resolve(path)
    os.makedirs(os.path.dirname(os.path.abspath(wpath)), exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, wpath)
    doc = dict(meta or {})
    doc['config'] = model.config
    with open(cpath, 'w') as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    return wpath, cpath


SYMMETRY_PASSES = (1, 2, 8, 48)   # the symmetry averages model.predict can make


def box_symmetries(n):
    """The first ``n`` (1, 2, 8 or 48) symmetry operations of a box, as (axis order, flipped
    axes): the identity; then the inversion; then all eight sign changes of the axes; then
    the 48 rotations and reflections of the cube (axis permutations with sign changes)."""
    if n not in SYMMETRY_PASSES:
        raise ValueError('symmetry averaging takes 1, 2, 8 or 48 operations of the box, '
                         'not %r' % (n,))
    flips = sorted(itertools.product((False, True), repeat=3),
                   key=lambda f: (f not in ((False,) * 3, (True,) * 3), f))   # identity, inversion
    ops = [(p, f) for p in itertools.permutations(range(3)) for f in flips]
    return ops[:n]


def apply_symmetry(a, perm, flips):
    """``a`` (X, Y, Z) with its axes reordered by ``perm``, then the ``flips`` axes reversed."""
    a = np.transpose(a, perm)
    for ax in range(3):
        if flips[ax]:
            a = np.flip(a, ax)
    return np.ascontiguousarray(a)


def invert_symmetry(a, perm, flips):
    """The inverse of :func:`apply_symmetry`."""
    for ax in range(3):
        if flips[ax]:
            a = np.flip(a, ax)
    return np.ascontiguousarray(np.transpose(a, np.argsort(perm)))


def _tiles(n, size, halo):
    """Start/stop of the tiles covering range(n): (core0, core1, pad0, pad1)."""
    out = []
    for c0 in range(0, n, size):
        c1 = min(c0 + size, n)
        out.append((c0, c1, max(0, c0 - halo), min(n, c1 + halo)))
    return out


@torch.no_grad()
def predict(model, rho_sad, device=None, max_voxels=None, symmetry=None):
    """delta-rho on the fine grid (numpy float32) from rho_SAD on the coarse grid (numpy).

    Boxes larger than ``max_voxels`` coarse voxels (default :data:`MAX_TILE_VOXELS`) run in
    overlapping tiles whose overlap covers the receptive field, so the result equals the
    untiled one up to float rounding.

    ``symmetry`` (1, 2, 8 or 48; default the model config's ``symmetry``, else 1) averages
    the predictions for that many symmetry operations of the box (:func:`box_symmetries`),
    each mapped back: one network pass each. The average is equivariant under those
    operations, and the network saw all 48 of them in training.
    """
    if symmetry is None:
        symmetry = model.config.get('symmetry', 1)
    ops = box_symmetries(symmetry)
    if len(ops) == 1:
        return _predict_box(model, rho_sad, device, max_voxels)
    rho_sad = np.asarray(rho_sad)
    out = None
    for perm, flips in ops:
        y = invert_symmetry(_predict_box(model, apply_symmetry(rho_sad, perm, flips),
                                         device, max_voxels), perm, flips)
        out = y if out is None else out + y
    out /= len(ops)
    return out


@torch.no_grad()
def _predict_box(model, rho_sad, device=None, max_voxels=None):
    if device is None:
        device = next(model.parameters()).device
    if max_voxels is None:
        max_voxels = MAX_TILE_VOXELS
    r = model.config['upsample']
    x = torch.as_tensor(np.ascontiguousarray(rho_sad), dtype=torch.float32)
    shape = x.shape
    halo = model.halo
    # a tile's core at least as wide as its halo keeps the recomputed overlap bounded
    edge = max(8, halo, int(round(max_voxels ** (1 / 3))) - 2 * halo)
    edge += edge % 2   # even, like the halo: every tile starts on an even voxel
    out = np.empty([n * r for n in shape], dtype=np.float32)
    if np.prod(shape) <= max_voxels:
        tiles = [[(0, n, 0, n)] for n in shape]
    else:
        tiles = [_tiles(n, edge, halo) for n in shape]
    for tx in tiles[0]:
        for ty in tiles[1]:
            for tz in tiles[2]:
                sl = tuple(slice(t[2], t[3]) for t in (tx, ty, tz))
                y = model(x[sl][None].to(device))[0].float().cpu().numpy()
                core = tuple(slice((t[0] - t[2]) * r, (t[1] - t[2]) * r) for t in (tx, ty, tz))
                dst = tuple(slice(t[0] * r, t[1] * r) for t in (tx, ty, tz))
                out[dst] = y[core]
    return out
