"""Gradient norms of the two loss terms (Huber on delta-rho, and the Coulomb metric (e|e) at
unit weight) for one model on its first N training boxes: how to weigh ``coulomb_weight``.

    python examples/diagnostics/loss_gradients.py [MODEL] [N] [CONFIG]

Defaults: the default model, 8 boxes, examples/train_branch16.yaml (its cache must exist).
"""
import sys

import numpy as np
import torch

from pyscf_densr import model as model_mod, train

torch.set_num_threads(1)
name = sys.argv[1] if len(sys.argv) > 1 else model_mod.DEFAULT_MODEL
n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
cfg = train.load_config(sys.argv[3] if len(sys.argv) > 3 else 'examples/train_branch16.yaml')
net = model_mod.from_pretrained(name)
net.train()
r = net.config['upsample']
cdir = train.cache_dir(cfg, net.config)
params = list(net.parameters())
ratios = []
for key in train.cached_keys(cdir, *cfg['train_range'])[:n]:
    x, y = train.CropSampler(cdir, [key], 0, 0, r, augment=False).sample_box()
    pred = net(x)
    huber = train._loss(pred, y, dict(cfg, coulomb_weight=0.0))
    coul = train.coulomb_error((pred - y).reshape(-1, *pred.shape[-3:]),
                               net.config['spacing'] / r, r).mean()
    norm = [float(torch.sqrt(sum((g ** 2).sum() for g in torch.autograd.grad(
        t, params, retain_graph=True)))) for t in (huber, coul)]
    ratios.append(norm[1] / norm[0])
    print('%s: Huber %.4f (grad norm %.3f); (e|e) %.4f Eh (grad norm %.3f per unit weight); '
          'ratio %.1f' % (key, float(huber.detach()), norm[0], float(coul.detach()), norm[1],
                          ratios[-1]), flush=True)
print('%s: median gradient ratio (e|e) / Huber %.1f over %d boxes'
      % (name, float(np.median(ratios)), len(ratios)))
