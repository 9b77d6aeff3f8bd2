"""NMAE (%) of a model's prediction averaged over symmetries of the box, on cached validation
grids: 1 pass (as shipped), 2 (the box and its inversion), 8 (all axis flips).

    python examples/diagnostics/symmetry_average.py densr-small-v3 [cache/grids/s0.4_m5.669_u2]

Uses the first 16 cached molecules of 400-449 (the validation molecules of training).
"""
import itertools
import sys

import numpy as np
import torch

from pyscf_densr import model as model_mod, train

torch.set_num_threads(1)
net = model_mod.from_pretrained(sys.argv[1])
cdir = sys.argv[2] if len(sys.argv) > 2 else 'cache/grids/s0.4_m5.669_u2'
keys = train.cached_keys(cdir, 400, 450)[:16]
res = {1: [], 2: [], 8: []}
for k in keys:
    sad, delta, meta = train.load_cached(cdir, k)
    dv = (meta['spacing'] / net.config['upsample']) ** 3
    preds = []
    for flips in itertools.product([0, 1], repeat=3):   # (0,0,0) first, (1,1,1) last
        ax = tuple(i for i in range(3) if flips[i])
        x = np.ascontiguousarray(np.flip(sad, ax)) if ax else sad
        p = model_mod.predict(net, x)
        preds.append(np.flip(p, ax) if ax else p)
    for n, sel in ((1, [0]), (2, [0, 7]), (8, range(8))):
        p = np.mean([preds[i] for i in sel], axis=0)
        res[n].append(np.abs(p - delta).sum() * dv / meta['nelectron'] * 100)
for n in res:
    print('%d pass(es): validation NMAE %.3f%% (%d molecules)' % (n, np.mean(res[n]), len(keys)))
