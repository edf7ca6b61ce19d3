#!/usr/bin/env python3
"""CPU (numpy) emulation, lane by lane, of the tensor-core fragment logic of csrc/cuda/kv_tile.cuh.

No GPU needed: it mirrors the kernel code step by step (cp.async staging addresses and swizzles,
the unpack2 magic-number bit tricks in fp16/bf16 and fp16's subnormal codes, the permuted Q' = Q'hi + Q'lo build, key_scores,
write_pairs, transpose_vsz, value_accum with the ones/p*z zero term, Q_MatMul's value_accum_dequant and
decode's value_accum_narrow (2-bit values through ldmatrix, query rows 0-3 twice in the columns),
write_warp_acc, the q.z
prologue) and executes mma.sync m16n8k16 from the PTX ISA's fragment layouts, then compares with
direct math on the unpacked codes. A wrong index in a mapping shows as an O(1) error; what remains
is fp16/bf16 rounding (~1e-7 for scores, ~1e-4 / 1e-3 for the p pairs and values).

Keep it in step with kv_tile.cuh when the fragment logic changes:  python scripts/emulate_cuda_tiles.py
"""
import numpy as np

TT, ROWS, PS = 64, 8, 64 // 2 + 4
rng = np.random.default_rng(0)


def f16(x):
    return np.float16(x)


def h2u(lo, hi, dt):  # two floats -> uint32 of two 16-bit values (dt: 'f16' or 'bf16')
    return (bits16(lo, dt) | (bits16(hi, dt) << 16)) & 0xFFFFFFFF


def bits16(x, dt):
    if dt == 'f16':
        return int(np.array(x, dtype=np.float16).view(np.uint16))
    f = np.array(x, dtype=np.float32).view(np.uint32)
    # round to nearest even
    u = int(f)
    lsb = (u >> 16) & 1
    return ((u + 0x7FFF + lsb) >> 16) & 0xFFFF


def u2f(u16, dt):
    if dt == 'f16':
        return float(np.array(u16, dtype=np.uint16).view(np.float16))
    return float(np.array(u16 << 16, dtype=np.uint32).view(np.float32))


def halves(u, dt):
    return u2f(u & 0xFFFF, dt), u2f((u >> 16) & 0xFFFF, dt)


def byte_perm(x, y, s):
    b = [(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)]
    r = 0
    for i in range(4):
        r |= b[(s >> (4 * i)) & 7] << (8 * i)
    return r


def rnd(x, dt):
    return u2f(bits16(x, dt), dt)


def hmul2(a, b, dt):
    a0, a1 = halves(a, dt); b0, b1 = halves(b, dt)
    return h2u(rnd(a0 * b0, dt), rnd(a1 * b1, dt), dt)


def hfma2_exact(a, b, c, dt):
    a0, a1 = halves(a, dt); b0, b1 = halves(b, dt); c0, c1 = halves(c, dt)
    r0, r1 = a0 * b0 + c0, a1 * b1 + c1
    return (bits16(r0, dt) | (bits16(r1, dt) << 16))


def unpack2(x, BITS, F, dt):
    OFF = F * BITS
    M = (1 << BITS) - 1
    if dt == 'f16':
        mask = ((M << OFF) * 0x10001) & 0xFFFFFFFF
        mul = ((15 - OFF) << 10) * 0x10001
        add = (0x8000 | ((25 - OFF) << 10)) * 0x10001
        return hfma2_exact((x & mask) | 0x64006400, mul, add, dt)
    elif OFF + BITS <= 7:
        mask = ((M << OFF) * 0x10001) & 0xFFFFFFFF
        mul = ((127 - OFF) << 7) * 0x10001
        add = (0x8000 | ((134 - OFF) << 7)) * 0x10001
        return hfma2_exact((x & mask) | 0x43004300, mul, add, dt)
    else:
        return hfma2_exact(((x >> OFF) & (M * 0x10001)) | 0x43004300, 0x3F803F80, 0xC300C300, dt)


# kv_tile.cuh's unpack2_codes: fp16 codes as exact subnormals (KIVI_SUBNORMAL_CODES, on by default),
# the field masked in place, code * 2^(F*BITS - 24); bf16 keeps the magic-number unpack2
SUBNORMAL_F16 = True


def subnormal(dt):
    return dt == 'f16' and SUBNORMAL_F16


def unpack_codes(x, BITS, F, dt):
    if subnormal(dt):
        return x & ((((1 << BITS) - 1) << (F * BITS)) * 0x10001) & 0xFFFFFFFF
    return unpack2(x, BITS, F, dt)


def codes_unscale(BITS, F, dt):  # what the products of unpack_codes' field F are multiplied by
    return float(2 ** (24 - F * BITS)) if subnormal(dt) else 1.0


