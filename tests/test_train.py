"""Training: grids from shards, crops with symmetry, checkpoints, resume, export, DDP."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyscf_densr import train, model as model_mod


def test_symmetry_keeps_fine_voxels_under_their_coarse_parent():
    rng = np.random.default_rng(0)
    coarse = rng.random((4, 5, 6))
    fine = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    for _ in range(10):
        perm, flips = train.random_symmetry(rng)
        c = model_mod.apply_symmetry(coarse, perm, flips)
        f = model_mod.apply_symmetry(fine, perm, flips)
        assert np.array_equal(f, c.repeat(2, 0).repeat(2, 1).repeat(2, 2))


def test_toml_config_reads_like_yaml(tmp_path):
    pytest.importorskip('tomllib' if sys.version_info >= (3, 11) else 'tomli')
    (tmp_path / 'a.yaml').write_text(
        "data: ['shards/*.h5']\ntrain_range: [0, 40]\nlr: 2.0e-4\n"
        "model:\n  coarse_blocks: 4\n  coarse_dilations: [1, 2, 4, 1]\n")
    (tmp_path / 'a.toml').write_text(
        "data = ['shards/*.h5']\ntrain_range = [0, 40]\nlr = 2.0e-4\n"
        "[model]\ncoarse_blocks = 4\ncoarse_dilations = [1, 2, 4, 1]\n")
    assert train.load_config(str(tmp_path / 'a.toml')) == \
        train.load_config(str(tmp_path / 'a.yaml'))
    (tmp_path / 'b.toml').write_text("learning_rate = 1e-3\n")
    with pytest.raises(ValueError, match='unknown training options: learning_rate'):
        train.load_config(str(tmp_path / 'b.toml'))


@pytest.fixture(scope='module')
def tiny_config(tmp_path_factory, shared_dir):
    out = tmp_path_factory.mktemp('train')
    cfg = {
        'data': [os.path.join(shared_dir, 'data', 'qm9_pbe_def2svp_000000.h5'),
                 os.path.join(shared_dir, 'data', 'qm9_pbe_def2svp_000400.h5')],
        'train_range': [0, 2], 'val_range': [400, 401], 'test_range': [401, 402],
        'cache': str(out / 'cache'), 'out': str(out / 'run'),
        'model': {'channels': 4, 'blocks': 1},
        'steps': 4, 'val_every': 2, 'batch': 2, 'crop': 6, 'crop_halo': 2, 'threads': 1,
    }
    path = out / 'cfg.json'
    path.write_text(json.dumps(cfg))
    train.build_cache(train.load_config(str(path)), progress=False)
    return path


def test_grid_cache_is_consistent(tiny_config):
    cfg = train.load_config(str(tiny_config))
    cdir = train.cache_dir(cfg, train._model_config(cfg))
    assert train.cached_keys(cdir, 0, 2) == ['000000', '000001']
    sad = np.load(os.path.join(cdir, '000000.sad.npy'))
    delta = np.load(os.path.join(cdir, '000000.delta.npy'))
    meta = json.load(open(os.path.join(cdir, '000000.json')))
    assert delta.shape == tuple(2 * n for n in sad.shape)
    # delta-rho integrates to about zero: both densities hold the same electrons
    assert abs(delta.sum() * (meta['spacing'] / 2) ** 3) < 0.2
    # ~N: nuclear cusps are sampled coarsely at 0.4 Bohr (a units slip would be off 6-fold)
    assert sad.sum() * meta["spacing"] ** 3 == pytest.approx(meta["nelectron"], rel=0.15)


def test_parallel_cache_build_matches_serial(tiny_config, tmp_path):
    cfg = train.load_config(str(tiny_config))
    serial = train.cache_dir(cfg, train._model_config(cfg))
    cfg['cache'] = str(tmp_path / 'cache')
    par = train.build_cache(cfg, ranges=[[0, 2]], progress=False, workers=2)
    assert train.cached_keys(par, 0, 2) == ['000000', '000001']
    for key in ('000000', '000001'):
        for part in ('sad', 'delta'):
            a = np.load(os.path.join(serial, '%s.%s.npy' % (key, part)))
            b = np.load(os.path.join(par, '%s.%s.npy' % (key, part)))
            assert np.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_train_resume_and_export(tiny_config):
    cfg = train.load_config(str(tiny_config))
    best = train.train(cfg, log=lambda *a: None)
    run = cfg['out']
    hist = [json.loads(l) for l in open(os.path.join(run, 'history.jsonl'))]
    assert [h['step'] for h in hist] == [2, 4]
    assert all(np.isfinite(h['val_nmae']) for h in hist)
    net = model_mod.from_pretrained(best + '.pt')
    assert net.meta['test_range'] == [401, 402] and net.config['channels'] == 4
    # the model lists exactly the elements of its training molecules
    import h5py
    with h5py.File(cfg['data'][0], 'r') as f:
        seen = set(int(z) for k in ('000000', '000001') for z in f[k]['numbers'][()])
    assert net.config['elements'] == sorted(seen)
    # resume: a longer run continues from the checkpoint rather than from scratch
    cfg['steps'] = 6
    train.train(cfg, log=lambda *a: None)
    hist = [json.loads(l) for l in open(os.path.join(run, 'history.jsonl'))]
    assert [h['step'] for h in hist] == [2, 4, 6]


def test_minutes_schedule_ends_at_min_lr_and_resumes_the_clock(tiny_config, tmp_path):
    """schedule: minutes anneals over max_minutes of wall time: the run stops at min_lr,
    and a resumed run continues the clock instead of restarting the schedule."""
    cfg = train.load_config(str(tiny_config))
    cfg.update(schedule='minutes', max_minutes=0.15, steps=10**6, val_every=3, lr=1e-3,
               min_lr=1e-5, out=str(tmp_path / 'timed'))
    train.train(cfg, log=lambda *a: None)
    hist = [json.loads(l) for l in open(os.path.join(cfg['out'], 'history.jsonl'))]
    assert hist[-1]['lr'] == pytest.approx(1e-5)
    assert hist[0]['lr'] > 1e-5 and hist[-1]['minutes'] >= 0.15
    # resumed with the budget already spent: one step, still at min_lr
    train.train(cfg, log=lambda *a: None)
    more = [json.loads(l) for l in open(os.path.join(cfg['out'], 'history.jsonl'))][len(hist):]
    assert len(more) == 1 and more[0]['step'] == hist[-1]['step'] + 1
    assert more[0]['lr'] == pytest.approx(1e-5)
    with pytest.raises(ValueError, match='needs max_minutes'):
        train.train(dict(cfg, max_minutes=None, out=str(tmp_path / 'x')), log=lambda *a: None)


def test_finetune_starts_from_the_model(tiny_config, tmp_path):
    cfg = train.load_config(str(tiny_config))
    base = model_mod.build_model(channels=4, blocks=1)
    torch.nn.init.normal_(base.up.weight, std=0.01)
    model_mod.save_model(base, str(tmp_path / 'base'))
    cfg.update(init=str(tmp_path / 'base.pt'), out=str(tmp_path / 'ft'), steps=0,
               model={})
    # zero steps: the exported model is the initial one, scored once
    cfg['steps'] = 1
    cfg['lr'] = 1e-12
    best = train.train(cfg, log=lambda *a: None)
    ft = model_mod.from_pretrained(best + '.pt')
    for k, v in base.state_dict().items():
        assert torch.allclose(v, ft.state_dict()[k], atol=1e-8)


def test_ddp_two_process_gloo(tiny_config, tmp_path):
    cfg = json.loads(open(tiny_config).read())
    cfg['out'] = str(tmp_path / 'ddp')
    path = tmp_path / 'ddp.json'
    path.write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                        '--master_port', '29533', '-m', 'pyscf_densr.train', str(path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.exists(tmp_path / 'ddp' / 'best.pt')


def test_whole_box_training_lowers_the_error(tiny_config, tmp_path):
    """crop: 0 trains on whole molecule boxes (what inference sees): a few steps from the
    shipped model on one molecule must lower that molecule's NMAE."""
    cfg = train.load_config(str(tiny_config))
    cfg.update(crop=0, batch=1, steps=12, val_every=12, lr=1e-4, min_lr=1e-4, model={},
               init=model_mod.DEFAULT_MODEL, out=str(tmp_path / 'boxes'), train_range=[0, 1],
               val_range=[0, 1])
    cdir = train.cache_dir(cfg, train._model_config(cfg))
    before, sad = train.evaluate_nmae(model_mod.from_pretrained(), cdir, ['000000'])
    train.train(cfg, log=lambda *a: None)
    hist = [json.loads(l) for l in open(tmp_path / 'boxes' / 'history.jsonl')]
    assert hist[-1]['step'] == 12 and hist[-1]['sad_nmae'] == pytest.approx(sad)
    assert hist[-1]['val_nmae'] < before < sad


