/*
 * update_ops.c -- poetc's in-place optimizer update ops for ONNX Runtime (domain "poet").
 *
 * Registered into the "poet" domain by spill_ops.c's RegisterCustomOps (one library, one
 * registration).  They let a training graph apply each parameter's update inside the backward
 * pass, in place in the checkpoint state's own buffers, with no copies:
 *
 *   StepCount(S) -> N
 *     S: float [1], the number of optimizer steps taken (checkpoint state).  Adds 1 to S in place
 *     and returns the new count as int64 [1] (what ONNX Runtime's Optimizer feeds AdamWOptimizer:
 *     1 on the first step).
 *
 *   AdamWUpdate(W, G, M1, M2, LR, N, D...) -> F
 *     W, G, M1, M2: float tensors of one shape (parameter, gradient, first and second moments);
 *     W, M1, M2 are updated in place.  LR: float [1] learning rate; N: int64 [1] step count (from
 *     StepCount).  D...: one or more tensors of any type, read by nobody: data dependencies that
 *     make the update run after every reader of the old W.  F: bool [1], true.
 *     Attributes as onnxruntime.training writes them for AdamWOptimizer: alpha, beta, epsilon,
 *     weight_decay (float), correct_bias, adam_mode (int; mode 1 only, the mode generate_artifacts
 *     writes).  The arithmetic is that of ORT 1.19's CPU AdamWOptimizer (com.microsoft), operation
 *     for operation in float, so the results are bitwise identical; the library is compiled with
 *     -ffp-contract=off so no compiler fuses a multiply and an add.
 *     Sliced update (attributes `begin`, `end`, int64 element offsets; default 0 and -1 = the whole
 *     tensor): only elements [begin, end) of W are updated, reading G at the same elements; M1 and
 *     M2 then hold end - begin elements (element j of W pairs with element j - begin of M1, M2).
 *     The update is elementwise, and each element's arithmetic (Eigen's packet or scalar square
 *     root included) is chosen from its position in the WHOLE W, so updating W in k disjoint
 *     ranges gives bitwise the whole update.
 *
 *   SGDUpdate(W, G, LR, D...) -> F
 *     W -= LR * G in place, as ORT's SGDOptimizerV2 computes it (W + (-LR) * G).
 *
 * All three run single-threaded and allocate only their one-element output.
 */
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

#if defined(__x86_64__) || defined(__i386__)
#include <float.h>
#include <xmmintrin.h>
#define POET_EIGEN_SSE_SQRT 1
#endif

#define POET_ORT_API_VERSION 19
#define POET_CHUNK 1024 /* elements per pass: keeps the denominators on the stack (4 KiB) */

static const OrtApi *u_ort = NULL;

enum { UPD_STEP = 0, UPD_ADAMW = 1, UPD_SGD = 2 };

typedef struct {
  OrtCustomOp base; /* must be first */
  int kind;
  const char *name;
  size_t n_fixed; /* inputs before the variadic dependencies */
} UpdOp;

typedef struct {
  const UpdOp *op;
  float alpha, beta, epsilon, weight_decay;
  int64_t correct_bias, adam_mode;
  int64_t begin, end; /* AdamWUpdate: the element range of W it updates (end -1: to the end) */
} UpdKernel;

static OrtStatus *upd_status(const char *name, const char *fmt, const char *detail) {
  char msg[600];
  snprintf(msg, sizeof msg, "poetc %s: ", name);
  snprintf(msg + strlen(msg), sizeof msg - strlen(msg), fmt, detail ? detail : "");
  return u_ort->CreateStatus(ORT_RUNTIME_EXCEPTION, msg);
}

static OrtStatus *upd_wrap(const char *name, OrtStatus *st, const char *what) {
  char msg[800];
  if (!st) return NULL;
  snprintf(msg, sizeof msg, "poetc %s: %s failed: %s", name, what, u_ort->GetErrorMessage(st));
  u_ort->ReleaseStatus(st);
  return u_ort->CreateStatus(ORT_RUNTIME_EXCEPTION, msg);
}

/* ---- OrtCustomOp callbacks --------------------------------------------- */

static const char *ORT_API_CALL upd_name(const OrtCustomOp *op) { return ((const UpdOp *)op)->name; }

static const char *ORT_API_CALL upd_ep(const OrtCustomOp *op) {
  (void)op;
  return NULL;
}

