"""Set-up shared by the diagnostics that compare the model's delta-rho with the exact one
on validation molecules (core_substitution, guess_settings_cap, coulomb_xc_split)."""
import types

from pyscf_densr import bench, hook

LEVEL = 'pbe/def2-svp'


def cases(net, n, first=400):
    """For validation molecules first.. (n of them): a namespace with the molecule record ``m``,
    ``mol``, the converged SCF ``mf`` (its cycles from minao), ``dm_sad``, ``e_ref`` (Eh),
    the reference grids ``ref`` (bench.reference_grids), the model's ``pred`` and the exact
    ``exact`` delta-rho (e/Bohr^3) on ``ref['grid']``."""
    level = bench.parse_level(LEVEL)
    for m in bench.molecules_from_heldout('../shared/data', first, 450, limit=n):
        mol = bench.build_mol(m, 'def2-svp')
        mf = bench.make_scf(mol, level)
        mf.kernel()
        dm_sad = mf.init_guess_by_minao(mol)
        ref = bench.reference_grids(mol, mf.make_rdm1(), dm_sad, net.config)
        pred, _ = hook.predict_delta_rho(mol, dm_sad, net)
        yield types.SimpleNamespace(m=m, mol=mol, mf=mf, dm_sad=dm_sad, e_ref=mf.e_tot, ref=ref,
                                    pred=pred, exact=ref['rho_conv'] - ref['rho_sad'], level=level)
