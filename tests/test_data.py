"""Tests of pyscf_densr.data (``densr data``): format, energies, resume, failures, parallel.

Tiny molecules in STO-3G keep the whole file to a few seconds per test on one thread.
"""

import glob
import logging
import os
import shutil

import numpy as np
import pytest

h5py = pytest.importorskip('h5py')
from pyscf.data.nist import BOHR  # noqa: E402

from pyscf_densr import data, grid  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data')
SMILES = ['C', 'O', 'N']
LEVEL = dict(xc='pbe', basis='sto-3g')


def _rdkit():
    pytest.importorskip('rdkit', reason='rdkit is needed to embed SMILES (pip install rdkit)')


def _write(path, lines):
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return str(path)


def _energy_of(g, orth=True):
    """Energy of the stored density, E[D], D = 2 C C^T (or its alpha/beta pair)."""
    mol, dm = data.read_molecule(g, orth=orth)
    f = g.file.attrs
    mf = data.make_scf(mol, f['xc'], f['grids_level'])
    return mf.energy_tot(dm)


def _shards(out):
    return sorted(glob.glob(os.path.join(str(out), '*.h5')))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """C, O, N labelled serially: (smiles file, output folder)."""
    _rdkit()
    d = tmp_path_factory.mktemp('ref')
    src = _write(d / 'tiny_smiles.txt', SMILES)
    out = d / 'out'
    s = data.generate(src, str(out), progress=False, **LEVEL)
    assert s['computed'] == 3 and s['failed'] == 0
    return src, out


def _results(out):
    res = {}
    for fn in _shards(out):
        with h5py.File(fn, 'r') as f:
            for k in f:
                c = f[k]['mo_coeff_occ'][()].astype(float)
                res[k] = (f[k].attrs['e_tot'], c.dot(c.T), f[k]['coords'][()])
    return res


def test_format_and_energy(reference):
    src, out = reference
    files = _shards(out)
    assert [os.path.basename(f) for f in files] == ['tiny_pbe_sto3g_000000.h5']
    with h5py.File(files[0], 'r') as f:
        a = f.attrs
        assert a['xc'] == 'pbe' and a['basis'] == 'sto-3g' and a['units'] == 'bohr'
        assert a['grids_level'] == 2 and a['conv_tol'] == 1e-9 and bool(a['complete'])
        assert isinstance(a['pyscf_version'], str) and 'ETKDG' in a['geometry']
        assert list(a['failed']) == []
        assert sorted(f.keys()) == ['000000', '000001', '000002']
        for k, smi in zip(sorted(f.keys()), SMILES):
            g = f[k]
            assert g['numbers'].dtype == np.int8 and g['coords'].dtype == np.float64
            assert g['mo_coeff_occ'].dtype == np.float32
            assert g['mo_energy_occ'].dtype == np.float64
            natm = g['numbers'].shape[0]
            assert g['coords'].shape == (natm, 3)
            assert g['mo_coeff_occ'].shape[1] == g['mo_energy_occ'].shape[0] == 5
            assert g.attrs['smiles'] == smi and g.attrs['charge'] == 0
            assert g.attrs['spin'] == 0 and g.attrs['perturbed'] == 0
            assert g.attrs['cycles_minao'] > 0
            assert 'name' not in g.attrs
            # raw float32 orbitals: D is not exactly idempotent, E is off at first order
            assert abs(_energy_of(g, orth=False) - g.attrs['e_tot']) < 1e-5
            assert abs(_energy_of(g) - g.attrs['e_tot']) < 1e-8


def test_matches_shared_format(reference):
    shared = sorted(glob.glob(os.path.join(SHARED, 'qm9_pbe_def2svp_*.h5')))
    if not shared:
        pytest.skip('shared data shards not found at %s' % SHARED)
    _, out = reference
    with h5py.File(shared[0], 'r') as ref, h5py.File(_shards(out)[0], 'r') as new:
        assert set(ref.attrs) <= set(new.attrs)
        for k in ref.attrs:
            assert type(ref.attrs[k]) is type(new.attrs[k]), k
        gr, gn = ref[sorted(ref)[0]], new[sorted(new)[0]]
        assert set(gr) == set(gn) and set(gr.attrs) == set(gn.attrs)
        for k in gr:
            assert gr[k].dtype == gn[k].dtype and gr[k].ndim == gn[k].ndim, k
        for k in gr.attrs:
            assert type(gr.attrs[k]) is type(gn.attrs[k]), k


