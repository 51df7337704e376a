"""FastAEV against TorchANI 2.9's AEVComputer: values, gradients, finite differences, padded buffers."""

import copy

import pytest
import torch

from nnpq.errors import NnpqError
from nnpq.models.fp32 import assemble_architecture
from nnpq.runtime.aev import FastAEV, cpp_extension_error, load_cpp_extension, neighbor_pairs
from nnpq.systems import get_system

BACKENDS = ["torch", "cpp"]


@pytest.fixture(scope="module")
def ani2x():
    """ANI-2x's architecture (the AEV needs no weights): species converter and both TorchANI neighbour lists."""
    cell_list = assemble_architecture("ani2x", neighborlist="cell_list")
    all_pairs = assemble_architecture("ani2x", neighborlist="all_pairs")
    return (cell_list.species_converter, cell_list.potentials["nnp"].aev_computer,
            all_pairs.potentials["nnp"].aev_computer)


def _require(backend: str) -> None:
    if backend == "cpp" and not load_cpp_extension():
        pytest.skip(f"the C++ AEV kernel did not build here: {cpp_extension_error()}")


@pytest.fixture(scope="module", params=BACKENDS)
def fast(request, ani2x):
    _require(request.param)
    return FastAEV.from_torchani(ani2x[1], backend=request.param)


def _structure(ani2x, name):
    s = get_system(name)
    species = ani2x[0](torch.tensor(s.atomic_numbers)[None])[0]
    pos = torch.tensor(s.positions, dtype=torch.float32)
    cell = None if s.box is None else torch.tensor(s.box, dtype=torch.float32)
    return species, pos, cell


def _triclinic(ani2x, outside: bool):
    """150 water-box atoms in a sheared 11-12 Å cell (below twice the 5.1 Å cutoff: several images
    of one neighbour, and of an atom itself, fall inside the cutoff); optionally atoms moved outside."""
    species, pos, _ = _structure(ani2x, "water-box")
    species, frac = species[:150], pos[:150] / 17.591
    cell = torch.tensor([[11.0, 0.0, 0.0], [3.1, 11.5, 0.0], [-2.2, 2.9, 12.0]])
    pos = frac @ cell
    if outside:
        gen = torch.Generator().manual_seed(0)
        moved = torch.randint(-1, 2, (150, 3), generator=gen).float()  # float32 loses digits further out
        moved[::2] = 0
        pos = pos + moved @ cell + 0.01 * torch.randn(150, 3, generator=gen)
    return species, pos, cell


def _reference(aev_computer, species, pos, cell, grad_out=None):
    """TorchANI's AEV and, for a dE/dAEV, its autograd gradient with respect to the positions."""
    p = pos[None].clone().requires_grad_(grad_out is not None)
    pbc = None if cell is None else torch.ones(3, dtype=torch.bool)
    aev = aev_computer(species[None], p, cell, pbc)[0]
    if grad_out is None:
        return aev.detach(), None
    aev.backward(grad_out)
    return aev.detach(), p.grad[0]


def _ours(module, species, pos, cell, grad_out):
    p = pos.clone().requires_grad_(True)
    aev = module(species, p, cell)
    aev.backward(grad_out)
    return aev.detach(), p.grad


CASES = ["ethanol", "sfcl-sulfonamide", "water-box", "triclinic", "outside"]


def _case(ani2x, name):
    if name == "triclinic":
        return _triclinic(ani2x, outside=False), ani2x[2]
    if name == "outside":
        return _triclinic(ani2x, outside=True), ani2x[2]
    return _structure(ani2x, name), ani2x[1]


@pytest.mark.parametrize("name", CASES)
def test_matches_torchani_values_and_gradients(ani2x, fast, name):
    (species, pos, cell), reference = _case(ani2x, name)
    if name == "sfcl-sulfonamide":
        assert set(species.tolist()) == set(range(7)), "the molecule should hold all 7 ANI-2x elements"
    grad_out = torch.randn(len(species), 1008, generator=torch.Generator().manual_seed(1))
    ref_aev, ref_grad = _reference(reference, species, pos, cell, grad_out)
    aev, grad = _ours(fast, species, pos, cell, grad_out)
    assert aev.shape == (len(species), 1008) and aev.dtype == torch.float32
    torch.testing.assert_close(aev, ref_aev, atol=2e-5, rtol=1e-5)
    scale = ref_grad.abs().max()
    assert (grad - ref_grad).abs().max() <= 2e-5 * scale + 1e-5


