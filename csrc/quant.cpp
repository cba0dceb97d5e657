// CPU kernels of localpers: GGUF dequantization and the fused rank-r edit into Q8_0 blocks.
//
// Every kernel reproduces the gguf package's numpy code (gguf/quants.py) operation by operation, so the
// results are bit-identical to it: float32 products and sums in the same order, no FMA (setup.py builds
// with -ffp-contract=off), fp16 conversions rounded to nearest even like numpy's astype.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

// ggml_type ids (gguf.GGMLQuantizationType) and their block layouts.
enum GgmlType : int { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };
constexpr int QK_K = 256;

// Threads start at this many dequantized elements (about half a millisecond on one core; the edit costs
// about 8 per element): below it, a second thread gains less than it loses waiting for a busy core.
constexpr int64_t PARALLEL_MIN_ELEMENTS = 1 << 20;

static uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static uint16_t load_u16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }

// Exact for every half value, branch-free so that loops over it vectorize (Maratyszcza's FP16 method):
// normal halves are rebiased by a multiplication by 2^-112, subnormal ones built as (0.5 + m*2^-24) - 0.5.
static float fp16_to_fp32(uint16_t h) {
    uint32_t w = uint32_t(h) << 16, sign = w & 0x80000000u, two_w = w + w;
    float normal = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float subnormal = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
    return bits_float(sign | float_bits(two_w < (1u << 27) ? subnormal : normal));
}

// Round to nearest even, overflow to inf, subnormals rounded too (as numpy's float32 -> float16).
static uint16_t fp32_to_fp16(float f) {
    uint32_t x = float_bits(f), ax = x & 0x7fffffff;
    uint16_t sign = (x >> 16) & 0x8000;
    if (ax > 0x7f800000) return sign | 0x7e00;     // NaN
    if (ax >= 0x477ff000) return sign | 0x7c00;    // >= 65520 rounds to inf
    if (ax >= 0x38800000) {                        // normal half: rebias the exponent, round 13 bits away
        uint32_t r = ax - 0x38000000;
        r += 0xfff + ((r >> 13) & 1);
        return sign | uint16_t(r >> 13);
    }
    int shift = 126 - int(ax >> 23);               // subnormal half: value / 2^-24 = m >> shift
    if (shift > 24) return sign;
    uint32_t m = (ax & 0x7fffff) | 0x800000, q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    q += rem > half || (rem == half && (q & 1));
    return sign | uint16_t(q);
}

// ---- dequantization: n_blocks blocks from x to y -------------------------------------------------------

static void dequant_f32(const uint8_t* x, float* y, int64_t n) { std::memcpy(y, x, n * 4); }

static void dequant_f16(const uint8_t* __restrict x, float* __restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = fp16_to_fp32(load_u16(x + 2 * i));
}

static void dequant_bf16(const uint8_t* __restrict x, float* __restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = bits_float(uint32_t(load_u16(x + 2 * i)) << 16);
}

// Q4_0: d (f16), 16 bytes of nibbles: element j is the low nibble of byte j, element j+16 the high one.
static void dequant_q4_0(const uint8_t* __restrict x, float* __restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 18, y += 32) {
        float d = fp16_to_fp32(load_u16(x));
        for (int j = 0; j < 16; j++) y[j] = d * float((x[2 + j] & 0xf) - 8);
        for (int j = 0; j < 16; j++) y[j + 16] = d * float((x[2 + j] >> 4) - 8);
    }
}

// Q4_1: d, m (f16), nibbles as Q4_0; y = d*q + m.
static void dequant_q4_1(const uint8_t* __restrict x, float* __restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 20, y += 32) {
        float d = fp16_to_fp32(load_u16(x)), m = fp16_to_fp32(load_u16(x + 2));
        for (int j = 0; j < 16; j++) y[j] = d * float(x[4 + j] & 0xf) + m;
        for (int j = 0; j < 16; j++) y[j + 16] = d * float(x[4 + j] >> 4) + m;
    }
}

