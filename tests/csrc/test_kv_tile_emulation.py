"""The tensor-core tile paths of csrc/cuda/kv_tile.cuh, emulated lane by lane on the CPU
(scripts/emulate_cuda_tiles.py): every lane's fragment registers, the mma's fragment layouts, the
shared-memory staging, and the fp16/bf16 rounding. CI has no GPU. These tests check the index
arithmetic of the kernels' data layouts against a numpy reference:
- keys: the Q'hi/Q'lo split and the permuted q table, also in two columns of one mma (PAIRED blocks of at most 4 rows);
- values: the byte loads at 2 bits and ldmatrix.x4.trans at 4 bits, with B = p * s (decode
  attention) and with A = the dequantized values (Q_MatMul); decode's narrow 2-bit path
  (ldmatrix, query rows 0-3 twice in the mma's columns);
- the q.z prologue and the code unpack.

The GPU tests (tests/ops/test_decode_attention.py, test_qmatmul.py) then check the kernels
themselves on the H200.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def emu():
    spec = importlib.util.spec_from_file_location("emulate_cuda_tiles", ROOT / "scripts" / "emulate_cuda_tiles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unpack_gives_the_codes(emu):
    emu.test_unpack()  # asserts every (dtype, bits, field) on random words


@pytest.mark.parametrize("dt", ["f16", "bf16"])
@pytest.mark.parametrize("KB", [2, 4])
@pytest.mark.parametrize("D", [64, 128])
def test_key_scores_match_numpy(emu, dt, KB, D):
    for G in (32, 64, 128):
        for t0 in (0, 64, 192):
            err, pair_err = emu.test_keys(KB, D, G, dt, t0)
            assert err < 1e-4 and pair_err < 1e-2, (G, t0, err, pair_err)


@pytest.mark.parametrize("dt", ["f16", "bf16"])
@pytest.mark.parametrize("KB", [2, 4])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("rows", [1, 4])
def test_paired_key_scores_match_numpy(emu, dt, KB, D, rows):
    """key_scores' PAIRED layout (blocks of at most 4 query rows: Q'hi of row r in column 2r, Q'lo
    in 2r + 1 of one mma): lane tid holds row tid's scores, hi + lo, equal to the reference, and
    writes row tid of the probability pairs (a row past the block's is q = 0: scores of 0)."""
    for G in (32, 64, 128):
        for t0 in (0, 64, 192):
            err, pair_err = emu.test_keys(KB, D, G, dt, t0, paired_rows=rows)
            assert err < 1e-4 and pair_err < 1e-2, (G, t0, err, pair_err)


@pytest.mark.parametrize("dt", ["f16", "bf16"])
@pytest.mark.parametrize("VB", [2, 4])  # 4: the ldmatrix.x4.trans path
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dequant", [False, True], ids=["value_accum", "value_accum_dequant"])
def test_value_accumulation_matches_numpy(emu, dt, VB, D, dequant):
    for G in (g for g in (32, 64, 128) if g <= D):
        for valid in (64, 37):  # a whole tile, and one cut inside a token pair
            err = emu.test_values(VB, D, G, dt, valid=valid, dequant=dequant)
            assert err < 1e-2, (G, valid, err)  # NaN (a channel never written) fails too


@pytest.mark.parametrize("dt", ["f16", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
def test_narrow_value_accumulation_matches_numpy(emu, dt, D):
    """value_accum_narrow (2-bit values through ldmatrix in blocks of at most 4 query rows): each
    (row, channel) of rows 0-3 comes from exactly one lane (asserted inside), equal to the reference."""
    for G in (g for g in (32, 64, 128) if g <= D):
        for valid in (64, 37):
            err = emu.test_values(2, D, G, dt, valid=valid, narrow=True)
            assert err < 1e-2, (G, valid, err)


@pytest.mark.parametrize("VB", [2, 4])
def test_qmatmul_values_keep_the_bits_of_a_long_softmax(emu, VB):
    """p ~ 1/T (a softmax over 64k tokens) in fp16: Q_MatMul's value_accum_dequant (A = dequantized
    values, B = p) keeps fp16 rounding, where value_accum's B = p * s falls below fp16's normal range."""
    p_scale = 2.0 ** -16
    dequant = emu.values_rel_err(VB, 128, 32, "f16", True, p_scale)
    p_times_s = emu.values_rel_err(VB, 128, 32, "f16", False, p_scale)
    assert dequant < 2e-4, dequant
    assert p_times_s > 5 * dequant, (p_times_s, dequant)


@pytest.mark.parametrize("dt", ["f16", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
def test_qz_prologue_matches_numpy(emu, dt, D):
    assert emu.test_qz(D, dt) < 1e-3
