"""One-row matmuls over bitsandbytes' NF4 weights, for decoding one stream.

A one-stream decoding step reads every weight once, so its 4-bit matmuls set its floor. On an H200,
bitsandbytes' one-row kernel moves about 0.94 TB/s of the card's 4.8: 3.6 ms of Falcon-7B's 6.6 ms
step with an adapter (bench/nf4_kernels.py, docs/benchmarks.md); this one takes 2.6 ms. An earlier
Triton kernel that looked each 4-bit code up one at a time (a gather per weight) ran at half
bitsandbytes' speed: it was bound by instructions, not memory, and this one still is.

This kernel looks the codes up four at a time with byte permutes (PTX `prmt`), as the fast CUDA
kernels for lookup-table formats do. NF4's 16 values, as bf16, are 32 bytes: their low bytes in four
registers and their high bytes in four more. One `prmt` picks four low bytes among eight by the low
three bits of four codes, a second picks among the other eight, a third chooses per byte by each
code's top bit; the same for the high bytes; two more interleave them into two bf16 pairs. Eight
weights cost 16 permutes and a few bit operations, then eight fp32 multiply-adds against the input.
The weights and their block scales are read as bitsandbytes stores them (nothing is copied or
converted at load): int32 words of eight codes (the even element in each byte's high nibble),
blocks of 64 weights with one scale each, the scales double-quantized (`absmax = code2[q] *
absmax2[block // 256] + offset`, computed here per block).

Arithmetic: each block's products `code * x` are summed in fp32, then multiplied by the block's
scale. bitsandbytes' one-row kernel also uses the codes rounded to bf16, but rounds each weight and
each product to bf16 before adding, so the two agree to bf16 rounding, not bit for bit; greedy text
can differ where two tokens' logits are that close.

Only CUDA builds of PyTorch ship Triton; `enable` gives the model's NF4 layers this kernel for
one-token passes on a CUDA device and leaves every other pass (and every other layout) to
bitsandbytes. Under an adapter (app/llm/lora.py), the kernel also adds the row's LoRA update as it
writes its output, sparing the separate expand kernel.

`nf4_matmul` takes passes of 2 to 64 rows, where bitsandbytes dequantizes each whole weight to bf16
and hands it to cuBLAS: the same lookups give a bf16 tile in registers, which the tensor cores
multiply by the input, a 64-weight block (one scale) at a time. A narrow layer's reduction is split
across programs so that every SM has several to switch between.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import nn

from app.llm.triton_common import KernelMismatch
from app.llm.triton_lora import LoraUpdate, lora_delta

BLOCK = 64  # weights per block scale: the only block size this kernel takes (bitsandbytes' default)
NESTED_BLOCK = 256  # block scales per second-level scale (double quantization)


@dataclass(frozen=True)
class Config:
    block_n: int = 8  # weight rows per program
    groups: int = 16  # 64-weight blocks per row per iteration
    warps: int = 4


CONFIG = Config()


def config_for(n: int, k: int) -> Config:
    """Tile sizes by the layer's shape: the fastest of bench/nf4_kernels.py --sweep on an H200 for
    Falcon-7B's four shapes (bench/results/2026-11-28-h200-nf4_kernels-prmt-2-sweep.log)."""
    if k >= 16384:  # a long reduction (the MLP's down projection): more blocks per iteration
        return Config(block_n=4, groups=32, warps=4)
    if n >= 16384:  # many output rows (the MLP's up projection)
        return Config(block_n=8, groups=8, warps=2)
    return CONFIG


