"""Uniform grids, the separable quadrature, the network's tiling and model files."""

import numpy as np
import pytest
import torch
from pyscf import gto
from pyscf.dft import numint

from pyscf_densr import fit, grid, model as model_mod
from conftest import cartesian, WATER


def test_refined_grid_subdivides_voxels():
    box = grid.make_box(np.zeros((1, 3)), 0.4, 2.0)
    fine = box.refine(2)
    assert fine.shape == tuple(2 * n for n in box.shape)
    # the mean of the 8 fine points of a voxel is the voxel centre
    c = fine.coords().reshape(*fine.shape, 3)
    mean = c.reshape(box.shape[0], 2, box.shape[1], 2, box.shape[2], 2, 3).mean(axis=(1, 3, 5))
    assert np.allclose(mean, box.coords().reshape(*box.shape, 3))


def test_box_errors():
    with pytest.raises(ValueError, match='without atoms'):
        grid.make_box(np.zeros((0, 3)), 0.4, 2.0)
    with pytest.raises(ValueError, match='NaN'):
        grid.make_box(np.array([[0, 0, np.nan]]), 0.4, 2.0)


def test_density_integrates_to_electron_count():
    mol = gto.M(atom=WATER, basis='def2-svp', verbose=0)
    from pyscf.scf import hf
    dm = hf.init_guess_by_minao(mol)
    g = grid.make_box(mol.atom_coords(), 0.2, 8.0)
    rho = grid.eval_density(mol, dm, g, max_memory=5)   # many chunks
    ref = numint.eval_rho(mol, mol.eval_gto('GTOval', g.coords()), dm)
    assert np.allclose(rho.ravel(), ref, atol=1e-12)
    assert abs(rho.sum() * g.dv - mol.nelectron) < 0.2   # O 1s cusp is under-sampled at 0.2 Bohr


def test_separable_quadrature_matches_dense():
    mol = gto.M(atom=WATER, basis='def2-svp', verbose=0)
    aux = fit.make_auxmol(mol)
    cart = cartesian(aux)
    g = grid.make_box(mol.atom_coords(), 0.3, 4.0)
    rng = np.random.default_rng(0)
    field = rng.normal(size=g.shape)
    chi = cart.eval_gto('GTOval_cart', g.coords())
    assert np.allclose(grid.project_on_cartesian_gtos(cart, field, g),
                       chi.T.dot(field.ravel()) * g.dv, atol=1e-10)
    assert np.allclose(grid.gram_of_cartesian_gtos(cart, g), chi.T.dot(chi) * g.dv, atol=1e-9)


def test_fit_conserves_charge_and_reproduces_aux_density():
    mol = gto.M(atom=WATER, basis='def2-svp', verbose=0)
    aux = fit.make_auxmol(mol)
    g = grid.make_box(mol.atom_coords(), 0.2, 5.0)
    rng = np.random.default_rng(1)
    c_true = rng.normal(size=aux.nao) * 1e-2
    field = aux.eval_gto('GTOval_sph', g.coords()).dot(c_true).reshape(g.shape)
    c = fit.fit_delta_rho(aux, field, g, charge=0.25)
    assert abs(fit.charges(aux).dot(c) - 0.25) < 1e-10
    fitted = aux.eval_gto('GTOval_sph', g.coords()).dot(c)
    # the constraint costs little: the fitted field is close to the original
    assert np.abs(fitted - field.ravel()).sum() < 0.3 * np.abs(field).sum()