static size_t ORT_API_CALL upd_input_count(const OrtCustomOp *op) {
  const UpdOp *p = (const UpdOp *)op;
  return p->kind == UPD_STEP ? 1 : p->n_fixed + 1;
}

static ONNXTensorElementDataType ORT_API_CALL upd_input_type(const OrtCustomOp *op, size_t i) {
  const UpdOp *p = (const UpdOp *)op;
  if (p->kind == UPD_STEP) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (i >= p->n_fixed) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; /* dependencies */
  if (p->kind == UPD_ADAMW && i == 5) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

static OrtCustomOpInputOutputCharacteristic ORT_API_CALL upd_input_char(const OrtCustomOp *op,
                                                                        size_t i) {
  const UpdOp *p = (const UpdOp *)op;
  return (p->kind != UPD_STEP && i >= p->n_fixed) ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
}

static size_t ORT_API_CALL upd_one(const OrtCustomOp *op) {
  (void)op;
  return 1;
}

static ONNXTensorElementDataType ORT_API_CALL upd_output_type(const OrtCustomOp *op, size_t i) {
  (void)i;
  return ((const UpdOp *)op)->kind == UPD_STEP ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
                                               : ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
}

static OrtCustomOpInputOutputCharacteristic ORT_API_CALL upd_output_char(const OrtCustomOp *op,
                                                                         size_t i) {
  (void)op;
  (void)i;
  return INPUT_OUTPUT_REQUIRED;
}

static OrtMemType ORT_API_CALL upd_mem(const OrtCustomOp *op, size_t i) {
  (void)op;
  (void)i;
  return OrtMemTypeDefault;
}

static int ORT_API_CALL upd_arity_one(const OrtCustomOp *op) {
  (void)op;
  return 1;
}

static int ORT_API_CALL upd_zero(const OrtCustomOp *op) {
  (void)op;
  return 0;
}

static int ORT_API_CALL upd_start(const OrtCustomOp *op) {
  (void)op;
  return 1;
}

static int ORT_API_CALL upd_end(const OrtCustomOp *op) {
  (void)op;
  return INT_MAX;
}

/* F and N are one-element tensors: tell ORT's shape inference. */
static OrtStatusPtr ORT_API_CALL upd_infer_shape(const OrtCustomOp *op, OrtShapeInferContext *ctx) {
  OrtTensorTypeAndShapeInfo *info = NULL;
  OrtStatus *st;
  int64_t one = 1;
  st = u_ort->CreateTensorTypeAndShapeInfo(&info);
  if (st) return st;
  st = u_ort->SetTensorElementType(info, upd_output_type(op, 0));
  if (!st) st = u_ort->SetDimensions(info, &one, 1);
  if (!st) st = u_ort->ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
  u_ort->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

static void attr_float(const OrtKernelInfo *info, const char *name, float *out) {
  OrtStatus *st = u_ort->KernelInfoGetAttribute_float(info, name, out);
  if (st) u_ort->ReleaseStatus(st); /* absent: keep the default */
}

static void attr_int(const OrtKernelInfo *info, const char *name, int64_t *out) {
  OrtStatus *st = u_ort->KernelInfoGetAttribute_int64(info, name, out);
  if (st) u_ort->ReleaseStatus(st);
}

static OrtStatusPtr ORT_API_CALL upd_create(const OrtCustomOp *op, const OrtApi *api,
                                            const OrtKernelInfo *info, void **kernel) {
  const UpdOp *p = (const UpdOp *)op;
  UpdKernel *k;
  (void)api;
  *kernel = NULL;
  k = (UpdKernel *)calloc(1, sizeof *k);
  if (!k) return upd_status(p->name, "out of memory creating kernel%s", NULL);
  k->op = p;
  /* defaults of ORT's AdamWOptimizer schema */
  k->alpha = 0.9f;
  k->beta = 0.999f;
  k->epsilon = 1e-8f;
  k->weight_decay = 0.f;
  k->correct_bias = 1;
  k->adam_mode = 0;
  k->begin = 0;
  k->end = -1;
  if (p->kind == UPD_ADAMW) {
    attr_int(info, "begin", &k->begin);
    attr_int(info, "end", &k->end);
    if (k->begin < 0 || (k->end != -1 && k->end <= k->begin)) {
      free(k);
      return upd_status(p->name, "begin must be >= 0 and end -1 or > begin%s", NULL);
    }
    attr_float(info, "alpha", &k->alpha);
    attr_float(info, "beta", &k->beta);
    attr_float(info, "epsilon", &k->epsilon);
    attr_float(info, "weight_decay", &k->weight_decay);
    attr_int(info, "correct_bias", &k->correct_bias);
    attr_int(info, "adam_mode", &k->adam_mode);
    if (k->adam_mode != 1) {
      free(k);
      return upd_status(p->name, "adam_mode must be 1 (the mode onnxruntime.training writes)%s", NULL);
    }
  }
  *kernel = k;
  return NULL;
}

static void ORT_API_CALL upd_destroy(void *kernel) { free(kernel); }

/* A float input's data and element count; `mutable_ok` is documentation only: in-place writes into
 * inputs are this op's contract (the buffers are the checkpoint state's own). */
static OrtStatus *float_input(const UpdKernel *k, OrtKernelContext *ctx, size_t i, float **data,
                              size_t *count) {
  const OrtValue *v = NULL;
  OrtTensorTypeAndShapeInfo *ti = NULL;
  OrtStatus *st = u_ort->KernelContext_GetInput(ctx, i, &v);
  if (st) return upd_wrap(k->op->name, st, "KernelContext_GetInput");
  if (!v) return upd_status(k->op->name, "missing input%s", NULL);
  st = u_ort->GetTensorTypeAndShape(v, &ti);
  if (!st) st = u_ort->GetTensorShapeElementCount(ti, count);
  if (ti) u_ort->ReleaseTensorTypeAndShapeInfo(ti);
  if (!st) st = u_ort->GetTensorMutableData((OrtValue *)v, (void **)data);
  return upd_wrap(k->op->name, st, "reading an input");
}

static OrtStatus *set_flag(const UpdKernel *k, OrtKernelContext *ctx) {
  OrtValue *out = NULL;
  bool *flag = NULL;
  int64_t one = 1;
  OrtStatus *st = u_ort->KernelContext_GetOutput(ctx, 0, &one, 1, &out);
  if (!st) st = u_ort->GetTensorMutableData(out, (void **)&flag);
  if (st) return upd_wrap(k->op->name, st, "allocating output F");
  flag[0] = 1;
  return NULL;
}

static OrtStatus *step_compute(const UpdKernel *k, OrtKernelContext *ctx) {
  float *s = NULL;
  size_t n = 0;
  OrtValue *out = NULL;
  int64_t *count = NULL, one = 1;
  OrtStatus *st = float_input(k, ctx, 0, &s, &n);
  if (st) return st;
  if (n != 1) return upd_status(k->op->name, "the step counter must hold one value%s", NULL);
  s[0] = s[0] + 1.0f;
  st = u_ort->KernelContext_GetOutput(ctx, 0, &one, 1, &out);
  if (!st) st = u_ort->GetTensorMutableData(out, (void **)&count);
  if (st) return upd_wrap(k->op->name, st, "allocating output N");
  count[0] = (int64_t)s[0];
  return NULL;
}

/* sqrt(m2) + epsilon as ORT's Eigen expression computes it.  On x86 ORT's Eigen evaluates
 * packets of 4 floats with EIGEN_FAST_MATH's square root (an _mm_rsqrt_ps estimate, one Newton
 * step, denormals flushed to 0: not IEEE sqrt, up to 2 ulp apart), from the first element whose
 * destination address is 16-byte aligned (`head`) to the last whole packet (`vec_end`), and the
 * other elements with scalar sqrtf; reproduce exactly that.  Elsewhere (aarch64: Eigen's NEON
 * packet sqrt is the IEEE vsqrtq_f32) sqrtf everywhere.  `head` of the whole W (the destination). */
static size_t eigen_head(const float *dst, size_t n) {
  size_t head = 0;
#ifdef POET_EIGEN_SSE_SQRT
  uintptr_t addr = (uintptr_t)dst;
  if (addr % sizeof(float) == 0) head = ((16 - addr % 16) % 16) / sizeof(float);
  if (head > n) head = n;
#else
  (void)dst;
  head = n;
#endif
  return head;
}

/* sqrt(m2[j]) + epsilon into out[j - lo] for the W elements j in [lo, hi), m2 indexed from `base`
 * (m2[j - base]); whether element j takes Eigen's packet path depends only on j, `head` and `vec_end`
 * (its position in the whole W): the packet arithmetic is per lane, so a partial packet is computed
 * through a padded copy. */
static void adamw_denominators(const float *m2, size_t base, size_t lo, size_t hi, size_t head,
                               size_t vec_end, float epsilon, float *out) {
  size_t j = lo;
  while (j < hi) {
#ifdef POET_EIGEN_SSE_SQRT
    if (j >= head && j < vec_end) {
      size_t take = hi - j, i;
      float in4[4] = {1.f, 1.f, 1.f, 1.f}, out4[4];
      __m128 x, minus_half_x, denormal, r;
      if (take > 4) take = 4;
      if (j + take > vec_end) take = vec_end - j;
      for (i = 0; i < take; i++) in4[i] = m2[j + i - base];
      x = _mm_loadu_ps(in4);
      minus_half_x = _mm_mul_ps(x, _mm_set1_ps(-0.5f));
      denormal = _mm_andnot_ps(_mm_cmplt_ps(x, _mm_setzero_ps()), _mm_cmplt_ps(x, _mm_set1_ps(FLT_MIN)));
      r = _mm_rsqrt_ps(x);
      r = _mm_mul_ps(r, _mm_add_ps(_mm_mul_ps(minus_half_x, _mm_mul_ps(r, r)), _mm_set1_ps(1.5f)));
      r = _mm_andnot_ps(denormal, _mm_mul_ps(x, r));
      _mm_storeu_ps(out4, _mm_add_ps(r, _mm_set1_ps(epsilon)));
      for (i = 0; i < take; i++) out[j + i - lo] = out4[i];
      j += take;
      continue;
    }
#else
    (void)head;
    (void)vec_end;
#endif
    out[j - lo] = sqrtf(m2[j - base]) + epsilon;
    j++;
  }
}

static OrtStatus *adamw_compute(const UpdKernel *k, OrtKernelContext *ctx) {
  float *w, *g, *m1, *m2, *lr_p;
  size_t n, ng, n1, n2, nl;
  const OrtValue *sv = NULL;
  int64_t *step_p = NULL;
  float lr, lr_corrected, alpha_correction = 1.f, beta_correction = 1.f;
  float c1, c2, decay;
  int64_t step;
  size_t head, vec_end, lo, hi, begin, end;
  OrtStatus *st;
  if ((st = float_input(k, ctx, 0, &w, &n)) || (st = float_input(k, ctx, 1, &g, &ng)) ||
      (st = float_input(k, ctx, 2, &m1, &n1)) || (st = float_input(k, ctx, 3, &m2, &n2)) ||
      (st = float_input(k, ctx, 4, &lr_p, &nl)))
    return st;
  begin = (size_t)k->begin;
  end = k->end < 0 ? n : (size_t)k->end;
  if (ng != n) return upd_status(k->op->name, "parameter and gradient differ in size%s", NULL);
  if (begin >= end || end > n)
    return upd_status(k->op->name, "the range [begin, end) lies outside the parameter%s", NULL);
  if (n1 != end - begin || n2 != end - begin)
    return upd_status(k->op->name, "the moments' size differs from the updated range end - begin%s", NULL);
  st = u_ort->KernelContext_GetInput(ctx, 5, &sv);
  if (!st) st = u_ort->GetTensorMutableData((OrtValue *)sv, (void **)&step_p);
  if (st) return upd_wrap(k->op->name, st, "reading the step count");
  lr = lr_p[0];
  step = step_p[0];
  lr_corrected = lr;
  if (k->correct_bias == 1) {
    /* ORT: std::pow(float, int64_t) is pow in double, cast back to float */
    alpha_correction = 1.f - (float)pow((double)k->alpha, (double)step);
    beta_correction = 1.f - (float)pow((double)k->beta, (double)step);
    lr_corrected *= sqrtf(beta_correction) / alpha_correction;
  }
  c1 = 1.f - k->alpha;
  c2 = 1.f - k->beta;
  decay = lr * k->weight_decay;
  head = eigen_head(w, n); /* of the whole W: each element's path is that of the whole update */
  vec_end = head + (n - head) / 4 * 4;
  /* moments are indexed from `begin`: point them at a virtual element 0 of W */
  for (lo = begin; lo < end; lo = hi) {
    size_t j;
    float denom[POET_CHUNK];
    hi = lo + POET_CHUNK;
    if (hi > end) hi = end;
    for (j = lo; j < hi; j++) {
      float gj = g[j];
      m1[j - begin] = k->alpha * m1[j - begin] + c1 * gj;
      m2[j - begin] = k->beta * m2[j - begin] + (c2 * gj) * gj;
    }
    adamw_denominators(m2, begin, lo, hi, head, vec_end, k->epsilon, denom);
    for (j = lo; j < hi; j++) {
      float wj = w[j] - (lr_corrected * m1[j - begin]) / denom[j - lo];
      w[j] = wj - decay * wj;
    }
  }
  return set_flag(k, ctx);
}

static OrtStatus *sgd_compute(const UpdKernel *k, OrtKernelContext *ctx) {
  float *w, *g, *lr_p;
  size_t n, ng, nl, i;
  float neg_lr;
  OrtStatus *st;
  if ((st = float_input(k, ctx, 0, &w, &n)) || (st = float_input(k, ctx, 1, &g, &ng)) ||
      (st = float_input(k, ctx, 2, &lr_p, &nl)))
    return st;
  if (ng != n) return upd_status(k->op->name, "parameter and gradient differ in size%s", NULL);
  neg_lr = -lr_p[0];
  for (i = 0; i < n; i++) w[i] = w[i] + neg_lr * g[i];
  return set_flag(k, ctx);
}

static OrtStatusPtr ORT_API_CALL upd_compute(void *kernel, OrtKernelContext *ctx) {
  const UpdKernel *k = (const UpdKernel *)kernel;
  switch (k->op->kind) {
    case UPD_STEP: return step_compute(k, ctx);
    case UPD_ADAMW: return adamw_compute(k, ctx);
    default: return sgd_compute(k, ctx);
  }
}

static void *ORT_API_CALL upd_create_v1(const OrtCustomOp *op, const OrtApi *api,
                                        const OrtKernelInfo *info) {
  void *k = NULL;
  OrtStatus *st = upd_create(op, api, info, &k);
  if (st) u_ort->ReleaseStatus(st);
  return k;
}

static void ORT_API_CALL upd_compute_v1(void *kernel, OrtKernelContext *ctx) {
  OrtStatus *st = upd_compute(kernel, ctx);
  if (st) u_ort->ReleaseStatus(st);
}

#define UPD_OP_INIT(KIND, NAME, NFIXED)                    \
  {                                                        \
    .base = {                                              \
        .version = POET_ORT_API_VERSION,                   \
        .CreateKernel = upd_create_v1,                     \
        .GetName = upd_name,                               \
        .GetExecutionProviderType = upd_ep,                \
        .GetInputType = upd_input_type,                    \
        .GetInputTypeCount = upd_input_count,              \
        .GetOutputType = upd_output_type,                  \
        .GetOutputTypeCount = upd_one,                     \
        .KernelCompute = upd_compute_v1,                   \
        .KernelDestroy = upd_destroy,                      \
        .GetInputCharacteristic = upd_input_char,          \
        .GetOutputCharacteristic = upd_output_char,        \
        .GetInputMemoryType = upd_mem,                     \
        .GetVariadicInputMinArity = upd_arity_one,         \
        .GetVariadicInputHomogeneity = upd_zero,           \
        .GetVariadicOutputMinArity = upd_arity_one,        \
        .GetVariadicOutputHomogeneity = upd_zero,          \
        .CreateKernelV2 = upd_create,                      \
        .KernelComputeV2 = upd_compute,                    \
        .InferOutputShapeFn = upd_infer_shape,             \
        .GetStartVersion = upd_start,                      \
        .GetEndVersion = upd_end,                          \
    },                                                     \
    .kind = (KIND), .name = (NAME), .n_fixed = (NFIXED)    \
  }

static UpdOp u_ops[] = {
    UPD_OP_INIT(UPD_STEP, "StepCount", 1),
    UPD_OP_INIT(UPD_ADAMW, "AdamWUpdate", 6),
    UPD_OP_INIT(UPD_SGD, "SGDUpdate", 3),
};

/* Called by spill_ops.c's RegisterCustomOps with the "poet" domain it creates. */
OrtStatus *poet_register_update_ops(OrtCustomOpDomain *domain, const OrtApi *api) {
  size_t i;
  OrtStatus *st;
  u_ort = api;
  for (i = 0; i < sizeof u_ops / sizeof u_ops[0]; i++) {
    st = u_ort->CustomOpDomain_Add(domain, &u_ops[i].base);
    if (st) return st;
  }
  return NULL;
}
