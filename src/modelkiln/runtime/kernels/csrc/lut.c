/* Byte lookup kernels: y[i] = table[x[i]], a scalar path and x86 paths chosen at run time.
 *
 * The x86 paths are compiled with per-function target attributes, never with -m flags for the
 * whole file, so the library still loads and runs on a CPU without them: kiln_lut_find() asks
 * __builtin_cpu_supports before handing one out.
 */
#include "lut.h"

#include <string.h>

void kiln_lut_scalar(const uint8_t *x, uint8_t *y, size_t n, const uint8_t *table) {
  size_t i = 0;
  /* Eight independent loads per turn: the loop is bound by load latency, not by arithmetic. */
  for (; i + 8 <= n; i += 8) {
    uint8_t a = table[x[i]], b = table[x[i + 1]], c = table[x[i + 2]], d = table[x[i + 3]];
    uint8_t e = table[x[i + 4]], f = table[x[i + 5]], g = table[x[i + 6]], h = table[x[i + 7]];
    y[i] = a;
    y[i + 1] = b;
    y[i + 2] = c;
    y[i + 3] = d;
    y[i + 4] = e;
    y[i + 5] = f;
    y[i + 6] = g;
    y[i + 7] = h;
  }
  for (; i < n; i++) y[i] = table[x[i]];
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KILN_X86 1
#include <immintrin.h>

/* ---- AVX2: 16 pshufb sub-tables of 16 entries, then a blend tree on the high nibble ----
 * pshufb looks up 16 entries (in each 128-bit lane) by an index's low 4 bits. Sixteen of them,
 * one per sub-table table[16k .. 16k+15], give every candidate for x's low nibble; four levels of
 * blendv pick the one x's high nibble names (blendv tests each byte's top bit, so bit b of x is
 * moved there by a 16-bit shift left by 7-b: the bits shifted across bytes land below bit 7, where
 * blendv does not look). The alternative (per sub-table, a saturating index that makes pshufb
 * zero the misses, then OR) measured 10-15 % slower. On the Xeon of benchmarks/results/
 * lookup_kernel.jsonl both are bound by vector ALU uops and run at about the scalar path's speed
 * (~5 GB/s on one core); CPUs whose blendv is one uop (AMD Zen) should gain more (not measured). */
__attribute__((target("avx2"))) static inline __m256i lut32_avx2(__m256i v, const __m256i *sub) {
  const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
  __m256i s[16];
  for (int k = 0; k < 16; k++) s[k] = _mm256_shuffle_epi8(sub[k], lo);
  __m256i m = _mm256_slli_epi16(v, 3); /* bit 4 */
  for (int k = 0; k < 8; k++) s[k] = _mm256_blendv_epi8(s[2 * k], s[2 * k + 1], m);
  m = _mm256_slli_epi16(v, 2); /* bit 5 */
  for (int k = 0; k < 4; k++) s[k] = _mm256_blendv_epi8(s[2 * k], s[2 * k + 1], m);
  m = _mm256_slli_epi16(v, 1); /* bit 6 */
  for (int k = 0; k < 2; k++) s[k] = _mm256_blendv_epi8(s[2 * k], s[2 * k + 1], m);
  return _mm256_blendv_epi8(s[0], s[1], v); /* bit 7 */
}

__attribute__((target("avx2"))) static void kiln_lut_avx2(const uint8_t *x, uint8_t *y, size_t n,
                                                           const uint8_t *table) {
  __m256i sub[16];
  for (int k = 0; k < 16; k++)
    sub[k] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(table + 16 * k)));
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i a = _mm256_loadu_si256((const __m256i *)(x + i));
    _mm256_storeu_si256((__m256i *)(y + i), lut32_avx2(a, sub));
  }
  if (i < n) { /* tail through a stack buffer: never read or write past x[n-1] / y[n-1] */
    uint8_t buf[32];
    size_t rest = n - i;
    memset(buf, 0, sizeof buf);
    memcpy(buf, x + i, rest);
    __m256i r = lut32_avx2(_mm256_loadu_si256((const __m256i *)buf), sub);
    _mm256_storeu_si256((__m256i *)buf, r);
    memcpy(y + i, buf, rest);
  }
}