def test_voxel_averaged_quadrature_integrates_tight_functions():
    """Against a constant field, the voxel-averaged factors integrate every function exactly
    (s: its charge; others: 0), however tight; point values do not."""
    mol = gto.M(atom=WATER, basis='def2-svp', verbose=0)
    cart = cartesian(fit.make_auxmol(mol))
    g = grid.make_box(mol.atom_coords(), 0.2, 6.0)
    one = np.ones(g.shape)
    exact = np.zeros(cart.nao)
    loc = cart.ao_loc_nr()
    for ib in range(cart.nbas):
        if cart.bas_angular(ib) == 0:
            a, cs = cart.bas_exp(ib), cart._libcint_ctr_coeff(ib)
            exact[loc[ib]:loc[ib + 1]] = (cs.T.dot((np.pi / a) ** 1.5)
                                          * 0.282094791773878143)
    # s and p functions whose tails the box holds (d functions integrate x^2 to non-zero)
    sp_ = np.concatenate([np.arange(loc[i], loc[i + 1]) for i in range(cart.nbas)
                          if cart.bas_angular(i) <= 1 and cart.bas_exp(i).min() > 1.0])
    avg = grid.project_on_cartesian_gtos(cart, one, g, cell_average=True)
    point = grid.project_on_cartesian_gtos(cart, one, g)
    assert np.allclose(avg[sp_], exact[sp_], rtol=1e-8, atol=1e-10)
    assert np.abs(point[sp_] - exact[sp_]).max() > 1e-3


@pytest.mark.parametrize('h', [0.2, 0.4])
def test_hartree_potential_of_a_gaussian(h):
    """The FFT Poisson solve against erf(sqrt(a) r) / r, free-space boundaries (the box's
    corners are as far as its centre's images would be)."""
    from scipy.special import erf
    g = grid.make_box(np.zeros((1, 3)), h, 8.0)
    x = g.coords()
    for a, tol in ((0.5, 1.5e-3), (2.0, 1.5e-2)):
        r = np.linalg.norm(x - [0.03, 0.05, 0.07], axis=1)
        rho = (a / np.pi) ** 1.5 * np.exp(-a * r * r)
        v = grid.hartree_potential(rho.reshape(g.shape), g).ravel()
        assert v.dtype == np.float32
        ref = erf(np.sqrt(a) * r) / r
        assert np.abs(v - ref).max() < tol
        assert abs(v[np.argmax(r)] - 1 / r.max()) < 1e-4     # the far corner: q / r


def test_coulomb_projection_matches_analytic_integrals():
    """(k|rho) from the grid (Poisson + voxel-averaged quadrature) against int2c2e, for a
    density of Gaussians as smooth as a valence delta-rho and one 100 times tighter; and
    by the grid fit."""
    mol = gto.M(atom=WATER, basis='def2-svp', verbose=0)
    aux = fit.make_auxmol(mol)
    g = grid.make_box(mol.atom_coords(), 0.2, 9.0)
    for exps, tol in (([0.3, 1.0, 3.0], 5e-4), ([30.0, 300.0], 1e-2)):
        src = gto.M(atom=WATER, basis={e: [[0, [x, 1.0]] for x in exps] + [[1, [1.0, 1.0]]]
                                       for e in ('O', 'H')}, verbose=0)
        c = np.random.default_rng(4).normal(size=src.nao)
        rho = src.eval_gto('GTOval_sph', g.coords()).dot(c).reshape(g.shape)
        want = gto.intor_cross('int2c2e', aux, src).dot(c)
        got, route = fit.coulomb_projection(aux, rho, g)
        assert route == 'Poisson'
        assert np.abs(got - want).max() < tol * np.abs(want).max()
    # the grid-fit route, where affordable: within a few per cent of the analytic numbers
    # for the smooth density (its fit basis is not the density's)
    src = gto.M(atom=WATER, basis={e: [[0, [x, 1.0]] for x in (0.3, 1.0, 3.0)]
                                   + [[1, [1.0, 1.0]]] for e in ('O', 'H')}, verbose=0)
    c = np.random.default_rng(4).normal(size=src.nao)
    rho = src.eval_gto('GTOval_sph', g.coords()).dot(c).reshape(g.shape)
    want = gto.intor_cross('int2c2e', aux, src).dot(c)
    got, route = fit.coulomb_projection(aux, rho, g, charge=float(rho.sum() * g.dv),
                                        fitmol=aux, max_memory=4000)
    assert route == 'grid fit'
    assert np.abs(got - want).max() < 0.03 * np.abs(want).max()


