import math

import torch

from vitkit.model.pos_embed import resample_pos_embed, sincos_2d


def test_sincos2d_equals_closed_form():
    grid, dim = (3, 5), 16
    pe = sincos_2d(grid, dim)
    assert pe.shape == (1, 15, 16)
    q = dim // 4
    for y in range(grid[0]):
        for x in range(grid[1]):
            row = pe[0, y * grid[1] + x]
            for k in range(q):
                w = 1.0 / 10000 ** (k / q)
                expect = [math.sin(y * w), math.cos(y * w), math.sin(x * w), math.cos(x * w)]
                got = [row[k], row[q + k], row[2 * q + k], row[3 * q + k]]
                for e, g in zip(expect, got):
                    assert abs(e - g.item()) < 1e-5


def test_resample_same_grid_is_identity():
    pe = torch.randn(1, 1 + 12, 8)
    assert resample_pos_embed(pe, (3, 4), (3, 4), num_prefix_tokens=1) is pe


def test_resample_non_square_keeps_prefix_tokens():
    pe = torch.randn(1, 3 + 6, 8)
    out = resample_pos_embed(pe, (4, 5), (2, 3), num_prefix_tokens=3)
    assert out.shape == (1, 3 + 20, 8)
    assert torch.equal(out[:, :3], pe[:, :3])


def test_resample_of_a_constant_stays_constant():
    pe = torch.ones(1, 16, 4) * 0.7
    out = resample_pos_embed(pe, (6, 6), None, num_prefix_tokens=0)
    assert torch.allclose(out, torch.full_like(out, 0.7), atol=1e-5)