def test_geometry_reproduces_shared():
    _rdkit()
    shared = sorted(glob.glob(os.path.join(SHARED, 'qm9_pbe_def2svp_000000.h5')))
    if not shared:
        pytest.skip('shared data shards not found at %s' % SHARED)
    with h5py.File(shared[0], 'r') as f:
        for k in sorted(f)[:5]:
            g = f[k]
            if g.attrs['perturbed']:
                continue
            geom = data.make_geometry(int(k), g.attrs['smiles'])
            assert list(geom['numbers']) == list(g['numbers'][()])
            assert np.abs(geom['coords'] - g['coords'][()]).max() < 1e-8


def test_cheaper_recipe_keeps_the_labels(reference, tmp_path):
    """Labels from the densr guess with density fitting: the same densities as the reference
    recipe's within data.LABEL_TOLERANCE, the recipe recorded, and not mixed into a shard of
    the reference recipe."""
    src, out = reference
    s = data.generate(src, str(tmp_path), progress=False, guess='densr', density_fit=True,
                      **LEVEL)
    assert s['computed'] == 3 and s['failed'] == 0
    ref, new = _results(out), _results(tmp_path)
    with h5py.File(_shards(tmp_path)[0], 'r') as f:
        assert f.attrs['density_fit'] == 1
        for k in f:
            assert f[k].attrs['cycles_densr'] > 0 and 'cycles_minao' not in f[k].attrs
            mol = data.build_mol(f[k]['numbers'][()], f[k]['coords'][()], 'sto-3g')
            g = grid.make_box(mol.atom_coords(), 0.2, 5.669)
            rho_ref = grid.eval_density(mol, ref[k][1], g)
            rho_new = grid.eval_density(mol, new[k][1], g)
            nmae = abs(rho_new - rho_ref).sum() / rho_ref.sum() * 100
            assert nmae < data.LABEL_NMAE_TOLERANCE
    with pytest.raises(ValueError, match='density_fit'):
        data.generate(src, str(out), progress=False, density_fit=True, retry_failed=True,
                      **LEVEL)
    with pytest.raises(ValueError, match='label guess'):
        data.generate(src, str(tmp_path / 'x'), progress=False, guess='huckel', **LEVEL)


def test_resume(reference, tmp_path, monkeypatch):
    src, out = reference
    out2 = tmp_path / 'out'
    shutil.copytree(str(out), str(out2))
    fn = _shards(out2)[0]

    def boom(*args, **kwargs):
        raise AssertionError('complete shard recomputed')
    monkeypatch.setattr(data, 'compute_molecule', boom)
    os.utime(fn, (1e9, 1e9))
    s = data.generate(src, str(out2), progress=False, **LEVEL)
    assert s['computed'] == 0 and s['skipped'] == 3
    assert os.path.getmtime(fn) == 1e9  # a complete shard is not even opened for writing

    # a partial shard: only the missing molecule is computed
    with h5py.File(fn, 'a') as f:
        del f['000001']
        f.attrs['complete'] = False
        f.create_group('_tmp000001').create_dataset('numbers', data=np.zeros(3, np.int8))
    monkeypatch.undo()
    calls = _count_computed(monkeypatch)
    s = data.generate(src, str(out2), progress=False, **LEVEL)
    assert calls == [1] and s['computed'] == 1 and s['skipped'] == 2
    ref = _results(out)
    new = _results(out2)
    assert abs(new['000001'][0] - ref['000001'][0]) < 1e-10
    with h5py.File(fn, 'r') as f:  # the half-written group of an interrupted run is gone
        assert bool(f.attrs['complete']) and sorted(f) == ['000000', '000001', '000002']


def _count_computed(monkeypatch):
    """Record the indices `data.generate` computes (the molecules it does not skip)."""
    calls = []
    real = data.compute_molecule

    def counted(index, molecule, options=None):
        calls.append(index)
        return real(index, molecule, options)
    monkeypatch.setattr(data, 'compute_molecule', counted)
    return calls


