/*
 * async_ops.c -- poetc's asynchronous paging ops: write-behind spills and prefetched restores.
 *
 * The synchronous Spill/Restore (spill_ops.c) block the step for the whole transfer.  These ops
 * hand the transfer to one background I/O thread per process, so a spill is written while the
 * following ops compute, and a restore is read while the ops before its first reader compute.
 * Correctness never depends on timing or on the executor: every op that needs a transfer to be
 * complete takes that transfer's handle or ticket as an input and waits for it.
 *
 * Op contract (domain "poet", opset version 1):
 *
 *   SpillAsync(X) -> H
 *     H: int64[2] = [token, pid], the same handle and file as Spill's (format in io_core.h).
 *     Copies X into a staging buffer (heap memory, so the heap counter sees it), queues the
 *     write and returns.  The staging buffer is freed as soon as the write is complete.
 *     attribute key (string, optional): label used only in error messages.
 *
 *   Flush(H) -> H2
 *     Waits until the write of H (if it was queued by SpillAsync) is complete and returns a copy
 *     of H.  A failed write fails Flush with the write's message.  The rewrite places a Flush
 *     where the staging buffer must be gone at the latest; the memory model counts it until then.
 *
 *   Prefetch(H) -> P
 *     P: int64[2] = [ticket, pid].  Queues the read of H's file into a staging buffer and
 *     returns.  The one I/O thread runs jobs in submission order, so a read queued after the
 *     write of the same handle always sees the complete file; a failed write fails the read.
 *
 *   Await(P) -> Y (float), Await_double, Await_float16, Await_int64, Await_int32, Await_int8,
 *   Await_uint8, Await_bool
 *     Waits for the read of P, checks the file's element type and shape against Y's declared
 *     static shape, allocates Y, copies the staging buffer into it and frees the buffer.  A
 *     missing file, bad header, short read or checksum mismatch fails Await with a message naming
 *     the file: data that did not authenticate is never handed to a reader.
 *     attribute keep_file (int, optional, default 0): as Restore's.
 *
 * Restore(H) calls poet_async_wait_write(H's token) first, so a synchronous Restore of an
 * asynchronously spilled handle is also ordered by the handle alone.
 *
 * Memory, for the planner: SpillAsync holds |X| extra from SpillAsync until its write completes
 * (at the latest at the Flush or the first Restore/Prefetch of H); Prefetch holds |Y| from
 * Prefetch to Await, and Await holds both for the duration of the copy.
 *
 * Queue: at most POET_ASYNC_MAX_PENDING queued or running jobs; a submitting op waits for a free
 * slot (back-pressure, never an error).
 *
 * Environment: POETC_SPILL_DIR and POETC_SPILL_DROP_CACHE as for Spill/Restore.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io_core.h"
#include "onnxruntime_c_api.h"
#include "op_util.h"

#define POET_ASYNC_MAX_PENDING 64

/* ------------------------------------------------------------------------ */
/* the job table and the I/O thread (no ONNX Runtime here)                  */

typedef enum { JOB_WRITE = 0, JOB_READ = 1 } job_kind;

typedef struct poet_job {
  struct poet_job *next;  /* the table: every job not yet claimed */
  struct poet_job *qnext; /* the queue: jobs not yet started */
  job_kind kind;
  uint64_t id;            /* write: the spill token; read: the prefetch ticket */
  uint64_t token;         /* the spill file's token */
  int drop_cache;
  int done;
  int failed;
  char path[POET_PATH_BYTES];
  char dir[POET_PATH_BYTES];
  poet_spill_header hdr;
  void *buf;
  poet_err err;
} poet_job;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_work = PTHREAD_COND_INITIALIZER;
static pthread_cond_t g_done = PTHREAD_COND_INITIALIZER;
static pthread_cond_t g_space = PTHREAD_COND_INITIALIZER;
static poet_job *g_table;
static poet_job *g_qhead, *g_qtail;
static int g_pending; /* queued or running */
static int g_thread_started;

