/* The byte lookup kernels: y[i] = table[x[i]] over n bytes, one per instruction set.
 *
 * Every path gives the same bytes; they differ only in speed. kiln_lut_select() picks one at
 * run time from what the CPU supports (never from compile flags: a built library may run on
 * another machine), or the one named by KILN_KERNELS_ISA.
 */
#ifndef KILN_LUT_H
#define KILN_LUT_H

#include <stddef.h>
#include <stdint.h>

typedef void (*kiln_lut_fn)(const uint8_t *x, uint8_t *y, size_t n, const uint8_t *table);

typedef struct KilnLutPath {
  const char *name; /* "scalar", "avx2", "avx512vbmi" */
  kiln_lut_fn fn;
} KilnLutPath;

/* The portable path: builds and runs everywhere (ARM64 included). */
void kiln_lut_scalar(const uint8_t *x, uint8_t *y, size_t n, const uint8_t *table);

/* The path named `name` if this CPU can run it; NULL if the name is unknown or the CPU lacks it.
 * "auto" (or NULL) picks the fastest one the CPU supports. */
const KilnLutPath *kiln_lut_find(const char *name);

/* Whether `name` is a path this build knows (whatever the CPU). */
int kiln_lut_known(const char *name);

#endif /* KILN_LUT_H */
