"""The benchmark: SCF cycles, wall time and guess quality of densr against PySCF's guesses.

    densr bench ../shared/molecules --levels pbe/def2-svp --guesses minao sap densr
    densr bench --heldout ../shared/data --range 450 500 --limit 10 --csv heldout.csv
    densr bench --drugs --levels pbe/def2-svp --guesses minao densr control --plots plots/
    python -m pyscf_densr.bench --smiles CCO --levels hf/cc-pvdz b3lyp/def2-tzvp+df

For every molecule x level x guess one SCF runs from a fresh SCF object (PySCF's default
convergence settings unless ``--conv-tol``/``--max-cycle``/``--grids-level`` say otherwise);
all guesses of one molecule and level run one after another in this process, so their times
are comparable. ``minao`` always runs first: its converged solution is the reference
(energy ``E_conv``, density matrix ``P_conv``) of every other row. For molecules whose SCF
takes hours, ``--no-reference`` runs the other guesses in a second process beside the one
running minao, both appending to one CSV; a later ``--resume`` run prints their comparison:

    densr bench --smiles-file big.smi --guesses minao --csv big.csv &
    densr bench --smiles-file big.smi --guesses densr --no-reference --csv big.csv --resume
    densr bench --smiles-file big.smi --guesses minao densr --csv big.csv --resume

Guesses: PySCF's own (``minao atom huckel mod_huckel sap vsap 1e``; ``vsap`` needs a DFT
level), ``densr`` (:func:`pyscf_densr.init_guess`, the public path), and two references
that use the same projection (:func:`project.density_matrix_from_delta_rho`) on the model's
fine grid:

``oracle``   fed the exact delta-rho = rho[P_conv] - rho[P_SAD]: what a perfect network
             would give; the limit of the projection (undamped: mix 1).
``control``  fed delta-rho = 0: only the projection's Fock build of the SAD density acts,
             damped with the model's ``guess_mix`` like densr; what densr gains over this
             is the network's contribution.

Columns of a row (:data:`COLUMNS`; energies in Hartree, times in seconds, NMAE in percent):

``molecule level guess``     the key (``--resume`` skips rows whose key is in the CSV)
``natm nao nelectron charge spin``
``converged cycles e_tot``   ``mf.converged``, ``mf.cycles``, ``mf.e_tot``
``dE``                       e_tot - e_tot(minao)
``same_state``               converged and |dE| < 1e-6 (:data:`SAME_STATE_TOL`)
``guess_time scf_time total_time``  wall times of making dm0, of ``mf.kernel(dm0)``, and
                             their sum. One-time work that the guess triggers and the SCF
                             then reuses (the 4-centre integrals or DF tensor of its J
                             build, DFT grids) counts in the guess time; total_time is the
                             fair comparison. Loading the network (torch import, weights)
                             happens once per process before any timing.
``guess_setup_time``         of guess_time, the seconds the densr pipeline spent making the
                             SCF's own DF tensor or direct DF-J state, which the SCF then
                             reuses instead of making it (blank for PySCF's guesses)
``guess_builds fock_builds`` Fock builds made inside the guess (densr, oracle, control: as
                             the guess reports them, the model's ``guess_fock_builds`` or
                             fewer where it prices them on the SCF's direct DF-J route
                             (``docs/method.md``, step 7), plus one exchange
                             build for methods with exact exchange; PySCF's guesses and a
                             densr guess that handed over to minao: 0), and the total
                             with the SCF's own (:func:`scf_fock_builds`: one a cycle and
                             two more): the count a guess cannot hide builds from
``cycle_time``               scf_time / the SCF's Fock builds: one SCF cycle of this run,
                             seconds (its set-up, grids or integrals, spread over them)
``peak_mem_mb``              the process's peak resident memory during guess and SCF (MB;
                             Linux VmHWM, reset before each row; blank elsewhere)
``proj_score``               Tr(P_conv S P_guess S) / N_electrons (Lehtola, JCTC 2019), spin
                             blocks summed (a restricted P counts as P/2 per spin), so 1 is
                             the exact answer
``dE_guess``                 E[P_guess] - E_conv (``mf.energy_tot(dm0)``; not timed)
``nmae_sad``                 NMAE of rho[P_SAD] against rho[P_conv] on the model's fine grid
``nmae_pred``                NMAE of the grid density the projection was fed, rho_SAD +
                             delta-rho: densr (the network), oracle (0 by construction),
                             control (= nmae_sad); blank for PySCF's guesses
``nmae_dm``                  NMAE of rho[P_guess] (after projection/diagonalisation), every
                             guess; only with ``--nmae-dm`` (one density evaluation per row)
``voxels``                   points of the model's fine grid for this molecule
``threads``                  ``pyscf.lib.num_threads()`` during the run
``jk_route``                 how the SCF built J/K: ``incore`` (4-centre integrals held in
                             memory, PySCF's choice when nao**4 bytes fit in ``max_memory``
                             beside what the process already uses), ``direct`` (recomputed
                             every cycle), ``df-tensor`` (PySCF's DF tensor, built once:
                             PySCF's choice with exact exchange, and what the densr guess
                             builds and leaves to the SCF) or ``df-direct`` (PySCF's direct
                             DF-J of a pure functional: 3-centre passes every cycle).
                             Guesses of one molecule are only
                             comparable in time on the same route; the summary says when not
``error``                    why the row has no result (the guess or the SCF raised)

NMAE = sum |rho - rho_ref| / sum rho_ref * 100 on the fine grid (design.md). The grids are
evaluated only when a densr/oracle/control row or ``--nmae-dm`` needs them (``--no-nmae``
skips the NMAE columns of densr rows; oracle and control still need rho[P_conv]).

Summaries per level and guess (:func:`summarize`): mean and median cycles, cycle reduction
against minao (100 (1 - sum cycles / sum cycles of minao) over the molecules both have),
wall-time speedup against minao (median over molecules of t_minao / t_guess, and
sum t_minao / sum t_guess, total times), same-state rate, guess-time fraction
(sum guess_time / sum total_time), mean projection score, median E[P_guess] - E_conv and
mean NMAE.
"""

import argparse
import csv
import gc
import glob
import math
import os
import sys
import time

import numpy as np
from pyscf import gto, lib

from pyscf_densr import hook

SAME_STATE_TOL = 1e-6   # Hartree
PYSCF_GUESSES = {
    'minao': 'init_guess_by_minao',
    'atom': 'init_guess_by_atom',
    'huckel': 'init_guess_by_huckel',
    'mod_huckel': 'init_guess_by_mod_huckel',
    'sap': 'init_guess_by_sap',
    'vsap': 'init_guess_by_vsap',
    '1e': 'init_guess_by_1e',
    'hcore': 'init_guess_by_1e',
}
GRID_GUESSES = ('densr', 'oracle', 'control')
GUESSES = tuple(PYSCF_GUESSES) + GRID_GUESSES
DEFAULT_GUESSES = ('minao', 'atom', 'huckel', 'sap', 'vsap', '1e', 'densr', 'oracle', 'control')
HELDOUT_RANGE = (450, 500)  # test split of the shipped models (shared/data shard 000450)

COLUMNS = ['molecule', 'level', 'guess', 'natm', 'nao', 'nelectron', 'charge', 'spin',
           'converged', 'cycles', 'e_tot', 'dE', 'same_state',
           'guess_time', 'guess_setup_time', 'scf_time', 'total_time', 'guess_builds',
           'fock_builds', 'cycle_time',
           'peak_mem_mb',
           'proj_score', 'dE_guess', 'nmae_sad', 'nmae_pred', 'nmae_dm',
           'voxels', 'threads', 'jk_route', 'error']