static poet_job *find_job(job_kind kind, uint64_t id) {
  poet_job *j;
  for (j = g_table; j; j = j->next)
    if (j->kind == kind && j->id == id) return j;
  return NULL;
}

static void unlink_job(poet_job *job) {
  poet_job **p;
  for (p = &g_table; *p; p = &(*p)->next)
    if (*p == job) {
      *p = job->next;
      return;
    }
}

static void run_write(poet_job *j) {
  if (poet_spill_write(j->path, &j->hdr, j->buf, j->drop_cache, &j->err) != POET_OK) {
    /* the directory may have been removed since session creation: recreate it once, as Spill does */
    if (!(j->err.kind == POET_E_IO && j->err.sys_errno == ENOENT &&
          poet_ensure_dir(j->dir, &j->err) == POET_OK &&
          poet_spill_write(j->path, &j->hdr, j->buf, j->drop_cache, &j->err) == POET_OK))
      j->failed = 1;
  }
  free(j->buf);
  j->buf = NULL;
}

static void run_read(poet_job *j) {
  poet_spill_reader rd;
  if (poet_spill_open(j->path, &rd, &j->err) != POET_OK) {
    j->failed = 1;
    return;
  }
  if (rd.hdr.token != j->token) {
    j->err.kind = POET_E_MISMATCH;
    j->err.sys_errno = 0;
    snprintf(j->err.msg, sizeof j->err.msg, "spill file '%.900s' holds token %016llx, expected %016llx "
             "(file mix-up)", j->path, (unsigned long long)rd.hdr.token, (unsigned long long)j->token);
    poet_spill_reader_close(&rd, 0);
    j->failed = 1;
    return;
  }
  j->hdr = rd.hdr;
  j->buf = malloc(rd.hdr.payload_bytes ? (size_t)rd.hdr.payload_bytes : 1);
  if (!j->buf) {
    j->err.kind = POET_E_IO;
    j->err.sys_errno = ENOMEM;
    snprintf(j->err.msg, sizeof j->err.msg, "out of memory staging %llu bytes of '%.900s'",
             (unsigned long long)rd.hdr.payload_bytes, j->path);
    poet_spill_reader_close(&rd, 0);
    j->failed = 1;
    return;
  }
  if (poet_spill_read_payload(&rd, j->buf, &j->err) != POET_OK) {
    free(j->buf);
    j->buf = NULL;
    j->failed = 1;
  }
  poet_spill_reader_close(&rd, 0);
}

static void *io_thread(void *arg) {
  (void)arg;
  pthread_mutex_lock(&g_mu);
  for (;;) {
    poet_job *j, *w = NULL;
    while (!g_qhead) pthread_cond_wait(&g_work, &g_mu);
    j = g_qhead;
    g_qhead = j->qnext;
    if (!g_qhead) g_qtail = NULL;
    /* A read after a write of the same token: the write ran before (one thread, FIFO); its outcome
     * stays in the table until claimed, so a failed write fails the read with its own message. */
    if (j->kind == JOB_READ && (w = find_job(JOB_WRITE, j->token)) != NULL && w->failed) {
      j->err = w->err; /* copied under the lock: a Flush may claim and free w meanwhile */
      j->failed = 1;
    }
    pthread_mutex_unlock(&g_mu);
    if (j->kind == JOB_WRITE)
      run_write(j);
    else if (!j->failed)
      run_read(j);
    pthread_mutex_lock(&g_mu);
    j->done = 1;
    g_pending--;
    pthread_cond_broadcast(&g_done);
    pthread_cond_signal(&g_space);
  }
  return NULL;
}

