"""Bit-packing of low-bit codes: hand-computed layouts, round trips, sizes and errors."""

import pytest
import torch

from qblora_pl.quantization.packing import SUPPORTED_BITS, pack_codes, packed_size, unpack_codes


def _u8(values):
    return torch.tensor(values, dtype=torch.uint8)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_round_trip_and_packed_size(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 5, 64), generator=gen).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, bits * 64 // 8) == (3, 5, packed_size(64, bits))
    assert torch.equal(unpack_codes(packed, bits, 64), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_extreme_codes_and_empty_rows_round_trip(bits):
    top = 2**bits - 1
    codes = _u8([[0] * 8 + [top] * 8, [top, 0] * 8])
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 16), codes)
    empty = torch.zeros(0, 16, dtype=torch.uint8)
    assert pack_codes(empty, bits).shape == (0, bits * 2)


def test_two_bit_layout_by_hand():
    # byte = q0 | q1 << 2 | q2 << 4 | q3 << 6
    packed = pack_codes(_u8([1, 2, 3, 0, 1, 1, 1, 1]), 2)
    assert packed.tolist() == [1 + (2 << 2) + (3 << 4), 1 + 4 + 16 + 64]  # [57, 85]


def test_four_bit_layout_by_hand():
    packed = pack_codes(_u8([1, 2, 15, 0, 7, 8, 0, 0]), 4)
    assert packed.tolist() == [0x21, 0x0F, 0x87, 0x00]


def test_three_bit_bit_plane_layout_by_hand():
    # codes 1..7,0: plane k collects bit k of the 8 codes, code t in bit t of the byte.
    packed = pack_codes(_u8([1, 2, 3, 4, 5, 6, 7, 0]), 3)
    bit0 = 0b01010101  # codes 1, 3, 5, 7 at positions 0, 2, 4, 6
    bit1 = 0b01100110  # codes 2, 3, 6, 7 at positions 1, 2, 5, 6
    bit2 = 0b01111000  # codes 4, 5, 6, 7 at positions 3, 4, 5, 6
    assert packed.tolist() == [bit0, bit1, bit2]


def test_eight_bit_is_identity_copy():
    codes = _u8([[0, 255, 3, 4, 5, 6, 7, 8]])
    packed = pack_codes(codes, 8)
    assert torch.equal(packed, codes) and packed.data_ptr() != codes.data_ptr()


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_n_not_multiple_of_8_raises_naming_n_and_bits(bits):
    with pytest.raises(ValueError, match=rf"n=12 .*bits={bits}"):
        pack_codes(torch.zeros(2, 12, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match=rf"n=12 .*bits={bits}"):
        unpack_codes(torch.zeros(2, 12, dtype=torch.uint8), bits, 12)


def test_bad_bits_dtype_range_and_length_raise():
    with pytest.raises(ValueError, match=r"bits=5 .*\(2, 3, 4, 8\)"):
        pack_codes(torch.zeros(8, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="uint8"):
        pack_codes(torch.zeros(8, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match=r"code 4 does not fit in bits=2"):
        pack_codes(_u8([0, 1, 2, 3, 4, 0, 0, 0]), 2)
    with pytest.raises(ValueError, match=r"expected last dimension .*= 12"):
        unpack_codes(torch.zeros(2, 8, dtype=torch.uint8), 3, 32)


def test_three_bit_unpack_without_the_little_endian_table_is_the_same(monkeypatch):
    import sys

    codes = torch.randint(0, 8, (5, 3, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_codes(codes, 3)
    assert torch.equal(unpack_codes(packed, 3, 64), codes)  # the table path (this machine)
    monkeypatch.setattr(sys, "byteorder", "big")
    assert torch.equal(unpack_codes(packed, 3, 64), codes)  # the per-bit path