_INT = ('natm', 'nao', 'nelectron', 'charge', 'spin', 'cycles', 'voxels', 'threads',
        'guess_builds', 'fock_builds')
_BOOL = ('converged', 'same_state')
_STR = ('molecule', 'level', 'guess', 'jk_route', 'error')

# Well-known drug molecules (C, H, N, O only: the elements the shipped models were trained
# on), 20 to 57 atoms with hydrogens; ``--drugs`` benchmarks them.
DRUGS = {
    'paracetamol': 'CC(=O)Nc1ccc(O)cc1',
    'aspirin': 'CC(=O)Oc1ccccc1C(=O)O',
    'caffeine': 'Cn1cnc2c1c(=O)n(C)c(=O)n2C',
    'nicotine': 'CN1CCC[C@H]1c1cccnc1',
    'ibuprofen': 'CC(C)Cc1ccc(cc1)C(C)C(=O)O',
    'morphine': 'CN1CC[C@]23c4c5ccc(O)c4O[C@H]2[C@@H](O)C=C[C@H]3[C@H]1C5',
    'testosterone': 'C[C@]12CC[C@H]3[C@@H](CCC4=CC(=O)CC[C@]34C)[C@@H]1CC[C@@H]2O',
    'tamoxifen': 'CC/C(=C(\\c1ccccc1)c1ccc(OCCN(C)C)cc1)c1ccccc1',
}


# --------------------------------------------------------------------------------------------
# molecules: dicts with name, numbers, coords (Bohr), charge, spin (None: by electron parity)

def _spin_of(numbers, charge, spin):
    return (int(sum(numbers)) - int(charge)) % 2 if spin is None else int(spin)


def molecules_from_xyz(paths, charge=0, spin=None):
    """Molecules of xyz files (Angstrom): files, folders (their ``*.xyz``) or glob patterns.

    A comment line ``charge=Q spin=S`` (or ``multiplicity=M``) sets the molecule's charge and
    spin; else ``charge``/``spin`` apply (spin None: 0 or 1 by electron count). A file with
    several frames gives ``name:k`` per frame.
    """
    from pyscf_densr import data
    out = []
    for p in ([paths] if isinstance(paths, str) else paths):
        files = data.xyz_files(p)
        if not files:
            raise FileNotFoundError('no xyz files at %s' % p)
        for path in files:
            frames = data.read_xyz(path)
            stem = os.path.splitext(os.path.basename(path))[0]
            for k, fr in enumerate(frames):
                info = fr['info']
                s = info.get('spin')
                if s is None and 'multiplicity' in info:
                    s = int(info['multiplicity']) - 1
                s = spin if s is None else s
                q = int(info.get('charge', charge) or 0)
                out.append({'name': stem if len(frames) == 1 else '%s:%d' % (stem, k),
                            'numbers': list(fr['numbers']), 'coords': fr['coords'],
                            'charge': q, 'spin': _spin_of(fr['numbers'], q, s)})
    return out


def molecules_from_smiles(smiles, names=None, seed=0):
    """Molecules from SMILES: RDKit ETKDG (``randomSeed=seed``) + MMFF94, hydrogens added.

    Charge and spin come from the SMILES (formal charges, radical electrons).
    """
    from pyscf_densr import data
    from pyscf.data.nist import BOHR
    out = []
    for i, smi in enumerate(smiles):
        numbers, xyz, charge, spin = data.geometry_from_smiles(smi, seed)
        name = names[i] if names and names[i] else smi
        out.append({'name': name, 'numbers': list(numbers),
                    'coords': np.asarray(xyz) / BOHR, 'charge': int(charge),
                    'spin': _spin_of(numbers, charge, spin)})
    return out


def molecules_from_heldout(folder, start=HELDOUT_RANGE[0], stop=HELDOUT_RANGE[1],
                           limit=None):
    """Molecules of the training shards (``*.h5`` in ``folder``) with index in [start, stop).

    Only the geometry, charge and spin are used; every level recomputes its own reference.
    Names are ``{set}_{index}``, e.g. ``qm9_000450``. ``limit`` keeps the first N by index.
    """
    import h5py
    found = []
    files = sorted(glob.glob(os.path.join(folder, '*.h5')))
    if not files:
        raise FileNotFoundError('no *.h5 shards in %s' % folder)
    for path in files:
        prefix = os.path.basename(path).split('_')[0]
        with h5py.File(path, 'r') as f:
            for key in f:
                if not key.isdigit() or not start <= int(key) < stop:
                    continue
                g = f[key]
                if 'numbers' not in g or 'coords' not in g:
                    continue
                numbers = [int(z) for z in g['numbers'][()]]
                q = int(g.attrs.get('charge', 0))
                found.append((int(key), {
                    'name': '%s_%s' % (prefix, key), 'numbers': numbers,
                    'coords': np.asarray(g['coords'][()], dtype=float), 'charge': q,
                    'spin': _spin_of(numbers, q, g.attrs.get('spin'))}))
    found.sort(key=lambda t: t[0])
    out = [m for _, m in found]
    return out[:limit] if limit else out


def _unique_names(molecules):
    seen = {}
    for m in molecules:
        n = m['name']
        if n in seen:
            seen[n] += 1
            m['name'] = '%s#%d' % (n, seen[n])
        else:
            seen[n] = 0
    return molecules


def build_mol(molecule, basis, verbose=0, max_memory=None):
    """PySCF Mole of a molecule dict (coordinates in Bohr) in ``basis``; ``max_memory`` in
    MB (default PySCF's, 4000 or ``PYSCF_MAX_MEMORY``)."""
    mol = gto.M(atom=[(int(z), tuple(float(x) for x in r))
                      for z, r in zip(molecule['numbers'], molecule['coords'])],
                unit='Bohr', basis=basis, charge=int(molecule.get('charge') or 0),
                spin=_spin_of(molecule['numbers'], molecule.get('charge') or 0,
                              molecule.get('spin')),
                verbose=verbose)
    if max_memory:
        mol.max_memory = float(max_memory)
    return mol


# --------------------------------------------------------------------------------------------
# levels and SCF objects

# implicit solvents of a level (``+pcm``: PySCF's IEF-PCM, water)
SOLVENTS = {'pcm': 'PCM', 'ddcosmo': 'ddCOSMO'}


def parse_level(text):
    """``'method/basis[+df][+pcm|+ddcosmo]'`` -> dict(name, method, basis, df, solvent).

    ``method`` is ``hf`` (RHF, or UHF for open shells), ``rohf``/``uhf``, or an XC functional
    (RKS, or UKS for open shells); ``+df`` asks for density fitting (PySCF's default auxiliary
    basis); ``+pcm`` or ``+ddcosmo`` an implicit solvent (PySCF's defaults: water). Examples:
    ``pbe/def2-svp``, ``b3lyp/def2-tzvp+df``, ``hf/cc-pvdz``, ``pbe/def2-svp+df+pcm``.
    """
    name = text.strip()
    body, tags = name, []
    while '+' in body and body.rsplit('+', 1)[1].strip().lower() in ('df', *SOLVENTS):
        body, tag = body.rsplit('+', 1)   # basis names hold '+' too (6-31+G*)
        tags.append(tag.strip().lower())
    form = 'level %r is not METHOD/BASIS[+df][+pcm|+ddcosmo], e.g. pbe/def2-svp' % text
    solvents = [t for t in tags if t in SOLVENTS]
    if body.count('/') != 1 or len(solvents) > 1 or tags.count('df') > 1:
        raise ValueError(form)
    method, basis = (s.strip() for s in body.split('/'))
    if not method or not basis:
        raise ValueError(form)
    return {'name': name, 'method': method.lower(), 'basis': basis, 'df': 'df' in tags,
            'solvent': solvents[0] if solvents else None}


