"""Training labels: converged PySCF solutions in HDF5 shards (``densr data``).

Each molecule gets a geometry (RDKit from a SMILES string, or read from xyz files or an ASE
database), one SCF run from PySCF's default ``minao`` guess, and a group in a shard file with
its occupied orbitals, in the format of ``shared/data/README.md`` (documented in
``docs/data.md``). Coordinates are in Bohr everywhere inside; xyz files and ASE databases are
read in Angstrom.

    densr data qm9_smiles.txt -o data --start 500 --stop 1000 --workers 2
    densr data molecules/ -o data --basis def2-tzvp           # a folder of xyz files
    densr data qm9_smiles.txt -o data --scheduler tcp://host:8786 --threads 1

or from Python: ``generate('qm9_smiles.txt', 'data', start=500, stop=1000, workers=2)``.

Runs are resumable: complete shards are skipped, partial shards are finished, and molecules
that fail (no embedding, SCF not converged, any exception) are logged and recorded in the
shard's ``failed`` attribute, never retried unless asked (``retry_failed``).
The work function :func:`compute_molecule` is a plain top-level function that returns a plain
dict, so it runs in local processes or on Dask workers; only the calling process writes HDF5.
rdkit, dask and tqdm are imported only where they are used.
"""

import argparse
import glob
import logging
import os
import re
import sys
import time

import numpy as np
from pyscf import lib
from pyscf.data.nist import BOHR  # Angstrom per Bohr

logger = logging.getLogger(__name__)

SHARD_SIZE = 50
DEFAULT_OPTIONS = {
    'xc': 'pbe',            # 'hf' means RHF (closed shell) / UHF (open shell)
    'basis': 'def2-svp',
    'grids_level': 2,
    'conv_tol': 1e-9,
    'max_cycle': 100,
    'sigma': 0.0,           # Angstrom; Gaussian displacement of every coordinate
    'perturb_fraction': 1.0,  # share of molecules displaced when sigma > 0
    'seed': 0,              # with the index, seeds the displacement
    'threads': None,        # pyscf.lib.num_threads in the worker; None leaves it alone
    'guess': 'minao',       # the label SCF's initial guess: 'minao' or 'densr'
    'density_fit': False,   # the label SCF density-fitted (PySCF's default fitting basis)
}
GUESSES = ('minao', 'densr')
# how far a cheaper label recipe (densr guess, density fitting) may move a label against the
# reference recipe (minao, no fitting): the NMAE of the density (percent, on the network's
# fine grid), a twentieth of the CPU model's target error (0.7%); tools/label_recipe.py
# checks it. The stored energy of a density-fitted label carries the fitting error (about
# 3e-5 Eh per atom at def2-SVP); training uses the densities only
LABEL_NMAE_TOLERANCE = 0.035
GEOMETRY_SMILES = 'RDKit ETKDG(randomSeed=index) + MMFF94 minimisation'
REQUIRED = ('numbers', 'coords')


class MoleculeError(RuntimeError):
    """This molecule cannot be labelled (bad SMILES, no embedding, SCF not converged)."""


# --------------------------------------------------------------------------------------------
# geometries

