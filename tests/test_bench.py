"""Tests of pyscf_densr.bench (``densr bench``): columns, reference rows, oracle vs control,
resume, plots, inputs and the summaries.

Water and methane at small basis sets keep the file well under two minutes on one thread.
The shipped model may be untrained or retrained at any time: nothing here depends on how good
its prediction is (only that the densr row exists and is filled in).
"""

import csv
import os

import numpy as np
import pytest
from pyscf import gto, scf, dft

from pyscf_densr import bench, cli, hook
from conftest import WATER, SHARED

WATER_XYZ = '3\ncharge=0 name=water\n' + '\n'.join(WATER.split('; ')) + '\n'


def _xyz(tmp_path, name='water.xyz', text=WATER_XYZ):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _read_rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def water_run(tmp_path_factory):
    """One run of the command: water PBE/def2-SVP, minao + the three grid guesses."""
    tmp = tmp_path_factory.mktemp('bench')
    xyz = _xyz(tmp)
    out = tmp / 'rows.csv'
    plots = tmp / 'plots'
    rc = bench.main([xyz, '--levels', 'pbe/def2-svp', '--guesses', 'densr', 'oracle',
                     'control', '--csv', str(out), '--plots', str(plots), '--no-progress',
                     '--threads', '1'])
    assert rc == 0
    return {'csv': str(out), 'plots': str(plots), 'rows': bench.read_csv(str(out))}


def test_csv_has_documented_columns(water_run):
    with open(water_run['csv'], newline='') as f:
        header = next(csv.reader(f))
    assert header == bench.COLUMNS
    rows = water_run['rows']
    # minao is always run first: it is the reference
    assert [r['guess'] for r in rows] == ['minao', 'densr', 'oracle', 'control']
    for r in rows:
        assert r['molecule'] == 'water' and r['level'] == 'pbe/def2-svp'
        assert (r['natm'], r['nao'], r['nelectron']) == (3, 24, 10)
        assert r['threads'] == 1
        assert r['voxels'] > 0 and r['nmae_sad'] > 0
        if not r['error']:
            # water's integrals fit in memory for every guess, minao's copy freed in between
            assert r['jk_route'] == 'incore'
            assert r['total_time'] == pytest.approx(r['guess_time'] + r['scf_time'])
            assert 0.5 < r['proj_score'] < 1.05
            assert r['cycles'] >= 1


def test_minao_row_is_the_reference(water_run):
    ref = water_run['rows'][0]
    assert ref['guess'] == 'minao' and not ref['error']
    assert ref['converged'] and ref['same_state']
    assert ref['dE'] == 0.0
    # minao's density is SAD itself, not idempotent: E[P_SAD] may lie on either side of E_conv
    assert np.isfinite(ref['dE_guess']) and ref['dE_guess'] != 0
    assert ref['nmae_pred'] is None


def test_exact_density_keeps_its_corrected_builds(ethanol):
    """From the exact delta-rho (a perfect network) the coarse builds start about as near
    as the correction to finer grids moves the density; the corrected builds are still made
    (``builds.REFINE_LIMIT``), and the exact density needs no more cycles than delta-rho = 0
    (ethanol, B3LYP/def2-SVP: 4 and 4, 6 where the coarse builds' result was kept)."""
    molecule = {'name': 'ethanol', 'numbers': list(ethanol.atom_charges()),
                'coords': ethanol.atom_coords(), 'charge': 0, 'spin': 0}
    rows = {r['guess']: r for r in bench.bench_molecule(
        molecule, bench.parse_level('b3lyp/def2-svp'), guesses=('minao', 'oracle', 'control'),
        nmae_mode='none')}
    oracle, control = rows['oracle'], rows['control']
    assert oracle['same_state'] and control['same_state']
    assert oracle['cycles'] <= control['cycles'] < rows['minao']['cycles']


