"""``densr predict``: a molecule's SAD and predicted densities as Gaussian cube files.

    densr predict molecule.xyz [-o prefix] [--charge Q] [--model NAME] [--device cpu]

Writes ``prefix_sad.cube`` (rho_SAD, input grid), ``prefix_delta.cube`` (the network's
delta-rho, output grid) and ``prefix_densr.cube`` (rho_SAD + delta-rho, output grid), in
e/Bohr^3 as the cube format expects; coordinates in the files follow ASE's cube writer.
"""

import argparse

import numpy as np
from pyscf import gto
from pyscf.data.nist import BOHR


def predict_densities(mol, model=None, device=None):
    """(rho_SAD coarse, coarse grid, delta-rho fine, fine grid, SAD density matrix)."""
    from pyscf.scf import hf
    from pyscf_densr import hook, grid
    hook.check_molecule(mol)
    dm_sad = hf.init_guess_by_minao(mol)
    delta, fine = hook.predict_delta_rho(mol, dm_sad, model, device)
    cfg = hook.load_model(model, device).config
    box = grid.make_box(mol.atom_coords(), cfg['spacing'], cfg['margin'])
    rho_sad = grid.eval_density(mol, dm_sad, box)
    return rho_sad, box, delta, fine, dm_sad


def write_cube(path, mol, data, ugrid):
    """Write ``data`` on UniformGrid ``ugrid`` (Bohr) as a cube file with ASE."""
    from ase import Atoms
    from ase.io.cube import write_cube as _write
    atoms = Atoms(numbers=[gto.charge(mol.atom_pure_symbol(i)) for i in range(mol.natm)],
                  positions=mol.atom_coords() * BOHR,
                  cell=np.diag(np.array(ugrid.shape) * ugrid.spacing * BOHR))
    with open(path, 'w') as f:
        _write(f, atoms, data=np.asarray(data, dtype=float), origin=ugrid.origin * BOHR)


def main(argv=None):
    p = argparse.ArgumentParser(prog='densr predict', description=__doc__.split('\n')[0])
    p.add_argument('xyz', help='molecule, xyz file in Angstrom')
    p.add_argument('-o', '--out', default=None, help='output prefix (default: xyz stem)')
    p.add_argument('--charge', type=int, default=0)
    p.add_argument('--spin', type=int, default=None)
    p.add_argument('--basis', default='def2-svp', help='basis of the SAD density matrix')
    p.add_argument('--model', default=None)
    p.add_argument('--device', default=None)
    a = p.parse_args(argv)
    mol = gto.M(atom=a.xyz, basis=a.basis, charge=a.charge, spin=a.spin, verbose=0)
    rho_sad, box, delta, fine, dm_sad = predict_densities(mol, a.model, a.device)
    prefix = a.out or a.xyz.rsplit('.', 1)[0]
    from pyscf_densr import grid
    rho_fine = grid.eval_density(mol, dm_sad, fine)
    write_cube(prefix + '_sad.cube', mol, rho_sad, box)
    write_cube(prefix + '_delta.cube', mol, delta, fine)
    write_cube(prefix + '_densr.cube', mol, rho_fine + delta, fine)
    print('wrote %s_{sad,delta,densr}.cube (electrons in box: SAD %.3f, densr %.3f)' % (
        prefix, rho_sad.sum() * box.dv, (rho_fine + delta).sum() * fine.dv))


if __name__ == '__main__':
    main()