def test_failures_logged_and_skipped(tmp_path, caplog, monkeypatch):
    _rdkit()
    src = _write(tmp_path / 'bad.smi', ['C', 'not_a_smiles((', 'O'])
    out = str(tmp_path / 'out')
    with caplog.at_level(logging.WARNING, logger='pyscf_densr.data'):
        s = data.generate(src, out, progress=False, **LEVEL)
    assert s['computed'] == 2 and s['failed'] == 1
    assert any('000001' in r.getMessage() and 'invalid SMILES' in r.getMessage()
               for r in caplog.records)
    fn = _shards(out)[0]
    assert os.path.basename(fn) == 'bad_pbe_sto3g_000000.h5'
    with h5py.File(fn, 'r') as f:
        assert bool(f.attrs['complete']) and list(f.attrs['failed']) == [1]
        assert 'invalid SMILES' in f.attrs['failed_reasons'][0]
        assert sorted(f) == ['000000', '000002']
    # a resume does not retry it ...
    with h5py.File(fn, 'a') as f:
        f.attrs['complete'] = False
    calls = _count_computed(monkeypatch)
    data.generate(src, out, progress=False, **LEVEL)
    assert calls == []
    # ... unless asked
    data.generate(src, out, progress=False, retry_failed=True, **LEVEL)
    assert calls == [1]


def test_scf_not_converged(tmp_path):
    _rdkit()
    r = data.compute_molecule(0, 'O', dict(LEVEL, max_cycle=1))
    assert not r['ok'] and 'not converged' in r['reason']


def test_dask_local_cluster(reference, tmp_path):
    pytest.importorskip('dask.distributed', reason='dask[distributed] is not installed')
    from dask.distributed import LocalCluster
    src, out = reference
    out2 = str(tmp_path / 'dask')
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        s = data.generate(src, out2, scheduler=cluster.scheduler_address, progress=False,
                          **LEVEL)
    assert s['computed'] == 3
    ref, new = _results(out), _results(out2)
    assert sorted(ref) == sorted(new)
    for k in ref:
        assert abs(ref[k][0] - new[k][0]) < 1e-8
        assert np.abs(ref[k][1] - new[k][1]).max() < 1e-5
        assert np.array_equal(ref[k][2], new[k][2])


def test_cli_processes_and_shards(reference, tmp_path):
    src, out = reference
    out2 = str(tmp_path / 'cli')
    rc = data.main([src, '-o', out2, '--basis', 'sto-3g', '--workers', '2', '--shard-size',
                    '2', '--start', '1', '--stop', '3', '--no-progress'])
    assert rc == 0
    files = [os.path.basename(f) for f in _shards(out2)]
    assert files == ['tiny_pbe_sto3g_000000.h5', 'tiny_pbe_sto3g_000002.h5']
    assert os.path.exists(os.path.join(out2, 'tiny_pbe_sto3g.log'))
    with h5py.File(os.path.join(out2, files[0]), 'r') as f:
        assert sorted(f) == ['000001'] and not f.attrs['complete']  # index 0 not attempted
    with h5py.File(os.path.join(out2, files[1]), 'r') as f:
        assert sorted(f) == ['000002'] and f.attrs['complete']
    ref, new = _results(out), _results(out2)
    for k in new:
        assert abs(ref[k][0] - new[k][0]) < 1e-8


def test_xyz_folder(tmp_path):
    d = tmp_path / 'xyz'
    d.mkdir()
    water = ['O 0.000 0.000 0.117', 'H 0.000 0.757 -0.467', 'H 0.000 -0.757 -0.467']
    _write(d / 'a_water.xyz', ['3', ''] + water)
    _write(d / 'b_frames.xyz', ['2', 'charge=0', 'H 0 0 0', 'H 0 0 0.74',
                                '3', 'multiplicity=2 name=oh2plus charge=1'] + water)
    out = str(tmp_path / 'out')
    s = data.generate(str(d), out, progress=False, **LEVEL)
    assert s['computed'] == 3
    fn = _shards(out)[0]
    assert os.path.basename(fn) == 'xyz_pbe_sto3g_000000.h5'
    with h5py.File(fn, 'r') as f:
        assert sorted(f) == ['000000', '000001', '000002']
        g = f['000000']
        assert list(g['numbers'][()]) == [8, 1, 1]
        xyz = np.array([[float(x) for x in w.split()[1:]] for w in water])
        assert np.allclose(g['coords'][()] * BOHR, xyz, atol=1e-12)
        assert g.attrs['smiles'] == '' and g.attrs['name'] == 'a_water'
        assert f['000001'].attrs['name'] == 'b_frames:0'
        g2 = f['000002']
        assert g2.attrs['charge'] == 1 and g2.attrs['spin'] == 1
        assert 'mo_coeff_occ_a' in g2 and 'mo_coeff_occ' not in g2
        for k in f:
            assert abs(_energy_of(f[k]) - f[k].attrs['e_tot']) < 1e-8