@dataclass
class Nf4Weight:
    """One layer's NF4 weight as bitsandbytes stores it, in the form the kernel reads."""

    words: torch.Tensor  # int32 [N * K / 8]: the packed codes, eight per word
    absmax: torch.Tensor  # uint8 [N * K / 64]: quantized block scales
    absmax2: torch.Tensor  # fp32: one per NESTED_BLOCK block scales
    code2: torch.Tensor  # fp32 [256]: the block scales' code
    offset: float
    asm: str  # the lookup, with this weight's 16 code values in it
    table: torch.Tensor  # int32 [4]: the table registers passed to it (see lookup_asm)
    n: int
    k: int
    matmul_asm: str  # nf4_matmul's lookup (word_to_bf16_asm)
    matmul_config: MatmulConfig  # nf4_matmul's tiles for this shape on this GPU
    # int32, one per tile of MIN_BLOCK_N output rows: nf4_matmul's count of a tile's reduction
    # slices done (split > 1), back to 0 after each call
    arrived: torch.Tensor

    @classmethod
    def of(cls, layer: Any) -> Nf4Weight | None:  # a bitsandbytes Linear4bit
        """The layer's weight, or None when it is not NF4 in the layout the kernel reads."""
        state = getattr(layer.weight, "quant_state", None)
        if (
            state is None
            or state.quant_type != "nf4"
            or state.blocksize != BLOCK
            or not state.nested
            or state.state2.blocksize != NESTED_BLOCK
            or len(state.shape) != 2
            or state.shape[1] % BLOCK
            or layer.weight.dtype != torch.uint8
            or state.code.numel() != 16
        ):
            return None
        n, k = state.shape
        device = layer.weight.device
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        code_bits = tuple(state.code.to(torch.bfloat16).view(torch.int16).tolist())
        return cls(
            words=layer.weight.data.reshape(-1).view(torch.int32),
            absmax=state.absmax,
            absmax2=state.state2.absmax.float(),
            code2=state.state2.code.float(),
            offset=float(state.offset),
            asm=lookup_asm(code_bits),
            table=_table_registers(code_bits, device),
            n=n,
            k=k,
            matmul_asm=word_to_bf16_asm(code_bits),
            matmul_config=matmul_config_for(n, k, sms),
            arrived=torch.zeros(-(-n // MIN_BLOCK_N), dtype=torch.int32, device=device),
        )


def _table_registers(code_bits: tuple[int, ...], device: torch.device) -> torch.Tensor:
    low, high = table_words(code_bits)
    words = [low[0], low[2], high[0], high[2]]
    return torch.tensor(words, dtype=torch.int64, device="cpu").to(torch.int32).to(device)


def table_words(code_bits: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """The 16 bf16 code values as eight registers: their low bytes (codes 0-3, 4-7, 8-11, 12-15),
    then their high bytes."""
    bits = [b & 0xFFFF for b in code_bits]
    low = [sum((bits[4 * r + i] & 0xFF) << (8 * i) for i in range(4)) for r in range(4)]
    high = [sum((bits[4 * r + i] >> 8) << (8 * i) for i in range(4)) for r in range(4)]
    return low, high


def _selectors_asm(word: str) -> str:
    """PTX: prmt selectors for all eight codes of `word` at once. cs/cs2: the low 3 bits of each
    code (nibbles 0-3, then 4-7); csel/csel2: per byte, i + 4 * the code's top bit."""
    return (
        f"and.b32 cs, {word}, 0x77777777;\n"
        f"shr.u32 csel, {word}, 1;\n"
        "and.b32 csel, csel, 0x44444444;\n"
        "or.b32 csel, csel, 0x32103210;\n"
        "shr.u32 cs2, cs, 16;\n"
        "shr.u32 csel2, csel, 16;\n"
    )


def _lookup_bytes_asm(codes: str, select: str, table: list[str]) -> str:
    """PTX: clo/chi = the low/high bytes of four codes' values, from the eight table registers
    (`table_words`' order): a permute among codes 0-7, one among 8-15, one choosing per code."""
    t = table
    return f"""
prmt.b32 ca, {t[0]}, {t[1]}, {codes};
prmt.b32 cb, {t[2]}, {t[3]}, {codes};
prmt.b32 clo, ca, cb, {select};
prmt.b32 ca, {t[4]}, {t[5]}, {codes};
prmt.b32 cb, {t[6]}, {t[7]}, {codes};
prmt.b32 chi, ca, cb, {select};"""


@functools.cache
def lookup_asm(code_bits: tuple[int, ...]) -> str:
    """PTX for one packed word: $0 = sum over its 8 weights of code[nibble] * x, in fp32 bits.

    $1 is the word (byte b holds weight 2b in its high nibble, 2b+1 in its low one); $2..$9 are the
    eight inputs it multiplies, in fp32; $10..$13 are table registers 0, 2, 4 and 6 (`table_words`),
    passed in so that they stay in registers across the loop; the other four are immediates.
    """
    low, high = table_words(code_bits)
    table = "".join(
        f"mov.b32 t{i}, {word:#010x};\n" for i, word in ((1, low[1]), (3, low[3]), (5, high[1]), (7, high[3]))
    )

    def half(codes: str, select: str, x: list[str], first: bool) -> str:
        # Four codes, as prmt selectors (the low 3 bits of each): nibble 0 is weight 1, nibble 1
        # weight 0, ...; `select` picks per byte between the two halves of the table (a code's top
        # bit). clo/chi get the four values' low/high bytes; then bf16 pairs; then fp32.
        start = f"mul.rn.f32 cacc, cf, {x[0]};" if first else f"fma.rn.f32 cacc, cf, {x[0]}, cacc;"
        table_registers = ["$10", "t1", "$11", "t3", "$12", "t5", "$13", "t7"]
        return (
            _lookup_bytes_asm(codes, select, table_registers)
            + f"""
prmt.b32 cp, clo, chi, 0x4051;
shl.b32 cf, cp, 16;
{start}
and.b32 cf, cp, 0xffff0000;
fma.rn.f32 cacc, cf, {x[1]}, cacc;
prmt.b32 cp, clo, chi, 0x6273;
shl.b32 cf, cp, 16;
fma.rn.f32 cacc, cf, {x[2]}, cacc;
and.b32 cf, cp, 0xffff0000;
fma.rn.f32 cacc, cf, {x[3]}, cacc;
"""
        )

    return (
        "{\n.reg .b32 t1, t3, t5, t7, cs, csel, cs2, csel2, ca, cb, clo, chi, cp, cf, cacc;\n"
        + table
        + _selectors_asm("$1")
        + half("cs", "csel", ["$2", "$3", "$4", "$5"], first=True)
        + half("cs2", "csel2", ["$6", "$7", "$8", "$9"], first=False)
        + "mov.b32 $0, cacc;\n}"
    )


@triton.jit
def _tile(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, b0, row0, rows, WORDS: tl.constexpr, BLOCKS: tl.constexpr,
          TILE: tl.constexpr, GROUPS: tl.constexpr):  # fmt: skip
    # The loads of the tile starting at block b0 of rows row0 + rows: packed words [TILE, rows],
    # the input as int32 words of two bf16 [TILE, 4] (weight word c multiplies input words
    # 4c..4c+3), and the blocks' quantized scales and second-level scales [GROUPS, rows].
    # Past the end of a row the weights' addresses are clamped to its last word and the input is
    # zero, so they add nothing: no mask per row, and each row's address is the first one's plus a
    # constant, which the loads take as an immediate offset.
    word = b0 * 8 + tl.arange(0, TILE)
    word_ok = word < WORDS
    word = tl.minimum(word, WORDS - 1)
    w = tl.load(w_ptr + row0 * WORDS + word[:, None] + rows[None, :] * WORDS)
    xw = tl.load(x_ptr + 4 * word[:, None] + tl.arange(0, 4)[None, :], mask=word_ok[:, None], other=0)
    index = (
        row0 * BLOCKS + tl.minimum(b0 + tl.arange(0, GROUPS), BLOCKS - 1)[:, None] + rows[None, :] * BLOCKS
    )
    q = tl.load(absmax_ptr + index)
    a2 = tl.load(absmax2_ptr + index // 256)
    return w, xw, q, a2


@triton.jit
def _nf4_gemv(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, table_ptr, out_ptr, n_out, offset, zero,
              part_ptr, b_ptr, slot_ptr, b_stride, rank, n_chunks, K: tl.constexpr, BLOCK_N: tl.constexpr,
              GROUPS: tl.constexpr, EVEN_N: tl.constexpr, ASM: tl.constexpr, LORA: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    # out[n] = sum over k of x[k] * code[w[n, k]] * scale[n, k // 64], plus with LORA the row's
    # adapter update (app/llm/triton_lora.py's shrink partials times B)
    WORDS: tl.constexpr = K // 8  # packed words per weight row
    BLOCKS: tl.constexpr = K // 64  # block scales per weight row
    TILE: tl.constexpr = GROUPS * 8  # words per row per iteration
    row0 = tl.program_id(0) * BLOCK_N
    rows = tl.arange(0, BLOCK_N)
    if not EVEN_N:  # rows past the end read the last row again and are not stored
        rows = tl.minimum(row0 + rows, n_out - 1) - row0
    acc = tl.zeros([TILE, BLOCK_N], dtype=tl.float32)
    # Loaded at addresses that differ per thread on paper (`zero` is 0): as constants, or as
    # values the compiler can see are the same in every thread, they live in uniform registers
    # and are copied to ordinary ones before every use, a quarter more instructions per word.
    spread = (tl.arange(0, TILE) * zero)[:, None]
    t0 = tl.load(table_ptr + spread)
    t2 = tl.load(table_ptr + 1 + spread)
    t4 = tl.load(table_ptr + 2 + spread)
    t6 = tl.load(table_ptr + 3 + spread)
    # Tiles are [words, rows]: a thread's rows share its words' inputs, unpacked once. Each
    # iteration issues the next tile's loads before computing its own, so the memory latency
    # overlaps the arithmetic.
    w_next, xw_next, q_next, a2_next = _tile(
        x_ptr, w_ptr, absmax_ptr, absmax2_ptr, 0, row0, rows, WORDS, BLOCKS, TILE, GROUPS
    )
    for b0 in range(0, BLOCKS, GROUPS):
        w, xw, q, a2 = w_next, xw_next, q_next, a2_next
        w_next, xw_next, q_next, a2_next = _tile(
            x_ptr, w_ptr, absmax_ptr, absmax2_ptr, b0 + GROUPS, row0, rows, WORDS, BLOCKS, TILE, GROUPS
        )
        xa, xb = tl.split(tl.reshape(xw, [TILE, 2, 2]))
        x01, x45 = tl.split(xa)
        x23, x67 = tl.split(xb)
        x0 = (x01 << 16).to(tl.float32, bitcast=True)[:, None]  # bf16 -> fp32: the high half
        x1 = (x01 & -65536).to(tl.float32, bitcast=True)[:, None]
        x2 = (x23 << 16).to(tl.float32, bitcast=True)[:, None]
        x3 = (x23 & -65536).to(tl.float32, bitcast=True)[:, None]
        x4 = (x45 << 16).to(tl.float32, bitcast=True)[:, None]
        x5 = (x45 & -65536).to(tl.float32, bitcast=True)[:, None]
        x6 = (x67 << 16).to(tl.float32, bitcast=True)[:, None]
        x7 = (x67 & -65536).to(tl.float32, bitcast=True)[:, None]
        shape: tl.constexpr = [TILE, BLOCK_N]
        part = tl.inline_asm_elementwise(
            ASM,
            "=r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [
                w,
                tl.broadcast_to(x0, shape),
                tl.broadcast_to(x1, shape),
                tl.broadcast_to(x2, shape),
                tl.broadcast_to(x3, shape),
                tl.broadcast_to(x4, shape),
                tl.broadcast_to(x5, shape),
                tl.broadcast_to(x6, shape),
                tl.broadcast_to(x7, shape),
                tl.broadcast_to(t0, shape),
                tl.broadcast_to(t2, shape),
                tl.broadcast_to(t4, shape),
                tl.broadcast_to(t6, shape),
            ],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        ).to(tl.float32, bitcast=True)
        scale = tl.load(code2_ptr + q.to(tl.int32)) * a2 + offset
        # each block's scale, for its 8 words
        acc += part * tl.reshape(tl.broadcast_to(scale[:, None, :], [GROUPS, 8, BLOCK_N]), shape)
    n = row0 + tl.arange(0, BLOCK_N)
    out = tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty)
    if LORA:
        # Rounded as the base layer's output first, as expanding after it would: the same bits.
        slot = tl.load(slot_ptr)
        delta = lora_delta(part_ptr, b_ptr, slot, 0, n, n < n_out, b_stride, rank, n_chunks, BLOCK_R, BLOCK_C)
        out = (out.to(tl.float32) + delta).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + n, out, mask=n < n_out)


def nf4_gemv(
    x: torch.Tensor, weight: Nf4Weight, config: Config | None = None, lora: LoraUpdate | None = None
) -> torch.Tensor:
    """x [..., K] with one row (bf16) times the NF4 weight's transpose: [..., N] in x's dtype; with
    `lora` (app/llm/triton_lora.shrink of the same x), plus the row's adapter update."""
    config = config or config_for(weight.n, weight.k)
    x1 = x.reshape(weight.k)
    if x1.dtype != torch.bfloat16:
        raise TypeError(f"nf4_gemv takes bf16 input, not {x1.dtype}")
    x1 = x1.contiguous()
    out = torch.empty(weight.n, dtype=x.dtype, device=x.device)
    grid = ((weight.n + config.block_n - 1) // config.block_n,)
    if lora is None:  # the LoRA arguments go unread
        lora_args: tuple[Any, ...] = (out, out, out, 0, 0, 0)
        blocks = {"BLOCK_R": 1, "BLOCK_C": 1}
    else:
        lora_args = (lora.parts, lora.b, lora.slots, lora.b.stride(0), lora.rank, lora.n_chunks)
        blocks = {"BLOCK_R": lora.block_r, "BLOCK_C": lora.block_c}
    _nf4_gemv[grid](
        x1.view(torch.int32), weight.words, weight.absmax, weight.absmax2, weight.code2, weight.table, out,
        weight.n, weight.offset, 0, *lora_args, K=weight.k, BLOCK_N=config.block_n, GROUPS=config.groups,
        EVEN_N=weight.n % config.block_n == 0, ASM=weight.asm, LORA=lora is not None, **blocks,
        num_warps=config.warps,
    )  # fmt: skip
    return out.view(*x.shape[:-1], weight.n)


@dataclass(frozen=True)
class MatmulConfig:
    block_n: int = 64  # weight rows per program, at least MIN_BLOCK_N
    warps: int = 4
    stages: int = 3
    # Programs that share one tile's reduction, each over a slice of the blocks: more programs for
    # narrow layers. Each writes its fp32 partial sums; the last to finish adds them up, in a fixed
    # order (the same bits every time), and writes the tile.
    split: int = 1


MIN_BLOCK_N = 16  # the tensor cores' smallest tile
MAX_ROWS = 64  # input rows the tensor-core kernel takes; longer passes (prompts) keep bitsandbytes'
MAX_SPLIT = 16


def matmul_config_for(n: int, k: int, sms: int) -> MatmulConfig:
    """`nf4_matmul`'s tiles for an n x k weight on a GPU of `sms` SMs: the reduction split until
    there are eight programs per SM, each slice keeping at least 8 blocks.

    One program per SM waits on its own loads and tensor-core results, latency-bound. On an H200
    (132 SMs; 32 rows, us per layer; bench/results/2026-11-28-h200-nf4_matmul-split-ab.log), split
    1/2/4/8/16 ways: Falcon-7B's qkv (73 tiles of 64 rows, 71 blocks) 47/37/25/20/25, MLP down (71
    tiles, 284 blocks) 175/108/69/58/55, MLP up (284 tiles, 71 blocks) 68/62/56/57/73. Slices of 4
    blocks are mostly prologue and epilogue.
    """
    config = MatmulConfig()
    tiles = -(-n // config.block_n)
    split = 1
    while tiles * split < 8 * sms and split < MAX_SPLIT and k // BLOCK // (2 * split) >= 8:
        split *= 2
    return MatmulConfig(split=split)


@functools.cache
def word_to_bf16_asm(code_bits: tuple[int, ...]) -> str:
    """PTX for one packed word: $0..$7 = the bf16 values of its eight weights, in order.

    The lookup is `lookup_asm`'s, the table in immediates (this kernel spends its time in the
    tensor cores and memory, not here); each interleaved pair holds weights 2b + 1 and 2b.
    """
    low, high = table_words(code_bits)
    table = "".join(f"mov.b32 t{i}, {word:#010x};\n" for i, word in enumerate(low + high))

    def half(codes: str, select: str, first: int) -> str:
        return (
            _lookup_bytes_asm(codes, select, [f"t{i}" for i in range(8)])
            + f"""
prmt.b32 cp, clo, chi, 0x5140;
mov.b32 {{${first + 1}, ${first}}}, cp;
prmt.b32 cp, clo, chi, 0x7362;
mov.b32 {{${first + 3}, ${first + 2}}}, cp;
"""
        )

    return (
        "{\n.reg .b32 t0, t1, t2, t3, t4, t5, t6, t7, cs, csel, cs2, csel2, ca, cb, clo, chi, cp;\n"
        + table
        + _selectors_asm("$8")
        + half("cs", "csel", 0)
        + half("cs2", "csel2", 4)
        + "}"
    )


@triton.jit
def _nf4_matmul(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, out_ptr, part_ptr, arrived_ptr, rows, n_out,
                offset, x_stride, out_stride, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SPLIT: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    # out[m, n] = sum over k of x[m, k] * code[w[n, k]] * scale[n, k // 64], one 64-weight block
    # (one scale) per iteration: its codes become a [BLOCK_N, 64] bf16 tile in registers, the
    # tensor cores multiply it by the input, and the block's scale multiplies the product.
    # (Scaling the codes first, to keep the sum in the tensor cores, measured slower: half again
    # as many instructions per block.)
    WORDS: tl.constexpr = K // 8
    BLOCKS: tl.constexpr = K // 64
    PER_SPLIT: tl.constexpr = (BLOCKS + SPLIT - 1) // SPLIT
    tile = tl.program_id(0)
    part = tl.program_id(1)  # which slice of the blocks, with SPLIT > 1
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_read = tl.minimum(n, n_out - 1)
    m = tl.arange(0, BLOCK_M)  # every row in one tile (BLOCK_M >= rows)
    m_ok = m < rows
    # The tile's column col holds weight k of the block: col = 32h + 16b1 + 8b0 + 2c + j for
    # k = 16c + 8h + 4b1 + 2b0 + j (word 2c + h, byte 2b1 + b0, nibble j), so that the eight
    # lookups of one word land where one thread holds them for the tensor cores.
    col = tl.arange(0, 64)
    k_of_col = 16 * (col // 2 % 4) + 8 * (col // 32) + 4 * (col // 16 % 2) + 2 * (col // 8 % 2) + col % 2
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for i in range(0, PER_SPLIT):
        b = part * PER_SPLIT + i
        if BLOCKS % SPLIT:  # the last slice is short: its blocks past the end add nothing
            past_end = b >= BLOCKS
            b = tl.minimum(b, BLOCKS - 1)
        words = tl.load(w_ptr + n_read[:, None] * WORDS + (b * 8 + tl.arange(0, 8))[None, :])
        words = tl.reshape(words, [BLOCK_N, 4, 2])  # [n, c, h]: word 2c + h
        o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
            ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r", [words], (tl.bfloat16,) * 8, is_pure=True, pack=1
        )
        q01 = tl.join(tl.join(o0, o1), tl.join(o2, o3))  # [n, c, h, j, b0]
        q23 = tl.join(tl.join(o4, o5), tl.join(o6, o7))
        t = tl.permute(tl.join(q01, q23), [0, 2, 5, 4, 1, 3])  # [n, h, b1, b0, c, j]
        codes = tl.reshape(t, [BLOCK_N, 64])
        x_at = x_ptr + m[None, :] * x_stride + (b * 64 + k_of_col)[:, None]
        xk = tl.load(x_at, mask=m_ok[None, :], other=0.0)  # [64, BLOCK_M], in the tile's order
        index = n_read * BLOCKS + b
        scale = (
            tl.load(code2_ptr + tl.load(absmax_ptr + index).to(tl.int32))
            * tl.load(absmax2_ptr + index // 256)
            + offset
        )
        if BLOCKS % SPLIT:
            scale = tl.where(past_end, 0.0, scale)
        acc += tl.dot(codes, xk) * scale[:, None]
    at = m[None, :] * out_stride + n[:, None]
    ok = m_ok[None, :] & (n < n_out)[:, None]
    if SPLIT == 1:
        tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        # part_ptr is [SPLIT, rows, n_out] fp32; arrived_ptr counts, per tile, the slices done.
        # Every thread's partial sums are stored before one thread counts (release, at GPU scope),
        # as CUTLASS's split-K semaphore does; the last to arrive reads them all from L2.
        tl.store(part_ptr + part * rows * out_stride + at, acc, mask=ok)
        tl.debug_barrier()
        if tl.atomic_add(arrived_ptr + tile, 1, sem="acq_rel") == SPLIT - 1:
            total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for p in range(SPLIT):
                total += tl.load(
                    part_ptr + p * rows * out_stride + at, mask=ok, other=0.0, cache_modifier=".cg"
                )
            tl.store(out_ptr + at, total.to(out_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(arrived_ptr + tile, 0)  # ready for the next call


def nf4_matmul(x: torch.Tensor, weight: Nf4Weight, config: MatmulConfig | None = None) -> torch.Tensor:
    """x [..., K] of up to MAX_ROWS rows (bf16) times the NF4 weight's transpose, on the tensor
    cores: [..., N] in x's dtype. `config` defaults to the weight's own (`matmul_config_for`)."""
    config = config or weight.matmul_config
    x2 = x.reshape(-1, weight.k)
    if x2.dtype != torch.bfloat16:
        raise TypeError(f"nf4_matmul takes bf16 input, not {x2.dtype}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if not 0 < rows <= MAX_ROWS:
        raise ValueError(f"nf4_matmul takes 1 to {MAX_ROWS} rows, not {rows}")
    block_m = max(16, triton.next_power_of_2(rows))  # the tensor cores' smallest tile
    if config.block_n < MIN_BLOCK_N:
        raise ValueError(f"nf4_matmul takes tiles of at least {MIN_BLOCK_N} rows, not {config.block_n}")
    tiles = triton.cdiv(weight.n, config.block_n)
    out = torch.empty((rows, weight.n), dtype=x.dtype, device=x.device)
    parts = (
        out
        if config.split == 1
        else torch.empty((config.split, rows, weight.n), dtype=torch.float32, device=x.device)
    )
    _nf4_matmul[(tiles, config.split)](
        x2, weight.words, weight.absmax, weight.absmax2, weight.code2, out, parts, weight.arrived, rows,
        weight.n, weight.offset, x2.stride(0), weight.n, K=weight.k, BLOCK_M=block_m, BLOCK_N=config.block_n,
        SPLIT=config.split, ASM=weight.matmul_asm,
        num_warps=config.warps, num_stages=config.stages,
    )  # fmt: skip
    return out.view(*x.shape[:-1], weight.n)


def enable(model: nn.Module) -> int:
    """Give the model's NF4 layers on a CUDA device this kernel for one-token passes; returns how
    many layers took it. Other layers (FP4, other block sizes, the CPU) keep their own path.

    The first layer is checked against bitsandbytes' dequantized weight before any is switched: a
    GPU or Triton build where the kernel does not compile, or computes something else, keeps
    bitsandbytes for every layer (and the caller logs it) rather than serving wrong text.
    """
    import bitsandbytes as bnb

    layers: list[tuple[Any, Nf4Weight]] = []
    module: Any
    for module in model.modules():
        if (
            isinstance(module, bnb.nn.Linear4bit)
            and module.weight.is_cuda
            and not hasattr(module, "nf4_weight")
        ):
            weight = Nf4Weight.of(module)
            if weight is not None:
                layers.append((module, weight))
    if not layers:
        return 0
    check(*layers[0])
    for module, weight in layers:
        module.nf4_weight = weight
        module.forward = functools.partial(_forward, module, module.forward)
    return len(layers)


def enable_rows(model: nn.Module) -> int:
    """Give `nf4_matmul` to the layers that have the one-row kernel (`enable`), for passes of 2 to
    MAX_ROWS tokens (decoding steps of several streams, short prompts); returns how many took it.

    On an H200 it took Falcon-7B's four shapes in 21 to 65 us at 32 rows, against bitsandbytes' 41
    to 149 (dequantizing each whole weight, then cuBLAS); bench/nf4_kernels.py, docs/benchmarks.md.
    Checked on the first layer as `enable` is, and switched on for none if it fails there; then
    compiled for every tile height and shape it will meet, so that no step waits for the compiler.
    Layers with a dequantized copy (app/llm/dequantized.py) keep it for those passes.
    """
    layers: list[Any] = [
        m for m in model.modules() if hasattr(m, "nf4_weight") and not hasattr(m, "nf4_rows")
    ]
    if not layers:
        return 0
    check(layers[0], layers[0].nf4_weight, rows=5)
    shapes = {(m.nf4_weight.n, m.nf4_weight.k): m.nf4_weight for m in layers}
    with torch.no_grad():
        for weight in shapes.values():
            for rows in (16, 32, MAX_ROWS):  # each tile height `nf4_matmul` picks
                x = torch.zeros(rows, weight.k, dtype=torch.bfloat16, device=weight.words.device)
                nf4_matmul(x, weight)
    for module in layers:
        module.nf4_rows = True
    return len(layers)


def check(layer: Any, weight: Nf4Weight, rows: int = 1) -> None:
    """Raise KernelMismatch unless the kernel for `rows` rows (`nf4_gemv` for one, `nf4_matmul`
    for more) gives `layer`'s product within bf16 rounding."""
    from bitsandbytes import functional as F

    with torch.no_grad():
        generator = torch.Generator(device=weight.words.device).manual_seed(0)
        x = torch.randn(rows, weight.k, generator=generator, device=weight.words.device).to(torch.bfloat16)
        dense = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        expected = x.float() @ dense.t()
        got = (nf4_gemv(x, weight) if rows == 1 else nf4_matmul(x, weight)).float()
    error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6))
    if not error < 2e-2:  # bf16 output and codes: about 1e-2 at most
        name = "one-row kernel" if rows == 1 else f"matmul kernel ({rows} rows)"
        raise KernelMismatch(
            f"the NF4 {name} is off by {error:.3g} (relative) on a {weight.n}x{weight.k} layer"
        )


def _takes(layer: Any, x: torch.Tensor) -> bool:
    # Not on the first call: bitsandbytes sets the layer up there.
    return (
        hasattr(layer, "nf4_weight")
        and x.dtype == torch.bfloat16
        and layer.compute_type_is_set
        and layer.compute_dtype in (None, torch.bfloat16)
    )


def one_row(layer: Any, x: torch.Tensor) -> bool:
    """Whether `layer` (a bitsandbytes Linear4bit) computes `x` with `nf4_gemv`: the kernel is
    enabled on it and x is one token in bf16 (a decoding step of one stream)."""
    return x.numel() == x.shape[-1] and _takes(layer, x)


def _few_rows(layer: Any, x: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1]
    return (
        1 < rows <= MAX_ROWS
        and getattr(layer, "nf4_rows", False)
        and not hasattr(layer, "dequantized_weight")  # cuBLAS on the copy is faster still
        and _takes(layer, x)
    )


def _forward(layer: Any, previous: Any, x: torch.Tensor) -> torch.Tensor:
    if one_row(layer, x):
        out = nf4_gemv(x, layer.nf4_weight)
    elif _few_rows(layer, x):
        out = nf4_matmul(x, layer.nf4_weight)
    else:
        return previous(x)
    return out if layer.bias is None else out + layer.bias.to(out.dtype)
