/*
 * spill_ops.c -- poetc's native Spill/Restore custom operators for ONNX Runtime.
 *
 * Built as a shared library and registered with
 *   SessionOptions.register_custom_ops_library(path)
 * which calls RegisterCustomOps() below.  Only the ORT C API is used; the
 * API table is requested at version POET_ORT_API_VERSION (19 == ORT 1.19), so
 * the library loads in onnxruntime(-training) >= 1.19 even though it is
 * compiled against newer headers.
 *
 * Op contract (domain "poet", opset version 1):
 *
 *   Spill(X) -> H
 *     X: tensor of float, double, float16, int64, int32, int8, uint8 or bool.
 *     H: int64 tensor of shape [2] = [token, pid].  The tensor is written to
 *        <dir>/poet-<pid>-<token as 16 hex digits>.spill (format in io_core.h).
 *     attribute key (string, optional): label used only in error messages.
 *
 *   Restore(H) -> Y  (float)         Restore_double(H)  -> Y (double)
 *   Restore_float16(H) -> Y          Restore_int64(H)   -> Y
 *   Restore_int32(H)   -> Y          Restore_int8(H)    -> Y
 *   Restore_uint8(H)   -> Y          Restore_bool(H)    -> Y
 *     One op type per output element type.  Tried on ORT 1.19.2: a single
 *     Restore with an UNDEFINED output type plus a `dtype` attribute is
 *     rejected when the library is registered ("There must be one (and only
 *     one) dynamic typed input to the custom op"): ORT copies an UNDEFINED
 *     output's type from the one UNDEFINED input, never from an attribute.
 *     Restore(H, like) with an UNDEFINED `like` input would work but needs an
 *     extra (empty) tensor in the graph; static per-dtype ops need nothing.
 *     Reads the file named by H, allocates Y with the stored shape, reads the
 *     payload straight into Y, verifies the xxHash64 checksum, and deletes the
 *     file.  Any problem -- missing file, bad magic/header, token/dtype
 *     mismatch, truncation, checksum mismatch -- fails the run with an error
 *     status naming the file; a damaged file is kept for inspection.
 *     attribute key (string, optional): label used only in error messages.
 *     attribute keep_file (int, optional, default 0): 1 leaves the file in
 *     place after a successful restore, for a later Restore of the same
 *     handle (a tensor paged in again between two backward readers); the
 *     last Restore of a handle has keep_file 0 and deletes it.
 *
 * Environment, read when a kernel is created (i.e. at session creation):
 *   POETC_SPILL_DIR         spill directory (default ${TMPDIR:-/tmp}/poetc-spill-<uid>,
 *                           created with mode 0700 if missing; refused unless it
 *                           is a directory owned by this user with mode 0700)
 *
 * Trust: every file is authenticated with a keyed MAC whose key exists only in
 * this process (io_core.h), so Restore fails on any file this process did not
 * write.  Restore's output shape and dtype come from the graph (the output's
 * declared static shape, which poetc's rewrite always writes) and the file
 * must match them; only a graph without a static shape for Y (hand-built test
 * graphs) takes the (authenticated) shape from the file.
 *   POETC_SPILL_DROP_CACHE  "1": fdatasync each spill file and advise
 *                           POSIX_FADV_DONTNEED so it leaves the page cache.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io_core.h"
#include "onnxruntime_c_api.h"
#include "op_util.h"

/* async_ops.c: waits for (and claims) a pending SpillAsync write of `token`; POET_OK if none */
int poet_async_wait_write(uint64_t token, poet_err *err);

#define POET_ORT_API_VERSION 19
#define POET_DOMAIN "poet"

static const OrtApi *g_ort = NULL;

enum { POET_KIND_SPILL = 0, POET_KIND_RESTORE = 1 };

typedef struct {
  OrtCustomOp base; /* must be first: ORT hands us &base */
  int kind;
  int32_t dtype;    /* Restore: produced element type; Spill: unused */
  const char *name;
} PoetOp;