SCF_OPTIONS = ('level_shift', 'damp', 'diis_start_cycle')


def make_scf(mol, level, grids_level=None, conv_tol=None, max_cycle=None, df_auxbasis=None,
             scf_options=None):
    """A fresh SCF object for ``level`` (a :func:`parse_level` dict); PySCF's defaults.

    ``df_auxbasis`` replaces PySCF's default fitting basis of ``+df`` levels.
    ``scf_options`` sets SCF attributes of :data:`SCF_OPTIONS` (``level_shift`` in Eh,
    ``damp``, ``diis_start_cycle``) for molecules whose SCF needs stabilising; the benchmark
    gives every guess the same ones.
    """
    from pyscf import scf, dft
    method = level['method']
    if method in ('hf', 'rhf', 'uhf', 'rohf'):
        if method == 'rohf':
            mf = scf.ROHF(mol)
        elif method == 'uhf' or mol.spin:
            mf = scf.UHF(mol)
        else:
            mf = scf.RHF(mol)
    else:
        mf = dft.UKS(mol, xc=method) if mol.spin else dft.RKS(mol, xc=method)
        if grids_level is not None:
            mf.grids.level = int(grids_level)
    if level.get('df'):
        mf = mf.density_fit(auxbasis=df_auxbasis)
        if level.get('df_incore'):
            # PySCF >= 2.3 recomputes the 3-centre integrals in every J build of a pure
            # functional (direct DF-J); this keeps the tensor instead (memory or disk,
            # by max_memory), built in the first cycle and counted in the SCF time
            mol.incore_anyway = True
    if level.get('solvent'):
        mf = getattr(mf, SOLVENTS[level['solvent']])()
    if conv_tol is not None:
        mf.conv_tol = float(conv_tol)
    if max_cycle is not None:
        mf.max_cycle = int(max_cycle)
    for key, value in (scf_options or {}).items():
        if key not in SCF_OPTIONS:
            raise ValueError('unknown SCF option %r (known: %s)' % (key, ' '.join(SCF_OPTIONS)))
        if value is not None:
            setattr(mf, key, value)
    mf.verbose = mol.verbose
    return mf


def run_scf(mf, dm0):
    """``mf.kernel(dm0)``; returns its wall time in seconds."""
    t0 = time.perf_counter()
    mf.kernel(dm0)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# metrics

def _spin_blocks(dm):
    dm = np.asarray(dm)
    return (dm * .5, dm * .5) if dm.ndim == 2 else (dm[0], dm[1])


def projection_score(dm_conv, dm_guess, s, nelectron):
    """Tr(P_conv S P_guess S) / N (dimensionless; 1 for the exact density matrix).

    Spin blocks are summed; a restricted (nao, nao) density matrix in PySCF's convention
    (occupations 2) counts as P/2 per spin, i.e. Tr(P_conv S P_guess S) / (2N).
    """
    ps = [a.dot(s) for a in _spin_blocks(dm_conv)]
    gs = [b.dot(s) for b in _spin_blocks(dm_guess)]
    return float(sum(np.einsum('ij,ji->', a, b) for a, b in zip(ps, gs))) / nelectron


def nmae(rho, rho_ref):
    """sum |rho - rho_ref| / sum rho_ref, in percent (both on the same uniform grid)."""
    return float(np.abs(np.asarray(rho) - rho_ref).sum() / np.asarray(rho_ref).sum() * 100)


def _total(dm):
    dm = np.asarray(dm)
    return dm.sum(axis=0) if dm.ndim == 3 else dm


def reference_grids(mol, dm_conv, dm_sad, config):
    """rho[P_conv] and rho[P_SAD] (e/Bohr^3) on the model's fine grid, and that grid.

    The grid is the one :func:`hook.predict_delta_rho` writes: the box of ``config``
    (``spacing``, ``margin``, Bohr) refined ``upsample`` times.
    """
    from pyscf_densr import grid as grid_mod
    box = grid_mod.make_box(mol.atom_coords(), config['spacing'], config['margin'])
    fine = box.refine(config['upsample'])
    rho_conv = grid_mod.eval_density(mol, _total(dm_conv), fine)
    rho_sad = grid_mod.eval_density(mol, _total(dm_sad), fine)
    return {'grid': fine, 'rho_conv': rho_conv, 'rho_sad': rho_sad}


# --------------------------------------------------------------------------------------------
# guesses

def make_guess(mf, guess, ref=None, model=None, device=None, exchange=None):
    """The initial density matrix ``guess`` for ``mf``; returns (dm0, seconds, info).

    ``ref`` (from :func:`reference_grids`) is needed by ``oracle``; ``model`` is a loaded
    network (:func:`pyscf_densr.load_model`) for densr/oracle/control. ``info`` holds the
    grid density the projection was fed (``rho_pred``, e/Bohr^3) when there is one.
    """
    mol = mf.mol
    info = {}
    if guess in PYSCF_GUESSES:
        fn = getattr(mf, PYSCF_GUESSES[guess], None)
        if fn is None:
            raise ValueError('guess %r is not available for %s (vsap needs a DFT level)'
                             % (guess, type(mf).__name__))
        t0 = time.perf_counter()
        dm = fn(mol)
        return dm, time.perf_counter() - t0, info
    if guess == 'densr':
        import pyscf_densr
        made = {}
        t0 = time.perf_counter()
        dm = pyscf_densr.init_guess(mf, model=model, device=device, exchange=exchange,
                                    fallback='error', details=made)
        dt = time.perf_counter() - t0
        if 'delta_rho' in made:
            info['delta'], info['grid'] = made['delta_rho'], made['grid']
        info['guess_builds'] = made.get('fock_builds', 0)
        info['guess_setup_time'] = made.get('scf_setup_time')
        return dm, dt, info
    if guess in ('oracle', 'control'):
        from pyscf_densr import project
        fine = ref['grid']
        if guess == 'oracle':
            delta = ref['rho_conv'] - ref['rho_sad']
        else:
            delta = np.zeros(fine.shape)
        t0 = time.perf_counter()
        dm_sad = mf.init_guess_by_minao(mol)
        # control is the densr pipeline with the network off, damping, grid level and
        # corrected builds included; the oracle stands for a perfect network, which needs
        # no damping (mix 1)
        mix = 1.0 if guess == 'oracle' else hook.guess_mix(model)
        made = {}
        dm = project.density_matrix_from_delta_rho(
            mf, delta, fine, dm_sad=dm_sad, auxbasis=model.config.get('auxbasis'),
            exchange=exchange or 'auto', mix=mix, grids_level=hook.guess_grids_level(model),
            fock_builds=hook.guess_fock_builds(model), price_builds=True,
            refine_builds=hook.guess_refine_builds(), details=made)
        info['guess_builds'] = made['fock_builds']
        info['guess_setup_time'] = made.get('scf_setup_time')
        dt = time.perf_counter() - t0
        info['delta'], info['grid'] = delta, fine
        return dm, dt, info
    raise ValueError('unknown guess %r (known: %s)' % (guess, ' '.join(GUESSES)))


