/* op_util.c -- see op_util.h. */
#include "op_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void poet_default_spill_dir(char *out, size_t n) {
  const char *env = getenv("POETC_SPILL_DIR");
  const char *tmp;
  if (env && *env) {
    snprintf(out, n, "%s", env);
    return;
  }
  tmp = getenv("TMPDIR");
  if (!tmp || !*tmp) tmp = "/tmp";
  snprintf(out, n, "%s/poetc-spill-%u", tmp, (unsigned)geteuid());
}

int poet_drop_cache_requested(void) {
  const char *drop = getenv("POETC_SPILL_DROP_CACHE");
  return drop && drop[0] && strcmp(drop, "0") != 0;
}

void poet_string_attr(const OrtApi *api, const OrtKernelInfo *info, const char *name, char *out, size_t n) {
  size_t sz = 0;
  OrtStatus *st = api->KernelInfoGetAttribute_string(info, name, NULL, &sz); /* size, then value */
  out[0] = '\0';
  if (st) {
    api->ReleaseStatus(st); /* absent */
    return;
  }
  if (sz > 0) {
    char *buf = (char *)malloc(sz);
    if (!buf) return;
    st = api->KernelInfoGetAttribute_string(info, name, buf, &sz);
    if (st)
      api->ReleaseStatus(st);
    else
      snprintf(out, n, "%s", buf);
    free(buf);
  }
}

int64_t poet_int_attr(const OrtApi *api, const OrtKernelInfo *info, const char *name, int64_t fallback) {
  int64_t v = fallback;
  OrtStatus *st = api->KernelInfoGetAttribute_int64(info, name, &v);
  if (st) {
    api->ReleaseStatus(st);
    return fallback;
  }
  return v;
}

int poet_declared_output_shape(const OrtApi *api, const OrtKernelInfo *info, size_t index, uint32_t *rank,
                               int64_t dims[POET_SPILL_MAX_RANK]) {
  OrtTypeInfo *ti = NULL;
  const OrtTensorTypeAndShapeInfo *tsi = NULL;
  size_t n = 0, d;
  int known = 0;
  OrtStatus *st = api->KernelInfo_GetOutputTypeInfo(info, index, &ti);
  if (!st) st = api->CastTypeInfoToTensorInfo(ti, &tsi);
  if (!st && tsi) st = api->GetDimensionsCount(tsi, &n);
  if (!st && tsi && n > 0 && n <= POET_SPILL_MAX_RANK) {
    st = api->GetDimensions(tsi, dims, n);
    if (!st) {
      known = 1;
      *rank = (uint32_t)n;
      for (d = 0; d < n; d++)
        if (dims[d] < 0) known = 0; /* symbolic: not declared statically */
    }
  }
  if (st) api->ReleaseStatus(st); /* no type info: the shape is not declared */
  if (ti) api->ReleaseTypeInfo(ti);
  return known;
}

OrtStatus *poet_value_meta(const OrtApi *api, const char *label, const OrtValue *v, int32_t *dtype,
                           uint32_t *rank, int64_t dims[POET_SPILL_MAX_RANK]) {
  char msg[POET_ERR_MSG_BYTES];
  OrtTensorTypeAndShapeInfo *ti = NULL;
  ONNXTensorElementDataType et;
  size_t n = 0;
  OrtStatus *st = api->GetTensorTypeAndShape(v, &ti);
  if (!st) st = api->GetTensorElementType(ti, &et);
  if (!st) st = api->GetDimensionsCount(ti, &n);
  if (!st && n > POET_SPILL_MAX_RANK) {
    api->ReleaseTensorTypeAndShapeInfo(ti);
    snprintf(msg, sizeof msg, "%s: tensor rank %zu exceeds the supported maximum %d", label, n,
             POET_SPILL_MAX_RANK);
    return api->CreateStatus(ORT_INVALID_ARGUMENT, msg);
  }
  if (!st && n > 0) st = api->GetDimensions(ti, dims, n);
  if (ti) api->ReleaseTensorTypeAndShapeInfo(ti);
  if (st) {
    snprintf(msg, sizeof msg, "%s: reading a tensor's type and shape failed: %s", label, api->GetErrorMessage(st));
    api->ReleaseStatus(st);
    return api->CreateStatus(ORT_RUNTIME_EXCEPTION, msg);
  }
  *dtype = (int32_t)et;
  *rank = (uint32_t)n;
  return NULL;
}