def mma(a, b, c, dt):
    """a[lane][4], b[lane][2] uint32; c[lane][4] float -> new c (PTX m16n8k16 layouts)."""
    A = np.zeros((16, 16)); B = np.zeros((16, 8)); C = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        A[g, 2 * t], A[g, 2 * t + 1] = halves(a[lane][0], dt)
        A[g + 8, 2 * t], A[g + 8, 2 * t + 1] = halves(a[lane][1], dt)
        A[g, 2 * t + 8], A[g, 2 * t + 9] = halves(a[lane][2], dt)
        A[g + 8, 2 * t + 8], A[g + 8, 2 * t + 9] = halves(a[lane][3], dt)
        B[2 * t, g], B[2 * t + 1, g] = halves(b[lane][0], dt)
        B[2 * t + 8, g], B[2 * t + 9, g] = halves(b[lane][1], dt)
        C[g, 2 * t], C[g, 2 * t + 1] = c[lane][0], c[lane][1]
        C[g + 8, 2 * t], C[g + 8, 2 * t + 1] = c[lane][2], c[lane][3]
    Dm = A @ B + C
    out = []
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        out.append([Dm[g, 2 * t], Dm[g, 2 * t + 1], Dm[g + 8, 2 * t], Dm[g + 8, 2 * t + 1]])
    return out