# --------------------------------------------------------------------------------------------
# the run

def scf_fock_builds(cycles, converged, conv_check=True):
    """Fock builds of ``mf.kernel``: one of dm0 before its first cycle, one a cycle, and,
    once converged, one in PySCF's extra cycle (``conv_check``)."""
    return int(cycles) + 1 + int(bool(converged and conv_check))


def _count_builds(row, conv_check=True):
    """``fock_builds`` and ``cycle_time`` of a row from its cycles, guess builds and SCF
    time (also for CSVs written before they counted the SCF's own builds)."""
    if row.get('cycles') is None or row.get('scf_time') is None:
        return row
    n = scf_fock_builds(row['cycles'], row.get('converged'), conv_check)
    row['fock_builds'] = n + (row.get('guess_builds') or 0)
    row['cycle_time'] = row['scf_time'] / n
    return row


def _blank_row(molecule, level, guess, mol):
    row = dict.fromkeys(COLUMNS)
    row.update(molecule=molecule['name'], level=level['name'], guess=guess, natm=mol.natm,
               nao=mol.nao, nelectron=mol.nelectron, charge=mol.charge, spin=mol.spin,
               threads=lib.num_threads(), error='')
    return row


def _jk_route(mf):
    with_df = getattr(mf, 'with_df', None)
    if with_df is not None:
        return 'df-tensor' if getattr(with_df, '_cderi', None) is not None else 'df-direct'
    return 'incore' if getattr(mf, '_eri', None) is not None else 'direct'