def test_auxbasis_covers_unusual_elements():
    mol = gto.M(atom='U 0 0 0; H 0 0 2.0', basis={'U': 'ano', 'H': 'sto-3g'}, spin=None,
                verbose=0)
    aux = fit.make_auxmol(mol)
    assert aux.nao > 0


@pytest.mark.parametrize('dilations,coarse,shape', [(None, 0, (23, 19, 17)),
                                                    ([1, 3], 0, (41, 30, 27)),
                                                    (None, 2, (44, 37, 30))])
def test_tiled_prediction_equals_untiled(dilations, coarse, shape):
    torch.manual_seed(0)
    net = model_mod.build_model(channels=4, blocks=2, dilations=dilations,
                                coarse_blocks=coarse, coarse_channels=6)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    rho = np.random.default_rng(0).random(shape).astype(np.float32)
    full = model_mod.predict(net, rho, max_voxels=10**9)
    tiled = model_mod.predict(net, rho, max_voxels=12**3)
    assert full.shape == tuple(2 * n for n in shape)
    assert np.allclose(full, tiled, atol=1e-5)


def test_box_symmetries_and_their_inverses():
    ops = model_mod.box_symmetries(48)
    assert len({(tuple(p), tuple(f)) for p, f in ops}) == 48
    assert ops[:2] == [((0, 1, 2), (False,) * 3), ((0, 1, 2), (True,) * 3)]
    assert model_mod.box_symmetries(8) == ops[:8]
    a = np.random.default_rng(1).random((3, 4, 5))
    for perm, flips in ops:
        b = model_mod.apply_symmetry(a, perm, flips)
        assert b.shape == tuple(a.shape[i] for i in perm)
        assert np.array_equal(model_mod.invert_symmetry(b, perm, flips), a)
    with pytest.raises(ValueError, match='1, 2, 8 or 48'):
        model_mod.box_symmetries(4)


def test_symmetry_averaged_prediction_is_equivariant():
    """Averaged over the 8 axis flips, flipping the input box flips the prediction; over all
    48 operations, so does a rotation of the box. A random network alone is not."""
    torch.manual_seed(2)
    net = model_mod.build_model(channels=4, blocks=2, coarse_blocks=1, coarse_channels=6)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    rho = np.random.default_rng(2).random((10, 12, 14)).astype(np.float32)

    def gap(n, perm, flips):
        p = model_mod.predict(net, rho, symmetry=n)
        q = model_mod.predict(net, model_mod.apply_symmetry(rho, perm, flips), symmetry=n)
        return np.abs(model_mod.apply_symmetry(p, perm, flips) - q).max() / np.abs(p).max()

    flip_y = ((0, 1, 2), (False, True, False))
    rotate = ((1, 0, 2), (True, False, False))   # 90 degrees about z
    assert gap(1, *flip_y) > 1e-2 and gap(1, *rotate) > 1e-2
    assert gap(8, *flip_y) < 1e-5 and gap(8, *rotate) > 1e-2
    assert gap(48, *rotate) < 1e-5
    # tiles and symmetry passes combine
    assert np.allclose(model_mod.predict(net, rho, symmetry=8),
                       model_mod.predict(net, rho, symmetry=8, max_voxels=8 ** 3), atol=1e-5)