def geometry_from_smiles(smiles, seed):
    """(numbers, coords in Angstrom, charge, spin) from RDKit: ETKDG embedding with
    ``randomSeed=seed`` and MMFF94 minimisation, hydrogens added. ``spin`` = number of
    radical electrons (high spin)."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import AllChem, Descriptors
    RDLogger.DisableLog('rdApp.*')
    m = Chem.MolFromSmiles(smiles)
    if m is None:
        raise MoleculeError('invalid SMILES %r' % smiles)
    m = Chem.AddHs(m)
    if AllChem.EmbedMolecule(m, randomSeed=int(seed)) != 0:
        raise MoleculeError('RDKit embedding failed')
    if AllChem.MMFFOptimizeMolecule(m) == -1:
        raise MoleculeError('no MMFF94 parameters')
    numbers = [a.GetAtomicNum() for a in m.GetAtoms()]
    coords = m.GetConformer().GetPositions()
    return numbers, coords, Chem.GetFormalCharge(m), Descriptors.NumRadicalElectrons(m)


def _default_spin(numbers, charge):
    return (int(sum(numbers)) - int(charge)) % 2


def make_geometry(index, molecule, options=None):
    """Geometry record of one molecule: dict with numbers, coords (Bohr), charge, spin,
    smiles, name, perturbed.

    ``molecule`` is a SMILES string or a dict with ``numbers`` and ``coords`` (Bohr), and
    optionally charge, spin, smiles, name, perturbed. With ``options['sigma'] > 0`` (Angstrom)
    every coordinate of a share ``perturb_fraction`` of the molecules is displaced by
    N(0, sigma), drawn from ``numpy.random.default_rng([seed, index])``.
    """
    opts = dict(DEFAULT_OPTIONS, **(options or {}))
    if isinstance(molecule, str):
        numbers, xyz, charge, spin = geometry_from_smiles(molecule, index)
        geom = {'numbers': numbers, 'coords': np.asarray(xyz) / BOHR, 'charge': charge,
                'spin': spin, 'smiles': molecule, 'name': '', 'perturbed': 0}
    else:
        numbers = [int(z) for z in molecule['numbers']]
        charge = int(molecule.get('charge') or 0)
        spin = molecule.get('spin')
        spin = _default_spin(numbers, charge) if spin is None else int(spin)
        geom = {'numbers': numbers,
                'coords': np.asarray(molecule['coords'], dtype=float).reshape(-1, 3),
                'charge': charge, 'spin': spin, 'smiles': molecule.get('smiles') or '',
                'name': molecule.get('name') or '',
                'perturbed': int(molecule.get('perturbed') or 0)}
    sigma = float(opts['sigma'] or 0)
    if sigma > 0:
        rng = np.random.default_rng([int(opts['seed']), int(index)])
        if rng.random() < float(opts['perturb_fraction']):
            shape = geom['coords'].shape
            geom['coords'] = geom['coords'] + rng.normal(0.0, sigma, shape) / BOHR
            geom['perturbed'] = 1
    return geom


def compute_geometry(index, molecule, options=None):
    """Like :func:`compute_molecule` without the SCF: {'index', 'ok', ...geometry} or
    {'index', 'ok': False, 'reason'}. Used by ``--write-xyz``."""
    out = {'index': int(index)}
    try:
        out.update(make_geometry(index, molecule, options))
        out['coords'] = np.asarray(out['coords']).tolist()
        out['ok'] = True
    except Exception as err:  # a molecule never stops the run
        out.update(ok=False, reason=_reason(err))
    return out


# --------------------------------------------------------------------------------------------
# SCF

def build_mol(numbers, coords, basis, charge=0, spin=0):
    """PySCF Mole from atomic numbers and coordinates in Bohr."""
    from pyscf import gto
    return gto.M(atom=[(int(z), tuple(float(x) for x in r)) for z, r in zip(numbers, coords)],
                 unit='Bohr', basis=basis, charge=int(charge), spin=int(spin), verbose=0)


def make_scf(mol, xc='pbe', grids_level=2, conv_tol=1e-9, max_cycle=100, guess='minao',
             density_fit=False):
    """The SCF object of the labels: RKS/UKS (xc) or RHF/UHF (``xc='hf'``).

    ``guess``: 'minao' (the reference recipe) or 'densr' (fewer cycles; the converged
    density is the same to the SCF's tolerance). ``density_fit``: PySCF's density fitting
    with its default fitting basis, cheaper per cycle at a small, checked change of the
    label (``tools/label_recipe.py``).
    """
    from pyscf import dft, scf
    if guess not in GUESSES:
        raise ValueError('label guess must be one of %s, not %r' % (', '.join(GUESSES), guess))
    if xc.lower() == 'hf':
        mf = scf.RHF(mol) if mol.spin == 0 else scf.UHF(mol)
    else:
        mf = dft.RKS(mol, xc=xc) if mol.spin == 0 else dft.UKS(mol, xc=xc)
        mf.grids.level = int(grids_level)
    if density_fit:
        mf = mf.density_fit()
    if guess == 'densr':
        import pyscf_densr  # noqa: F401 (registers the key)
    mf.init_guess = guess
    mf.conv_tol = float(conv_tol)
    mf.max_cycle = int(max_cycle)
    mf.verbose = 0
    return mf


def _occupied(mf):
    """{name: array} of occupied orbitals (float32) and energies (float64)."""
    if mf.mol.spin == 0 and np.ndim(mf.mo_occ) == 1:
        occ = mf.mo_occ > 0
        return {'mo_coeff_occ': np.asarray(mf.mo_coeff[:, occ], dtype=np.float32),
                'mo_energy_occ': np.asarray(mf.mo_energy[occ], dtype=np.float64)}
    out = {}
    for s, tag in enumerate('ab'):
        occ = mf.mo_occ[s] > 0
        out['mo_coeff_occ_' + tag] = np.asarray(mf.mo_coeff[s][:, occ], dtype=np.float32)
        out['mo_energy_occ_' + tag] = np.asarray(mf.mo_energy[s][occ], dtype=np.float64)
    return out


def _reason(err):
    if isinstance(err, MoleculeError):
        return str(err)
    return '%s: %s' % (type(err).__name__, err)


def compute_molecule(index, molecule, options=None):
    """Label one molecule; the unit of work sent to processes and Dask workers.

    index: its position in the source (the group name); molecule: a SMILES string or a dict
    with ``numbers`` and ``coords`` in Bohr (see :func:`make_geometry`); options: see
    ``DEFAULT_OPTIONS``. Returns a plain dict: ``ok``, the geometry, ``e_tot`` (Hartree),
    ``cycles`` (of the SCF from ``options['guess']``), the occupied orbitals
    (:func:`_occupied`) and ``wall`` (seconds), or
    ``ok=False`` with a ``reason``. Never raises.
    """
    t0 = time.time()
    opts = dict(DEFAULT_OPTIONS, **(options or {}))
    out = {'index': int(index)}
    try:
        if opts.get('threads'):
            lib.num_threads(int(opts['threads']))
        geom = make_geometry(index, molecule, opts)
        mol = build_mol(geom['numbers'], geom['coords'], opts['basis'],
                        geom['charge'], geom['spin'])
        mf = make_scf(mol, opts['xc'], opts['grids_level'], opts['conv_tol'], opts['max_cycle'],
                      opts['guess'], opts['density_fit'])
        mf.kernel()
        if not mf.converged:
            raise MoleculeError('SCF not converged in %d cycles' % mf.max_cycle)
        out.update(geom)
        out.update(_occupied(mf))
        out.update(ok=True, e_tot=float(mf.e_tot), cycles=int(mf.cycles), guess=opts['guess'])
    except Exception as err:  # a molecule never stops the run
        out = {'index': int(index), 'ok': False, 'reason': _reason(err)}
    out['wall'] = time.time() - t0
    return out


# --------------------------------------------------------------------------------------------
# sources: {index: SMILES string or geometry dict}

def read_smiles(path):
    """{index: SMILES} from a text file, one SMILES per line with an optional name after it;
    the index is the 0-based line number, so the file's order is the split. Blank lines and
    lines starting with '#' are skipped (their index stays unused)."""
    out, names = {}, {}
    with open(path) as f:
        for i, line in enumerate(f):
            parts = line.split(None, 1)
            if not parts or parts[0].startswith('#'):
                continue
            out[i] = parts[0]
            if len(parts) > 1 and parts[1].strip():
                names[i] = parts[1].strip()
    return out, names


def _parse_comment(line):
    info = {}
    for tok in line.split():
        if '=' in tok:
            k, v = tok.split('=', 1)
            info[k.lower()] = v.strip('"\'')
    return info


def read_xyz(path):
    """Frames of an xyz file (several may follow each other): list of dicts with numbers,
    coords (Bohr) and the ``key=value`` pairs of the comment line (charge, spin or
    multiplicity, smiles, index, perturbed, name are used)."""
    from pyscf.data import elements
    frames = []
    with open(path) as f:
        lines = f.read().splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        nat = int(lines[i].split()[0])
        info = _parse_comment(lines[i + 1]) if i + 1 < len(lines) else {}
        numbers, xyz = [], []
        for line in lines[i + 2:i + 2 + nat]:
            p = line.split()
            sym = p[0]
            numbers.append(int(sym) if sym.isdigit() else elements.charge(sym))
            xyz.append([float(x) for x in p[1:4]])
        if len(numbers) != nat:
            raise ValueError('%s: truncated frame at line %d' % (path, i + 1))
        frames.append({'numbers': numbers, 'coords': np.array(xyz) / BOHR, 'info': info})
        i += 2 + nat
    return frames


def _geometry_dict(numbers, coords, info, name, charge, spin):
    c = info.get('charge', charge)
    if 'spin' in info:
        s = int(info['spin'])
    elif 'multiplicity' in info:
        s = int(info['multiplicity']) - 1
    else:
        s = spin
    return {'numbers': [int(z) for z in numbers], 'coords': np.asarray(coords, dtype=float),
            'charge': int(c or 0), 'spin': None if s is None else int(s),
            'smiles': str(info.get('smiles', '')), 'name': str(info.get('name', name)),
            'perturbed': int(info.get('perturbed', 0))}


def xyz_files(source):
    """Sorted xyz paths of a folder, a glob pattern or one file."""
    if os.path.isdir(source):
        return sorted(glob.glob(os.path.join(source, '*.xyz')))
    return sorted(glob.glob(source))


def read_xyz_source(source, charge=0, spin=None):
    """{index: geometry dict} of the frames of xyz files, in sorted file order; a comment line
    ``index=N`` sets the index, else it is the frame's position."""
    out = {}
    pos = 0
    for path in xyz_files(source):
        frames = read_xyz(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        for k, fr in enumerate(frames):
            name = stem if len(frames) == 1 else '%s:%d' % (stem, k)
            idx = int(fr['info'].get('index', pos))
            out[idx] = _geometry_dict(fr['numbers'], fr['coords'], fr['info'], name,
                                      charge, spin)
            pos += 1
    return out


def read_ase_db(path, charge=0, spin=None):
    """{index: geometry dict} of an ASE database; the index is the key ``index`` if the row
    has one, else the row id. Keys charge, spin or multiplicity, smiles, name are used."""
    import ase.db
    out = {}
    with ase.db.connect(path) as db:
        for row in db.select():
            kv = dict(row.key_value_pairs)
            idx = int(kv.get('index', row.id))
            out[idx] = _geometry_dict(row.numbers, np.asarray(row.positions) / BOHR, kv,
                                      kv.get('name', ''), charge, spin)
    return out


def read_source(source, kind=None, charge=0, spin=None):
    """(molecules {index: SMILES or geometry dict}, names {index: name}, kind, geometry note).

    ``source``: a SMILES file (.txt, .smi, .smiles, .csv), an xyz folder / glob / file, an ASE
    database (.db, .json), or in Python a list of SMILES strings or geometry dicts
    (``numbers``, ``coords`` in Bohr). ``charge``/``spin`` apply to xyz and database entries
    that do not give their own (spin None: 0 or 1 by electron count).
    """
    if isinstance(source, (list, tuple)):
        mols = {i: (m if isinstance(m, str) else _as_geometry(m, charge, spin))
                for i, m in enumerate(source)}
        kind = 'smiles' if all(isinstance(m, str) for m in mols.values()) else 'list'
        return mols, {}, kind, (GEOMETRY_SMILES if kind == 'smiles' else 'given coordinates')
    source = os.fspath(source)
    if kind is None:
        ext = os.path.splitext(source)[1].lower()
        if os.path.isdir(source) or ext == '.xyz' or any(c in source for c in '*?['):
            kind = 'xyz'
        elif ext in ('.db', '.json'):
            kind = 'db'
        else:
            kind = 'smiles'
    if kind == 'smiles':
        mols, names = read_smiles(source)
        return mols, names, kind, GEOMETRY_SMILES
    if kind == 'xyz':
        mols = read_xyz_source(source, charge, spin)
        if not mols:
            raise FileNotFoundError('no xyz files in %s' % source)
        return mols, {}, kind, 'xyz files %s (Angstrom)' % os.path.basename(source.rstrip('/'))
    if kind == 'db':
        return read_ase_db(source, charge, spin), {}, kind, 'ASE database %s' % (
            os.path.basename(source))
    raise ValueError('unknown source kind %r' % kind)


def _as_geometry(m, charge, spin):
    if hasattr(m, 'get_atomic_numbers'):  # ase.Atoms, Angstrom
        info = dict(getattr(m, 'info', {}))
        return _geometry_dict(m.get_atomic_numbers(), m.get_positions() / BOHR, info,
                              info.get('name', ''), charge, spin)
    return _geometry_dict(m['numbers'], m['coords'], m, m.get('name', ''), charge, spin)


def default_prefix(source, xc='pbe', basis='def2-svp'):
    """Shard name prefix ``{set}_{xc}_{basis}``, e.g. ``qm9_pbe_def2svp`` for qm9_smiles.txt."""
    if isinstance(source, (list, tuple)):
        stem = 'mols'
    else:
        stem = os.path.basename(os.fspath(source).rstrip('/').replace('*', ''))
        stem = os.path.splitext(stem)[0] or 'mols'
        stem = re.sub(r'[_-]?smiles$', '', stem) or 'mols'
    tag = lambda s: re.sub(r'[^0-9a-z]+', '', s.lower())  # noqa: E731
    return '%s_%s_%s' % (re.sub(r'[^0-9A-Za-z_-]+', '', stem) or 'mols', tag(xc), tag(basis))


# --------------------------------------------------------------------------------------------
# shards

def shard_path(out_dir, prefix, first):
    return os.path.join(out_dir, '%s_%06d.h5' % (prefix, first))


def _h5open(path, mode, tries=10):
    """h5py.File, retried while another process (a reader) holds the file lock."""
    import h5py
    for k in range(tries):
        try:
            return h5py.File(path, mode)
        except (OSError, BlockingIOError) as err:
            if 'lock' not in str(err).lower() or k == tries - 1:
                raise
            time.sleep(1.0)


def _is_done(g):
    return (all(k in g for k in REQUIRED) and 'e_tot' in g.attrs
            and ('mo_coeff_occ' in g or 'mo_coeff_occ_a' in g))


def _root_attrs(opts, geometry):
    import pyscf
    return {'xc': opts['xc'].lower(), 'basis': opts['basis'],
            'grids_level': np.int64(opts['grids_level']),
            'conv_tol': np.float64(opts['conv_tol']), 'pyscf_version': pyscf.__version__,
            'units': 'bohr', 'geometry': geometry, 'max_cycle': np.int64(opts['max_cycle']),
            'density_fit': np.int64(bool(opts['density_fit']))}


def open_shard(path, attrs):
    """Done and failed indices of a shard, creating it (``complete=False``) if absent.

    An unreadable file is moved aside to ``path.corrupt`` and started again; groups left
    half-written by an interrupted run are removed. A shard of another level of theory
    (xc, basis, grids_level, conv_tol, density fitting) is an error. Returns (complete, done,
    failed).
    """
    import h5py
    if os.path.exists(path):
        try:
            f = _h5open(path, 'r')
            f.close()
        except OSError as err:
            if 'lock' in str(err).lower():
                raise
            logger.error('%s is unreadable (%s); moved to %s.corrupt', path, err, path)
            os.replace(path, path + '.corrupt')
    if not os.path.exists(path):
        with h5py.File(path, 'w') as f:
            for k, v in attrs.items():
                f.attrs[k] = v
            f.attrs['complete'] = False
            f.attrs['failed'] = np.zeros(0, dtype=np.int64)
        return False, set(), {}
    with _h5open(path, 'r') as f:
        for k in ('xc', 'basis', 'grids_level', 'conv_tol', 'density_fit'):
            old = f.attrs.get(k, 0 if k == 'density_fit' else None)
            if old is None:
                continue
            same = (np.isclose(float(old), float(attrs[k]))
                    if k in ('grids_level', 'conv_tol', 'density_fit')
                    else str(old).lower() == str(attrs[k]).lower())
            if not same:
                raise ValueError('%s has %s=%s, not %s' % (path, k, old, attrs[k]))
        complete = bool(f.attrs.get('complete', False))
        if not complete and f.attrs.get('geometry', attrs['geometry']) != attrs['geometry']:
            logger.warning('%s: geometry note differs: %r (file) vs %r', path,
                           f.attrs['geometry'], attrs['geometry'])
        broken = [k for k in f.keys()
                  if k.startswith('_tmp') or (k.isdigit() and not _is_done(f[k]))]
        done = {int(k) for k in f.keys() if k.isdigit()} - {int(k) for k in broken
                                                             if k.isdigit()}
        failed = _failed(f)
    if broken and not complete:  # left by an interrupted write
        with _h5open(path, 'a') as f:
            for k in broken:
                del f[k]
    return complete, done, failed


def _failed(f):
    idx = [int(i) for i in np.atleast_1d(f.attrs.get('failed', np.zeros(0)))]
    why = list(np.atleast_1d(f.attrs.get('failed_reasons', [])))
    why = [str(w) for w in why] + [''] * (len(idx) - len(why))
    return dict(zip(idx, why))


def _set_failed(f, failed):
    import h5py
    keys = sorted(failed)
    f.attrs['failed'] = np.asarray(keys, dtype=np.int64)
    f.attrs['failed_reasons'] = np.array([failed[k] for k in keys], dtype=h5py.string_dtype())


def write_molecule(path, res):
    """Write one result of :func:`compute_molecule` into its shard (group = 6-digit index).
    The group is built under a temporary name and renamed, so a crash leaves no half group."""
    key = '%06d' % res['index']
    tmp = '_tmp' + key
    with _h5open(path, 'a') as f:
        for k in (tmp, key):
            if k in f:
                del f[k]
        g = f.create_group(tmp)
        g.create_dataset('numbers', data=np.asarray(res['numbers'], dtype=np.int8))
        g.create_dataset('coords', data=np.asarray(res['coords'], dtype=np.float64))
        for k in ('mo_coeff_occ', 'mo_coeff_occ_a', 'mo_coeff_occ_b'):
            if k in res:
                g.create_dataset(k, data=np.asarray(res[k], dtype=np.float32))
        for k in ('mo_energy_occ', 'mo_energy_occ_a', 'mo_energy_occ_b'):
            if k in res:
                g.create_dataset(k, data=np.asarray(res[k], dtype=np.float64))
        g.attrs['smiles'] = res.get('smiles', '')
        g.attrs['charge'] = np.int64(res['charge'])
        g.attrs['spin'] = np.int64(res['spin'])
        g.attrs['cycles_' + res.get('guess', 'minao')] = np.int64(res['cycles'])
        g.attrs['perturbed'] = np.int64(res.get('perturbed', 0))
        if res.get('name'):
            g.attrs['name'] = res['name']
        g.attrs['e_tot'] = np.float64(res['e_tot'])
        f.move(tmp, key)
        failed = _failed(f)
        if res['index'] in failed:
            del failed[res['index']]
            _set_failed(f, failed)


def record_failure(path, index, reason):
    """Add ``index`` (with its reason) to the shard's ``failed`` attribute."""
    with _h5open(path, 'a') as f:
        failed = _failed(f)
        failed[int(index)] = str(reason)
        _set_failed(f, failed)


def finish_shard(path, expected):
    """Mark the shard complete if every index in ``expected`` is present or failed.
    Returns (complete, n_molecules, n_failed)."""
    with _h5open(path, 'a') as f:
        done = {int(k) for k in f.keys() if k.isdigit()}
        failed = _failed(f)
        complete = set(expected) <= (done | set(failed))
        if complete:
            f.attrs['complete'] = True
        return complete, len(done), len(failed)


def orthonormalize(c, s):
    """Loewdin-orthonormalise orbitals ``c`` (nao, nocc) in the overlap metric ``s``:
    ``c (c^T s c)^(-1/2)``. Undoes the float32 rounding of stored orbitals, which otherwise
    shifts the energy of ``2 c c^T`` by about 1e-6 Hartree (first order: the rounded density
    is not idempotent); afterwards the stored ``e_tot`` is reproduced to about 1e-10."""
    c = np.asarray(c, dtype=np.float64)
    w, v = np.linalg.eigh(c.T.dot(s).dot(c))
    return c.dot((v * w**-0.5).dot(v.T))


def read_molecule(g, basis=None, orth=True):
    """(mol, dm) of a stored molecule group: dm = 2 C C^T (closed shell) or the (2, nao, nao)
    alpha/beta pair ``C_a C_a^T, C_b C_b^T`` (open shell; spin-summed: ``dm.sum(0)``).
    ``orth``: orthonormalise the float32 orbitals first (:func:`orthonormalize`)."""
    basis = basis or g.file.attrs.get('basis', 'def2-svp')
    mol = build_mol(g['numbers'][()], g['coords'][()], basis,
                    g.attrs.get('charge', 0), g.attrs.get('spin', 0))
    s = mol.intor_symmetric('int1e_ovlp') if orth else None

    def load(name):
        c = g[name][()].astype(np.float64)
        return orthonormalize(c, s) if orth and c.shape[1] else c
    if 'mo_coeff_occ' in g:
        c = load('mo_coeff_occ')
        return mol, 2 * c.dot(c.T)
    ca, cb = load('mo_coeff_occ_a'), load('mo_coeff_occ_b')
    return mol, np.stack([ca.dot(ca.T), cb.dot(cb.T)])


# --------------------------------------------------------------------------------------------
# execution: serial, local processes, Dask

def _run_serial(fn, tasks, opts):
    for idx, mol in tasks:
        yield fn(idx, mol, opts)


def _run_processes(fn, tasks, opts, workers):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool
    ctx = multiprocessing.get_context('spawn')  # PySCF's OpenMP is not fork-safe
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    try:
        futs = {ex.submit(fn, idx, mol, opts): idx for idx, mol in tasks}
        for fut in as_completed(futs):
            try:
                yield fut.result()
            except BrokenProcessPool as err:
                raise RuntimeError('a worker process died (out of memory?): %s; '
                                   'finished molecules are saved, run again to resume'
                                   % err) from err
            except Exception as err:
                yield {'index': futs[fut], 'ok': False, 'reason': _reason(err)}
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _dask_client(scheduler):
    from dask.distributed import Client
    if hasattr(scheduler, 'submit'):
        return scheduler, False
    return Client(scheduler), True


def _run_dask(fn, tasks, opts, scheduler):
    from dask.distributed import as_completed
    client, own = _dask_client(scheduler)
    futs = {}
    try:
        for idx, mol in tasks:  # earlier indices first: shards complete in order
            fut = client.submit(fn, idx, mol, opts, pure=False, priority=-int(idx))
            futs[fut] = idx
        for fut in as_completed(list(futs)):
            try:
                yield fut.result()
            except Exception as err:  # KilledWorker, lost worker...
                yield {'index': futs[fut], 'ok': False, 'reason': _reason(err)}
    finally:
        if futs:
            client.cancel(list(futs))
        if own:
            client.close()


def run_tasks(fn, tasks, opts, workers=1, scheduler=None):
    """Results of ``fn(index, molecule, opts)`` for ``tasks`` [(index, molecule)], in order of
    completion: in this process (workers 1), a spawn process pool, or a Dask cluster
    (``scheduler``: address like ``tcp://host:8786``, a Client or a cluster object)."""
    if not tasks:
        return iter(())
    if scheduler is not None:
        return _run_dask(fn, tasks, opts, scheduler)
    if workers > 1 and len(tasks) > 1:
        return _run_processes(fn, tasks, opts, min(workers, len(tasks)))
    return _run_serial(fn, tasks, opts)


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _progress(total, enabled, desc):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, smoothing=0.05)


# --------------------------------------------------------------------------------------------
# the driver

def generate(source, out_dir, xc='pbe', basis='def2-svp', start=0, stop=None,
             shard_size=SHARD_SIZE, prefix=None, workers=1, scheduler=None, threads=None,
             sigma=0.0, perturb_fraction=1.0, seed=0, max_cycle=100, conv_tol=1e-9,
             grids_level=2, charge=0, spin=None, kind=None, retry_failed=False,
             progress=True, guess='minao', density_fit=False):
    """Label the molecules of ``source`` with index in [start, stop) into shards in
    ``out_dir``; resumable. Returns a summary dict (files, computed, failed, skipped).

    source: SMILES file, xyz folder/glob/file, ASE database, or a list (see
    :func:`read_source`). Shard ``k`` holds indices [k*shard_size, (k+1)*shard_size) and is
    named ``{prefix}_{k*shard_size:06d}.h5`` (prefix default :func:`default_prefix`).
    workers: local processes (each gets ``threads`` = cores // workers PySCF threads unless
    given); scheduler: Dask scheduler address, Client or cluster (then ``threads`` defaults to
    leaving the workers' setting alone). sigma (Angstrom), perturb_fraction, seed: thermal
    distortion (:func:`make_geometry`). retry_failed: compute recorded failures again.
    guess, density_fit: the label SCF's recipe (:func:`make_scf`; each molecule records
    ``cycles_<guess>``, the shard whether it is density-fitted).
    """
    if guess not in GUESSES:
        raise ValueError('label guess must be one of %s, not %r' % (', '.join(GUESSES), guess))
    opts = dict(DEFAULT_OPTIONS, xc=xc, basis=basis, grids_level=grids_level,
                conv_tol=conv_tol, max_cycle=max_cycle, sigma=sigma,
                perturb_fraction=perturb_fraction, seed=seed, threads=threads, guess=guess,
                density_fit=bool(density_fit))
    if threads is None and scheduler is None and workers > 1:
        opts['threads'] = max(1, _cpu_count() // workers)
    mols, names, kind, geometry = read_source(source, kind, charge, spin)
    if sigma > 0:
        geometry += ('; perturbed=1 adds N(0, %g A) noise per coordinate (share %g, '
                     'numpy default_rng([%d, index]))' % (sigma, perturb_fraction, seed))
    prefix = prefix or default_prefix(source, xc, basis)
    os.makedirs(out_dir, exist_ok=True)
    attrs = _root_attrs(opts, geometry)
    stop = max(mols) + 1 if stop is None and mols else (stop or 0)
    shards, expected = {}, {}
    for i in sorted(mols):
        first = i // shard_size * shard_size
        expected.setdefault(first, []).append(i)
        if start <= i < stop:
            shards.setdefault(first, []).append(i)
    summary = {'files': [], 'computed': 0, 'failed': 0, 'skipped': 0}
    todo, remaining = [], {}
    for first, idx in sorted(shards.items()):
        path = shard_path(out_dir, prefix, first)
        summary['files'].append(path)
        complete, done, failed = open_shard(path, attrs)
        if complete and not (retry_failed and set(failed) & set(idx)):
            summary['skipped'] += len(idx)
            logger.info('%s is complete; skipped', path)
            continue
        skip = done if retry_failed else done | set(failed)
        left = [i for i in idx if i not in skip]
        summary['skipped'] += len(idx) - len(left)
        remaining[first] = len(left)
        todo += [(i, mols[i]) for i in left]
        if not left:
            _finish(path, expected[first])

    bar = _progress(len(todo), progress, prefix)
    t0 = time.time()
    try:
        for res in run_tasks(compute_molecule, todo, opts, workers, scheduler):
            i = res['index']
            first = i // shard_size * shard_size
            path = shard_path(out_dir, prefix, first)
            if res['ok']:
                if not res.get('name') and i in names:
                    res['name'] = names[i]
                write_molecule(path, res)
                summary['computed'] += 1
                logger.debug('%06d: %d cycles, %.1f s', i, res['cycles'], res['wall'])
            else:
                record_failure(path, i, res['reason'])
                summary['failed'] += 1
                logger.warning('molecule %06d failed: %s', i, res['reason'])
            remaining[first] -= 1
            if remaining[first] == 0:
                _finish(path, expected[first])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(failed=summary['failed'], refresh=False)
    finally:
        if bar is not None:
            bar.close()
    logger.info('%d molecules labelled, %d failed, %d skipped in %.0f s',
                summary['computed'], summary['failed'], summary['skipped'], time.time() - t0)
    return summary


def _finish(path, expected):
    complete, n, nf = finish_shard(path, expected)
    if complete:
        logger.info('%s complete: %d molecules, %d failed', path, n, nf)
    else:
        logger.info('%s partial (indices outside this run missing)', path)


def write_geometries(source, path, start=0, stop=None, workers=1, scheduler=None,
                     sigma=0.0, perturb_fraction=1.0, seed=0, charge=0, spin=None,
                     kind=None, progress=True):
    """Write the geometries of ``source`` (index in [start, stop)) to one multi-frame xyz file
    (Angstrom) whose comment lines carry index, smiles, charge, spin, perturbed, so that
    labels can be made where RDKit is missing: ``densr data PATH.xyz`` keeps the indices."""
    opts = dict(DEFAULT_OPTIONS, sigma=sigma, perturb_fraction=perturb_fraction, seed=seed)
    mols, names, kind, _ = read_source(source, kind, charge, spin)
    stop = max(mols) + 1 if stop is None and mols else (stop or 0)
    tasks = [(i, mols[i]) for i in sorted(mols) if start <= i < stop]
    bar = _progress(len(tasks), progress, 'geometries')
    results = {}
    for res in run_tasks(compute_geometry, tasks, opts, workers, scheduler):
        results[res['index']] = res
        if not res['ok']:
            logger.warning('molecule %06d failed: %s', res['index'], res['reason'])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    from pyscf.data.elements import ELEMENTS
    n = 0
    with open(path, 'w') as f:
        for i in sorted(results):
            r = results[i]
            if not r['ok']:
                continue
            info = 'index=%d charge=%d spin=%d perturbed=%d' % (i, r['charge'], r['spin'],
                                                                 r['perturbed'])
            if r['smiles']:
                info += ' smiles=%s' % r['smiles']
            name = r['name'] or names.get(i, '')
            if name and ' ' not in name:
                info += ' name=%s' % name
            f.write('%d\n%s\n' % (len(r['numbers']), info))
            for z, x in zip(r['numbers'], np.asarray(r['coords']) * BOHR):
                f.write('%-2s %20.14f %20.14f %20.14f\n' % (ELEMENTS[z], x[0], x[1], x[2]))
            n += 1
    logger.info('%d geometries written to %s (%d failed)', n, path, len(results) - n)
    return n


# --------------------------------------------------------------------------------------------
# command line

def _parser():
    p = argparse.ArgumentParser(
        prog='densr data', description='Generate training labels (converged PySCF orbitals) '
        'in HDF5 shards; resumable. See docs/data.md.')
    p.add_argument('source', help='SMILES file (one per line, optional name), xyz folder, '
                   'glob or file, or ASE database (.db)')
    p.add_argument('-o', '--out', default='.', help='output folder (default: .)')
    p.add_argument('--start', type=int, default=0, help='first index (default 0)')
    p.add_argument('--stop', type=int, default=None, help='index after the last (default: end)')
    p.add_argument('--xc', default='pbe', help="functional; 'hf' for RHF/UHF (default pbe)")
    p.add_argument('--basis', default='def2-svp', help='basis (default def2-svp)')
    p.add_argument('--grids-level', type=int, default=2, help='DFT grids level (default 2)')
    p.add_argument('--conv-tol', type=float, default=1e-9, help='SCF conv_tol (default 1e-9)')
    p.add_argument('--max-cycle', type=int, default=100, help='SCF max_cycle (default 100)')
    p.add_argument('--guess', choices=GUESSES, default='minao',
                   help='initial guess of the label SCF (default minao; densr: fewer cycles, '
                        'same converged density)')
    p.add_argument('--density-fit', action='store_true',
                   help='density-fitted label SCF (cheaper; check the change of the labels '
                        'with tools/label_recipe.py)')
    p.add_argument('--shard-size', type=int, default=SHARD_SIZE,
                   help='molecules per shard (default %d)' % SHARD_SIZE)
    p.add_argument('--prefix', default=None,
                   help='shard name prefix (default {set}_{xc}_{basis}, e.g. qm9_pbe_def2svp)')
    p.add_argument('-j', '--workers', type=int, default=1, help='local processes (default 1)')
    p.add_argument('--scheduler', default=None,
                   help='Dask scheduler address (tcp://host:8786); replaces --workers')
    p.add_argument('--threads', type=int, default=None,
                   help='PySCF threads per task (default cores // workers; with --scheduler: '
                   'the workers\' own setting)')
    p.add_argument('--sigma', type=float, default=0.0,
                   help='thermal distortion: N(0, sigma) Angstrom per coordinate (default 0)')
    p.add_argument('--perturb-fraction', type=float, default=1.0,
                   help='share of molecules distorted when sigma > 0 (default 1)')
    p.add_argument('--seed', type=int, default=0, help='distortion seed (default 0)')
    p.add_argument('--charge', type=int, default=0,
                   help='charge of xyz/database molecules without their own (default 0)')
    p.add_argument('--spin', type=int, default=None, help='2S of xyz/database molecules '
                   'without their own (default: 0 or 1 by electron count)')
    p.add_argument('--kind', choices=('smiles', 'xyz', 'db'), default=None,
                   help='source kind (default: from the name)')
    p.add_argument('--retry-failed', action='store_true',
                   help='compute molecules recorded as failed again')
    p.add_argument('--write-xyz', metavar='PATH', default=None,
                   help='only write the geometries to this xyz file (no SCF)')
    p.add_argument('--log', default=None,
                   help='log file (default: OUT/PREFIX.log; "-" for none)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.add_argument('-v', '--verbose', action='store_true', help='log every molecule')
    return p


def main(argv=None):
    """``densr data ...``: see ``densr data --help`` and docs/data.md."""
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    fmt = logging.Formatter('%(asctime)s %(levelname)s %(message)s')
    handlers = [logging.StreamHandler(sys.stderr)]
    prefix = args.prefix or default_prefix(args.source, args.xc, args.basis)
    log = args.log
    if log is None and not args.write_xyz:
        os.makedirs(args.out, exist_ok=True)
        log = os.path.join(args.out, prefix + '.log')
    if log and log != '-':
        handlers.append(logging.FileHandler(log))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    old = logger.level, logger.propagate
    logger.setLevel(level)
    logger.propagate = False
    try:
        if args.write_xyz:
            write_geometries(args.source, args.write_xyz, args.start, args.stop, args.workers,
                             args.scheduler, args.sigma, args.perturb_fraction, args.seed,
                             args.charge, args.spin, args.kind, not args.no_progress)
            return 0
        s = generate(args.source, args.out, xc=args.xc, basis=args.basis, start=args.start,
                     stop=args.stop, shard_size=args.shard_size, prefix=prefix,
                     workers=args.workers, scheduler=args.scheduler, threads=args.threads,
                     sigma=args.sigma, perturb_fraction=args.perturb_fraction, seed=args.seed,
                     max_cycle=args.max_cycle, conv_tol=args.conv_tol,
                     grids_level=args.grids_level, charge=args.charge, spin=args.spin,
                     kind=args.kind, retry_failed=args.retry_failed,
                     progress=not args.no_progress, guess=args.guess,
                     density_fit=args.density_fit)
        print('%d labelled, %d failed, %d skipped; shards: %s' % (
            s['computed'], s['failed'], s['skipped'], ' '.join(
                os.path.basename(f) for f in s['files'])))
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # usage errors, dead pool
        logger.error('%s', err)
        return 1
    finally:
        logger.setLevel(old[0])
        logger.propagate = old[1]
        for h in handlers:
            logger.removeHandler(h)
            if isinstance(h, logging.FileHandler):
                h.close()


if __name__ == '__main__':
    from pyscf_densr import data as _data  # run the importable module (pickling by name)
    sys.exit(_data.main())