/* ---- AVX-512 VBMI: vpermi2b indexes 128 bytes (two registers) by an index's low 7 bits ----
 * One vpermi2b over table[0..127], one over table[128..255], then a blend on the index's top bit:
 * a full 256-entry lookup for 64 bytes in four instructions. Tails use masked loads and stores,
 * which do not touch (or fault on) the masked-out bytes. */
#define KILN_AVX512 "avx512f,avx512bw,avx512vbmi"

__attribute__((target(KILN_AVX512))) static inline __m512i lut64_vbmi(__m512i v, __m512i t0, __m512i t1,
                                                                     __m512i t2, __m512i t3) {
  __m512i lo = _mm512_permutex2var_epi8(t0, v, t1);
  __m512i hi = _mm512_permutex2var_epi8(t2, v, t3);
  return _mm512_mask_blend_epi8(_mm512_movepi8_mask(v), lo, hi);
}

__attribute__((target(KILN_AVX512))) static void kiln_lut_avx512vbmi(const uint8_t *x, uint8_t *y, size_t n,
                                                                    const uint8_t *table) {
  const __m512i t0 = _mm512_loadu_si512((const void *)table);
  const __m512i t1 = _mm512_loadu_si512((const void *)(table + 64));
  const __m512i t2 = _mm512_loadu_si512((const void *)(table + 128));
  const __m512i t3 = _mm512_loadu_si512((const void *)(table + 192));
  size_t i = 0;
  for (; i + 256 <= n; i += 256) {
    __m512i a = _mm512_loadu_si512((const void *)(x + i));
    __m512i b = _mm512_loadu_si512((const void *)(x + i + 64));
    __m512i c = _mm512_loadu_si512((const void *)(x + i + 128));
    __m512i d = _mm512_loadu_si512((const void *)(x + i + 192));
    _mm512_storeu_si512((void *)(y + i), lut64_vbmi(a, t0, t1, t2, t3));
    _mm512_storeu_si512((void *)(y + i + 64), lut64_vbmi(b, t0, t1, t2, t3));
    _mm512_storeu_si512((void *)(y + i + 128), lut64_vbmi(c, t0, t1, t2, t3));
    _mm512_storeu_si512((void *)(y + i + 192), lut64_vbmi(d, t0, t1, t2, t3));
  }
  for (; i + 64 <= n; i += 64) {
    __m512i a = _mm512_loadu_si512((const void *)(x + i));
    _mm512_storeu_si512((void *)(y + i), lut64_vbmi(a, t0, t1, t2, t3));
  }
  if (i < n) {
    __mmask64 m = ((__mmask64)1 << (n - i)) - 1; /* n - i < 64 */
    __m512i a = _mm512_maskz_loadu_epi8(m, (const void *)(x + i));
    _mm512_mask_storeu_epi8((void *)(y + i), m, lut64_vbmi(a, t0, t1, t2, t3));
  }
}
#endif /* x86-64 */

/* Fastest first: auto picks the first one the CPU supports. */
static const KilnLutPath PATHS[] = {
#ifdef KILN_X86
    {"avx512vbmi", kiln_lut_avx512vbmi},
    {"avx2", kiln_lut_avx2},
#endif
    {"scalar", kiln_lut_scalar},
};

static const char *const KNOWN[] = {"scalar", "avx2", "avx512vbmi"};

static int cpu_runs(const char *name) {
  if (strcmp(name, "scalar") == 0) return 1;
#ifdef KILN_X86
  __builtin_cpu_init();
  if (strcmp(name, "avx2") == 0) return __builtin_cpu_supports("avx2");
  if (strcmp(name, "avx512vbmi") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vbmi");
#endif
  return 0;
}

int kiln_lut_known(const char *name) {
  for (size_t i = 0; i < sizeof KNOWN / sizeof KNOWN[0]; i++)
    if (strcmp(name, KNOWN[i]) == 0) return 1;
  return 0;
}

const KilnLutPath *kiln_lut_find(const char *name) {
  int want_auto = name == NULL || name[0] == '\0' || strcmp(name, "auto") == 0;
  for (size_t i = 0; i < sizeof PATHS / sizeof PATHS[0]; i++) {
    if (!want_auto && strcmp(name, PATHS[i].name) != 0) continue;
    if (cpu_runs(PATHS[i].name)) return &PATHS[i];
    if (!want_auto) return NULL;
  }
  return NULL;
}