def test_oracle_beats_control(water_run):
    """The exact delta-rho never needs more cycles than delta-rho = 0 (water: 5 vs 8)."""
    rows = {r['guess']: r for r in water_run['rows']}
    oracle, control = rows['oracle'], rows['control']
    assert oracle['converged'] and control['converged']
    assert oracle['same_state'] and control['same_state']
    assert oracle['cycles'] <= control['cycles']
    assert oracle['proj_score'] > control['proj_score']
    assert abs(oracle['dE_guess']) < abs(control['dE_guess'])
    assert oracle['nmae_pred'] == pytest.approx(0, abs=1e-8)
    assert control['nmae_pred'] == pytest.approx(control['nmae_sad'])
    densr = rows['densr']
    if not densr['error']:
        assert densr['nmae_pred'] > 0


def test_plots_are_png(water_run):
    names = sorted(os.listdir(water_run['plots']))
    assert names == ['cycles.png', 'guess_time_vs_voxels.png', 'guess_vs_cycle.png',
                     'time_vs_size.png']
    for n in names:
        with open(os.path.join(water_run['plots'], n), 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_guess_plot_shows_the_guess_without_the_scf_setup(water_run, tmp_path, monkeypatch):
    """Where rows record the SCF's DF set-up made inside the guess, guess_vs_cycle.png adds
    the guess without it as its own series."""
    import matplotlib.axes
    series = []
    real = matplotlib.axes.Axes.scatter
    monkeypatch.setattr(matplotlib.axes.Axes, 'scatter', lambda ax, x, y, *a, **k: (
        series.append((k.get('label'), list(y))), real(ax, x, y, *a, **k))[1])
    rows = [dict(r, guess_setup_time=0.25 * r['guess_time']) if r['guess'] == 'densr' else r
            for r in water_run['rows']]
    bench.plot(rows, str(tmp_path))
    d = [r for r in rows if r['guess'] == 'densr'][0]
    own = [y for label, y in series if label and 'without the SCF' in label]
    assert own == [[pytest.approx(0.75 * d['guess_time'])]]


def test_terminal_table(water_run, capsys):
    rows = water_run['rows']
    print(bench.format_rows(rows))
    print(bench.format_summary(bench.summarize(rows)))
    out = capsys.readouterr().out
    assert '== pbe/def2-svp ==' in out
    for g in ('minao', 'densr', 'oracle', 'control'):
        assert g in out


def test_resume_skips_finished_rows(tmp_path, monkeypatch, capsys):
    xyz = _xyz(tmp_path)
    out = str(tmp_path / 'r.csv')
    argv = [xyz, '--levels', 'pbe/sto-3g', 'hf/sto-3g+df', '--guesses', 'minao', 'sap', 'vsap',
            '--csv', out, '--no-progress']
    calls = []
    real = bench.run_scf

    def counting(mf, dm0):
        calls.append(type(mf).__name__)
        return real(mf, dm0)
    monkeypatch.setattr(bench, 'run_scf', counting)
    assert bench.main(argv) == 0
    # vsap needs a DFT level: an error row for HF, not PySCF's silent fallback to minao
    assert len(calls) == 5
    first = _read_rows(out)
    assert len(first) == 6
    vsap_hf = [r for r in first if r['guess'] == 'vsap' and r['level'] == 'hf/sto-3g+df'][0]
    assert 'vsap' in vsap_hf['error'] and vsap_hf['converged'] == '0'

    calls.clear()
    capsys.readouterr()
    assert bench.main(argv + ['--resume']) == 0
    assert calls == []
    assert _read_rows(out) == first
    text = capsys.readouterr().out
    assert '0 new rows (6 from --resume)' in text
    assert '== hf/sto-3g+df ==' in text   # the summary includes the resumed rows

    # an interrupted run: the last row is missing; only the minao reference and it run again
    with open(out, 'w', newline='') as f:
        w = csv.DictWriter(f, bench.COLUMNS)
        w.writeheader()
        w.writerows(r for r in first
                    if not (r['guess'] == 'sap' and r['level'] == 'pbe/sto-3g'))
    assert bench.main(argv + ['--resume']) == 0
    assert len(calls) == 2
    again = _read_rows(out)
    assert len(again) == 6
    keys = [(r['molecule'], r['level'], r['guess']) for r in again]
    assert len(set(keys)) == 6


def test_guesses_beside_the_reference_in_another_process(tmp_path, monkeypatch, capsys):
    """--no-reference runs no minao SCF; the resumed summary compares the rows with the
    minao row another run appended to the same CSV, and finds a wrong state."""
    xyz = _xyz(tmp_path)
    out = str(tmp_path / 'r.csv')
    common = [xyz, '--levels', 'hf/sto-3g', '--csv', out, '--no-progress']
    calls = []
    real = bench.run_scf

    def counting(mf, dm0):
        calls.append(1)
        return real(mf, dm0)
    monkeypatch.setattr(bench, 'run_scf', counting)
    assert bench.main(common + ['--guesses', 'sap', '1e', '--no-reference']) == 0
    assert len(calls) == 2
    rows = bench.read_csv(out)
    assert [r['guess'] for r in rows] == ['sap', '1e']
    assert all(r['dE'] is None and r['proj_score'] is None for r in rows)
    assert bench.main(common + ['--guesses', 'minao', '--resume']) == 0
    assert len(calls) == 3
    capsys.readouterr()
    assert bench.main(common + ['--guesses', 'minao', 'sap', '1e', '--resume',
                                '--markdown']) == 0
    assert len(calls) == 3
    # minao leads the comparison though its row came last
    assert '| cycles minao/sap/1e |' in capsys.readouterr().out
    rows = {r['guess']: r for r in bench.read_csv(out)}
    assert set(rows) == {'minao', 'sap', '1e'}
    for g in ('sap', '1e'):
        assert abs(rows[g]['dE']) < 1e-6 and rows[g]['same_state'] is True
    # a row whose energy is not minao's is not counted as the same state
    bad = bench.read_csv(out)
    bad[1]['e_tot'] += 1e-3
    bad[1]['dE'] = bad[1]['same_state'] = None
    assert bench.compare_with_reference(bad) == 1
    assert bad[1]['same_state'] is False and abs(bad[1]['dE'] - 1e-3) < 1e-9
    assert bench.main(common + ['--guesses', 'control', '--no-reference']) == 2
    assert bench.main(common + ['--guesses', 'nonsense']) == 2
    with pytest.raises(ValueError, match='oracle needs the minao reference'):
        bench.check_guesses(['densr', 'oracle'], reference=False)


def test_smiles_input(capsys):
    pytest.importorskip('rdkit')
    mols = bench.molecules_from_smiles(['C', '[CH3]'], names=['methane', None])
    assert [m['name'] for m in mols] == ['methane', '[CH3]']
    assert [len(m['numbers']) for m in mols] == [5, 4]
    assert [m['spin'] for m in mols] == [0, 1]
    assert bench.main(['--smiles', 'C', '--levels', 'hf/sto-3g', '--guesses', 'minao', '1e',
                       '--no-progress']) == 0
    out = capsys.readouterr().out
    assert 'hf/sto-3g' in out and '1e' in out


def test_drug_set_is_chno_and_sized():
    rdkit = pytest.importorskip('rdkit')  # noqa: F841
    from rdkit import Chem
    sizes = []
    for smi in bench.DRUGS.values():
        m = Chem.AddHs(Chem.MolFromSmiles(smi))
        assert {a.GetSymbol() for a in m.GetAtoms()} <= set('CHNO')
        sizes.append(m.GetNumAtoms())
    assert min(sizes) >= 20 and max(sizes) <= 60


def test_xyz_charge_and_spin(tmp_path):
    _xyz(tmp_path, 'oh.xyz', '2\ncharge=-1\nO 0 0 0\nH 0 0 0.97\n')
    _xyz(tmp_path, 'oh_rad.xyz', '2\n\nO 0 0 0\nH 0 0 0.97\n')
    _xyz(tmp_path, 'o2.xyz', '2\nmultiplicity=3\nO 0 0 0\nO 0 0 1.21\n')
    mols = {m['name']: m for m in bench.molecules_from_xyz(str(tmp_path), charge=0)}
    assert (mols['oh']['charge'], mols['oh']['spin']) == (-1, 0)
    assert (mols['oh_rad']['charge'], mols['oh_rad']['spin']) == (0, 1)
    assert (mols['o2']['charge'], mols['o2']['spin']) == (0, 2)
    # CLI charge applies where the comment line gives none
    m = bench.molecules_from_xyz(str(tmp_path / 'oh_rad.xyz'), charge=1)[0]
    assert (m['charge'], m['spin']) == (1, 0)
    mol = bench.build_mol(m, 'sto-3g')
    assert mol.charge == 1 and mol.spin == 0
    assert np.allclose(mol.atom_coord(1)[2], 0.97 / 0.52917721092, atol=1e-6)


def test_heldout_molecules():
    folder = os.path.join(SHARED, 'data')
    if not os.path.exists(os.path.join(folder, 'qm9_pbe_def2svp_000450.h5')):
        pytest.skip('the held-out shard qm9_pbe_def2svp_000450.h5 is not present')
    mols = bench.molecules_from_heldout(folder, 450, 500, limit=3)
    assert len(mols) == 3
    assert all(m['name'].startswith('qm9_0004') for m in mols)
    idx = [int(m['name'].split('_')[1]) for m in mols]
    assert idx == sorted(idx) and all(450 <= i < 500 for i in idx)
    assert all(m['charge'] == 0 and m['spin'] == 0 for m in mols)


def test_parse_level():
    assert bench.parse_level('pbe/def2-svp') == {
        'name': 'pbe/def2-svp', 'method': 'pbe', 'basis': 'def2-svp', 'df': False,
        'solvent': None}
    lv = bench.parse_level('B3LYP/6-31+G*+df')
    assert (lv['method'], lv['basis'], lv['df']) == ('b3lyp', '6-31+G*', True)
    lv = bench.parse_level('pbe/6-31+G*+df+PCM')
    assert (lv['basis'], lv['df'], lv['solvent']) == ('6-31+G*', True, 'pcm')
    for bad in ('pbe', 'pbe/', '/def2-svp', 'a/b/c', 'pbe/sto-3g+pcm+ddcosmo', 'pbe/sto-3g+df+df'):
        with pytest.raises(ValueError):
            bench.parse_level(bad)
    mol = gto.M(atom=WATER, basis='sto-3g', verbose=0)
    assert isinstance(bench.make_scf(mol, bench.parse_level('hf/sto-3g')), scf.hf.RHF)
    mf = bench.make_scf(mol, bench.parse_level('pbe/sto-3g+df'), grids_level=1)
    assert isinstance(mf, dft.rks.RKS) and mf.grids.level == 1 and hasattr(mf, 'with_df')
    mf = bench.make_scf(mol, bench.parse_level('pbe/sto-3g+df+ddcosmo'))
    assert type(mf.with_solvent).__name__ == 'ddCOSMO' and hasattr(mf, 'with_df')
    # --df-incore keeps the 3-centre tensor; PySCF's default pure-functional DF-J does not,
    # and both give the same energy
    energies = []
    for incore in (False, True):
        m = gto.M(atom=WATER, basis='sto-3g', verbose=0)
        lv = dict(bench.parse_level('pbe/sto-3g+df'), df_incore=incore)
        mf = bench.make_scf(m, lv, grids_level=1)
        energies.append(mf.kernel())
        assert (mf.with_df._cderi is not None) == incore
    assert abs(energies[0] - energies[1]) < 1e-8
    with pytest.raises(ValueError):
        bench.check_guesses(['minao', 'nonsense'])
    assert bench.check_guesses(['SAP', 'minao', 'sap']) == ['minao', 'sap']


def test_scf_stabilisation_keeps_the_answer(tmp_path, monkeypatch):
    """--level-shift / --damp reach every guess's SCF and converge to the same energy."""
    mol = gto.M(atom=WATER, basis='sto-3g', verbose=0)
    lv = bench.parse_level('hf/sto-3g')
    plain = bench.make_scf(mol, lv)
    shifted = bench.make_scf(mol, lv, scf_options={'level_shift': 0.3, 'damp': 0.5,
                                                   'diis_start_cycle': 3})
    assert (shifted.level_shift, shifted.damp, shifted.diis_start_cycle) == (0.3, 0.5, 3)
    assert abs(plain.kernel() - shifted.kernel()) < 1e-8 and shifted.converged
    with pytest.raises(ValueError, match='unknown SCF option'):
        bench.make_scf(mol, lv, scf_options={'levelshift': 0.3})
    out = tmp_path / 'rows.csv'
    made = []
    make_scf = bench.make_scf

    def recording_make_scf(*args, **kwargs):
        made.append(make_scf(*args, **kwargs))
        return made[-1]
    monkeypatch.setattr(bench, 'make_scf', recording_make_scf)
    assert bench.main([_xyz(tmp_path), '--levels', 'hf/sto-3g', '--guesses', 'minao', '1e',
                       '--level-shift', '0.3', '--csv', str(out), '--no-progress']) == 0
    assert [mf.level_shift for mf in made] == [0.3, 0.3]
    rows = _read_rows(str(out))
    assert [r['guess'] for r in rows] == ['minao', '1e']
    for r in rows:
        assert r['converged'] == '1' and abs(float(r['e_tot']) - plain.e_tot) < 1e-8


def test_jk_route_is_recorded(tmp_path, capsys):
    """Too little max_memory for the 4-centre integrals: every guess runs direct, and
    the summary flags molecules whose guesses ran on different routes."""
    out = tmp_path / 'rows.csv'
    assert bench.main([_xyz(tmp_path), '--levels', 'hf/sto-3g', 'hf/sto-3g+df', '--guesses',
                       'minao', '1e', '--max-memory', '1', '--csv', str(out),
                       '--no-progress']) == 0
    rows = bench.read_csv(str(out))
    assert [r['jk_route'] for r in rows] == ['direct', 'direct', 'df-tensor', 'df-tensor']
    assert 'different routes' not in capsys.readouterr().out
    rows[1]['jk_route'] = 'incore'
    assert bench.mixed_jk_routes(rows) == [('water', 'hf/sto-3g')]


@pytest.mark.parametrize('kind', ['rhf', 'uhf'])
def test_projection_score_of_exact_answer_is_one(kind):
    mol = gto.M(atom=WATER, basis='sto-3g', charge=int(kind == 'uhf'),
                spin=int(kind == 'uhf'), verbose=0)
    mf = (scf.RHF if kind == 'rhf' else scf.UHF)(mol).run()
    dm = mf.make_rdm1()
    s = mf.get_ovlp()
    assert bench.projection_score(dm, dm, s, mol.nelectron) == pytest.approx(1, abs=1e-10)
    score = bench.projection_score(dm, mf.get_init_guess(key='1e'), s, mol.nelectron)
    assert score < 1


def test_summary_arithmetic():
    def row(mol, guess, cycles, tg, ts, same=True):
        return dict(molecule=mol, level='x/y', guess=guess, cycles=cycles, converged=True,
                    same_state=same, guess_time=tg, scf_time=ts, total_time=tg + ts,
                    proj_score=None, dE_guess=None, nmae_pred=None, nmae_dm=None,
                    nmae_sad=None, error='')
    rows = [row('a', 'minao', 10, 0.0, 10.0), row('b', 'minao', 20, 0.0, 20.0),
            row('a', 'densr', 5, 1.0, 4.0), row('b', 'densr', 10, 2.0, 8.0, same=False)]
    st = bench.summarize(rows)['x/y']
    assert st['minao']['cycle_reduction'] == 0
    d = st['densr']
    assert d['cycles_mean'] == 7.5 and d['cycles_median'] == 7.5
    assert d['cycle_reduction'] == pytest.approx(50)
    assert d['speedup_median'] == pytest.approx(2.0)      # 10/5 and 20/10
    assert d['speedup_total'] == pytest.approx(30 / 15)
    assert d['same_state_rate'] == 0.5
    assert d['guess_fraction'] == pytest.approx(3 / 15)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(['bench', '--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ('--heldout', '--levels', '--guesses', '--resume', '--plots', '--csv',
                '--smiles', '--charge'):
        assert opt in out
    assert bench.main([]) == 2   # no molecules: a usage error, not a crash


def test_fock_builds_and_memory_columns(water_run, tmp_path):
    """Builds inside the guess count with the SCF's own; PySCF's guesses make none; a
    cycle's time is the SCF's time over its builds, also read back from a CSV."""
    rows = {r['guess']: r for r in water_run['rows']}
    assert rows['minao']['guess_builds'] == 0
    assert rows['minao']['fock_builds'] == rows['minao']['cycles'] + 2
    d = rows['densr']
    n = hook.guess_fock_builds(hook.load_model())
    assert n <= d['guess_builds'] <= n + hook.guess_refine_builds()   # corrected builds
    assert d['fock_builds'] == d['cycles'] + 2 + d['guess_builds']
    assert d['cycle_time'] * (d['cycles'] + 2) == pytest.approx(d['scf_time'], abs=1e-9)
    assert d['peak_mem_mb'] is None or d['peak_mem_mb'] > 50
    path = tmp_path / 'rows.csv'
    bench.write_csv(path, [dict(d, fock_builds=d['cycles'], cycle_time=1.0)])
    back = bench.read_csv(path)[0]
    assert back['fock_builds'] == d['fock_builds']
    assert back['cycle_time'] == pytest.approx(d['cycle_time'])


def test_scf_fock_builds_counts_pyscf_kernel():
    """scf_fock_builds(cycles, converged) is the number of get_veff calls of mf.kernel,
    converged and not, with and without PySCF's extra cycle."""
    mol = gto.M(atom=WATER, basis='sto-3g', verbose=0)
    for max_cycle, conv_check in ((50, True), (50, False), (2, True)):
        mf = scf.RHF(mol)
        mf.max_cycle, mf.conv_check = max_cycle, conv_check
        calls = []
        get_veff = mf.get_veff
        mf.get_veff = lambda *a, **k: calls.append(1) or get_veff(*a, **k)
        mf.kernel()
        assert mf.converged == (max_cycle == 50)
        assert bench.scf_fock_builds(mf.cycles, mf.converged, conv_check) == len(calls)


def test_markdown_table(water_run):
    text = bench.format_markdown(water_run['rows'])
    lines = text.splitlines()
    assert lines[0].startswith('| molecule | level |') and len(lines) == 3
    assert '| water | pbe/def2-svp |' in lines[2] and lines[2].endswith('| yes |')
    assert 'set-up' not in lines[0]   # no DF set-up made in the guess: no such column
    rows = [dict(r, guess_setup_time=1.25) if r['guess'] == 'densr' else r
            for r in water_run['rows']]
    lines = bench.format_markdown(rows).splitlines()
    assert "| of it the SCF's DF set-up / s |" in lines[0]
    assert len(lines[0].split('|')) == len(lines[1].split('|')) == len(lines[2].split('|'))
    assert '| 1.2 |' in lines[2]


def test_reference_integrals_released_before_the_next_guess(tmp_path, monkeypatch):
    """minao's DF tensor (and 4-centre integrals) are freed before the next guess runs, so
    each guess sees the memory a fresh process would."""
    import gc
    from pyscf import df
    molecule = bench.molecules_from_xyz([_xyz(tmp_path)])[0]
    held = []
    make_guess = bench.make_guess

    def spy(mf, guess, *a, **k):
        if guess != 'minao':
            gc.collect()
            held.append([o for o in gc.get_objects() if isinstance(o, df.DF)
                         and o is not getattr(mf, 'with_df', None) and o._cderi is not None])
        return make_guess(mf, guess, *a, **k)
    monkeypatch.setattr(bench, 'make_guess', spy)
    rows = bench.bench_molecule(molecule, bench.parse_level('b3lyp/sto-3g+df'),
                                guesses=['minao', 'atom'], nmae_mode='none')
    assert [r['guess'] for r in rows] == ['minao', 'atom']
    assert rows[0]['jk_route'] == 'df-tensor' and rows[1]['same_state']
    assert held == [[]]