def _reset_peak_memory():
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def _peak_memory():
    """Peak resident memory since :func:`_reset_peak_memory`, MB (None off Linux)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _short_error(e):
    msg = '%s: %s' % (type(e).__name__, e)
    return ' '.join(msg.split())[:200]


def bench_molecule(molecule, level, guesses=DEFAULT_GUESSES, model=None, device=None,
                   exchange=None, done=(), nmae_mode='pred', grids_level=None, conv_tol=None,
                   max_cycle=None, verbose=0, on_row=None, df_auxbasis=None,
                   max_memory=None, scf_options=None, reference=True):
    """Rows (dicts of :data:`COLUMNS`) of one molecule at one level, every guess in turn.

    ``minao`` runs first as the reference. Guesses whose (molecule, level, guess) key is in
    ``done`` are skipped (the minao reference still runs if any other guess is left).
    ``reference=False`` runs no minao SCF: the rows leave ``dE``, ``same_state``,
    ``proj_score`` and ``dE_guess`` blank for :func:`compare_with_reference` (oracle and
    control, which need the converged density, are refused).
    ``model`` is a loaded network, a name or None (the default model) for
    densr/oracle/control. ``nmae_mode``: ``'pred'``
    (NMAE of the grid densities), ``'dm'`` (also of rho[P_guess] for every guess) or
    ``'none'``. ``on_row(row)`` is called as each row is finished. ``df_auxbasis``,
    ``scf_options`` and ``max_memory`` (MB) go to :func:`make_scf` and :func:`build_mol`.
    """
    order = check_guesses(guesses, reference)
    todo = [g for g in order if (molecule['name'], level['name'], g) not in done]
    if not reference:
        todo = [g for g in todo if g != 'minao']
    if not todo:
        return []
    mol = build_mol(molecule, level['basis'], verbose, max_memory)
    rows = []

    def emit(row):
        rows.append(row)
        if on_row is not None:
            on_row(row)

    def scf(guess, ref=None):
        gc.collect()  # earlier guesses' SCF objects, so PySCF sees the same free memory
        mf = make_scf(mol, level, grids_level, conv_tol, max_cycle, df_auxbasis,
                      scf_options)
        row = _blank_row(molecule, level, guess, mol)
        dm0, info = None, {}
        _reset_peak_memory()
        try:
            dm0, row['guess_time'], info = make_guess(mf, guess, ref, model, device, exchange)
            row['scf_time'] = run_scf(mf, dm0)
            row['peak_mem_mb'] = _peak_memory()
        except Exception as e:  # a failed guess is a result, not the end of the benchmark
            row['error'] = _short_error(e)
            row['converged'] = False
            row['same_state'] = False
            return mf, row, dm0, info
        row['total_time'] = row['guess_time'] + row['scf_time']
        row['jk_route'] = _jk_route(mf)
        row['converged'] = bool(mf.converged)
        row['cycles'] = int(mf.cycles)
        row['e_tot'] = float(mf.e_tot)
        row['guess_builds'] = info.get('guess_builds', 0)
        row['guess_setup_time'] = info.get('guess_setup_time')
        _count_builds(row, mf.conv_check)
        return mf, row, dm0, info

    if not reference:
        for g in todo:
            emit(scf(g)[1])
        return rows
    mf_ref, row_ref, dm_sad, _ = scf('minao')
    if row_ref['error']:
        for g in todo:
            row = _blank_row(molecule, level, g, mol)
            row.update(error='minao reference failed: ' + row_ref['error'],
                       converged=False, same_state=False)
            emit(row)
        return rows
    e_conv = row_ref['e_tot']
    dm_conv = mf_ref.make_rdm1()
    s = mf_ref.get_ovlp()
    # oracle and control need the fine grid (and oracle rho[P_conv]); the NMAE columns need
    # both densities. Evaluated outside every timing.
    grids = None
    if ('oracle' in todo or 'control' in todo or nmae_mode == 'dm'
            or (nmae_mode == 'pred' and 'densr' in todo)):
        if model is None or isinstance(model, (str, os.PathLike)):
            model = warm_model(model, device)
        grids = reference_grids(mol, dm_conv, dm_sad, model.config)
        nmae_sad = nmae(grids['rho_sad'], grids['rho_conv'])

    def finish(mf, row, dm0, info):
        if not row['error']:
            row['dE'] = row['e_tot'] - e_conv
            row['same_state'] = bool(row['converged'] and row_ref['converged']
                                     and abs(row['dE']) < SAME_STATE_TOL)
            row['proj_score'] = projection_score(dm_conv, dm0, s, mol.nelectron)
            try:
                row['dE_guess'] = float(mf.energy_tot(dm0)) - e_conv
            except Exception as e:  # the row keeps its SCF result; only this column is blank
                print('densr bench: E[P_guess] of %s %s %s failed: %s' % (
                    row['molecule'], row['level'], row['guess'], _short_error(e)),
                    file=sys.stderr)
        if grids is not None:
            row['voxels'] = grids['grid'].size
            if nmae_mode != 'none':
                row['nmae_sad'] = nmae_sad
                if 'delta' in info and tuple(info['grid'].shape) == grids['grid'].shape:
                    row['nmae_pred'] = nmae(grids['rho_sad'] + info['delta'],
                                            grids['rho_conv'])
            if nmae_mode == 'dm' and dm0 is not None:
                from pyscf_densr import grid as grid_mod
                row['nmae_dm'] = nmae(grid_mod.eval_density(mol, _total(dm0), grids['grid']),
                                      grids['rho_conv'])
        emit(row)

    if 'minao' in todo:
        finish(mf_ref, row_ref, dm_sad, {})
    # PySCF keeps the 4-centre integrals or the DF tensor in memory only while they fit
    # in max_memory beside the process's memory; minao's, held on, would push the next
    # guesses of a borderline molecule to a slower route (a DF tensor on disk)
    mf_ref._eri = None
    if getattr(mf_ref, 'with_df', None) is not None:
        mf_ref.with_df.reset()
    for g in todo:
        if g == 'minao':
            continue
        finish(*scf(g, grids))
    return rows


def bench(molecules, levels, guesses=DEFAULT_GUESSES, model=None, device=None, exchange=None,
          done=(), nmae_mode='pred', grids_level=None, conv_tol=None, max_cycle=None,
          verbose=0, on_row=None, progress=False, df_auxbasis=None, max_memory=None,
          scf_options=None, reference=True):
    """Rows of every molecule x level (x guess); see :func:`bench_molecule`.

    ``levels`` are strings (``'pbe/def2-svp'``) or :func:`parse_level` dicts; ``model`` a
    shipped name, a path or a loaded network (loaded and warmed up here, before any timing).
    """
    levels = [parse_level(lv) if isinstance(lv, str) else lv for lv in levels]
    guesses = check_guesses(guesses, reference)
    tasks = [(m, lv) for m in molecules for lv in levels]
    left = [(m['name'], lv['name'], g) for m, lv in tasks for g in guesses
            if (m['name'], lv['name'], g) not in done]
    net = None
    if any(g in GRID_GUESSES for *_, g in left) or (left and nmae_mode == 'dm'):
        net = warm_model(model, device)
    bar = _progress(len(tasks), progress)
    rows = []
    try:
        for m, lv in tasks:
            if bar is not None:
                bar.set_postfix_str('%s %s' % (m['name'][:24], lv['name']))
            rows += bench_molecule(m, lv, guesses, net, device, exchange, done, nmae_mode,
                                   grids_level, conv_tol, max_cycle, verbose, on_row,
                                   df_auxbasis, max_memory, scf_options, reference)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return rows


def compare_with_reference(rows):
    """Fill ``dE`` and ``same_state`` of rows made without the reference in their process
    (``--no-reference``) from the minao row of the same molecule and level, where there is
    one; returns the number of rows filled."""
    ref = {(r['molecule'], r['level']): r for r in rows
           if r['guess'] == 'minao' and not r.get('error') and r.get('e_tot') is not None}
    n = 0
    for r in rows:
        a = ref.get((r['molecule'], r['level']))
        if (a is None or r['guess'] == 'minao' or r.get('error') or r.get('e_tot') is None
                or r.get('dE') is not None):
            continue
        r['dE'] = r['e_tot'] - a['e_tot']
        r['same_state'] = bool(r['converged'] and a['converged']
                               and abs(r['dE']) < SAME_STATE_TOL)
        n += 1
    return n


def check_guesses(guesses, reference=True):
    """Lower-cased guess names, validated, minao first, no duplicates. Without the minao
    reference in the process (``reference=False``) oracle and control, which need its
    converged density, are refused."""
    out = []
    for g in guesses:
        g = g.lower()
        if g not in GUESSES:
            raise ValueError('unknown guess %r (known: %s)' % (g, ' '.join(GUESSES)))
        if not reference and g in ('oracle', 'control'):
            raise ValueError('%s needs the minao reference in its process' % g)
        if g not in out:
            out.append(g)
    return ['minao'] + [g for g in out if g != 'minao']


def warm_model(model=None, device=None):
    """Load the network once and run it on a tiny box, so no timing includes the torch
    import, the weight loading or first-call set-up."""
    import pyscf_densr
    from pyscf_densr import model as model_mod
    net = pyscf_densr.load_model(model, device)
    model_mod.predict(net, np.full((8, 8, 8), 1e-3))
    return net


def _progress(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc='densr bench', unit='mol-level', dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# summaries

def _f(rows, key):
    return [r[key] for r in rows if r.get(key) is not None and not
            (isinstance(r[key], float) and math.isnan(r[key]))]


def _mean(x):
    return float(np.mean(x)) if len(x) else None


def _median(x):
    return float(np.median(x)) if len(x) else None


def summarize(rows):
    """{level: {guess: stats}}: per-level statistics of every guess (see module docstring).

    Speedups and the cycle reduction compare a guess with minao on the molecules where both
    have a finished row (unconverged runs count with their ``cycles``, i.e. ``max_cycle``).
    """
    out = {}
    for level in dict.fromkeys(r['level'] for r in rows):
        lrows = [r for r in rows if r['level'] == level]
        minao = {r['molecule']: r for r in lrows if r['guess'] == 'minao'
                 and not r.get('error')}
        out[level] = {}
        for guess in dict.fromkeys(r['guess'] for r in lrows):
            g = [r for r in lrows if r['guess'] == guess]
            ok = [r for r in g if not r.get('error')]
            pair = [(minao[r['molecule']], r) for r in ok if r['molecule'] in minao]
            cyc = _f(ok, 'cycles')
            st = {'n': len(g), 'errors': len(g) - len(ok),
                  'converged': sum(bool(r['converged']) for r in g),
                  'cycles_mean': _mean(cyc), 'cycles_median': _median(cyc)}
            c0 = sum(a['cycles'] for a, _ in pair)
            st['cycle_reduction'] = (100 * (1 - sum(b['cycles'] for _, b in pair) / c0)
                                     if pair and c0 else None)
            ratios = [a['total_time'] / b['total_time'] for a, b in pair if b['total_time']]
            st['speedup_median'] = _median(ratios)
            t_b = sum(b['total_time'] for _, b in pair)
            st['speedup_total'] = sum(a['total_time'] for a, _ in pair) / t_b if t_b else None
            st['same_state_rate'] = (sum(bool(r['same_state']) for r in g) / len(g)
                                     if g else None)
            tt = sum(_f(ok, 'total_time'))
            st['guess_fraction'] = sum(_f(ok, 'guess_time')) / tt if tt else None
            st['guess_time_mean'] = _mean(_f(ok, 'guess_time'))
            st['fock_builds_mean'] = _mean(_f(ok, 'fock_builds'))
            f0 = sum(a.get('fock_builds') or 0 for a, _ in pair)
            st['build_reduction'] = (
                100 * (1 - sum(b.get('fock_builds') or 0 for _, b in pair) / f0)
                if pair and f0 else None)
            st['total_time_sum'] = tt
            st['proj_score_mean'] = _mean(_f(ok, 'proj_score'))
            st['dE_guess_median'] = _median(_f(ok, 'dE_guess'))
            st['nmae_pred_mean'] = _mean(_f(ok, 'nmae_pred'))
            st['nmae_dm_mean'] = _mean(_f(ok, 'nmae_dm'))
            st['nmae_sad_mean'] = _mean(_f(ok, 'nmae_sad'))
            out[level][guess] = st
    return out


# --------------------------------------------------------------------------------------------
# tables, CSV, plots

def _fmt(v, spec):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return '-'
    if isinstance(v, bool):
        return 'yes' if v else 'no'
    return format(v, spec)


def _table(header, lines):
    w = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: '  '.join(str(c).rjust(n) for c, n in zip(cells, w))  # noqa: E731
    return '\n'.join([fmt(header), fmt(['-' * n for n in w])] + [fmt(ln) for ln in lines])


def format_rows(rows):
    """A plain-text table of the rows (one line per molecule x level x guess)."""
    header = ['molecule', 'level', 'guess', 'natm', 'nao', 'conv', 'cycles', 'builds',
              'dE/Eh', 'same', 't_guess/s', 't_scf/s', 't_cycle/s', 't_total/s', 'MB', 'proj', 'E[Pg]-E/Eh', 'nmae%', 'sad%',
              'error']
    lines = []
    for r in rows:
        nm = r.get('nmae_pred')
        lines.append([r['molecule'][:28], r['level'], r['guess'], r['natm'], r['nao'],
                      _fmt(r['converged'], ''), _fmt(r['cycles'], 'd'),
                      _fmt(r.get('fock_builds'), 'd'), _fmt(r['dE'], '.1e'),
                      _fmt(r['same_state'], ''), _fmt(r['guess_time'], '.2f'),
                      _fmt(r['scf_time'], '.2f'), _fmt(r.get('cycle_time'), '.2f'),
                      _fmt(r['total_time'], '.2f'), _fmt(r.get('peak_mem_mb'), '.0f'),
                      _fmt(r['proj_score'], '.5f'), _fmt(r['dE_guess'], '.2e'),
                      _fmt(nm, '.2f'), _fmt(r.get('nmae_sad') if nm is not None else None,
                                            '.2f'), (r.get('error') or '')[:40]])
    return _table(header, lines)


def format_summary(summary):
    """A plain-text table per level of :func:`summarize`'s statistics.

    ``nmae%`` is the grid density fed to the projection (densr/oracle/control), ``sad%`` the
    SAD density's NMAE on the same molecules, ``dm%`` that of rho[P_guess] (``--nmae-dm``).
    """
    pct = lambda v: None if v is None else 100 * v  # noqa: E731
    out = []
    for level, per in summary.items():
        with_dm = any(st['nmae_dm_mean'] is not None for st in per.values())
        header = ['guess', 'n', 'err', 'conv', 'cyc mean', 'cyc med', 'cyc -%', 'builds',
                  'builds -%', 'speedup med', 'speedup tot', 'same %', 'guess %', 'proj', 'E[Pg]-E med',
                  'nmae%', 'sad%'] + (['dm%'] if with_dm else [])
        lines = []
        for guess, st in per.items():
            ln = [guess, st['n'], st['errors'], st['converged'],
                  _fmt(st['cycles_mean'], '.2f'), _fmt(st['cycles_median'], '.1f'),
                  _fmt(st['cycle_reduction'], '.1f'), _fmt(st['fock_builds_mean'], '.2f'),
                  _fmt(st['build_reduction'], '.1f'), _fmt(st['speedup_median'], '.2f'),
                  _fmt(st['speedup_total'], '.2f'), _fmt(pct(st['same_state_rate']), '.0f'),
                  _fmt(pct(st['guess_fraction']), '.1f'), _fmt(st['proj_score_mean'], '.4f'),
                  _fmt(st['dE_guess_median'], '.2e'), _fmt(st['nmae_pred_mean'], '.2f'),
                  _fmt(st['nmae_sad_mean'] if st['nmae_pred_mean'] is not None else None,
                       '.2f')]
            if with_dm:
                ln.append(_fmt(st['nmae_dm_mean'], '.2f'))
            lines.append(ln)
        out.append('== %s ==\n%s' % (level, _table(header, lines)))
    return '\n\n'.join(out)


def format_markdown(rows):
    """A Markdown table, one line per molecule x level: cycles and Fock builds of every guess
    (slash-separated, in the order of the rows), densr's guess time against one SCF cycle of
    minao's run, total times, densr's speedup and peak memory, and whether every guess
    landed in minao's state."""
    guesses = list(dict.fromkeys(r['guess'] for r in rows))
    keys = list(dict.fromkeys((r['molecule'], r['level']) for r in rows))
    by = {(r['molecule'], r['level'], r['guess']): r for r in rows}
    g = '/'.join(guesses)
    # the SCF's set-up inside the guess, where the rows have it (older CSVs do not)
    setup = any(r.get('guess_setup_time') for r in rows if r['guess'] == 'densr')
    lines = ['| molecule | level | atoms | nao | cycles %s | Fock builds %s | densr guess / s '
             '%s| one minao cycle / s | total %s / s | densr speedup | densr peak MB | '
             'same state |' % (g, g, '| of it the SCF\'s DF set-up / s ' if setup else '', g),
             '| --- | --- | ---: | ---: | --- | --- | ---: | %s---: | --- | ---: | ---: | --- |'
             % ('---: | ' if setup else '')]
    for mol, lv in keys:
        rr = [by.get((mol, lv, x)) for x in guesses]
        ok = [r for r in rr if r is not None and not r.get('error')]
        if not ok:
            continue
        m, d = by.get((mol, lv, 'minao')), by.get((mol, lv, 'densr'))

        def cell(key, spec):
            return '/'.join(_fmt(r.get(key) if r is not None and not r.get('error') else None,
                                 spec) for r in rr)
        speed = (m['total_time'] / d['total_time'] if m and d and not d.get('error')
                 and d.get('total_time') else None)
        lines.append('| %s | %s | %d | %d | %s | %s | %s | %s%s | %s | %s | %s | %s |' % (
            mol, lv, ok[0]['natm'], ok[0]['nao'], cell('cycles', 'd'), cell('fock_builds', 'd'),
            _fmt(d.get('guess_time') if d else None, '.1f'),
            _fmt(d.get('guess_setup_time') if d else None, '.1f') + ' | ' if setup else '',
            _fmt(m.get('cycle_time') if m else None, '.1f'), cell('total_time', '.0f'),
            _fmt(speed, '.2f'), _fmt(d.get('peak_mem_mb') if d else None, '.0f'),
            'yes' if all(r['guess'] == 'minao' or r.get('same_state') for r in ok) else 'no'))
    return '\n'.join(lines)