typedef struct {
  const PoetOp *op;
  char dir[POET_PATH_BYTES];
  char key[256];
  int drop_cache;
  int keep_file; /* Restore: leave the spill file for a later Restore of the same handle */
  int has_shape; /* Restore: the graph declares Y's static shape (exp_rank, exp_dims) */
  uint32_t exp_rank;
  int64_t exp_dims[POET_SPILL_MAX_RANK];
} PoetKernel;

/* ------------------------------------------------------------------------ */
/* helpers                                                                  */

static OrtStatus *make_status(OrtErrorCode code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static OrtStatus *make_status(OrtErrorCode code, const char *fmt, ...) {
  char msg[POET_ERR_MSG_BYTES + 512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  return g_ort->CreateStatus(code, msg);
}

static const char *op_label(const PoetKernel *k) { return k->op->name; }

/* Prefix "poetc <Op>[key=...]: " for error messages. */
static void label_prefix(const PoetKernel *k, char *out, size_t n) {
  if (k->key[0])
    snprintf(out, n, "poetc %s[key=%s]", op_label(k), k->key);
  else
    snprintf(out, n, "poetc %s", op_label(k));
}

/* Wraps an ORT API status from a call we made, adding context. */
static OrtStatus *wrap_status(const PoetKernel *k, OrtStatus *st, const char *what) {
  char pre[400];
  OrtStatus *out;
  if (!st) return NULL;
  label_prefix(k, pre, sizeof pre);
  out = make_status(ORT_RUNTIME_EXCEPTION, "%s: %s failed: %s", pre, what,
                    g_ort->GetErrorMessage(st));
  g_ort->ReleaseStatus(st);
  return out;
}

static OrtStatus *io_status(const PoetKernel *k, const poet_err *err) {
  char pre[400];
  label_prefix(k, pre, sizeof pre);
  return make_status(ORT_RUNTIME_EXCEPTION, "%s: %s", pre, err->msg);
}

/* ------------------------------------------------------------------------ */
/* OrtCustomOp callbacks                                                    */

static const char *ORT_API_CALL op_get_name(const OrtCustomOp *op) {
  return ((const PoetOp *)op)->name;
}

static const char *ORT_API_CALL op_get_ep(const OrtCustomOp *op) {
  (void)op;
  return NULL; /* CPU execution provider */
}

static ONNXTensorElementDataType ORT_API_CALL op_input_type(const OrtCustomOp *op, size_t i) {
  const PoetOp *p = (const PoetOp *)op;
  (void)i;
  return p->kind == POET_KIND_SPILL ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED
                                    : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
}

static ONNXTensorElementDataType ORT_API_CALL op_output_type(const OrtCustomOp *op, size_t i) {
  const PoetOp *p = (const PoetOp *)op;
  (void)i;
  return p->kind == POET_KIND_SPILL ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
                                    : (ONNXTensorElementDataType)p->dtype;
}

static size_t ORT_API_CALL op_one(const OrtCustomOp *op) {
  (void)op;
  return 1;
}

static OrtCustomOpInputOutputCharacteristic ORT_API_CALL op_required(const OrtCustomOp *op,
                                                                     size_t i) {
  (void)op;
  (void)i;
  return INPUT_OUTPUT_REQUIRED;
}

static OrtMemType ORT_API_CALL op_input_mem(const OrtCustomOp *op, size_t i) {
  (void)op;
  (void)i;
  return OrtMemTypeDefault;
}

static int ORT_API_CALL op_arity_one(const OrtCustomOp *op) {
  (void)op;
  return 1;
}

static int ORT_API_CALL op_zero(const OrtCustomOp *op) {
  (void)op;
  return 0;
}

static int ORT_API_CALL op_start_version(const OrtCustomOp *op) {
  (void)op;
  return 1;
}

static int ORT_API_CALL op_end_version(const OrtCustomOp *op) {
  (void)op;
  return INT_MAX;
}

/* Spill's H is always int64[2]: tell ORT's shape inference. */
static OrtStatusPtr ORT_API_CALL op_infer_shape(const OrtCustomOp *op, OrtShapeInferContext *ctx) {
  const PoetOp *p = (const PoetOp *)op;
  OrtTensorTypeAndShapeInfo *info = NULL;
  OrtStatus *st;
  int64_t two = 2;
  if (p->kind != POET_KIND_SPILL) return NULL;
  st = g_ort->CreateTensorTypeAndShapeInfo(&info);
  if (st) return st;
  st = g_ort->SetTensorElementType(info, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
  if (!st) st = g_ort->SetDimensions(info, &two, 1);
  if (!st) st = g_ort->ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
  g_ort->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

static OrtStatusPtr ORT_API_CALL op_create_kernel(const OrtCustomOp *op, const OrtApi *api,
                                                  const OrtKernelInfo *info, void **kernel) {
  const PoetOp *p = (const PoetOp *)op;
  PoetKernel *k;
  (void)api;
  *kernel = NULL;
  k = (PoetKernel *)calloc(1, sizeof *k);
  if (!k) return make_status(ORT_FAIL, "poetc %s: out of memory creating kernel", p->name);
  k->op = p;
  poet_default_spill_dir(k->dir, sizeof k->dir);
  k->drop_cache = poet_drop_cache_requested();
  poet_string_attr(g_ort, info, "key", k->key, sizeof k->key);
  if (p->kind == POET_KIND_RESTORE) {
    k->has_shape = poet_declared_output_shape(g_ort, info, 0, &k->exp_rank, k->exp_dims);
    k->keep_file = poet_int_attr(g_ort, info, "keep_file", 0) != 0; /* absent: delete after restoring */
  }

  if (p->kind == POET_KIND_SPILL) {
    poet_err err;
    if (poet_ensure_dir(k->dir, &err) != POET_OK) {
      OrtStatus *out;
      char pre[400];
      label_prefix(k, pre, sizeof pre);
      out = make_status(ORT_FAIL, "%s: unusable spill directory (POETC_SPILL_DIR=%s): %s", pre,
                        getenv("POETC_SPILL_DIR") ? getenv("POETC_SPILL_DIR") : "<unset>",
                        err.msg);
      free(k);
      return out;
    }
  }
  *kernel = k;
  return NULL;
}

static void ORT_API_CALL op_destroy_kernel(void *kernel) { free(kernel); }

/* Reads type/shape of an input or output value. */
static OrtStatus *value_meta(const PoetKernel *k, const OrtValue *v, int32_t *dtype,
                             uint32_t *rank, int64_t *dims) {
  char pre[400];
  label_prefix(k, pre, sizeof pre);
  return poet_value_meta(g_ort, pre, v, dtype, rank, dims);
}

static OrtStatus *spill_compute(PoetKernel *k, OrtKernelContext *ctx) {
  const OrtValue *x = NULL;
  OrtValue *h = NULL;
  void *xdata = NULL;
  int64_t *hdata = NULL;
  int64_t hshape = 2;
  poet_spill_header hdr;
  poet_err err;
  char path[POET_PATH_BYTES];
  OrtStatus *st;
  int64_t pid = (int64_t)getpid();

  memset(&hdr, 0, sizeof hdr);
  st = g_ort->KernelContext_GetInput(ctx, 0, &x);
  if (st) return wrap_status(k, st, "KernelContext_GetInput");
  if (!x) return make_status(ORT_INVALID_ARGUMENT, "poetc Spill: missing input X");
  st = value_meta(k, x, &hdr.dtype, &hdr.rank, hdr.dims);
  if (st) return st;
  if (poet_dtype_size(hdr.dtype) == 0) {
    char pre[400];
    label_prefix(k, pre, sizeof pre);
    return make_status(ORT_INVALID_ARGUMENT, "%s: unsupported input element type %d (supported: "
                       "float, double, float16, int64, int32, int8, uint8, bool)", pre,
                       (int)hdr.dtype);
  }
  st = g_ort->GetTensorMutableData((OrtValue *)x, &xdata);
  if (st) return wrap_status(k, st, "GetTensorMutableData(X)");

  hdr.token = poet_new_token();
  if (poet_spill_path(path, sizeof path, k->dir, pid, hdr.token, &err) != POET_OK)
    return io_status(k, &err);
  if (poet_spill_write(path, &hdr, xdata, k->drop_cache, &err) != POET_OK) {
    /* The directory may have been removed since session creation (e.g. a tmp
     * cleaner): recreate it once and retry. */
    if (err.kind == POET_E_IO && err.sys_errno == ENOENT &&
        poet_ensure_dir(k->dir, &err) == POET_OK &&
        poet_spill_write(path, &hdr, xdata, k->drop_cache, &err) == POET_OK) {
      /* recovered */
    } else {
      return io_status(k, &err);
    }
  }

  st = g_ort->KernelContext_GetOutput(ctx, 0, &hshape, 1, &h);
  if (!st) st = g_ort->GetTensorMutableData(h, (void **)&hdata);
  if (st) {
    unlink(path);
    return wrap_status(k, st, "allocating output H");
  }
  hdata[0] = (int64_t)hdr.token;
  hdata[1] = pid;
  return NULL;
}

static OrtStatus *restore_compute(PoetKernel *k, OrtKernelContext *ctx) {
  const OrtValue *h = NULL;
  OrtValue *y = NULL;
  void *ydata = NULL;
  int64_t *hdata = NULL;
  int32_t hdt = 0;
  uint32_t hrank = 0;
  int64_t hdims[POET_SPILL_MAX_RANK];
  uint64_t token;
  int64_t pid;
  poet_spill_reader rd;
  poet_err err;
  char path[POET_PATH_BYTES], pre[400];
  OrtStatus *st;

  label_prefix(k, pre, sizeof pre);
  st = g_ort->KernelContext_GetInput(ctx, 0, &h);
  if (st) return wrap_status(k, st, "KernelContext_GetInput");
  if (!h) return make_status(ORT_INVALID_ARGUMENT, "%s: missing input H", pre);
  st = value_meta(k, h, &hdt, &hrank, hdims);
  if (st) return st;
  if (hdt != POET_DT_INT64 || hrank != 1 || hdims[0] != 2)
    return make_status(ORT_INVALID_ARGUMENT, "%s: input H must be an int64 tensor of shape [2] "
                       "produced by poet.Spill", pre);
  st = g_ort->GetTensorMutableData((OrtValue *)h, (void **)&hdata);
  if (st) return wrap_status(k, st, "GetTensorMutableData(H)");
  token = (uint64_t)hdata[0];
  pid = hdata[1];
  if (poet_spill_path(path, sizeof path, k->dir, pid, token, &err) != POET_OK)
    return io_status(k, &err);
  /* a handle from SpillAsync: its write must be complete (async_ops.c) */
  if (poet_async_wait_write(token, &err) != POET_OK)
    return make_status(ORT_RUNTIME_EXCEPTION, "%s: the write of this spill failed: %s", pre, err.msg);

  if (poet_spill_open(path, &rd, &err) != POET_OK) return io_status(k, &err);
  if (rd.hdr.token != token) {
    poet_spill_reader_close(&rd, 0);
    return make_status(ORT_RUNTIME_EXCEPTION, "%s: spill file '%s' holds token %016llx, "
                       "expected %016llx (file mix-up)", pre, path,
                       (unsigned long long)rd.hdr.token, (unsigned long long)token);
  }
  if (rd.hdr.dtype != k->op->dtype) {
    poet_spill_reader_close(&rd, 0);
    return make_status(ORT_RUNTIME_EXCEPTION, "%s: dtype mismatch: spill file '%s' holds %s "
                       "data but this op produces %s (use the Restore op for %s)", pre, path,
                       poet_dtype_name(rd.hdr.dtype), poet_dtype_name(k->op->dtype),
                       poet_dtype_name(rd.hdr.dtype));
  }
  if (k->has_shape) {
    uint32_t d;
    int same = rd.hdr.rank == k->exp_rank;
    for (d = 0; same && d < k->exp_rank; d++) same = rd.hdr.dims[d] == k->exp_dims[d];
    if (!same) {
      char got[256], want[256];
      size_t g = 0, w = 0;
      got[0] = want[0] = '\0';
      for (d = 0; d < rd.hdr.rank && g < sizeof got - 24; d++)
        g += (size_t)snprintf(got + g, sizeof got - g, d ? ",%lld" : "%lld", (long long)rd.hdr.dims[d]);
      for (d = 0; d < k->exp_rank && w < sizeof want - 24; d++)
        w += (size_t)snprintf(want + w, sizeof want - w, d ? ",%lld" : "%lld", (long long)k->exp_dims[d]);
      poet_spill_reader_close(&rd, 0);
      return make_status(ORT_RUNTIME_EXCEPTION, "%s: shape mismatch: spill file '%s' holds a [%s] "
                         "tensor but the graph restores a [%s] one; the file was kept for inspection",
                         pre, path, got, want);
    }
  }
  st = g_ort->KernelContext_GetOutput(ctx, 0, rd.hdr.dims, rd.hdr.rank, &y);
  if (!st && rd.hdr.payload_bytes > 0) st = g_ort->GetTensorMutableData(y, &ydata);
  if (st) {
    poet_spill_reader_close(&rd, 0);
    return wrap_status(k, st, "allocating output Y");
  }
  if (poet_spill_read_payload(&rd, ydata, &err) != POET_OK) {
    poet_spill_reader_close(&rd, 0);
    return make_status(ORT_RUNTIME_EXCEPTION, "%s: %s; the file was kept for inspection", pre,
                       err.msg);
  }
  poet_spill_reader_close(&rd, !k->keep_file);
  return NULL;
}

static OrtStatusPtr ORT_API_CALL op_compute(void *kernel, OrtKernelContext *ctx) {
  PoetKernel *k = (PoetKernel *)kernel;
  return k->op->kind == POET_KIND_SPILL ? spill_compute(k, ctx) : restore_compute(k, ctx);
}

/* Legacy (pre-V2) entry points; ORT uses the V2 ones for version >= 16. */
static void *ORT_API_CALL op_create_kernel_v1(const OrtCustomOp *op, const OrtApi *api,
                                              const OrtKernelInfo *info) {
  void *k = NULL;
  OrtStatus *st = op_create_kernel(op, api, info, &k);
  if (st) g_ort->ReleaseStatus(st);
  return k;
}

static void ORT_API_CALL op_compute_v1(void *kernel, OrtKernelContext *ctx) {
  OrtStatus *st = op_compute(kernel, ctx);
  if (st) g_ort->ReleaseStatus(st);
}

/* ------------------------------------------------------------------------ */
/* op table and registration                                                */

#define POET_OP_INIT(KIND, DTYPE, NAME)                                              \
  {                                                                                  \
    .base = {                                                                        \
        .version = POET_ORT_API_VERSION,                                             \
        .CreateKernel = op_create_kernel_v1,                                         \
        .GetName = op_get_name,                                                      \
        .GetExecutionProviderType = op_get_ep,                                       \
        .GetInputType = op_input_type,                                               \
        .GetInputTypeCount = op_one,                                                 \
        .GetOutputType = op_output_type,                                             \
        .GetOutputTypeCount = op_one,                                                \
        .KernelCompute = op_compute_v1,                                              \
        .KernelDestroy = op_destroy_kernel,                                          \
        .GetInputCharacteristic = op_required,                                       \
        .GetOutputCharacteristic = op_required,                                      \
        .GetInputMemoryType = op_input_mem,                                          \
        .GetVariadicInputMinArity = op_arity_one,                                    \
        .GetVariadicInputHomogeneity = op_zero,                                      \
        .GetVariadicOutputMinArity = op_arity_one,                                   \
        .GetVariadicOutputHomogeneity = op_zero,                                     \
        .CreateKernelV2 = op_create_kernel,                                          \
        .KernelComputeV2 = op_compute,                                               \
        .InferOutputShapeFn = op_infer_shape,                                        \
        .GetStartVersion = op_start_version,                                         \
        .GetEndVersion = op_end_version,                                             \
    },                                                                               \
    .kind = (KIND), .dtype = (DTYPE), .name = (NAME)                                 \
  }

/* update_ops.c: the in-place optimizer updates (StepCount, AdamWUpdate, SGDUpdate) share the domain */
OrtStatus *poet_register_update_ops(OrtCustomOpDomain *domain, const OrtApi *api);
/* state_ops.c: StateRead / StateWrite (the state directory's paged tensors) share the domain */
OrtStatus *poet_register_state_ops(OrtCustomOpDomain *domain, const OrtApi *api);
/* async_ops.c: write-behind spills and prefetched restores (SpillAsync, Flush, Prefetch, Await*) */
OrtStatus *poet_register_async_ops(OrtCustomOpDomain *domain, const OrtApi *api);

static PoetOp g_ops[] = {
    POET_OP_INIT(POET_KIND_SPILL, 0, "Spill"),
    POET_OP_INIT(POET_KIND_RESTORE, POET_DT_FLOAT, "Restore"),
    POET_OP_INIT(POET_KIND_RESTORE, POET_DT_DOUBLE, "Restore_double"),
    POET_OP_INIT(POET_KIND_RESTORE, POET_DT_FLOAT16, "Restore_float16"),
    POET_OP_INIT(POET_KIND_RESTORE, POET_DT_INT64, "Restore_int64"),
    POET_OP_INIT(POET_KIND_RESTORE, POET_DT_INT32, "Restore_int32"),
    POET_OP_INIT(POET_KIND_RESTORE, POET_DT_INT8, "Restore_int8"),
    POET_OP_INIT(POET_KIND_RESTORE, POET_DT_UINT8, "Restore_uint8"),
    POET_OP_INIT(POET_KIND_RESTORE, POET_DT_BOOL, "Restore_bool"),
};

__attribute__((visibility("default"))) OrtStatus *ORT_API_CALL
RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *api_base) {
  OrtCustomOpDomain *domain = NULL;
  OrtStatus *st;
  size_t i;
  const OrtApi *api = api_base->GetApi(POET_ORT_API_VERSION);
  if (!api) {
    /* Older runtime: report through the oldest API table, which has CreateStatus. */
    const OrtApi *old = api_base->GetApi(1);
    char msg[256];
    snprintf(msg, sizeof msg, "poetc spill ops need ONNX Runtime C API version %d (ORT >= 1.19); "
             "this runtime is %s", POET_ORT_API_VERSION, api_base->GetVersionString());
    return old ? old->CreateStatus(ORT_FAIL, msg) : NULL;
  }
  g_ort = api;
  st = g_ort->CreateCustomOpDomain(POET_DOMAIN, &domain);
  if (st) return st;
  for (i = 0; i < sizeof g_ops / sizeof g_ops[0]; i++) {
    st = g_ort->CustomOpDomain_Add(domain, &g_ops[i].base);
    if (st) return st;
  }
  st = poet_register_update_ops(domain, g_ort);
  if (st) return st;
  st = poet_register_state_ops(domain, g_ort);
  if (st) return st;
  st = poet_register_async_ops(domain, g_ort);
  if (st) return st;
  /* The domain must outlive every session created from these options; it is
   * deliberately never released (a few hundred bytes per registration). */
  return g_ort->AddCustomOpDomain(options, domain);
}