class Geo:
    def __init__(s, KB, VB, D):
        s.KB, s.VB, s.D = KB, VB, D
        s.PK, s.PV = 8 // KB, 8 // VB
        s.NKS, s.NKB = D // 16, D // 64
        s.KROWS = TT // s.PK
        s.RSETS = TT // (8 * s.PK)
        s.MPR = s.PK // 2
        s.NMT = TT // 16
        s.RB = D * VB // 8
        s.NVM = D // 16
        s.NBB = D * VB // 64
        s.NCB = D // 32
        s.VKS = TT // 16
        s.QPS = 2 * s.NKS + 4
        s.RS = s.RB + 16 if s.RB >= 32 else s.RB

    def ksw(s, r):
        return ((r & 1) << 2) if s.D >= 128 else 0

    def vsw(s, t):
        RB = s.RB
        if 32 <= RB <= 128:
            return (t // (128 // RB)) & (RB // 16 - 1)
        return 0


def test_keys(KB, D, G, dt, t0, paired_rows=0):
    """key_scores on one staged tile: (max score error, max pair error) against numpy. paired_rows
    = 1..4: key_scores' PAIRED layout for a block of that many query rows (Q'hi of row r in column
    2r, Q'lo in 2r + 1, fast_attn's qmine_a / qmine_b): lane tid must hold row tid's scores, hi + lo,
    and write_pairs<PAIRED> row tid of the probabilities, which decode's softmax and value paths
    rely on."""
    g = Geo(KB, 2, D)
    PK = g.PK
    ntok = t0 + TT
    codes = rng.integers(0, 1 << KB, size=(ntok, D))
    ngr = (ntok + G - 1) // G
    s = np.array([[rnd(v, dt) for v in row] for row in rng.uniform(0.01, 0.5, size=(ngr, D))])
    z = np.array([[rnd(v, dt) for v in row] for row in rng.uniform(-1, 1, size=(ngr, D))])
    q = np.array([[rnd(v, dt) for v in row] for row in rng.normal(size=(ROWS, D))])
    if paired_rows:
        q[paired_rows:] = 0.0  # fill_qperm: rows past nrows are zero
    # pack codes per layout: byte (r, d) holds tokens r*P + j at bits j*KB
    packed = np.zeros((ntok // PK, D), dtype=np.int64)
    for r in range(ntok // PK):
        for j in range(PK):
            packed[r] |= codes[r * PK + j] << (j * KB)
    # stage tile: code rows [t0/PK, t0/PK + KROWS)
    smem_kc = np.zeros(g.KROWS * D, dtype=np.int64)
    CPR = D // 16
    RPI = 32 // CPR
    flat = packed[t0 // PK: t0 // PK + g.KROWS].reshape(-1)
    for lane in range(32):
        r_l, cc_l = lane // CPR, lane % CPR
        dst0 = r_l * D + ((cc_l ^ g.ksw(r_l)) << 4)
        for i in range(g.KROWS * CPR // 32):
            dst = dst0 + i * RPI * D
            src = (lane + 32 * i) * 16
            smem_kc[dst:dst + 16] = flat[src:src + 16]
    nks = TT // G if TT >= G else 1
    smem_ks = [s[t0 // G + i] for i in range(nks)]  # rows of halves
    # qperm
    qperm = np.zeros(ROWS * 4 * g.QPS, dtype=np.int64)
    for e in range(ROWS * 4 * g.NKS):
        r, rem = e // (4 * g.NKS), e % (4 * g.NKS)
        c, ks = rem // g.NKS, rem % g.NKS
        ch = 16 * (c + 4 * (ks // 4)) + 4 * (ks % 4)
        vx = h2u(q[r, ch], q[r, ch + 1], dt); vy = h2u(q[r, ch + 2], q[r, ch + 3], dt)
        qperm[(r * 4 + c) * g.QPS + 2 * ks] = byte_perm(vx, vy, 0x5410)
        qperm[(r * 4 + c) * g.QPS + 2 * ks + 1] = byte_perm(vx, vy, 0x7632)
    # qz table times the score scale sc (direct; the prologue mma is checked separately)
    sc = 0.0883883 * 1.4426950408889634  # decode: softmax scale 1/sqrt(128) in log2 units
    gA = t0 // G
    qz = {gg: sc * (q @ z[gg]) for gg in range(gA, ngr)}
    # key_scores per lane
    qp = [[[0, 0, 0, 0] for _ in range(g.NKS)] for _ in range(32)]
    S = [[None] * g.NMT for _ in range(32)]
    tile_g0 = t0 // G
    cur_g = -1
    for rs in range(g.RSETS):
        gg = (t0 + rs * 8 * PK) // G
        if gg != cur_g:
            for lane in range(32):
                gid, tid = lane >> 2, lane & 3
                srow = smem_ks[gg - tile_g0]
                if paired_rows:  # fast_attn's qmine_a / qmine_b: column gid is (q, 0) or (q, q) of row gid >> 1
                    qm = ((gid >> 1) * 4 + tid) * g.QPS
                    qmb = (((gid >> 1) if gid & 1 else 4) * 4 + tid) * g.QPS
                else:
                    qm = (gid * 4 + tid) * g.QPS
                for kb in range(g.NKB):
                    base = 16 * (tid + 4 * kb)
                    sw = [h2u(srow[base + 2 * k], srow[base + 2 * k + 1], dt) for k in range(8)]
                    qw = [int(qperm[qm + 8 * kb + k]) for k in range(8)]
                    for i in range(4):
                        s02 = byte_perm(sw[2 * i], sw[2 * i + 1], 0x5410); s13 = byte_perm(sw[2 * i], sw[2 * i + 1], 0x7632)
                        if paired_rows:  # fma(qa, s, -round(qb * s)), one rounding
                            pair = []
                            for qa_w, qb_w, s_w in ((qw[2 * i], int(qperm[qmb + 8 * kb + 2 * i]), s02),
                                                    (qw[2 * i + 1], int(qperm[qmb + 8 * kb + 2 * i + 1]), s13)):
                                hb = halves(hmul2(qb_w, s_w, dt), dt)
                                qa_h, s_h = halves(qa_w, dt), halves(s_w, dt)
                                pair.append(h2u(rnd(qa_h[0] * s_h[0] - hb[0], dt), rnd(qa_h[1] * s_h[1] - hb[1], dt), dt))
                            qp[lane][4 * kb + i] = pair + [0, 0]
                            continue
                        h0 = hmul2(qw[2 * i], s02, dt); h1 = hmul2(qw[2 * i + 1], s13, dt)
                        q0a, q0b = halves(qw[2 * i], dt); s0a, s0b = halves(s02, dt); h0a, h0b = halves(h0, dt)
                        q1a, q1b = halves(qw[2 * i + 1], dt); s1a, s1b = halves(s13, dt); h1a, h1b = halves(h1, dt)
                        l0 = h2u(rnd(q0a * s0a - h0a, dt), rnd(q0b * s0b - h0b, dt), dt)
                        l1 = h2u(rnd(q1a * s1a - h1a, dt), rnd(q1b * s1b - h1b, dt), dt)
                        qp[lane][4 * kb + i] = [h0, h1, l0, l1]
            cur_g = gg
        cw = []
        for lane in range(32):
            gid, tid = lane >> 2, lane & 3
            row = 8 * rs + gid
            words = []
            for kb in range(g.NKB):
                off = row * D + (((tid + 4 * kb) ^ g.ksw(row)) << 4)
                bts = smem_kc[off:off + 16]
                words.append([int(bts[4 * w] | (bts[4 * w + 1] << 8) | (bts[4 * w + 2] << 16) | (bts[4 * w + 3] << 24)) for w in range(4)])
            cw.append(words)
        chi = [[None] * 32 for _ in range(g.MPR)]
        clo = [[None] * 32 for _ in range(g.MPR)]
        for h in range(g.MPR):
            for lane in range(32):
                chi[h][lane] = [0.0, 0.0, 0.0, 0.0]
                clo[h][lane] = [0.0, 0.0, 0.0, 0.0]
        for ks in range(g.NKS):
            for h in range(g.MPR):
                a = []
                for lane in range(32):
                    w = cw[lane][ks // 4][ks % 4]
                    w8 = w >> 8
                    a.append([unpack_codes(w, KB, 2 * h, dt), unpack_codes(w, KB, 2 * h + 1, dt), unpack_codes(w8, KB, 2 * h, dt), unpack_codes(w8, KB, 2 * h + 1, dt)])
                chi[h] = mma(a, [[qp[l][ks][0], qp[l][ks][1]] for l in range(32)], chi[h], dt)
                if not paired_rows:
                    clo[h] = mma(a, [[qp[l][ks][2], qp[l][ks][3]] for l in range(32)], clo[h], dt)
        for h in range(g.MPR):
            for lane in range(32):
                # c0, c1: token field 2h; c2, c3: field 2h + 1; fma(chi + clo, unscale * sc, sc * q.z)
                zz = qz[gg]; tid = lane & 3
                if paired_rows:  # columns 2 tid, 2 tid + 1 = hi and lo of row tid; q.z of row zrow = tid
                    f = [np.float32(codes_unscale(KB, 2 * h + k, dt) * sc) for k in range(2)]
                    zr = np.float32(zz[tid])
                    c = chi[h][lane]
                    s0 = np.float32(np.float32(c[0] + c[1]) * f[0] + zr)
                    s2 = np.float32(np.float32(c[2] + c[3]) * f[1] + zr)
                    S[lane][rs * g.MPR + h] = [s0, s0, s2, s2]
                    continue
                S[lane][rs * g.MPR + h] = [np.float32(np.float32(chi[h][lane][k] + clo[h][lane][k]) *
                                                      np.float32(codes_unscale(KB, 2 * h + k // 2, dt) * sc) +
                                                      np.float32(zz[2 * tid + (k & 1)])) for k in range(4)]
    # check: S[lane][mt][c] = score(token t0 + score_token(mt, c, gid), row 2tid + (c&1))
    kfull = codes * s[np.arange(ntok) // G] + z[np.arange(ntok) // G]
    ref = sc * (q @ kfull.T)  # [ROWS, ntok], in the scale key_scores is given
    err = 0
    for lane in range(32):
        gid, tid = lane >> 2, lane & 3
        for mt in range(g.NMT):
            for c in range(4):
                rs, h = mt // g.MPR, mt % g.MPR
                tau = (8 * rs + gid) * PK + 2 * h + (c >> 1)
                row = 2 * tid + (c & 1)
                if paired_rows:
                    row = tid  # c = 0, 1 alike (and 2, 3): row tid, hi + lo; a row past nrows is q = 0
                err = max(err, abs(S[lane][mt][c] - ref[row, t0 + tau]) / (1 + abs(ref[row, t0 + tau])))
    # write_pairs -> pb ; check pairs
    pb = np.zeros(ROWS * PS, dtype=np.int64)
    for lane in range(32):
        gid, tid = lane >> 2, lane & 3
        for mt in range(g.NMT):
            rs, h = mt // g.MPR, mt % g.MPR
            pair = ((8 * rs + gid) * PK + 2 * h) // 2
            if paired_rows:  # write_pairs<PAIRED>: row tid only
                pb[tid * PS + pair] = h2u(S[lane][mt][0], S[lane][mt][2], dt)
                continue
            pb[(2 * tid) * PS + pair] = h2u(S[lane][mt][0], S[lane][mt][2], dt)
            pb[(2 * tid + 1) * PS + pair] = h2u(S[lane][mt][1], S[lane][mt][3], dt)
    perr = 0
    for r in range(4 if paired_rows else ROWS):
        for tp in range(TT // 2):
            lo, hi = halves(int(pb[r * PS + tp]), dt)
            perr = max(perr, abs(lo - ref[r, t0 + 2 * tp]) / (1 + abs(ref[r, t0 + 2 * tp])), abs(hi - ref[r, t0 + 2 * tp + 1]) / (1 + abs(ref[r, t0 + 2 * tp + 1])))
    return err, perr


def ldmatrix_x4_trans(mem, row_addr, lane):
    """What lane `lane` receives from ldmatrix.x4.trans.b16: row_addr(l) is the byte address lane l
    gives (rows 0..7 of matrix l // 8); d[i] = (M_i[2c][g], M_i[2c+1][g]), g = lane // 4, c = lane % 4."""
    g, c = lane >> 2, lane & 3
    out = []
    for i in range(4):
        def elem(r):
            a = row_addr(8 * i + r) + 2 * g
            assert row_addr(8 * i + r) % 16 == 0, "ldmatrix rows are 16-byte aligned"
            return int(mem[a]) | (int(mem[a + 1]) << 8)
        out.append(elem(2 * c) | (elem(2 * c + 1) << 16))
    return out


def test_values(VB, D, G, dt, valid=TT, dequant=False, narrow=False):
    """max |out - ref| / (1 + |ref|) of one value tile: value_accum (dequant=False, decode attention),
    value_accum_dequant (Q_MatMul) or, narrow=True, value_accum_narrow (2 bits, query rows 0-3 only),
    p uniform in [0, 1). NaN where a (row, channel) was never written."""
    red, ref = values_tile(VB, D, G, dt, valid, dequant, narrow=narrow)
    return np.max(np.abs(red - ref) / (1 + np.abs(ref)))


def values_rel_err(VB, D, G, dt, dequant, p_scale):
    """||out - ref|| / ||ref|| of one value tile with p uniform in [0, p_scale): a softmax over T
    tokens has p ~ 1/T, where value_accum's p * s leaves fp16's normal range."""
    red, ref = values_tile(VB, D, G, dt, TT, dequant, p_scale)
    return np.linalg.norm(red - ref) / np.linalg.norm(ref)


def narrow_slot(cb, NCB):  # transpose_vsz's NARROW order: block cb = 2j + h at slot h * NCB/2 + j
    return (cb & 1) * 2 + (cb >> 1) if NCB == 4 else cb


def values_narrow(g, vcs, sps, spz, pb, dt):
    """value_accum_narrow, then write_warp_acc_narrow: red[4, D] (query rows 0-3), and how many
    lanes wrote each (row, channel)."""
    D, NCB, RS, NSEG = g.D, g.NCB, g.RS, g.D // 64
    one = h2u(1.0, 1.0, dt)
    acc = [[[0.0] * 4 for _ in range(g.NVM)] for _ in range(32)]
    zacc = [[[0.0] * 4 for _ in range(NSEG)] for _ in range(32)]
    for ks in range(g.VKS):
        ds = [ldmatrix_x4_trans(vcs, lambda l: (16 * ks + (l & 7) + 8 * ((l >> 3) & 1)) * RS + 16 * ((l >> 4) % NSEG), lane)
              for lane in range(32)]
        regs = []
        for lane in range(32):
            gid, tid = lane >> 2, lane & 3
            tp0, tp1 = 8 * ks + tid, 8 * ks + tid + 4
            p0, p1 = int(pb[(gid & 3) * PS + tp0]), int(pb[(gid & 3) * PS + tp1])  # query row gid & 3
            base = (gid >> 2) * NSEG  # this lane's column block in each segment
            sz = [[int(t[tp * NCB + base + j]) for j in range(NSEG)] for t in (sps, spz) for tp in (tp0, tp1)]
            regs.append((p0, p1, *sz))  # p0, p1, s0, s1, z0, z1
        for j in range(NSEG):
            b = [[hmul2(r[0], r[4][j], dt), hmul2(r[1], r[5][j], dt)] for r in regs]
            res = mma([[one] * 4] * 32, b, [zacc[l][j] for l in range(32)], dt)
            for l in range(32):
                zacc[l][j] = res[l]
            bp = [[hmul2(r[0], r[2][j], dt), hmul2(r[1], r[3][j], dt)] for r in regs]
            for i in range(4):
                bt, h = i // 2, i % 2
                xs = [(ds[l][2 * j] >> (8 * bt), ds[l][2 * j + 1] >> (8 * bt)) for l in range(32)]
                a = [[unpack_codes(x[0], 2, 2 * h, dt), unpack_codes(x[0], 2, 2 * h + 1, dt),
                      unpack_codes(x[1], 2, 2 * h, dt), unpack_codes(x[1], 2, 2 * h + 1, dt)] for x in xs]
                mt = 4 * j + 2 * bt + h
                res = mma(a, bp, [acc[l][mt] for l in range(32)], dt)
                for l in range(32):
                    acc[l][mt] = res[l]
    red = np.full((4, D), np.nan)
    writes = np.zeros((4, D), dtype=int)
    for lane in range(32):
        gid, tid = lane >> 2, lane & 3
        if (tid >> 1) != (gid >> 2):
            continue
        r0 = 2 * (tid & 1)
        for mt in range(g.NVM):
            j, h = mt // 4, mt % 2
            ch = 64 * j + 8 * gid + 4 * ((mt // 2) % 2) + 2 * h  # value_channel_narrow
            f0, f1 = codes_unscale(2, 2 * h, dt), codes_unscale(2, 2 * h + 1, dt)
            red[r0, ch] = acc[lane][mt][0] * f0 + zacc[lane][j][0]
            red[r0, ch + 1] = acc[lane][mt][2] * f1 + zacc[lane][j][0]
            red[r0 + 1, ch] = acc[lane][mt][1] * f0 + zacc[lane][j][1]
            red[r0 + 1, ch + 1] = acc[lane][mt][3] * f1 + zacc[lane][j][1]
            writes[r0:r0 + 2, ch:ch + 2] += 1
    return red, writes


def values_tile(VB, D, G, dt, valid=TT, dequant=False, p_scale=1.0, narrow=False):
    g = Geo(2, VB, D)
    PV, NCB, NG = g.PV, g.NCB, D // G
    log2G = G.bit_length() - 1
    codes = rng.integers(0, 1 << VB, size=(TT, D))
    s = np.array([[rnd(v, dt) for v in row] for row in rng.uniform(0.01, 0.5, size=(TT, NG))])
    z = np.array([[rnd(v, dt) for v in row] for row in rng.uniform(-1, 1, size=(TT, NG))])
    p = np.array([[rnd(v, dt) for v in row] for row in rng.uniform(0, p_scale, size=(ROWS, TT))])
    packed = np.zeros((TT, D // PV), dtype=np.int64)
    for c in range(D // PV):
        for j in range(PV):
            packed[:, c] |= codes[:, c * PV + j] << (j * VB)
    RB, CPR, RS = g.RB, g.RB // 16, g.RS
    vcs = np.zeros(TT * RS, dtype=np.int64)
    RPI = 32 // CPR
    for lane in range(32):
        t_l, cc_l = lane // CPR, lane % CPR
        for i in range(TT * CPR // 32):
            t = t_l + i * RPI
            if t >= valid:
                continue
            dst = t_l * RS + cc_l * 16 + i * RPI * RS
            c = lane + 32 * i  # source chunk index (16 bytes)
            vcs[dst:dst + 16] = packed.reshape(-1)[c * 16:(c + 1) * 16]
    # superset staging with an offset: emulate an element array with offset soff (in halves)
    soff_h = 3  # arbitrary element offset inside the aligned superset
    sflat = np.zeros(soff_h + TT * NG + 8); zflat = np.zeros(soff_h + TT * NG + 8)
    sflat[soff_h:soff_h + TT * NG] = s.reshape(-1); zflat[soff_h:soff_h + TT * NG] = z.reshape(-1)
    sps = np.zeros(TT // 2 * NCB, dtype=np.int64); spz = np.zeros_like(sps)
    for e in range(TT // 2 * NCB):
        tp, cb = e // NCB, e % NCB
        gg = (cb << 5) >> log2G
        t = 2 * tp
        s0 = bits16(sflat[soff_h + t * NG + gg], dt) if t < valid else 0
        s1 = bits16(sflat[soff_h + (t + 1) * NG + gg], dt) if t + 1 < valid else 0
        z0 = bits16(zflat[soff_h + t * NG + gg], dt) if t < valid else 0
        z1 = bits16(zflat[soff_h + (t + 1) * NG + gg], dt) if t + 1 < valid else 0
        slot = tp * NCB + narrow_slot(cb, NCB) if narrow else e
        sps[slot] = s0 | (s1 << 16); spz[slot] = z0 | (z1 << 16)
    pb = np.zeros(ROWS * PS, dtype=np.int64)
    for r in range(ROWS):
        for tp in range(TT // 2):
            pb[r * PS + tp] = h2u(p[r, 2 * tp], p[r, 2 * tp + 1], dt)
    vfull = codes * np.repeat(s, G, axis=1) + np.repeat(z, G, axis=1)
    pv = p.copy(); pv[:, valid:] = 0
    if narrow:
        assert VB == 2 and not dequant
        red, writes = values_narrow(g, vcs, sps, spz, pb, dt)
        assert (writes == 1).all(), "every (row, channel) written by exactly one lane"
        return red, (pv @ vfull)[:4]
    acc = [[[0.0] * 4 for _ in range(g.NVM)] for _ in range(32)]
    zacc = [[[0.0] * 4 for _ in range(NCB)] for _ in range(32)]

    def vbyte(lane, ks, dt, bb):
        gid, tid = lane >> 2, lane & 3
        return int(vcs[2 * tid * RS + gid + (16 * ks + dt) * RS + 8 * bb])

    def a_regs(x, reg, bits, f0, f1, cb):
        """A registers from code pairs x = (xlo, xhi), fields f0 (rows gid) and f1 (rows gid + 8)."""
        if not dequant:  # value_accum: the codes (fp16 subnormals), B = p * s
            return [unpack_codes(x[0], bits, f0, dt), unpack_codes(x[0], bits, f1, dt),
                    unpack_codes(x[1], bits, f0, dt), unpack_codes(x[1], bits, f1, dt)]
        _, _, z0, z1, _, _, s0, s1 = reg  # value_accum_dequant: v = fma(code, s, z) per pair, B = p
        return [hfma2_exact(unpack2(x[0], bits, f0, dt), s0[cb], z0[cb], dt),
                hfma2_exact(unpack2(x[0], bits, f1, dt), s0[cb], z0[cb], dt),
                hfma2_exact(unpack2(x[1], bits, f0, dt), s1[cb], z1[cb], dt),
                hfma2_exact(unpack2(x[1], bits, f1, dt), s1[cb], z1[cb], dt)]

    def b_regs(reg, cb):
        return [reg[0], reg[1]] if dequant else [reg[4][cb], reg[5][cb]]

    for ks in range(g.VKS):
        regs = []
        for lane in range(32):
            gid, tid = lane >> 2, lane & 3
            tp0, tp1 = 8 * ks + tid, 8 * ks + tid + 4
            p0, p1 = int(pb[gid * PS + tp0]), int(pb[gid * PS + tp1])
            s0 = [int(sps[tp0 * NCB + cb]) for cb in range(NCB)]; s1 = [int(sps[tp1 * NCB + cb]) for cb in range(NCB)]
            z0 = [int(spz[tp0 * NCB + cb]) for cb in range(NCB)]; z1 = [int(spz[tp1 * NCB + cb]) for cb in range(NCB)]
            pp0 = [hmul2(p0, s0[cb], dt) for cb in range(NCB)]; pp1 = [hmul2(p1, s1[cb], dt) for cb in range(NCB)]
            regs.append((p0, p1, z0, z1, pp0, pp1, s0, s1))
        for cb in range(NCB if not dequant else 0):
            one = h2u(1.0, 1.0, dt)
            a = [[one, one, one, one] for l in range(32)]
            b = [[hmul2(regs[l][0], regs[l][2][cb], dt), hmul2(regs[l][1], regs[l][3][cb], dt)] for l in range(32)]
            res = mma(a, b, [zacc[l][cb] for l in range(32)], dt)
            for l in range(32):
                zacc[l][cb] = res[l]
        if VB == 4:  # ldmatrix.x4.trans per pair of 16-byte segments (value_accum's 4-bit path)
            for sp in range(NCB // 2):
                ds = [ldmatrix_x4_trans(vcs, lambda l: (16 * ks + (l & 7) + 8 * ((l >> 3) & 1)) * RS + 16 * (l >> 4) + 32 * sp, lane)
                      for lane in range(32)]
                for i in range(4):
                    j, b = i // 2, i % 2
                    sg = 2 * sp + j
                    xs = [(ds[l][2 * j] >> (8 * b), ds[l][2 * j + 1] >> (8 * b)) for l in range(32)]
                    a = [a_regs(xs[l], regs[l], 4, 0, 1, sg) for l in range(32)]
                    bfr = [b_regs(regs[l], sg) for l in range(32)]
                    res = mma(a, bfr, [acc[l][2 * sg + b] for l in range(32)], dt)
                    for l in range(32):
                        acc[l][2 * sg + b] = res[l]
            continue
        for bb in range(g.NBB):
            cb = bb * PV // 4
            xs = []
            for lane in range(32):
                gid, tid = lane >> 2, lane & 3
                xlo = byte_perm(vbyte(lane, ks, 0, bb), vbyte(lane, ks, 1, bb), 0x5410)
                xhi = byte_perm(vbyte(lane, ks, 8, bb), vbyte(lane, ks, 9, bb), 0x5410)
                xs.append((xlo, xhi))
            for h in range(PV // 2):
                mt = bb * (PV // 2) + h
                a = [a_regs(xs[l], regs[l], VB, 2 * h, 2 * h + 1, cb) for l in range(32)]
                b = [b_regs(regs[l], cb) for l in range(32)]
                res = mma(a, b, [acc[l][mt] for l in range(32)], dt)
                for l in range(32):
                    acc[l][mt] = res[l]
    red = np.full((ROWS, D), np.nan)
    for lane in range(32):
        gid, tid = lane >> 2, lane & 3
        for mt in range(g.NVM):
            bb, h = mt // (PV // 2), mt % (PV // 2)
            ch = 32 * (mt // 2) + 4 * gid + 2 * (mt % 2) if PV == 2 else (8 * bb + gid) * PV + 2 * h  # value_channel
            cbk = bb * PV // 4
            f0, f1 = codes_unscale(VB, 2 * h, dt), codes_unscale(VB, 2 * h + 1, dt)  # channels ch, ch + 1
            if dequant:  # write_warp_values: exact codes, no zero term
                f0 = f1 = 1.0
            red[2 * tid, ch] = acc[lane][mt][0] * f0 + zacc[lane][cbk][0]
            red[2 * tid, ch + 1] = acc[lane][mt][2] * f1 + zacc[lane][cbk][0]
            red[2 * tid + 1, ch] = acc[lane][mt][1] * f0 + zacc[lane][cbk][1]
            red[2 * tid + 1, ch + 1] = acc[lane][mt][3] * f1 + zacc[lane][cbk][1]
    return red, pv @ vfull


def test_qz(D, dt, ng=21):
    # qz_prologue: A = q rows (m = query row, rows 8-15 zero), B = z rows (n = group, 8 per block);
    # lane tid's channels are the slice [D/4 * tid, +D/4): k-step ks takes c0 + 4 ks + {0, 1}
    # (k 2tid, +1) and + {2, 3} (k 2tid+8, +9), in A and B alike
    z = np.array([[rnd(v, dt) for v in row] for row in rng.uniform(-1, 1, size=(ng, D))])
    q = np.array([[rnd(v, dt) for v in row] for row in rng.normal(size=(ROWS, D))])
    nrows = 6
    qz = np.zeros((((ng + 7) // 8) * 8, ROWS))
    for bi in range((ng + 7) // 8):
        c = [[0.0] * 4 for _ in range(32)]
        for ks in range(D // 16):
            a = []; b = []
            for lane in range(32):
                gid, tid = lane >> 2, lane & 3
                ci = (D // 4) * tid + 4 * ks
                qv = gid < nrows
                a.append([h2u(q[gid, ci], q[gid, ci + 1], dt) if qv else 0, 0,
                          h2u(q[gid, ci + 2], q[gid, ci + 3], dt) if qv else 0, 0])
                g = 8 * bi + gid
                b.append([h2u(z[g, ci], z[g, ci + 1], dt) if g < ng else 0,
                          h2u(z[g, ci + 2], z[g, ci + 3], dt) if g < ng else 0])
            c = mma(a, b, c, dt)
        for lane in range(32):
            gid, tid = lane >> 2, lane & 3
            qz[8 * bi + 2 * tid, gid] = c[lane][0]
            qz[8 * bi + 2 * tid + 1, gid] = c[lane][1]
    qq = q.copy(); qq[nrows:] = 0
    ref = z @ qq.T
    return np.max(np.abs(qz[:ng] - ref))


def test_unpack():
    for dt in ('f16', 'bf16'):
        for BITS in (2, 4):
            P = 8 // BITS
            for F in range(P):
                for trial in range(200):
                    x = int(rng.integers(0, 2**32))
                    r = unpack2(x, BITS, F, dt)
                    lo, hi = halves(r, dt)
                    e0 = (x >> (F * BITS)) & ((1 << BITS) - 1)
                    e1 = (x >> (16 + F * BITS)) & ((1 << BITS) - 1)
                    assert (lo, hi) == (e0, e1), (dt, BITS, F, hex(x), lo, hi, e0, e1)
    for BITS in (2, 4):  # the subnormal fp16 codes: code * 2^(F*BITS - 24), exactly
        for F in range(8 // BITS):
            for trial in range(200):
                x = int(rng.integers(0, 2**32))
                lo, hi = halves(unpack_codes(x, BITS, F, 'f16'), 'f16')
                e0 = (x >> (F * BITS)) & ((1 << BITS) - 1)
                e1 = (x >> (16 + F * BITS)) & ((1 << BITS) - 1)
                f = codes_unscale(BITS, F, 'f16')
                assert (lo * f, hi * f) == (e0, e1), (BITS, F, hex(x), lo, hi, e0, e1)
    print("unpack2 OK")


if __name__ == "__main__":
    # scores: max relative error (vs 1 + |ref|); pairs / values: after rounding to fp16 / bf16
    import sys
    test_unpack()
    worst = {"keys": 0.0, "pairs": 0.0, "values": 0.0, "qz": 0.0}
    for dt in ('f16', 'bf16'):
        e = max(test_qz(128, dt), test_qz(64, dt))
        worst["qz"] = max(worst["qz"], e)
        print(dt, "qz abs err", e)
        for KB in (2, 4):
            for D in (64, 128):
                for G in (32, 64, 128):
                    for t0 in (0, 64, 192):
                        e, pe = test_keys(KB, D, G, dt, t0)
                        worst["keys"], worst["pairs"] = max(worst["keys"], e), max(worst["pairs"], pe)
                        print(f"{dt} keys KB={KB} D={D} G={G} t0={t0}: rel err {e:.2e}  pairs {pe:.2e}")
        for VB in (2, 4):
            for D in (64, 128):
                for G in (32, 64, 128):
                    if G > D:
                        continue
                    for dq in (False, True):
                        e = test_values(VB, D, G, dt, dequant=dq)
                        e2 = test_values(VB, D, G, dt, valid=37, dequant=dq)
                        worst["values"] = max(worst["values"], e, e2)
                        name = "value_accum_dequant" if dq else "value_accum"
                        print(f"{dt} {name} VB={VB} D={D} G={G}: rel err {e:.2e}  (valid=37: {e2:.2e})")
                    if VB == 2:
                        e = test_values(VB, D, G, dt, narrow=True)
                        e2 = test_values(VB, D, G, dt, valid=37, narrow=True)
                        worst["values"] = max(worst["values"], e, e2)
                        print(f"{dt} value_accum_narrow D={D} G={G}: rel err {e:.2e}  (valid=37: {e2:.2e})")
            for p_scale in (1.0, 2.0 ** -14, 2.0 ** -16):  # p ~ 1/T: 16k and 64k tokens
                old, new = values_rel_err(VB, 128, 32, dt, False, p_scale), values_rel_err(VB, 128, 32, dt, True, p_scale)
                print(f"{dt} VB={VB} p < {p_scale:.1e}: ||err|| / ||ref|| value_accum {old:.1e}, value_accum_dequant {new:.1e}")
    limits = {"keys": 1e-4, "pairs": 1e-2, "values": 1e-2, "qz": 1e-3}
    bad = {k: v for k, v in worst.items() if not v < limits[k]}
    print("worst:", worst)
    print("FAIL" if bad else "PASS", bad or "")
    sys.exit(1 if bad else 0)