def test_ase_db(tmp_path):
    pytest.importorskip('ase', reason='ase is needed to read ASE databases')
    import ase.db
    from ase import Atoms
    path = str(tmp_path / 'set.db')
    with ase.db.connect(path) as db:
        db.write(Atoms('H2', positions=[[0, 0, 0], [0, 0, 0.74]]))
        db.write(Atoms('HF', positions=[[0, 0, 0], [0, 0, 0.92]]), index=7, smiles='F')
    out = str(tmp_path / 'out')
    data.generate(path, out, progress=False, **LEVEL)
    fn = _shards(out)[0]
    assert os.path.basename(fn) == 'set_pbe_sto3g_000000.h5'
    with h5py.File(fn, 'r') as f:
        assert sorted(f) == ['000001', '000007']  # row id, or the key `index`
        assert f['000007'].attrs['smiles'] == 'F'
        assert np.allclose(f['000001/coords'][1, 2] * BOHR, 0.74)
        assert abs(_energy_of(f['000007']) - f['000007'].attrs['e_tot']) < 1e-8


def test_open_shell_smiles(tmp_path):
    _rdkit()
    out = str(tmp_path / 'out')
    data.generate(['[CH3]'], out, progress=False, **LEVEL)
    with h5py.File(_shards(out)[0], 'r') as f:
        g = f['000000']
        assert g.attrs['spin'] == 1
        assert g['mo_coeff_occ_a'].shape == (8, 5) and g['mo_coeff_occ_b'].shape == (8, 4)
        assert g['mo_energy_occ_a'].dtype == np.float64
        mol, dm = data.read_molecule(g)
        assert dm.shape == (2, 8, 8) and mol.spin == 1
        assert abs(_energy_of(g) - g.attrs['e_tot']) < 1e-8


def test_write_xyz_roundtrip(reference, tmp_path):
    src, out = reference
    path = str(tmp_path / 'geoms.xyz')
    n = data.write_geometries(src, path, start=1, progress=False)
    assert n == 2
    frames = data.read_xyz_source(path)
    assert sorted(frames) == [1, 2] and frames[1]['smiles'] == 'O'
    out2 = str(tmp_path / 'out')
    data.generate(path, out2, progress=False, **LEVEL)
    ref, new = _results(out), _results(out2)
    assert sorted(new) == ['000001', '000002']
    for k in new:
        assert np.abs(ref[k][2] - new[k][2]).max() < 1e-12  # 14 decimals in Angstrom
        assert abs(ref[k][0] - new[k][0]) < 1e-8
    with h5py.File(_shards(out2)[0], 'r') as f:
        assert f['000002'].attrs['smiles'] == 'N'


def test_perturbation():
    _rdkit()
    g0 = data.make_geometry(7, 'CCO')
    g1 = data.make_geometry(7, 'CCO', {'sigma': 0.05})
    g2 = data.make_geometry(7, 'CCO', {'sigma': 0.05})
    assert g0['perturbed'] == 0 and g1['perturbed'] == 1
    assert np.array_equal(g1['coords'], g2['coords'])  # deterministic per (seed, index)
    d = (g1['coords'] - g0['coords']) * BOHR
    assert 0.02 < d.std() < 0.08
    g3 = data.make_geometry(7, 'CCO', {'sigma': 0.05, 'perturb_fraction': 0.0})
    assert g3['perturbed'] == 0 and np.array_equal(g3['coords'], g0['coords'])


def test_prefix_and_cli_dispatch(capsys):
    assert data.default_prefix('x/qm9_smiles.txt') == 'qm9_pbe_def2svp'
    assert data.default_prefix('mols.db', 'hf', 'cc-pVTZ') == 'mols_hf_ccpvtz'
    from pyscf_densr import cli
    with pytest.raises(SystemExit) as e:
        cli.main(['data', '--help'])
    assert e.value.code == 0 and '--scheduler' in capsys.readouterr().out