def test_grown_model_starts_where_the_small_one_was():
    torch.manual_seed(1)
    small = model_mod.build_model(channels=4, blocks=2)
    for p in small.parameters():
        torch.nn.init.normal_(p, std=0.2)
    big = model_mod.build_model(channels=4, blocks=4, dilations=[1, 1, 2, 4])
    assert model_mod.load_grown(big, small.state_dict()) == ['body.2', 'body.3']
    x = torch.rand(1, 10, 9, 8)
    assert torch.equal(big(x), small(x))
    # a half-resolution branch grows the same way
    multi = model_mod.build_model(channels=4, blocks=2, coarse_blocks=2, coarse_channels=6)
    assert model_mod.load_grown(multi, small.state_dict()) == ['branch']
    assert torch.equal(multi(x), small(x))
    # ... and more blocks in an existing branch
    for p in multi.branch.parameters():
        torch.nn.init.normal_(p, std=0.2)
    deeper = model_mod.build_model(channels=4, blocks=2, coarse_blocks=4, coarse_channels=6,
                                   coarse_dilations=[1, 1, 2, 1])
    assert model_mod.load_grown(deeper, multi.state_dict()) == ['branch.blocks.2',
                                                                'branch.blocks.3']
    assert torch.equal(deeper(x), multi(x))
    # names in numeric order past ten blocks (as v6 grew from v5)
    deepest = model_mod.build_model(channels=4, blocks=2, coarse_blocks=12, coarse_channels=6)
    assert model_mod.load_grown(deepest, deeper.state_dict()) == [
        'branch.blocks.%d' % i for i in range(4, 12)]
    assert torch.allclose(deepest(x), deeper(x), atol=1e-6)
    # ... and wider: more half-resolution and full-resolution channels
    for p in deepest.parameters():
        torch.nn.init.normal_(p, std=0.1)
    wide = model_mod.build_model(channels=6, blocks=2, coarse_blocks=12, coarse_channels=9)
    assert model_mod.load_grown(wide, deepest.state_dict()) == ['widened']
    assert torch.allclose(wide(x), deepest(x), atol=1e-6)
    # the new channels carry a signal, and the output learns from it at once
    wide(x).pow(2).sum().backward()
    assert wide.up.weight.grad[:, 4:].abs().sum() > 0
    assert wide.branch.up.weight.grad[:, 6:].abs().sum() > 0
    other = model_mod.build_model(channels=4, blocks=2, kernel=5)
    with pytest.raises(model_mod.ModelError, match='shape mismatch'):
        model_mod.load_grown(other, small.state_dict())
    narrow = model_mod.build_model(channels=3, blocks=2)
    with pytest.raises(model_mod.ModelError, match='shape mismatch'):
        model_mod.load_grown(narrow, small.state_dict())
    finer = model_mod.build_model(channels=4, blocks=2, upsample=3)   # 27 sub-voxels, not 8
    with pytest.raises(model_mod.ModelError, match=r"shape mismatch \['up.weight', 'up.bias'\]"):
        model_mod.load_grown(finer, small.state_dict())
    with pytest.raises(model_mod.ModelError, match='dilations'):
        model_mod.build_model(channels=4, blocks=3, dilations=[1, 2])


@pytest.mark.parametrize('shape', [(9, 7, 5), (10, 8, 6)])
def test_coarse_branch_sits_on_every_other_voxel(shape):
    # with a sampling down-convolution and identity blocks, the branch must return its input
    # on even voxels and the mean of the two neighbours on odd ones: coarse voxels aligned
    # with fine ones (no half-voxel shift) whatever the parity of the box
    br = model_mod.CoarseBranch(1, 1, 3, [])
    with torch.no_grad():
        br.down.weight.zero_()
        br.down.weight[0, 0, 1, 1, 1] = 1
        br.down.bias.zero_()
        br.up.weight.fill_(1)
    br.act = torch.nn.Identity()
    x = torch.arange(shape[0], dtype=torch.float32)[:, None, None].expand(*shape)
    y = br(x[None, None].clone())[0, 0]
    assert y.shape == x.shape
    # an even axis is padded by one zero voxel: its last voxel sees the padding
    ok = tuple(slice(0, n if n % 2 else n - 1) for n in shape)
    assert torch.allclose(y[ok], x[ok], atol=1e-5)


