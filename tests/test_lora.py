"""models/lora.py: the frozen base held in bf16 while an adapter trains, and given back bit for bit."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from pgraft_cli.models.lora import frozen_layers_in, join_bf16, split_bf16


def test_split_bf16_keeps_autocasts_rounding_and_joins_back_every_bit_pattern():
    # every rounding case: down, up, ties to even in both directions (either sign), zeros,
    # subnormals, the largest float32 (rounds to bf16 infinity) and random weights
    patterns = torch.tensor([0x3F800000, 0x3F807FFF, 0x3F808000, 0x3F818000, 0x3F808001, 0xBF808000 - 2**32,
                             0xBF818000 - 2**32, 0x00000000, 0x80000000 - 2**32, 0x00000001, 0x807F8000 - 2**32,
                             0x7F7FFFFF, 0xFF7FFFFF - 2**32], dtype=torch.int64).to(torch.int32)
    x = torch.cat([patterns.view(torch.float32), torch.randn(4096, generator=torch.Generator().manual_seed(0))])
    high, low, ties = split_bf16(x.reshape(-1, 1))
    assert high.dtype == torch.bfloat16 and low.dtype == torch.int16 and low.shape == (len(x), 1)
    assert torch.equal(high.view(torch.int16), x.reshape(-1, 1).to(torch.bfloat16).view(torch.int16))  # as autocast
    # 0x3F808000 and 0xBF808000 are ties rounded down to an even upper half: d = +2^15, the listed ones
    assert ties.tolist() == [2, 5]
    assert torch.equal(join_bf16(high, low, ties).view(torch.int32), x.reshape(-1, 1).view(torch.int32))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set size from /proc")
def test_frozen_layers_in_bf16_keep_no_float32_copy_on_the_host():
    """While the frozen layers are in bf16 the process holds 2 bytes of leftover bits per weight,
    not a float32 copy as well: its resident memory does not grow (a float32 copy kept would add the
    bf16 half on top, 2 bytes a weight)."""
    torch.manual_seed(0)
    # each tensor over glibc's largest mmap threshold (32 MiB), so a freed one leaves the resident set
    network = nn.Sequential(nn.Linear(8, 8), *[nn.Linear(6144, 4096, bias=False) for _ in range(2)])
    network.requires_grad_(False)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    frozen_bytes = sum(m.weight.nbytes for m in network[1:])  # 192 MiB of float32
    start = _rss_bytes()
    with frozen_layers_in(network, torch.bfloat16) as held:
        grown = _rss_bytes() - start
        assert all(m.weight.dtype == torch.bfloat16 for m in network[1:]) and network[0].weight.dtype == torch.float32
        assert sum(t.nbytes for t in held) <= frozen_bytes // 2 + frozen_bytes // 1000  # int16, a few ties
    assert grown < frozen_bytes // 8, f"resident memory grew by {grown / 2**20:.1f} MiB while in bf16"
    after = network.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], before[k]) for k in before)