def mixed_jk_routes(rows):
    """(molecule, level) keys whose guesses' SCFs built J/K by different routes, other than
    the DF tensor that the grid guesses build for a density-fitted SCF (by design)."""
    routes = {}
    for r in rows:
        route = r.get('jk_route')
        if route:
            if route.startswith('df') and r['guess'] in GRID_GUESSES:
                continue
            routes.setdefault((r['molecule'], r['level']), set()).add(route)
    return sorted(k for k, v in routes.items() if len(v) > 1)


def _csv_value(v):
    if v is None:
        return ''
    if isinstance(v, bool):
        return '1' if v else '0'
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _parse_value(key, text):
    if text is None or text == '':
        return '' if key in _STR else None
    if key in _STR:
        return text
    if key in _BOOL:
        return text.strip().lower() in ('1', 'true', 'yes')
    if key in _INT:
        return int(float(text))
    return float(text)


def read_csv(path):
    """Rows of a benchmark CSV, typed (ints, floats, bools; blanks are None)."""
    with open(path, newline='') as f:
        return [_count_builds({k: _parse_value(k, r.get(k)) for k in COLUMNS})
                for r in csv.DictReader(f)]


def write_csv(path, rows):
    """Write ``rows`` to ``path`` (header :data:`COLUMNS`)."""
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_csv_value(r.get(k)) for k in COLUMNS])


class CsvAppender:
    """Appends each finished row to a CSV at once (so ``--resume`` loses nothing)."""

    def __init__(self, path, rows=()):
        self.path = path
        write_csv(path, rows)

    def __call__(self, row):
        with open(self.path, 'a', newline='') as f:
            csv.writer(f).writerow([_csv_value(row.get(k)) for k in COLUMNS])