def test_outside_atoms_give_the_wrapped_aev(ani2x, fast):
    species, pos, cell = _triclinic(ani2x, outside=False)
    moved = pos + torch.tensor([2.0, -1.0, 3.0]) @ cell
    torch.testing.assert_close(fast(species, moved, cell), fast(species, pos, cell), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sfcl-sulfonamide", "triclinic"])
def test_float64_gradient_equals_finite_differences_and_torchani(ani2x, fast, name):
    (species, pos, cell), reference = _case(ani2x, name)
    pos, cell = pos.double(), None if cell is None else cell.double()
    grad_out = torch.randn(len(species), 1008, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, grad = _ours(fast, species, pos, cell, grad_out)
    assert grad.dtype == torch.float64
    if cell is None:  # (TorchANI's all-pairs list is slow in float64 for small periodic cells)
        _, ref_grad = _reference(copy.deepcopy(reference).double(), species, pos, cell, grad_out)
        torch.testing.assert_close(grad, ref_grad, atol=1e-9, rtol=1e-8)
    h = 1e-5
    for atom, axis in [(0, 0), (1, 2), (len(species) // 2, 1), (len(species) - 1, 0)]:
        step = torch.zeros_like(pos)
        step[atom, axis] = h
        with torch.no_grad():
            fd = ((fast(species, pos + step, cell) - fast(species, pos - step, cell)) * grad_out).sum() / (2 * h)
        assert abs(fd - grad[atom, axis]) <= 1e-6 * (1 + abs(fd)), (atom, axis, float(fd), float(grad[atom, axis]))


def test_scripted_and_autograd_paths_agree(ani2x):
    _require("cpp")
    species, pos, cell = _triclinic(ani2x, outside=True)
    grad_out = torch.randn(len(species), 1008, generator=torch.Generator().manual_seed(3))
    ref_aev, ref_grad = _ours(FastAEV.from_torchani(ani2x[1], backend="torch"), species, pos, cell, grad_out)
    for module in (FastAEV.from_torchani(ani2x[1], backend="autograd"),
                   torch.jit.script(FastAEV.from_torchani(ani2x[1], backend="torch")),
                   torch.jit.script(FastAEV.from_torchani(ani2x[1], backend="cpp"))):
        aev, grad = _ours(module, species, pos, cell, grad_out)
        torch.testing.assert_close(aev, ref_aev, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-4)


def test_neighbor_pairs_match_brute_force(ani2x):
    species, pos, cell = _triclinic(ani2x, outside=True)
    i, j, shift, d = neighbor_pairs(pos, cell, 5.1)
    assert bool((i[1:] >= i[:-1]).all()), "pairs must be sorted by centre"
    torch.testing.assert_close(d, (pos[j] - pos[i] + shift).norm(dim=1), atol=1e-4, rtol=0)
    # brute force over every image within reach
    rng = torch.arange(-4, 5)
    images = torch.cartesian_prod(rng, rng, rng).float() @ cell
    v = pos[None, :, None] - pos[:, None, None] + images[None, None]
    dist = v.norm(dim=-1)
    expected = int(((dist <= 5.1) & (dist > 0)).sum())
    assert len(i) == expected
    got = {(a, b, round(float(x), 3)) for a, b, x in zip(i.tolist(), j.tolist(), d.tolist())}
    assert len(got) == len(i), "no pair may appear twice"


def test_capture_friendly_buffers_equal_the_plain_aev(ani2x):
    species, pos, cell = _triclinic(ani2x, outside=True)
    plain = FastAEV.from_torchani(ani2x[1], backend="torch")
    padded = plain.capture_friendly(skin=0.6)
    grad_out = torch.randn(len(species), 1008, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(5)
    for step, jitter in enumerate([0.0, 0.1, 0.1, 0.5]):
        pos = pos + jitter * (torch.rand(pos.shape, generator=gen) - 0.5)  # |move| <= 0.09 Å per step until the last
        ref_aev, ref_grad = _ours(plain, species, pos, cell, grad_out)
        aev, grad = _ours(padded, species, pos, cell, grad_out)
        torch.testing.assert_close(aev, ref_aev, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-4)
        assert padded.pair_i.shape[0] == padded.pair_capacity > int((padded.shift[:, 0] < 100).sum())
        if step == 0:
            capacity = (padded.pair_capacity, padded.triple_capacity)
    assert padded.rebuilds == 2, "a Verlet list reused while atoms moved < skin/2, rebuilt after"
    assert (padded.pair_capacity, padded.triple_capacity) == capacity or padded.reallocations > 1


def test_capture_friendly_grows_its_capacity(ani2x):
    species, pos, cell = _structure(ani2x, "ethanol")
    padded = FastAEV.from_torchani(ani2x[1], backend="torch").capture_friendly(pair_capacity=8, triple_capacity=8)
    assert padded.update_neighbors(species, pos, cell) is True
    assert padded.pair_capacity > 8 * 9 and padded.triple_capacity > 8
    assert padded.update_neighbors(species, pos, cell) is False
    ref = FastAEV.from_torchani(ani2x[1], backend="torch")(species, pos, cell)
    torch.testing.assert_close(padded.compute(species, pos), ref, atol=2e-5, rtol=1e-5)


def test_bad_input_is_one_line_error(ani2x):
    module = FastAEV.from_torchani(ani2x[1], backend="torch")
    with pytest.raises(NnpqError, match="positions"):
        module(torch.zeros(3, dtype=torch.long), torch.zeros(3, 2))
    with pytest.raises(NnpqError, match="cell"):
        module(torch.zeros(3, dtype=torch.long), torch.zeros(3, 3), torch.eye(2))
    with pytest.raises(NnpqError, match="backend"):
        FastAEV.from_torchani(ani2x[1], backend="fortran")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_padded_step_is_one_graph_replay(ani2x):
    species, pos, cell = _structure(ani2x, "water-box")
    grad_out = torch.randn(len(species), 1008, generator=torch.Generator().manual_seed(6))
    ref_aev, ref_grad = _ours(FastAEV.from_torchani(ani2x[1], backend="torch"), species, pos, cell, grad_out)
    dev = torch.device("cuda")
    module = FastAEV.from_torchani(ani2x[1], backend="torch").to(dev)
    species, pos, cell, grad_out = species.to(dev), pos.to(dev), cell.to(dev), grad_out.to(dev)
    aev, grad = _ours(module, species, pos, cell, grad_out)
    torch.testing.assert_close(aev.cpu(), ref_aev, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(grad.cpu(), ref_grad, atol=1e-4, rtol=1e-4)

    padded = module.capture_friendly(skin=0.5)
    padded.update_neighbors(species, pos, cell)
    static = pos.clone().requires_grad_(True)

    def step():
        return torch.autograd.grad(padded.compute(species, static), static, grad_out)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_grad = step()
    moved = pos + 0.1 * (torch.rand_like(pos) - 0.5)
    assert not padded.needs_rebuild(species, moved, cell)
    with torch.no_grad():
        static.copy_(moved)
    graph.replay()
    _, expected = _ours(module, species, moved, cell, grad_out)
    torch.testing.assert_close(graph_grad, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compiled_backend_matches_the_torch_reference(ani2x):
    species, pos, cell = _triclinic(ani2x, outside=True)
    grad_out = torch.randn(len(species), 1008, generator=torch.Generator().manual_seed(7))
    ref_aev, ref_grad = _ours(FastAEV.from_torchani(ani2x[1], backend="torch"), species, pos, cell, grad_out)
    aev, grad = _ours(FastAEV.from_torchani(ani2x[1], backend="compile"), species, pos, cell, grad_out)
    torch.testing.assert_close(aev, ref_aev, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["water-box", "sfcl-sulfonamide"])
def test_cpp_verlet_list_is_reused_and_gives_the_same_aev(ani2x, name):
    """The C++ path keeps its skin-padded neighbour list while atoms move less than half the skin,
    and rebuilds it beyond that; the AEV equals a fresh torch-backend AEV either way."""
    from nnpq.runtime.aev import VERLET_SKIN

    _require("cpp")
    cpp = FastAEV.from_torchani(ani2x[1], backend="cpp")
    reference = FastAEV.from_torchani(ani2x[1], backend="torch")
    species, pos, cell = _structure(ani2x, name)
    gen = torch.Generator().manual_seed(5)
    cpp(species, pos, cell)
    lists = cpp.__dict__["_verlet"][2]
    for step, scale in enumerate((0.4, 0.4, 1.6)):  # largest moves below, below, above half the skin
        moved = pos + torch.nn.functional.normalize(torch.randn(pos.shape, generator=gen), dim=1) * (
            scale * VERLET_SKIN / 2 * torch.rand(len(pos), 1, generator=gen))
        moved[0] += scale * VERLET_SKIN / 2 * torch.tensor([1.0, 0.0, 0.0]) - moved[0] + pos[0]
        out = cpp(species, moved, cell)
        torch.testing.assert_close(out, reference(species, moved, cell), rtol=1e-5, atol=1e-6)
        assert (cpp.__dict__["_verlet"][2] is lists) == (scale < 1), step
        # neighbours are sorted per centre: a reused list gives the bits of a fresh one, so results
        # do not depend on when the list was built (serial and parallel campaigns agree)
        fresh = FastAEV.from_torchani(ani2x[1], backend="cpp")
        assert torch.equal(out, fresh(species, moved, cell))


def test_cpp_kernel_takes_other_models_constants():
    """ANI-1x's AEV sizes (4 species) go through the kernel's generic instantiation (ANI-2x's are
    specialised): it must equal the torch backend there too."""
    _require("cpp")
    ani1x = assemble_architecture("ani1x", neighborlist="all_pairs")
    computer = ani1x.potentials["nnp"].aev_computer
    s = get_system("ethanol")
    species = ani1x.species_converter(torch.tensor(s.atomic_numbers)[None])[0]
    pos = torch.tensor(s.positions, dtype=torch.float32)
    out = FastAEV.from_torchani(computer, backend="cpp")(species, pos, None)
    torch.testing.assert_close(out, FastAEV.from_torchani(computer, backend="torch")(species, pos, None),
                               rtol=1e-5, atol=1e-6)