def test_pixel_shuffle_places_subvoxels():
    x = torch.arange(8.).reshape(1, 8, 1, 1, 1)
    y = model_mod.pixel_shuffle_3d(x, 2)[0, 0]
    assert y[0, 0, 0] == 0 and y[0, 0, 1] == 1 and y[0, 1, 0] == 2 and y[1, 0, 0] == 4


def test_save_and_load_roundtrip(tmp_path):
    net = model_mod.build_model(channels=4, blocks=1)
    model_mod.save_model(net, str(tmp_path / 'm'), {'val_nmae': 1.0})
    state = torch.load(tmp_path / 'm.pt', weights_only=True)
    assert set(state) == set(net.state_dict())
    back = model_mod.from_pretrained(str(tmp_path / 'm.pt'))
    assert back.config['channels'] == 4 and back.meta['val_nmae'] == 1.0
    x = torch.rand(1, 6, 6, 6)
    assert torch.allclose(back(x), net(x))


def test_shipped_default_model_loads():
    assert model_mod.DEFAULT_MODEL in model_mod.available_models()
    net = model_mod.from_pretrained()
    assert not net.training


def _saved_random_net(tmp_path, seed):
    """A small random network saved as tmp_path/m.pt/.json, and its float32 state_dict."""
    torch.manual_seed(seed)
    net = model_mod.build_model(channels=4, blocks=2, coarse_blocks=1, coarse_channels=6)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model_mod.save_model(net, str(tmp_path / 'm'))
    state = torch.load(tmp_path / 'm.pt', weights_only=True)
    return net, state


def test_half_precision_weights_load_as_float32(tmp_path):
    """Shipped weights may be stored in float16 (densr-cpu, to keep the file small):
    the loaded network computes in float32 with the rounded weights."""
    net, state = _saved_random_net(tmp_path, 2)
    torch.save({k: v.half() for k, v in state.items()}, tmp_path / 'm.pt')
    half = model_mod.from_pretrained(str(tmp_path / 'm.pt'))
    assert all(p.dtype == torch.float32 for p in half.parameters())
    x = torch.rand(1, 9, 8, 7)
    with torch.no_grad():
        a, b = net.eval()(x), half(x)
    assert 0 < float((a - b).abs().max()) < 0.01 * float(a.abs().max())   # rounded, not lost
    for name in (model_mod.DEFAULT_MODEL,):   # shipped in float16
        assert model_mod.from_pretrained(name).up.weight.dtype == torch.float32



def test_int8_weights_load_close_to_float32(tmp_path):
    """quantize_state (densr-gpu's shipped format) keeps each weight within half a step of
    its channel's 127 levels and loads as float32 through from_pretrained; on this random
    network the output moves by a few percent of its size (the shipped model's test NMAE is
    what docs/training.md reports)."""
    net, state = _saved_random_net(tmp_path, 3)
    q = model_mod.quantize_state(state)
    assert q['head.weight'].dtype == torch.int8
    back = model_mod.dequantize_state(q)
    assert set(back) == set(state)
    for k, v in state.items():
        step = v.abs().reshape(v.shape[0], -1).amax(1) / 127 if v.dim() >= 2 else None
        if step is not None:
            err = (back[k] - v).abs().reshape(v.shape[0], -1).amax(1)
            assert torch.all(err <= 0.5 * step + 1e-7)
    torch.save(q, tmp_path / 'm.pt')
    small = model_mod.from_pretrained(str(tmp_path / 'm.pt'))
    assert all(p.dtype == torch.float32 for p in small.parameters())
    x = torch.rand(1, 9, 8, 7)
    with torch.no_grad():
        a, b = net.eval()(x), small(x)
    assert 0 < float((a - b).abs().max()) < 0.05 * float(a.abs().max())
    assert model_mod.from_pretrained('densr-gpu').up.weight.dtype == torch.float32
