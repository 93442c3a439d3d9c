/*
 * op_util.h -- kernel plumbing shared by the poet custom ops (spill_ops.c, async_ops.c): the spill
 * directory rule, optional attributes, a node's declared output shape, a value's type and shape.
 * Plain ORT C API; every function takes the API table the library registered with.
 */
#ifndef POETC_OP_UTIL_H
#define POETC_OP_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include "io_core.h"
#include "onnxruntime_c_api.h"

#ifdef __cplusplus
extern "C" {
#endif

/* POETC_SPILL_DIR, else ${TMPDIR:-/tmp}/poetc-spill-<euid> (one private directory per user). */
void poet_default_spill_dir(char *out, size_t n);

/* POETC_SPILL_DROP_CACHE set and not "0". */
int poet_drop_cache_requested(void);

/* Optional string attribute `name` into out (NUL-terminated, truncated to n); "" when absent. */
void poet_string_attr(const OrtApi *api, const OrtKernelInfo *info, const char *name, char *out, size_t n);

/* Optional int attribute; `fallback` when absent. */
int64_t poet_int_attr(const OrtApi *api, const OrtKernelInfo *info, const char *name, int64_t fallback);

/* The static shape the graph declares for output `index`: 1 and (rank, dims) when every dim is
 * known, 0 otherwise (rank 0 is also what ORT reports for an undeclared shape: not a check). */
int poet_declared_output_shape(const OrtApi *api, const OrtKernelInfo *info, size_t index, uint32_t *rank,
                               int64_t dims[POET_SPILL_MAX_RANK]);

/* Element type and shape of tensor `v`.  NULL, or a status whose message starts with `label`. */
OrtStatus *poet_value_meta(const OrtApi *api, const char *label, const OrtValue *v, int32_t *dtype,
                           uint32_t *rank, int64_t dims[POET_SPILL_MAX_RANK]);

#ifdef __cplusplus
}
#endif
#endif /* POETC_OP_UTIL_H */