/* Queues `job` (caller holds g_mu); starts the thread on first use.  0 or an errno. */
static int submit_locked(poet_job *job) {
  if (!g_thread_started) {
    pthread_t t;
    pthread_attr_t attr;
    int rc = pthread_attr_init(&attr);
    if (rc) return rc;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    rc = pthread_create(&t, &attr, io_thread, NULL);
    pthread_attr_destroy(&attr);
    if (rc) return rc;
    g_thread_started = 1;
  }
  while (g_pending >= POET_ASYNC_MAX_PENDING) pthread_cond_wait(&g_space, &g_mu);
  job->next = g_table;
  g_table = job;
  job->qnext = NULL;
  if (g_qtail)
    g_qtail->qnext = job;
  else
    g_qhead = job;
  g_qtail = job;
  g_pending++;
  pthread_cond_signal(&g_work);
  return 0;
}

/* Waits for the queued write of `token` (if any), claims it and reports its outcome.  Used by
 * Flush, and by spill_ops.c's Restore before it opens a file.  Thread-safe. */
int poet_async_wait_write(uint64_t token, poet_err *err) {
  poet_job *j;
  int rc = POET_OK;
  pthread_mutex_lock(&g_mu);
  j = find_job(JOB_WRITE, token);
  if (j) {
    while (!j->done) pthread_cond_wait(&g_done, &g_mu);
    unlink_job(j);
  }
  pthread_mutex_unlock(&g_mu);
  if (j) {
    if (j->failed) {
      *err = j->err;
      rc = err->kind ? err->kind : POET_E_IO;
    }
    free(j);
  }
  return rc;
}

/* ------------------------------------------------------------------------ */
/* ONNX Runtime ops                                                         */

static const OrtApi *g_api = NULL;

enum { K_SPILL_ASYNC = 0, K_FLUSH = 1, K_PREFETCH = 2, K_AWAIT = 3 };

typedef struct {
  OrtCustomOp base; /* must be first */
  int kind;
  int32_t dtype; /* Await: produced element type */
  const char *name;
} AsyncOp;

typedef struct {
  const AsyncOp *op;
  char dir[POET_PATH_BYTES];
  char key[256];
  int drop_cache;
  int keep_file;
  int has_shape;
  uint32_t exp_rank;
  int64_t exp_dims[POET_SPILL_MAX_RANK];
} AsyncKernel;

static OrtStatus *fail(const AsyncKernel *k, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static OrtStatus *fail(const AsyncKernel *k, const char *fmt, ...) {
  char msg[POET_ERR_MSG_BYTES + 512];
  int n;
  va_list ap;
  if (k->key[0])
    n = snprintf(msg, sizeof msg, "poetc %s[key=%s]: ", k->op->name, k->key);
  else
    n = snprintf(msg, sizeof msg, "poetc %s: ", k->op->name);
  va_start(ap, fmt);
  vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, ap);
  va_end(ap);
  return g_api->CreateStatus(ORT_RUNTIME_EXCEPTION, msg);
}

static OrtStatus *fail_ort(const AsyncKernel *k, OrtStatus *st, const char *what) {
  OrtStatus *out = fail(k, "%s failed: %s", what, g_api->GetErrorMessage(st));
  g_api->ReleaseStatus(st);
  return out;
}