def _save_loglog(plt, fig, ax, xlabel, ylabel, folder, name):
    """Log-log axes, labels and legend; the figure saved as ``folder/name`` (returned)."""
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(folder, name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(rows, folder):
    """PNG figures of ``rows`` in ``folder``; returns their paths.

    ``cycles.png``: SCF cycles per guess (box plot, one panel per level).
    ``time_vs_size.png``: total time (filled) and guess time (open) against basis size.
    ``guess_vs_cycle.png``: guess time of densr/oracle/control (open: less the SCF's DF
    set-up it made, where recorded) and the time of one SCF cycle (minao's run) against
    atoms, log-log.
    ``guess_time_vs_voxels.png``: guess time of densr/oracle/control against fine-grid points.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    os.makedirs(folder, exist_ok=True)
    rows = [r for r in rows if not r.get('error') and r.get('cycles') is not None]
    levels = list(dict.fromkeys(r['level'] for r in rows))
    guesses = list(dict.fromkeys(r['guess'] for r in rows))
    colors = {g: plt.cm.tab10(i % 10) for i, g in enumerate(guesses)}
    paths = []
    if not levels:
        return paths
    n = len(levels)

    fig, axes = plt.subplots(1, n, figsize=(max(5, 1.0 * len(guesses) + 1) * n, 4),
                             squeeze=False)
    for ax, lv in zip(axes[0], levels):
        gs = [g for g in guesses if any(r['level'] == lv and r['guess'] == g for r in rows)]
        data = [[r['cycles'] for r in rows if r['level'] == lv and r['guess'] == g] for g in gs]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(gs) + 1))
        ax.set_xticklabels(gs, rotation=30)
        for i, d in enumerate(data):
            ax.scatter(np.full(len(d), i + 1) + np.random.default_rng(i).uniform(-.15, .15,
                                                                                  len(d)),
                       d, s=8, color=colors[gs[i]], alpha=.6, zorder=3)
        ax.set_title(lv)
        ax.set_ylabel('SCF cycles')
    fig.tight_layout()
    paths.append(os.path.join(folder, 'cycles.png'))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
    for ax, lv in zip(axes[0], levels):
        for g in guesses:
            rr = [r for r in rows if r['level'] == lv and r['guess'] == g]
            if not rr:
                continue
            x = [r['nao'] for r in rr]
            ax.scatter(x, [r['total_time'] for r in rr], color=colors[g], label=g, s=18)
            ax.scatter(x, [max(r['guess_time'], 1e-4) for r in rr], facecolors='none',
                       edgecolors=colors[g], marker='s', s=18)
        ax.scatter([], [], color='k', s=18, label='filled: total (guess + SCF)')
        ax.scatter([], [], facecolors='none', edgecolors='k', marker='s', s=18,
                   label='open: guess alone')
        ax.set_xlabel('basis functions (nao)')
        ax.set_ylabel('wall time / s')
        ax.set_yscale('log')
        ax.set_title(lv)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(os.path.join(folder, 'time_vs_size.png'))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for g in guesses:
        rr = [r for r in rows if r['guess'] == g and r.get('cycle_time')]
        if g in GRID_GUESSES and rr:
            ax.scatter([r['natm'] for r in rr], [max(r['guess_time'], 1e-4) for r in rr],
                       color=colors[g], marker='s', s=18, label='%s: guess' % g)
            own = [r for r in rr if r.get('guess_setup_time')]
            if own:
                ax.scatter([r['natm'] for r in own],
                           [max(r['guess_time'] - r['guess_setup_time'], 1e-4) for r in own],
                           facecolors='none', edgecolors=colors[g], marker='s', s=18,
                           label="%s: guess without the SCF's DF set-up" % g)
        if g == 'minao' and rr:
            ax.scatter([r['natm'] for r in rr], [r['cycle_time'] for r in rr], color='k',
                       s=18, label='one SCF cycle (minao run)')
    paths.append(_save_loglog(plt, fig, ax, 'atoms', 'wall time / s', folder,
                              'guess_vs_cycle.png'))

    vox = [r for r in rows if r['guess'] in GRID_GUESSES and r.get('voxels')]
    if vox:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for g in GRID_GUESSES:
            for lv in levels:
                rr = [r for r in vox if r['guess'] == g and r['level'] == lv]
                if rr:
                    ax.scatter([r['voxels'] for r in rr], [r['guess_time'] for r in rr],
                               color=colors.get(g), s=18,
                               marker='o' if lv == levels[0] else 'x',
                               label='%s %s' % (g, lv))
        paths.append(_save_loglog(plt, fig, ax, 'fine-grid points', 'guess time / s', folder,
                                  'guess_time_vs_voxels.png'))
    return paths


# --------------------------------------------------------------------------------------------
# command line

def _parser():
    p = argparse.ArgumentParser(
        prog='densr bench',
        description='SCF cycles, wall time and guess quality of the densr guess against '
                    "PySCF's guesses (and the oracle/control references of the projection).",
        epilog='Examples:\n'
               '  densr bench ../shared/molecules --levels pbe/def2-svp\n'
               '  densr bench --heldout ../shared/data --range 450 500 --limit 10 '
               '--csv heldout.csv --resume\n'
               '  densr bench --drugs --guesses minao sap densr control --plots plots/\n'
               'Set OMP_NUM_THREADS (or --threads) for the number of cores PySCF and torch use.',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group('molecules')
    src.add_argument('inputs', nargs='*', metavar='XYZ',
                     help='xyz files, folders of *.xyz or glob patterns (Angstrom)')
    src.add_argument('--smiles', nargs='+', default=[], metavar='SMILES',
                     help='SMILES strings (RDKit ETKDG + MMFF94 geometry)')
    src.add_argument('--smiles-file', metavar='FILE',
                     help="a file with one 'SMILES [name]' per line")
    src.add_argument('--drugs', action='store_true',
                     help='the built-in drug set: %s' % ', '.join(DRUGS))
    src.add_argument('--seed', type=int, default=0, help='RDKit embedding seed (default 0)')
    src.add_argument('--heldout', metavar='DIR',
                     help='training shards (*.h5): benchmark the molecules with index in --range')
    src.add_argument('--range', nargs=2, type=int, default=list(HELDOUT_RANGE),
                     metavar=('START', 'STOP'),
                     help='index range [START, STOP) of --heldout (default %d %d: the test '
                          'split of the shipped models)' % HELDOUT_RANGE)
    src.add_argument('--limit', type=int, help='at most this many molecules (in input order)')
    src.add_argument('--charge', type=int, default=0,
                     help='charge of xyz molecules whose comment line gives none (default 0)')
    src.add_argument('--spin', type=int, default=None,
                     help='2S of xyz molecules whose comment line gives none '
                          '(default: 0 or 1 by electron count)')
    run = p.add_argument_group('calculations')
    run.add_argument('--levels', nargs='+', default=['pbe/def2-svp'], metavar='LEVEL',
                     help='METHOD/BASIS[+df][+pcm|+ddcosmo], e.g. pbe/def2-svp '
                          'b3lyp/def2-tzvp hf/cc-pvdz+df pbe/def2-svp+df+pcm (an implicit '
                          'solvent, water; default pbe/def2-svp)')
    run.add_argument('--guesses', nargs='+', default=list(DEFAULT_GUESSES), metavar='GUESS',
                     help='from: %s (default: %s; minao always runs, it is the reference)'
                          % (' '.join(GUESSES), ' '.join(DEFAULT_GUESSES)))
    run.add_argument('--model', help='densr model: shipped name or path to NAME.pt')
    run.add_argument('--device', help="torch device of the network ('cpu', 'cuda')")
    run.add_argument('--exchange', choices=('auto', 'sad', 'iterate'),
                     help='exact-exchange option of the projection (densr, oracle, control)')
    run.add_argument('--threads', type=int, help='pyscf.lib.num_threads (default: as set)')
    run.add_argument('--grids-level', type=int, help="DFT grids level (default PySCF's, 3)")
    run.add_argument('--conv-tol', type=float, help="SCF conv_tol (default PySCF's, 1e-9)")
    run.add_argument('--max-cycle', type=int, help="SCF max_cycle (default PySCF's, 50)")
    run.add_argument('--level-shift', type=float, metavar='EH',
                     help='SCF level shift of the virtual orbitals in Eh, for every guess '
                          "(stabilises small-gap systems; default PySCF's, 0)")
    run.add_argument('--damp', type=float, metavar='F',
                     help='Fock damping factor for every guess; PySCF damps only the cycles '
                          'before DIIS starts, so give --diis-start-cycle too')
    run.add_argument('--diis-start-cycle', type=int, metavar='N',
                     help="first SCF cycle with DIIS (default PySCF's, 1)")
    run.add_argument('--df-auxbasis', metavar='BASIS',
                     help="fitting basis of +df levels (default PySCF's choice), e.g. "
                          "def2-universal-jfit for pure functionals")
    run.add_argument('--max-memory', type=float, metavar='MB',
                     help="PySCF max_memory (default 4000 or PYSCF_MAX_MEMORY); a stored DF "
                          "tensor (hybrids, or --df-incore) larger than this is read from "
                          "disk every cycle")
    run.add_argument('--df-incore', action='store_true',
                     help="+df levels keep the 3-centre tensor across cycles (PySCF's "
                          "default for pure functionals recomputes it in every J build: "
                          "less memory, slower cycles for large molecules)")
    run.add_argument('--nmae-dm', action='store_true',
                     help='also the NMAE of rho[P_guess] of every guess (one density '
                          'evaluation per row)')
    run.add_argument('--no-nmae', action='store_true',
                     help='skip the NMAE columns (saves the reference densities unless '
                          'oracle runs)')
    run.add_argument('--verbose', type=int, default=0, help='PySCF verbosity (default 0)')
    out = p.add_argument_group('output')
    out.add_argument('--csv', help='write rows to this CSV as they finish')
    out.add_argument('--resume', action='store_true',
                     help='keep the rows already in --csv and skip their '
                          '(molecule, level, guess)')
    out.add_argument('--no-reference', action='store_true',
                     help="run no minao SCF here: with --csv, another process runs minao "
                          "into the same CSV side by side, and the summary compares the "
                          "rows with its row once it is there (dE and same_state; "
                          "proj_score and dE_guess stay blank; not with oracle or control)")
    out.add_argument('--plots', metavar='DIR', help='write PNG plots to DIR')
    out.add_argument('--summary-only', action='store_true',
                     help='print only the per-level summary, not every row')
    out.add_argument('--markdown', action='store_true',
                     help='also print a Markdown table, one line per molecule and level')
    out.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def collect_molecules(args):
    """The molecules the command line asks for, names made unique."""
    mols = []
    if args.inputs:
        mols += molecules_from_xyz(args.inputs, args.charge, args.spin)
    smiles, names = list(args.smiles), [None] * len(args.smiles)
    if args.smiles_file:
        from pyscf_densr import data
        sm, nm = data.read_smiles(args.smiles_file)
        for i in sorted(sm):
            smiles.append(sm[i])
            names.append(nm.get(i))
    if args.drugs:
        smiles += list(DRUGS.values())
        names += list(DRUGS)
    if smiles:
        mols += molecules_from_smiles(smiles, names, args.seed)
    if args.heldout:
        start, stop = args.range
        if start < HELDOUT_RANGE[0]:
            print('densr bench: warning: indices below %d are in the shipped models\' '
                  'training split; they are not held out' % HELDOUT_RANGE[0], file=sys.stderr)
        mols += molecules_from_heldout(args.heldout, start, stop)
    if args.limit:
        mols = mols[:args.limit]
    return _unique_names(mols)


def main(argv=None):
    """``densr bench`` / ``python -m pyscf_densr.bench``; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.resume and not args.csv:
        print('densr bench: --resume needs --csv', file=sys.stderr)
        return 2
    if args.threads:
        lib.num_threads(args.threads)
    levels = [parse_level(s) for s in args.levels]
    for lv in levels:
        lv['df_incore'] = lv['df'] and args.df_incore
    try:
        guesses = check_guesses(args.guesses, not args.no_reference)
    except ValueError as e:
        print('densr bench: %s' % e, file=sys.stderr)
        return 2
    molecules = collect_molecules(args)
    if not molecules:
        print('densr bench: no molecules (give xyz files, --smiles, --smiles-file, --drugs '
              'or --heldout)', file=sys.stderr)
        return 2
    old = []
    if args.resume and os.path.exists(args.csv):
        old = read_csv(args.csv)
    compare_with_reference(old)
    done = {(r['molecule'], r['level'], r['guess']) for r in old}
    on_row = CsvAppender(args.csv, old) if args.csv else None
    nmae_mode = 'none' if args.no_nmae else 'dm' if args.nmae_dm else 'pred'
    t0 = time.perf_counter()
    rows = bench(molecules, levels, guesses, args.model, args.device, args.exchange, done,
                 nmae_mode, args.grids_level, args.conv_tol, args.max_cycle, args.verbose,
                 on_row, progress=not args.no_progress, df_auxbasis=args.df_auxbasis,
                 max_memory=args.max_memory,
                 scf_options={'level_shift': args.level_shift, 'damp': args.damp,
                              'diis_start_cycle': args.diis_start_cycle},
                 reference=not args.no_reference)
    wall = time.perf_counter() - t0
    # keep only the rows this command asks about (a resumed CSV may hold more)
    keys = {(m['name'], lv['name']) for m in molecules for lv in levels}
    allrows = [r for r in old if (r['molecule'], r['level']) in keys and r['guess'] in guesses]
    allrows += rows
    # minao first within each molecule and level, whichever process wrote its row first
    first = {}
    for r in allrows:
        first.setdefault((r['molecule'], r['level']), len(first))
    allrows.sort(key=lambda r: (first[r['molecule'], r['level']], guesses.index(r['guess'])))
    compare_with_reference(allrows)
    if not args.summary_only:
        print(format_rows(allrows))
        print()
    print(format_summary(summarize(allrows)))
    if args.markdown:
        print()
        print(format_markdown(allrows))
    mixed = mixed_jk_routes(allrows)
    if mixed:
        print('\nnote: the SCFs of %d molecule-level pairs built J/K by different routes '
              '(column jk_route; e.g. %s %s): their times are not comparable; a larger '
              '--max-memory keeps every guess in core' % ((len(mixed),) + mixed[0]))
    print('\n%d molecules x %d levels, %d new rows (%d from --resume) in %.1f s on %d threads'
          % (len(molecules), len(levels), len(rows), len(allrows) - len(rows), wall,
             lib.num_threads()))
    if args.plots:
        for path in plot(allrows, args.plots):
            print('wrote', path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