def test_crop_halo_defaults_to_the_receptive_field(tiny_config, tmp_path):
    cfg = train.load_config(str(tiny_config))
    cfg.update(crop_halo=1, steps=1, val_every=1, out=str(tmp_path / 'halo'))
    logged = []
    train.train(cfg, log=logged.append)
    assert any('receptive field' in m for m in logged)
    assert train.TRAIN_DEFAULTS['crop_halo'] == 'auto'


def test_coulomb_error_of_two_gaussians_is_analytic():
    """(e|e) of a normalised Gaussian minus another, off-centre: the erf formula."""
    from scipy.special import erf
    h, n = 0.2, 80
    x = (np.arange(n) - n / 2 + 0.5) * h
    X, Y, Z = np.meshgrid(x, x, x, indexing='ij')

    def gauss(a, c):
        return (a / np.pi) ** 1.5 * np.exp(-a * ((X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2))

    def pair(p, q, r):
        mu = np.sqrt(p * q / (p + q))
        return 2 * mu / np.sqrt(np.pi) if r == 0 else erf(mu * r) / r

    c2 = np.array([1.5, 0.3, -0.4])
    e = gauss(1.5, (0, 0, 0)) - gauss(0.8, c2)
    ref = pair(1.5, 1.5, 0) + pair(0.8, 0.8, 0) - 2 * pair(1.5, 0.8, np.linalg.norm(c2))
    got = train.coulomb_error(torch.tensor(e, dtype=torch.float32)[None], h)
    assert float(got[0]) == pytest.approx(ref, rel=0.01)
    # the loss's pooled version keeps the low-frequency part: within 5% here
    got2 = train.coulomb_error(torch.tensor(e, dtype=torch.float32)[None], h, pool=2)
    assert float(got2[0]) == pytest.approx(ref, rel=0.05)
    # zero error, zero
    assert float(train.coulomb_error(torch.zeros(1, 8, 8, 8), h)[0]) == 0.0


def test_coulomb_loss_lowers_the_coulomb_error(tiny_config, tmp_path):
    """coulomb_weight adds (e|e) of the error to the loss: a few whole-box steps with it
    must lower the validation Coulomb error that the history records, and more than the
    same steps without it (a small network built here, from scratch)."""
    cfg = train.load_config(str(tiny_config))
    cfg.update(crop=0, batch=1, steps=8, val_every=8, lr=1e-3, min_lr=1e-3,
               model={'channels': 8, 'blocks': 2}, out=str(tmp_path / 'coul'),
               train_range=[0, 1], val_range=[0, 1], coulomb_weight=5.0, select='val_coulomb')
    cdir = train.cache_dir(cfg, train._model_config(cfg))
    before = []
    train.evaluate_nmae(model_mod.build_model(train._model_config(cfg)), cdir, ['000000'],
                        coulomb=before)
    train.train(cfg, log=lambda *a: None)
    hist = [json.loads(l) for l in open(tmp_path / 'coul' / 'history.jsonl')]
    assert 0 < hist[-1]['val_coulomb'] < before[0]
    train.train(dict(cfg, coulomb_weight=0.0, out=str(tmp_path / 'plain')), log=lambda *a: None)
    plain = [json.loads(l) for l in open(tmp_path / 'plain' / 'history.jsonl')]
    assert hist[-1]['val_coulomb'] < plain[-1]['val_coulomb']
    meta = json.load(open(tmp_path / 'coul' / 'best.json'))
    assert meta['val_coulomb'] == pytest.approx(hist[-1]['val_coulomb'])
    logged = []   # resuming under the other score must not compare it with the stored best
    train.train(dict(cfg, select='val_nmae', steps=9, val_every=1), log=logged.append)
    assert any('select changed' in m for m in logged)
    assert json.load(open(tmp_path / 'coul' / 'best.json'))['step'] == 9
    with pytest.raises(ValueError, match='select'):
        train.train(dict(cfg, select='loss', out=str(tmp_path / 'bad')), log=lambda *a: None)


def test_train_range_list_keeps_held_out_molecules_out(tmp_path):
    """train_range may be a list of ranges (the shards plus labels generated past them);
    none may overlap the validation or test range, whichever way the config arrives."""
    cfg = train.load_config({'train_range': [[0, 400], [500, 1000]]})
    assert train.train_ranges(cfg) == [[0, 400], [500, 1000]]
    assert train.train_ranges(train.load_config({})) == [[0, 400]]
    cdir = tmp_path / 'cache'
    cdir.mkdir()
    for k in (0, 399, 420, 460, 500, 999, 1000):
        (cdir / ('%06d.json' % k)).write_text('{}')
    assert train._train_keys(str(cdir), cfg) == ['000000', '000399', '000500', '000999']
    with pytest.raises(ValueError, match='overlaps val_range'):
        train.load_config({'train_range': [[0, 400], [440, 460]]})
    with pytest.raises(ValueError, match='overlaps test_range'):
        train.load_config({'train_range': [0, 460], 'val_range': [900, 950]})
    with pytest.raises(ValueError, match='train_range must be'):
        train.load_config({'train_range': [[0, 400], [600, 500]]})
    (tmp_path / 'c.yaml').write_text("train_range: [0, 400]\n")
    with pytest.raises(ValueError, match='overlaps test_range'):
        train.main([str(tmp_path / 'c.yaml'), '--set', 'train_range=[[0, 400], [450, 451]]'])


def test_learning_rate_warms_up_then_follows_the_cosine():
    cfg = train.load_config({'lr': 1e-3, 'min_lr': 1e-5, 'steps': 1000, 'warmup_steps': 10})
    cos = lambda f: 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + np.cos(np.pi * f))
    assert train.learning_rate(cfg, 0, 0) == pytest.approx(cos(0) / 10)
    assert train.learning_rate(cfg, 4, 0) == pytest.approx(cos(0.004) / 2)
    assert train.learning_rate(cfg, 10, 0) == pytest.approx(cos(0.01))
    assert train.learning_rate(cfg, 1000, 0) == pytest.approx(1e-5)
    cfg.update(schedule='minutes', max_minutes=20, warmup_steps=0)
    assert train.learning_rate(cfg, 5, 10.0) == pytest.approx(cos(0.5))
    assert train.learning_rate(cfg, 5, 30.0) == pytest.approx(1e-5)


def test_run_minutes_stops_this_run_and_the_next_resumes(tiny_config, tmp_path):
    """run_minutes ends one process's share (a batch job's time slot) with a checkpoint;
    the next run resumes from it, the schedule's clock untouched."""
    cfg = train.load_config(str(tiny_config))
    # shorter than any step, so each run makes exactly one (a tiny step can take < 6 ms)
    cfg.update(run_minutes=1e-9, steps=50, val_every=50, out=str(tmp_path / 'share'))
    train.train(cfg, log=lambda *a: None)
    train.train(cfg, log=lambda *a: None)
    hist = [json.loads(l) for l in open(os.path.join(cfg['out'], 'history.jsonl'))]
    assert [h['step'] for h in hist] == [1, 2]