static const char *ORT_API_CALL a_name(const OrtCustomOp *op) { return ((const AsyncOp *)op)->name; }
static const char *ORT_API_CALL a_ep(const OrtCustomOp *op) {
  (void)op;
  return NULL;
}
static ONNXTensorElementDataType ORT_API_CALL a_input_type(const OrtCustomOp *op, size_t i) {
  (void)i;
  return ((const AsyncOp *)op)->kind == K_SPILL_ASYNC ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED
                                                       : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
}
static ONNXTensorElementDataType ORT_API_CALL a_output_type(const OrtCustomOp *op, size_t i) {
  const AsyncOp *p = (const AsyncOp *)op;
  (void)i;
  return p->kind == K_AWAIT ? (ONNXTensorElementDataType)p->dtype : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
}
static size_t ORT_API_CALL a_one(const OrtCustomOp *op) {
  (void)op;
  return 1;
}
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL a_required(const OrtCustomOp *op, size_t i) {
  (void)op;
  (void)i;
  return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL a_mem(const OrtCustomOp *op, size_t i) {
  (void)op;
  (void)i;
  return OrtMemTypeDefault;
}
static int ORT_API_CALL a_int_one(const OrtCustomOp *op) {
  (void)op;
  return 1;
}
static int ORT_API_CALL a_int_zero(const OrtCustomOp *op) {
  (void)op;
  return 0;
}
static int ORT_API_CALL a_end_version(const OrtCustomOp *op) {
  (void)op;
  return INT_MAX;
}

/* H and P are always int64[2]. */
static OrtStatusPtr ORT_API_CALL a_infer_shape(const OrtCustomOp *op, OrtShapeInferContext *ctx) {
  OrtTensorTypeAndShapeInfo *info = NULL;
  OrtStatus *st;
  int64_t two = 2;
  if (((const AsyncOp *)op)->kind == K_AWAIT) return NULL;
  st = g_api->CreateTensorTypeAndShapeInfo(&info);
  if (st) return st;
  st = g_api->SetTensorElementType(info, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
  if (!st) st = g_api->SetDimensions(info, &two, 1);
  if (!st) st = g_api->ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

static OrtStatusPtr ORT_API_CALL a_create_kernel(const OrtCustomOp *op, const OrtApi *api,
                                                 const OrtKernelInfo *info, void **kernel) {
  const AsyncOp *p = (const AsyncOp *)op;
  AsyncKernel *k;
  (void)api;
  *kernel = NULL;
  k = (AsyncKernel *)calloc(1, sizeof *k);
  if (!k) return g_api->CreateStatus(ORT_FAIL, "poetc async ops: out of memory creating a kernel");
  k->op = p;
  poet_default_spill_dir(k->dir, sizeof k->dir);
  k->drop_cache = poet_drop_cache_requested();
  poet_string_attr(g_api, info, "key", k->key, sizeof k->key);
  if (p->kind == K_AWAIT) {
    k->has_shape = poet_declared_output_shape(g_api, info, 0, &k->exp_rank, k->exp_dims);
    k->keep_file = poet_int_attr(g_api, info, "keep_file", 0) != 0;
  }
  if (p->kind == K_SPILL_ASYNC) {
    poet_err err;
    if (poet_ensure_dir(k->dir, &err) != POET_OK) {
      OrtStatus *out = fail(k, "unusable spill directory (POETC_SPILL_DIR=%s): %s",
                            getenv("POETC_SPILL_DIR") ? getenv("POETC_SPILL_DIR") : "<unset>", err.msg);
      free(k);
      return out;
    }
  }
  *kernel = k;
  return NULL;
}

static void ORT_API_CALL a_destroy_kernel(void *kernel) { free(kernel); }

/* Element type and shape of a value. */
static OrtStatus *meta(const AsyncKernel *k, const OrtValue *v, int32_t *dtype, uint32_t *rank,
                       int64_t *dims) {
  char label[400];
  if (k->key[0])
    snprintf(label, sizeof label, "poetc %s[key=%s]", k->op->name, k->key);
  else
    snprintf(label, sizeof label, "poetc %s", k->op->name);
  return poet_value_meta(g_api, label, v, dtype, rank, dims);
}

/* The int64[2] input 0 (a handle or a ticket). */
static OrtStatus *pair_input(const AsyncKernel *k, OrtKernelContext *ctx, const char *what,
                             int64_t out[2]) {
  const OrtValue *v = NULL;
  int32_t dt = 0;
  uint32_t rank = 0;
  int64_t dims[POET_SPILL_MAX_RANK];
  int64_t *data = NULL;
  OrtStatus *st = g_api->KernelContext_GetInput(ctx, 0, &v);
  if (st) return fail_ort(k, st, "KernelContext_GetInput");
  if (!v) return fail(k, "missing input %s", what);
  st = meta(k, v, &dt, &rank, dims);
  if (st) return st;
  if (dt != POET_DT_INT64 || rank != 1 || dims[0] != 2)
    return fail(k, "input %s must be an int64 tensor of shape [2]", what);
  st = g_api->GetTensorMutableData((OrtValue *)v, (void **)&data);
  if (st) return fail_ort(k, st, "GetTensorMutableData");
  out[0] = data[0];
  out[1] = data[1];
  return NULL;
}

static OrtStatus *pair_output(const AsyncKernel *k, OrtKernelContext *ctx, int64_t a, int64_t b) {
  OrtValue *v = NULL;
  int64_t *data = NULL;
  int64_t two = 2;
  OrtStatus *st = g_api->KernelContext_GetOutput(ctx, 0, &two, 1, &v);
  if (!st) st = g_api->GetTensorMutableData(v, (void **)&data);
  if (st) return fail_ort(k, st, "allocating the output");
  data[0] = a;
  data[1] = b;
  return NULL;
}

/* Queues `j` on the I/O thread; on failure frees it (and its staging buffer) and reports why. */
static OrtStatus *queue_job(const AsyncKernel *k, poet_job *j) {
  int rc;
  pthread_mutex_lock(&g_mu);
  rc = submit_locked(j);
  pthread_mutex_unlock(&g_mu);
  if (rc) {
    free(j->buf);
    free(j);
    return fail(k, "cannot start the I/O thread: %s", strerror(rc));
  }
  return NULL;
}

static OrtStatus *spill_async(AsyncKernel *k, OrtKernelContext *ctx) {
  const OrtValue *x = NULL;
  void *xdata = NULL;
  poet_job *j;
  poet_err err;
  uint64_t bytes = 0;
  int64_t pid = (int64_t)getpid();
  OrtStatus *st = g_api->KernelContext_GetInput(ctx, 0, &x);
  if (st) return fail_ort(k, st, "KernelContext_GetInput");
  if (!x) return fail(k, "missing input X");
  j = (poet_job *)calloc(1, sizeof *j);
  if (!j) return fail(k, "out of memory");
  st = meta(k, x, &j->hdr.dtype, &j->hdr.rank, j->hdr.dims);
  if (!st && poet_payload_bytes(j->hdr.dtype, j->hdr.rank, j->hdr.dims, &bytes, &err) != POET_OK)
    st = fail(k, "%s", err.msg);
  if (!st) {
    st = g_api->GetTensorMutableData((OrtValue *)x, &xdata);
    if (st) st = fail_ort(k, st, "GetTensorMutableData(X)");
  }
  if (st) {
    free(j);
    return st;
  }
  j->kind = JOB_WRITE;
  j->token = j->id = j->hdr.token = poet_new_token();
  j->drop_cache = k->drop_cache;
  snprintf(j->dir, sizeof j->dir, "%s", k->dir);
  if (poet_spill_path(j->path, sizeof j->path, k->dir, pid, j->token, &err) != POET_OK) {
    free(j);
    return fail(k, "%s", err.msg);
  }
  j->buf = malloc(bytes ? (size_t)bytes : 1);
  if (!j->buf) {
    free(j);
    return fail(k, "out of memory staging %llu bytes for the write", (unsigned long long)bytes);
  }
  if (bytes) memcpy(j->buf, xdata, (size_t)bytes);
  st = pair_output(k, ctx, (int64_t)j->token, pid);
  if (st) {
    free(j->buf);
    free(j);
    return st;
  }
  return queue_job(k, j);
}

static OrtStatus *flush(AsyncKernel *k, OrtKernelContext *ctx) {
  int64_t h[2];
  poet_err err;
  OrtStatus *st = pair_input(k, ctx, "H", h);
  if (st) return st;
  if (poet_async_wait_write((uint64_t)h[0], &err) != POET_OK) return fail(k, "the write failed: %s", err.msg);
  return pair_output(k, ctx, h[0], h[1]);
}

static OrtStatus *prefetch(AsyncKernel *k, OrtKernelContext *ctx) {
  int64_t h[2];
  poet_err err;
  poet_job *j;
  OrtStatus *st = pair_input(k, ctx, "H", h);
  if (st) return st;
  j = (poet_job *)calloc(1, sizeof *j);
  if (!j) return fail(k, "out of memory");
  j->kind = JOB_READ;
  j->token = (uint64_t)h[0];
  j->id = poet_new_token();
  if (poet_spill_path(j->path, sizeof j->path, k->dir, h[1], j->token, &err) != POET_OK) {
    free(j);
    return fail(k, "%s", err.msg);
  }
  st = pair_output(k, ctx, (int64_t)j->id, (int64_t)getpid());
  if (st) {
    free(j);
    return st;
  }
  return queue_job(k, j);
}

static void shape_text(char *out, size_t n, uint32_t rank, const int64_t *dims) {
  size_t used = 0;
  uint32_t d;
  out[0] = '\0';
  for (d = 0; d < rank && used + 24 < n; d++)
    used += (size_t)snprintf(out + used, n - used, d ? ",%lld" : "%lld", (long long)dims[d]);
}

static OrtStatus *await_read(AsyncKernel *k, OrtKernelContext *ctx) {
  int64_t p[2];
  poet_job *j;
  OrtValue *y = NULL;
  void *ydata = NULL;
  OrtStatus *st = pair_input(k, ctx, "P", p);
  if (st) return st;
  pthread_mutex_lock(&g_mu);
  j = find_job(JOB_READ, (uint64_t)p[0]);
  if (j) {
    while (!j->done) pthread_cond_wait(&g_done, &g_mu);
    unlink_job(j);
    /* the write this read followed is claimed too: its outcome reached the read */
    {
      poet_job *w = find_job(JOB_WRITE, j->token);
      if (w && w->done) {
        unlink_job(w);
        free(w);
      }
    }
  }
  pthread_mutex_unlock(&g_mu);
  if (!j) return fail(k, "no prefetch %016llx was issued in this process (a graph without its Prefetch?)",
                      (unsigned long long)p[0]);
  if (j->failed) {
    st = fail(k, "%s; nothing was handed to the reader", j->err.msg);
    goto out;
  }
  if (j->hdr.dtype != k->op->dtype) {
    st = fail(k, "dtype mismatch: spill file '%s' holds %s data but this op produces %s", j->path,
              poet_dtype_name(j->hdr.dtype), poet_dtype_name(k->op->dtype));
    goto out;
  }
  if (k->has_shape) {
    uint32_t d;
    int same = j->hdr.rank == k->exp_rank;
    for (d = 0; same && d < k->exp_rank; d++) same = j->hdr.dims[d] == k->exp_dims[d];
    if (!same) {
      char got[256], want[256];
      shape_text(got, sizeof got, j->hdr.rank, j->hdr.dims);
      shape_text(want, sizeof want, k->exp_rank, k->exp_dims);
      st = fail(k, "shape mismatch: spill file '%s' holds a [%s] tensor but the graph restores a [%s] one",
                j->path, got, want);
      goto out;
    }
  }
  st = g_api->KernelContext_GetOutput(ctx, 0, j->hdr.dims, j->hdr.rank, &y);
  if (!st && j->hdr.payload_bytes > 0) st = g_api->GetTensorMutableData(y, &ydata);
  if (st) {
    st = fail_ort(k, st, "allocating output Y");
    goto out;
  }
  if (j->hdr.payload_bytes > 0) memcpy(ydata, j->buf, (size_t)j->hdr.payload_bytes);
  if (!k->keep_file) unlink(j->path);
out:
  free(j->buf);
  free(j);
  return st;
}

static OrtStatusPtr ORT_API_CALL a_compute(void *kernel, OrtKernelContext *ctx) {
  AsyncKernel *k = (AsyncKernel *)kernel;
  switch (k->op->kind) {
    case K_SPILL_ASYNC: return spill_async(k, ctx);
    case K_FLUSH: return flush(k, ctx);
    case K_PREFETCH: return prefetch(k, ctx);
    default: return await_read(k, ctx);
  }
}

static void *ORT_API_CALL a_create_kernel_v1(const OrtCustomOp *op, const OrtApi *api,
                                             const OrtKernelInfo *info) {
  void *k = NULL;
  OrtStatus *st = a_create_kernel(op, api, info, &k);
  if (st) g_api->ReleaseStatus(st);
  return k;
}

static void ORT_API_CALL a_compute_v1(void *kernel, OrtKernelContext *ctx) {
  OrtStatus *st = a_compute(kernel, ctx);
  if (st) g_api->ReleaseStatus(st);
}

#define ASYNC_OP(KIND, DTYPE, NAME)                                  \
  {                                                                  \
    .base = {                                                        \
        .version = 19,                                               \
        .CreateKernel = a_create_kernel_v1,                          \
        .GetName = a_name,                                           \
        .GetExecutionProviderType = a_ep,                            \
        .GetInputType = a_input_type,                                \
        .GetInputTypeCount = a_one,                                  \
        .GetOutputType = a_output_type,                              \
        .GetOutputTypeCount = a_one,                                 \
        .KernelCompute = a_compute_v1,                               \
        .KernelDestroy = a_destroy_kernel,                           \
        .GetInputCharacteristic = a_required,                        \
        .GetOutputCharacteristic = a_required,                       \
        .GetInputMemoryType = a_mem,                                 \
        .GetVariadicInputMinArity = a_int_one,                       \
        .GetVariadicInputHomogeneity = a_int_zero,                   \
        .GetVariadicOutputMinArity = a_int_one,                      \
        .GetVariadicOutputHomogeneity = a_int_zero,                  \
        .CreateKernelV2 = a_create_kernel,                           \
        .KernelComputeV2 = a_compute,                                \
        .InferOutputShapeFn = a_infer_shape,                         \
        .GetStartVersion = a_int_one,                                \
        .GetEndVersion = a_end_version,                              \
    },                                                               \
    .kind = (KIND), .dtype = (DTYPE), .name = (NAME)                 \
  }

static AsyncOp g_async_ops[] = {
    ASYNC_OP(K_SPILL_ASYNC, 0, "SpillAsync"),
    ASYNC_OP(K_FLUSH, 0, "Flush"),
    ASYNC_OP(K_PREFETCH, 0, "Prefetch"),
    ASYNC_OP(K_AWAIT, POET_DT_FLOAT, "Await"),
    ASYNC_OP(K_AWAIT, POET_DT_DOUBLE, "Await_double"),
    ASYNC_OP(K_AWAIT, POET_DT_FLOAT16, "Await_float16"),
    ASYNC_OP(K_AWAIT, POET_DT_INT64, "Await_int64"),
    ASYNC_OP(K_AWAIT, POET_DT_INT32, "Await_int32"),
    ASYNC_OP(K_AWAIT, POET_DT_INT8, "Await_int8"),
    ASYNC_OP(K_AWAIT, POET_DT_UINT8, "Await_uint8"),
    ASYNC_OP(K_AWAIT, POET_DT_BOOL, "Await_bool"),
};

/* Called by spill_ops.c's RegisterCustomOps: the async ops share the "poet" domain. */
OrtStatus *poet_register_async_ops(OrtCustomOpDomain *domain, const OrtApi *api) {
  size_t i;
  OrtStatus *st;
  g_api = api;
  for (i = 0; i < sizeof g_async_ops / sizeof g_async_ops[0]; i++) {
    st = api->CustomOpDomain_Add(domain, &g_async_ops[i].base);
    if (st) return st;
  }
  return NULL;
}
