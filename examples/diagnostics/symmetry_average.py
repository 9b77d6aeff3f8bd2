"""NMAE (%) and Coulomb error (e|e) of a model's prediction averaged over symmetry operations
of the box (``model.predict(symmetry=n)``: 1 pass, 2 = the box and its inversion, 8 = all axis
flips, 48 = all rotations and reflections of the cube), on cached grids.

    python examples/diagnostics/symmetry_average.py MODEL [--range 400 450] [--max 16]
        [--passes 1 2 8 48] [--cache cache/grids/s0.4_m5.669_u2]

Defaults to the first 16 cached validation molecules of 400-449. One line of JSON per
molecule on stdout, the means at the end.
"""
import argparse
import json

import numpy as np
import torch

from pyscf_densr import model as model_mod, train

ap = argparse.ArgumentParser()
ap.add_argument('model')
ap.add_argument('--range', nargs=2, type=int, default=[400, 450])
ap.add_argument('--max', type=int, default=16)
ap.add_argument('--passes', nargs='+', type=int, default=[1, 2, 8, 48])
ap.add_argument('--cache', default='cache/grids/s0.4_m5.669_u2')
args = ap.parse_args()

torch.set_num_threads(1)
net = model_mod.from_pretrained(args.model)
keys = train.cached_keys(args.cache, *args.range)[:args.max]
ops = model_mod.box_symmetries(max(args.passes))    # each n is a prefix of the longest list
res = {n: [] for n in args.passes}
cou = {n: [] for n in args.passes}
for k in keys:
    sad, delta, meta = train.load_cached(args.cache, k)
    dv = (meta['spacing'] / net.config['upsample']) ** 3
    total = None
    row = {'key': k}
    for i, (perm, flips) in enumerate(ops):
        p = model_mod.invert_symmetry(
            model_mod.predict(net, model_mod.apply_symmetry(sad, perm, flips), symmetry=1),
            perm, flips).astype(np.float64)
        total = p if total is None else total + p
        n = i + 1
        if n in res:
            err = total / n - delta
            res[n].append(np.abs(err).sum() * dv / meta['nelectron'] * 100)
            cou[n].append(float(train.coulomb_error(
                torch.as_tensor(err, dtype=torch.float32)[None], dv ** (1 / 3),
                net.config['upsample'])[0]))
            row['nmae_%d' % n] = round(res[n][-1], 4)
            row['ee_%d' % n] = round(cou[n][-1], 5)
    print(json.dumps(row), flush=True)
for n in args.passes:
    print('%s, %2d pass(es): NMAE %.3f%%, (e|e) mean %.4f median %.4f Eh (%d molecules %d-%d)'
          % (args.model, n, np.mean(res[n]), np.mean(cou[n]), np.median(cou[n]), len(keys),
             *args.range))
