"""models/lora.py: the frozen base held in bf16 while an adapter trains, and given back bit for bit."""

from __future__ import annotations

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



def _with_ties(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every third value (in its logical order) a tie rounded down to even, 1.00390625 (0x3F808000)."""
    flat = x.flatten()
    flat[::3] = torch.tensor(0x3F808000, dtype=torch.int32).view(torch.float32)
    return flat.view(x.shape)


def test_split_and_join_bf16_give_non_contiguous_weights_back_bit_for_bit():
    """A transposed matrix and a channels_last convolution weight (strided storage), with ties among them."""
    g = torch.Generator().manual_seed(0)
    weights = [_with_ties(torch.randn(8, 6, generator=g)).t(),
               _with_ties(torch.randn(4, 3, 3, 3, generator=g)).contiguous(memory_format=torch.channels_last)]
    for x in weights:
        assert not x.is_contiguous()
        high, low, ties = split_bf16(x)
        assert len(ties) > 0
        assert torch.equal(join_bf16(high, low, ties).view(torch.int32), x.view(torch.int32))


def test_join_bf16_keeps_nan_a_nan_whatever_its_payload_or_sign():
    """The bf16 cast may canonicalise a NaN's payload and sign: the join gives a NaN back, not its bits."""
    nans = torch.tensor([0x7FC00000, 0x7FC12345, 0x7F800001, 0xFFC00000 - 2**32, 0xFF812345 - 2**32],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([nans, torch.randn(16, generator=torch.Generator().manual_seed(0))])
    back = join_bf16(*split_bf16(x))
    assert torch.isnan(back[:len(nans)]).all() and torch.equal(back[len(nans):], x[len(nans):])

def _network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(64, 32), nn.Conv2d(4, 8, 3)).requires_grad_(False)


def test_frozen_layers_off_the_host_keep_only_the_bits_bf16_drops_on_the_host():
    """A network on a GPU (``host="none"`` stands in here): while its frozen layers are bf16, the host
    keeps 2 bytes a weight (int16 low bits, a few tie indices), not a 4-byte float32 copy; on exit
    every weight is its float32 self bit for bit."""
    network = _network()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    frozen = [p for m in list(network)[1:] for p in m.parameters()]
    with frozen_layers_in(network, torch.bfloat16, host="none") as held:
        assert all(p.dtype == torch.bfloat16 for p in frozen) and network[0].weight.dtype == torch.float32
        assert all(torch.equal(p.view(torch.int16), before[k].to(torch.bfloat16).view(torch.int16))  # as autocast
                   for k, p in network.state_dict().items() if not k.startswith("0."))
        assert not any(t.dtype == torch.float32 for t in held)
        assert sum(t.numel() * t.element_size() for t in held if t.dtype == torch.int16) == 2 * sum(p.numel() for p in frozen)
    after = network.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], before[k]) for k in before)


def test_frozen_layers_on_the_host_keep_their_own_storage_not_a_copy():
    """On the CPU the float32 weights are kept as they are (often the weight file's memory map): the
    host holds no second copy, and they come back as the very same storage."""
    network = _network()
    storages = {k: v.data_ptr() for k, v in network.state_dict().items()}
    with frozen_layers_in(network, torch.bfloat16) as held:
        assert {t.data_ptr() for t in held} == {storages[k] for k in storages if not k.startswith("0.")}
    assert {k: v.data_ptr() for k, v in network.state_dict().items()} == storages
