"""Where a model's density error sits: NMAE (%) split by the (approximate) converged density of each voxel
(tails, valence, near nuclei), for the model and for SAD alone, on cached grids.

    python examples/diagnostics/error_by_density.py densr-small-v6 [LO HI] [cache dir]

Default molecules 450-461 (the first twelve of the test range; reading them does not tune
anything). The bins add up to the molecule-averaged NMAE of `densr train --evaluate`.
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F

from pyscf_densr import model as model_mod, train

torch.set_num_threads(1)
net = model_mod.from_pretrained(sys.argv[1])
lo, hi = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (450, 462)
cdir = sys.argv[4] if len(sys.argv) > 4 else 'cache/grids/s0.4_m5.669_u2'
keys = train.cached_keys(cdir, lo, hi)
edges = [0, 1e-3, 1e-2, 1e-1, 1, 10, np.inf]     # e/Bohr^3
err = np.zeros(len(edges) - 1)
sad_err = np.zeros(len(edges) - 1)
for k in keys:
    sad, delta, meta = train.load_cached(cdir, k)
    r = net.config['upsample']
    dv = (meta['spacing'] / r) ** 3
    pred = model_mod.predict(net, sad)
    # binning density: SAD interpolated trilinearly to the fine grid (as the network's
    # relative output is scaled) plus delta-rho; rho_conv up to that interpolation error,
    # which is largest at the nuclear peaks (the cache holds no exact rho_conv)
    rho = F.interpolate(torch.from_numpy(sad)[None, None], scale_factor=r, mode='trilinear',
                        align_corners=False)[0, 0].numpy() + delta
    scale = dv / meta['nelectron'] * 100 / len(keys)
    for j in range(len(edges) - 1):
        m = (rho >= edges[j]) & (rho < edges[j + 1])
        err[j] += np.abs(pred - delta)[m].sum() * scale
        sad_err[j] += np.abs(delta)[m].sum() * scale
print('%s, %d molecules (%d-%d)' % (sys.argv[1], len(keys), lo, hi - 1))
print('%-22s %8s %8s' % ('rho_ref / e Bohr^-3', 'model %', 'SAD %'))
for j in range(len(edges) - 1):
    print('%-22s %8.3f %8.3f' % ('[%g, %g)' % (edges[j], edges[j + 1]), err[j], sad_err[j]))
print('%-22s %8.3f %8.3f' % ('total', err.sum(), sad_err.sum()))
