"""What the timing tools share: one molecule, from an xyz file or a SMILES, at a level."""
from pyscf import lib

from pyscf_densr import bench


def add_arguments(ap, level):
    """The molecule's arguments: xyz file or SMILES, ``--level`` (default ``level``),
    ``--charge``, ``--threads``."""
    ap.add_argument('xyz', help='an xyz file (Angstrom) or a SMILES (RDKit geometry)')
    ap.add_argument('--level', default=level)
    ap.add_argument('--charge', type=int, default=0)
    ap.add_argument('--threads', type=int, default=1)


def molecule(a):
    """(mol, level) of the parsed arguments ``a``; sets PySCF's threads to ``a.threads``."""
    lib.num_threads(a.threads)
    level = bench.parse_level(a.level)
    if a.xyz.endswith('.xyz'):
        m = bench.molecules_from_xyz([a.xyz], charge=a.charge)[0]
    else:
        m = bench.molecules_from_smiles([a.xyz])[0]
    return bench.build_mol(m, level['basis']), level