// Q5_0: d (f16), 32 high bits (little-endian uint32: bit j is the 5th bit of element j), nibbles as Q4_0;
// y = d * (q - 16).
static void dequant_q5_0(const uint8_t* __restrict x, float* __restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 22, y += 32) {
        float d = fp16_to_fp32(load_u16(x));
        uint32_t qh;
        std::memcpy(&qh, x + 2, 4);
        for (int j = 0; j < 16; j++) y[j] = d * float(int((x[6 + j] & 0xf) | (((qh >> j) & 1) << 4)) - 16);
        for (int j = 0; j < 16; j++) y[j + 16] = d * float(int((x[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
    }
}

// Q5_1: d, m (f16), high bits and nibbles as Q5_0; y = d*q + m.
static void dequant_q5_1(const uint8_t* __restrict x, float* __restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 24, y += 32) {
        float d = fp16_to_fp32(load_u16(x)), m = fp16_to_fp32(load_u16(x + 2));
        uint32_t qh;
        std::memcpy(&qh, x + 4, 4);
        for (int j = 0; j < 16; j++) y[j] = d * float((x[8 + j] & 0xf) | (((qh >> j) & 1) << 4)) + m;
        for (int j = 0; j < 16; j++) y[j + 16] = d * float((x[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m;
    }
}

// Q8_0: d (f16), 32 int8.
static void dequant_q8_0(const uint8_t* __restrict x, float* __restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 34, y += 32) {
        float d = fp16_to_fp32(load_u16(x));
        for (int j = 0; j < 32; j++) y[j] = float(int8_t(x[2 + j])) * d;
    }
}

// The 8 six-bit scales and mins of a Q4_K/Q5_K super-block, packed in 12 bytes.
static void k_scale_min(const uint8_t* s, float d, float dmin, float* scale, float* min) {
    for (int j = 0; j < 4; j++) {
        scale[j] = d * float(s[j] & 63);
        min[j] = dmin * float(s[j + 4] & 63);
        scale[j + 4] = d * float((s[j + 8] & 0xf) | ((s[j] >> 2) & 0x30));
        min[j + 4] = dmin * float((s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30));
    }
}

// Q4_K: d, dmin (f16), 12 scale bytes, 128 nibble bytes; sub-block 2g takes the low nibbles of bytes
// 32g..32g+31, sub-block 2g+1 their high nibbles.
static void dequant_q4_k(const uint8_t* __restrict x, float* __restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 144, y += QK_K) {
        float scale[8], min[8];
        k_scale_min(x + 4, fp16_to_fp32(load_u16(x)), fp16_to_fp32(load_u16(x + 2)), scale, min);
        const uint8_t* qs = x + 16;
        for (int g = 0; g < 4; g++) {
            for (int l = 0; l < 32; l++) y[64 * g + l] = scale[2 * g] * float(qs[32 * g + l] & 0xf) - min[2 * g];
            for (int l = 0; l < 32; l++) y[64 * g + 32 + l] = scale[2 * g + 1] * float(qs[32 * g + l] >> 4) - min[2 * g + 1];
        }
    }
}

// Q5_K: Q4_K plus 32 bytes of high bits; sub-block s takes bit s of byte l as the 5th bit of element l.
static void dequant_q5_k(const uint8_t* __restrict x, float* __restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 176, y += QK_K) {
        float scale[8], min[8];
        k_scale_min(x + 4, fp16_to_fp32(load_u16(x)), fp16_to_fp32(load_u16(x + 2)), scale, min);
        const uint8_t *qh = x + 16, *qs = x + 48;
        for (int s = 0; s < 8; s++) {  // sub-block s: nibble s % 2 of bytes 32(s/2)..+31, high bit s of qh
            const uint8_t* q = qs + 32 * (s / 2);
            int shift = 4 * (s % 2);
            for (int l = 0; l < 32; l++)
                y[32 * s + l] = scale[s] * float(((q[l] >> shift) & 0xf) | (((qh[l] >> s) & 1) << 4)) - min[s];
        }
    }
}

// Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, d (f16); (q - 32) * d*scale of
// its 16-element sub-block. In each 128-element half h, quarter t takes nibble t/2 of ql[64h + 32(t%2) + l]
// and bits 2t..2t+1 of qh[32h + l].
static void dequant_q6_k(const uint8_t* __restrict x, float* __restrict y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 210, y += QK_K) {
        const int8_t* sc = reinterpret_cast<const int8_t*>(x + 192);
        float d = fp16_to_fp32(load_u16(x + 208));
        for (int h = 0; h < 2; h++)
            for (int t = 0; t < 4; t++) {
                const uint8_t *ql = x + 64 * h + 32 * (t % 2), *qh = x + 128 + 32 * h;
                int shift = 4 * (t / 2);
                for (int half = 0; half < 2; half++) {  // two sub-blocks of 16, each with its scale
                    float scale = d * float(sc[8 * h + 2 * t + half]);
                    for (int l = 16 * half; l < 16 * half + 16; l++) {
                        int q = ((ql[l] >> shift) & 0xf) | (((qh[l] >> (2 * t)) & 3) << 4);
                        y[128 * h + 32 * t + l] = scale * float(q - 32);
                    }
                }
            }
    }
}

struct TypeInfo {
    int block_size, type_size;
    void (*dequant)(const uint8_t*, float*, int64_t);
};

static TypeInfo type_info(int qtype) {
    switch (qtype) {
        case F32: return {1, 4, dequant_f32};
        case F16: return {1, 2, dequant_f16};
        case BF16: return {1, 2, dequant_bf16};
        case Q4_0: return {32, 18, dequant_q4_0};
        case Q4_1: return {32, 20, dequant_q4_1};
        case Q5_0: return {32, 22, dequant_q5_0};
        case Q5_1: return {32, 24, dequant_q5_1};
        case Q8_0: return {32, 34, dequant_q8_0};
        case Q4_K: return {QK_K, 144, dequant_q4_k};
        case Q5_K: return {QK_K, 176, dequant_q5_k};
        case Q6_K: return {QK_K, 210, dequant_q6_k};
    }
    throw std::invalid_argument("unsupported ggml type id " + std::to_string(qtype));
}

static const uint8_t* checked_data(const py::array_t<uint8_t, py::array::c_style>& raw, const TypeInfo& t,
                                   int64_t n_elements) {
    if (n_elements % t.block_size || raw.size() != n_elements / t.block_size * t.type_size)
        throw std::invalid_argument("data size does not match the tensor shape");
    return raw.data();
}

py::array_t<float> dequantize(py::array_t<uint8_t, py::array::c_style> raw, int qtype, int64_t n_elements) {
    TypeInfo t = type_info(qtype);
    const uint8_t* x = checked_data(raw, t, n_elements);
    py::array_t<float> out(n_elements);
    float* y = out.mutable_data();
    // Chunks of about 16K elements, handed out dynamically: a thread whose core another process holds
    // does not hold up the others.
    int64_t n_blocks = n_elements / t.block_size, chunk = 16384 / t.block_size;
    int64_t n_chunks = (n_blocks + chunk - 1) / chunk;
    py::gil_scoped_release release;
#pragma omp parallel for schedule(dynamic) if (n_elements >= PARALLEL_MIN_ELEMENTS)
    for (int64_t c = 0; c < n_chunks; c++) {
        int64_t first = c * chunk, count = std::min(chunk, n_blocks - first);
        t.dequant(x + first * t.type_size, y + first * t.block_size, count);
    }
    return out;
}

// ---- Q8_0 quantization (gguf's Q8_0.quantize_blocks) and the fused edit --------------------------------

// One Q8_0 block as ggml's quantize_row_q8_0_ref and gguf's numpy port: d = amax/127, q = roundf(x * (1/d)).
// roundf (half away from zero) is computed as trunc(v + copysign(0.5 - 2^-25, v)), which vectorizes and
// equals it for every float |v| < 256 (checked exhaustively; here |v| <= 127 + a few ulps).
static void quantize_block_q8_0(const float* __restrict x, uint8_t* __restrict out) {
    int32_t amax_bits = 0;  // |x| compared as integers: same order as the floats, and it vectorizes
    for (int j = 0; j < 32; j++) amax_bits = std::max(amax_bits, int32_t(float_bits(x[j]) & 0x7fffffff));
    float d = bits_float(amax_bits) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    uint16_t dh = fp32_to_fp16(d);
    std::memcpy(out, &dh, 2);
    int8_t* q = reinterpret_cast<int8_t*>(out + 2);
    for (int j = 0; j < 32; j++) {
        float v = x[j] * id;
        q[j] = int8_t(int(v + std::copysign(0x1.fffffep-2f, v)));
    }
}

// One row of the edit: dequantize it into w, add scale * sum_k u[k] * V[:, k] (k in order), quantize.
static void edit_row(const TypeInfo& t, const uint8_t* src, const float* u, const float* vt, int64_t n_in, int64_t r,
                     float scale, float* w, uint8_t* dst) {
    t.dequant(src, w, n_in / t.block_size);
    for (int64_t c = 0; c < n_in; c += 32) {  // one output block at a time, so its update stays in L1
        float block[32] = {};
        for (int64_t k = 0; k < r; k++)
            for (int j = 0; j < 32; j++) block[j] += u[k] * vt[k * n_in + c + j];
        for (int j = 0; j < 32; j++) block[j] = w[c + j] + scale * block[j];
        quantize_block_q8_0(block, dst + c / 32 * 34);
    }
}

// Q8_0 bytes of dequant(W) + scale * U @ V.T, one row at a time; the update is summed over k = 0..r-1 in
// float32 (product, then add), the order of the numpy reference in localpers/quant.py.
py::array_t<uint8_t> edit_to_q8_0(py::array_t<uint8_t, py::array::c_style> raw, int qtype, int64_t n_out,
                                  int64_t n_in, py::array_t<float, py::array::c_style> U,
                                  py::array_t<float, py::array::c_style> V, float scale) {
    TypeInfo t = type_info(qtype);
    if (n_in % 32 || n_in % t.block_size) throw std::invalid_argument("n_in must be a multiple of the block sizes");
    const uint8_t* x = checked_data(raw, t, n_out * n_in);
    if (U.ndim() != 2 || V.ndim() != 2 || U.shape(0) != n_out || V.shape(0) != n_in || U.shape(1) != V.shape(1))
        throw std::invalid_argument("U must be [n_out, r] and V [n_in, r]");
    const int64_t r = U.shape(1), row_in = n_in / t.block_size * t.type_size, row_out = n_in / 32 * 34;
    py::array_t<uint8_t> out({n_out, row_out});
    uint8_t* y = out.mutable_data();
    const float *u = U.data(), *v = V.data();
    py::gil_scoped_release release;
    std::vector<float> vt(r * n_in);  // V transposed, so the inner loop runs over contiguous columns
    for (int64_t j = 0; j < n_in; j++)
        for (int64_t k = 0; k < r; k++) vt[k * n_in + j] = v[j * r + k];
#pragma omp parallel if (8 * n_out * n_in >= PARALLEL_MIN_ELEMENTS)
    {
        std::vector<float> w(n_in);
#pragma omp for schedule(dynamic)
        for (int64_t i = 0; i < n_out; i++)
            edit_row(t, x + i * row_in, u + i * r, vt.data(), n_in, r, scale, w.data(), y + i * row_out);
    }
    return out;
}

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "localpers CPU kernels: GGUF dequantization and the fused rank-r edit into Q8_0 (OpenMP)";
#ifdef LOCALPERS_SOURCE_SHA256
    m.attr("source_sha256") = LOCALPERS_SOURCE_SHA256;  // set by setup.py: the SHA-256 of the compiled sources
#endif
    m.def("dequantize", &dequantize, py::arg("raw"), py::arg("qtype"), py::arg("n_elements"),
          "Dequantize raw bytes of ggml type `qtype` holding n_elements values to a flat float32 array.");
    m.def("edit_to_q8_0", &edit_to_q8_0, py::arg("raw"), py::arg("qtype"), py::arg("n_out"), py::arg("n_in"),
          py::arg("U"), py::arg("V"), py::arg("scale"),
          "Q8_0 bytes [n_out, n_in/32*34] of dequant(W) + scale * U @ V.T.");
}
