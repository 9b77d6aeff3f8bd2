"""NMAE on the 10 held-out S/Cl molecules: raw network, and as the guess uses it (delta-rho
switched off near elements the model has not seen)."""
import sys, glob, json, os, numpy as np, h5py
from pyscf_densr import model as mm, hook, grid, data, train
cfg = train.load_config('examples/finetune_sulfur_chlorine.yaml')
for name in sys.argv[1:]:
    net = mm.from_pretrained(name)
    cdir = train.cache_dir(cfg, net.config)
    rows = []
    for fn, key in train.list_molecules(train._shard_files(cfg), 50, 60):
        with h5py.File(fn, 'r') as f:
            mol, dm = data.read_molecule(f[key])
        sad = np.load(os.path.join(cdir, key + '.sad.npy'))
        delta = np.load(os.path.join(cdir, key + '.delta.npy'))
        box = grid.make_box(mol.atom_coords(), net.config['spacing'], net.config['margin'])
        fine = box.refine(net.config['upsample'])
        pred = mm.predict(net, sad)
        masked = np.array(pred, dtype=np.float64)
        hook._unseen_mask(mol, fine, net.config.get('elements', []), out=masked)
        n = mol.nelectron / fine.dv
        rows.append((np.abs(delta).sum() / n * 100, np.abs(pred - delta).sum() / n * 100,
                     np.abs(masked - delta).sum() / n * 100))
    r = np.mean(rows, axis=0)
    print('%s: elements %s; 10 held-out S/Cl molecules: SAD %.2f%%, network %.2f%%, as the guess uses it %.2f%%'
          % (name, net.config.get('elements'), *r))
