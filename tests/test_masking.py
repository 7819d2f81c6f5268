"""Masks are checked against plain references written here: counts, sets, and a flood fill."""
import numpy as np
import pytest

from masking import beit_mask, block_mask, random_mask, split_patches

GRIDS = [(7, 7), (8, 8), (14, 14), (16, 16), (8, 12)]


def counts_for(n):
    return sorted({0, 1, 5, n // 4, round(0.4 * n), n // 2, n - 1, n})


def component_sizes(mask, grid):
    """Sizes of the 4-connected components of a flat bool mask, by breadth-first search."""
    h, w = grid
    cells = mask.reshape(h, w)
    seen = np.zeros((h, w), dtype=bool)
    sizes = []
    for i in range(h):
        for j in range(w):
            if not cells[i, j] or seen[i, j]:
                continue
            seen[i, j] = True
            queue, size = [(i, j)], 0
            while queue:
                y, x = queue.pop()
                size += 1
                for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= ny < h and 0 <= nx < w and cells[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            sizes.append(size)
    return sizes


def mean_component_size(masks, grid):
    sizes = [s for m in masks for s in component_sizes(m, grid)]
    return sum(sizes) / len(sizes)


def as_mask(indices, n):
    mask = np.zeros(n, dtype=bool)
    mask[indices] = True
    return mask


def test_component_sizes_reference():
    # The reference itself: two 4-connected pieces; the diagonal touch does not connect.
    cells = np.array([[1, 1, 0],
                      [0, 0, 1],
                      [1, 0, 1]], dtype=bool)
    assert sorted(component_sizes(cells.reshape(-1), (3, 3))) == [1, 2, 2]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("mask_fn", [block_mask, random_mask])
def test_exact_count(mask_fn, grid):
    n = grid[0] * grid[1]
    for num_masked in counts_for(n):
        for seed in range(15):
            mask = mask_fn(grid, num_masked, np.random.default_rng(seed))
            assert mask.dtype == bool and mask.shape == (n,)
            assert int(mask.sum()) == num_masked


def test_block_mask_min_block_larger_than_grid():
    for seed in range(20):
        assert block_mask((3, 3), 5, np.random.default_rng(seed), min_block=16).sum() == 5
        assert block_mask((7, 7), 40, np.random.default_rng(seed), min_block=64).sum() == 40


def test_random_mask_is_uniform():
    # Every cell should be masked with probability 20/64; allow 5 standard deviations.
    rng, draws = np.random.default_rng(0), 3000
    hits = sum(random_mask((8, 8), 20, rng).astype(int) for _ in range(draws))
    p = 20 / 64
    std = np.sqrt(draws * p * (1 - p))
    assert np.all(np.abs(hits - draws * p) < 5 * std)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("mask_fn", [block_mask, random_mask])
def test_allowed_is_respected(mask_fn, grid):
    n = grid[0] * grid[1]
    for seed in range(10):
        rng = np.random.default_rng(seed)
        allowed = rng.random(n) < 0.6
        num_allowed = int(allowed.sum())
        for num_masked in sorted({0, 1, num_allowed // 3, num_allowed // 2, num_allowed}):
            mask = mask_fn(grid, num_masked, rng, allowed=allowed)
            assert int(mask.sum()) == num_masked
            assert not np.any(mask & ~allowed)
        # Asking for every allowed cell leaves exactly the allowed set.
        assert np.array_equal(mask_fn(grid, num_allowed, rng, allowed=allowed), allowed)


@pytest.mark.parametrize("mask_fn", [block_mask, random_mask])
def test_bad_counts_raise(mask_fn):
    rng = np.random.default_rng(0)
    allowed = np.zeros(196, dtype=bool)
    allowed[:10] = True
    with pytest.raises(AssertionError, match="allowed"):
        mask_fn((14, 14), 11, rng, allowed=allowed)
    with pytest.raises(AssertionError):
        mask_fn((14, 14), 197, rng)
    with pytest.raises(AssertionError):
        mask_fn((14, 14), -1, rng)


@pytest.mark.parametrize("kind", ["block", "random"])
@pytest.mark.parametrize("grid", GRIDS)
def test_split_half_is_complement(grid, kind):
    n = grid[0] * grid[1]
    for seed in range(20):
        a, b = split_patches(grid, 0.5, np.random.default_rng(seed), kind=kind)
        assert len(a) == len(b) == round(n / 2)
        assert not set(a) & set(b)
        if n % 2 == 0:
            assert set(a) | set(b) == set(range(n))


@pytest.mark.parametrize("kind", ["block", "random"])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("mask_ratio", [0.6, 0.75, 0.9])
def test_split_high_ratio_is_disjoint(grid, kind, mask_ratio):
    n = grid[0] * grid[1]
    k = round(n * (1 - mask_ratio))
    for seed in range(20):
        a, b = split_patches(grid, mask_ratio, np.random.default_rng(seed), kind=kind)
        assert len(a) == len(b) == k
        assert not set(a) & set(b)
    if mask_ratio == 0.75 and n % 4 == 0:
        assert k == n // 4


@pytest.mark.parametrize("kind", ["block", "random"])
@pytest.mark.parametrize("mask_ratio", [0.5, 0.75])
def test_split_indices_sorted_unique_in_range(kind, mask_ratio):
    for seed in range(20):
        split = split_patches((14, 14), mask_ratio, np.random.default_rng(seed), kind=kind)
        assert split.dtype == np.int64 and split.ndim == 2 and split.shape[0] == 2
        for row in split:
            assert np.all(np.diff(row) > 0)  # strictly increasing: sorted and unique
            assert row.min() >= 0 and row.max() < 196


def test_beit_mask_count():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        assert beit_mask((14, 14), 0.4, rng).sum() == 78
        assert beit_mask((14, 14), 75 / 196, rng).sum() == 75
        assert beit_mask((8, 12), 0.5, rng, kind="random").sum() == 48


def test_bad_ratios_raise():
    rng = np.random.default_rng(0)
    for ratio in [0.0, 0.3, 0.49, 1.0, 1.5, -0.5]:
        with pytest.raises(AssertionError, match="mask_ratio"):
            split_patches((14, 14), ratio, rng)
    with pytest.raises(AssertionError, match="no visible patch"):
        split_patches((2, 2), 0.9, rng)  # k = round(0.4) = 0
    for ratio in [0.0, 1.0, 1.5, -0.1]:
        with pytest.raises(AssertionError, match="mask_ratio"):
            beit_mask((14, 14), ratio, rng)
    with pytest.raises(AssertionError, match="kind"):
        split_patches((14, 14), 0.5, rng, kind="grid")
    with pytest.raises(AssertionError, match="kind"):
        beit_mask((14, 14), 0.4, rng, kind="grid")


@pytest.mark.parametrize("num_masked", [49, 75, 98])
def test_block_masks_are_contiguous(num_masked):
    grid, seeds = (14, 14), range(40)
    blocks = [block_mask(grid, num_masked, np.random.default_rng(s)) for s in seeds]
    randoms = [random_mask(grid, num_masked, np.random.default_rng(s)) for s in seeds]
    assert mean_component_size(blocks, grid) > 3 * mean_component_size(randoms, grid)


def test_block_mask_is_symmetric_and_isotropic():
    # Uniform positions on a symmetric grid: each half is masked as often as its mirror image.
    # Log-uniform aspect ratios in [r, 1/r]: tall blocks are as common as wide ones.
    masks = np.stack([block_mask((14, 14), 49, np.random.default_rng(s)).reshape(14, 14)
                      for s in range(2000)])
    hits = masks.sum(axis=0)
    assert abs(hits[:7].sum() / hits[7:].sum() - 1) < 0.12  # top vs bottom
    assert abs(hits[:, :7].sum() / hits[:, 7:].sum() - 1) < 0.12  # left vs right
    horizontal_pairs = (masks[:, :, 1:] & masks[:, :, :-1]).sum()
    vertical_pairs = (masks[:, 1:, :] & masks[:, :-1, :]).sum()
    assert abs(horizontal_pairs / vertical_pairs - 1) < 0.05


def test_split_branches_are_contiguous():
    # At 75% branch B is drawn around A's blocks; it should still come in blocks, not specks.
    grid, n = (14, 14), 196
    for branch in (0, 1):
        blocks = [as_mask(split_patches(grid, 0.75, np.random.default_rng(s))[branch], n)
                  for s in range(40)]
        randoms = [as_mask(split_patches(grid, 0.75, np.random.default_rng(s), "random")[branch], n)
                   for s in range(40)]
        assert mean_component_size(blocks, grid) > 3 * mean_component_size(randoms, grid)


def test_determinism():
    draws = {
        "block": lambda rng: block_mask((14, 14), 98, rng),
        "random": lambda rng: random_mask((14, 14), 98, rng),
        "split_block": lambda rng: split_patches((14, 14), 0.75, rng),
        "split_random": lambda rng: split_patches((14, 14), 0.5, rng, kind="random"),
        "beit": lambda rng: beit_mask((14, 14), 0.4, rng),
    }
    for name, draw in draws.items():
        for seed in range(5):
            first = draw(np.random.default_rng(seed))
            assert np.array_equal(first, draw(np.random.default_rng(seed))), name
            assert not np.array_equal(first, draw(np.random.default_rng(seed + 100))), name
