/*
 * state_ops.c -- poetc's state-directory file format and the StateRead / StateWrite ops.
 *
 * Registered into the "poet" domain by spill_ops.c's RegisterCustomOps.  A paged training graph
 * does not take its paged state tensors (parameters, optimizer moments) as graph inputs: it reads
 * them from the state directory with StateRead and writes their new values with StateWrite.
 *
 *   StateRead[_<dtype>](D...) -> Y
 *     attr key (string, required): the state tensor's name.  Y: the value of `key` as of the START
 *     of the step, i.e. the file of the last committed generation g:
 *       <dir>/gen-<g>/<file(key)>   (generation field must be g), or, if that file does not exist,
 *       <dir>/frozen/<file(key)>    (a frozen parameter: generation 0, frozen flag set).
 *     Y's shape is the graph's declared static shape (the file must match it; without a declared
 *     shape the file's authenticated shape is used).  D...: zero or more tensors of any type, read
 *     by nobody: explicit ordering dependencies.  May run any number of times per step.
 *     One op type per element type, as for Restore: StateRead (float), StateRead_double, ...
 *
 *   StateWrite(X, D...) -> T
 *     attr key (string, required).  Writes X as the value of `key` for generation g+1 into
 *     <dir>/gen-<g+1>/<file(key)> (replacing an earlier write of the same step).  T: int64 [1]
 *     (the generation written), to be made a graph output so nothing is pruned.  D...: zero or
 *     more ordering dependencies (e.g. the flag of the AdamWUpdate that updated X in place).
 *
 * The ops learn the directory, its MAC key and g / g+1 from poet_state_configure(), an exported C
 * function the runtime calls through ctypes on the same loaded library before every step
 * (poetc.runtime.statedir); a step run without it fails with a message saying so.  Generations,
 * the commit protocol and crash safety are the runtime's (statedir.py); these ops only read
 * committed files and write uncommitted ones.
 *
 * File format (little-endian):
 *   0    8  magic "POETSTA\0"          8   4  u32 version (1)
 *   12   4  i32 ONNX element type      16  4  u32 rank (<= 16)
 *   20   4  u32 flags (bit 0: frozen)  24  8  u64 payload bytes
 *   32   8  u64 generation             40  8  u64 payload MAC
 *   48 128  i64 dims[16]               176 256 key (NUL padded; at most 255 bytes)
 *   432  8  u64 header MAC over bytes [0, 432)
 *   440  .  payload
 * Both MACs are SipHash-2-4 keyed with the state directory's 16-byte key (its MANIFEST.json), so a
 * file of another state directory, a torn, truncated or altered file, a file of another key or of
 * another generation is refused with a message naming the file.
 *
 * File name of a key: the key with every byte outside [A-Za-z0-9._-] replaced by '_', cut to 96
 * bytes, then '-', 16 hex digits of xxHash64(key, seed 0), ".state" (unique and portable).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io_core.h"
#include "onnxruntime_c_api.h"

#define POET_ORT_API_VERSION 19
#define ST_MAGIC "POETSTA"
#define ST_VERSION 1u
#define ST_KEY_BYTES 256
#define ST_HEADER_BYTES 440
#define ST_MAC_OFFSET 432
#define ST_FLAG_FROZEN 1u
#define ST_EXPORT __attribute__((visibility("default")))

static const OrtApi *s_ort = NULL;

/* ---- configuration set by the runtime (poet_state_configure) ----------- */

static pthread_mutex_t s_lock = PTHREAD_MUTEX_INITIALIZER;
static int s_configured = 0;
static char s_dir[POET_PATH_BYTES];
static unsigned char s_key[16];
static uint64_t s_read_gen, s_write_gen;

/* TEST ONLY (tests/test_kill.py): POETC_TEST_KILL_AT="S:read:N" or "S:write:N" SIGKILLs this process
 * right after the N-th StateRead (resp. StateWrite, its file written) of the step that writes
 * generation S, so a kill lands at the same point of a step whatever the machine's speed.  Read at
 * each poet_state_configure; unset (always, outside tests): no effect. */
static uint64_t s_kill_gen, s_kill_n, s_reads_done, s_writes_done;
static int s_kill_kind = -1; /* 0 read, 1 write, -1 none */

static void kill_hook_configure(void) {
  const char *spec = getenv("POETC_TEST_KILL_AT");
  unsigned long long gen = 0, n = 0;
  char phase[16] = {0};
  s_kill_kind = -1;
  s_reads_done = s_writes_done = 0;
  if (!spec || sscanf(spec, "%llu:%15[a-z]:%llu", &gen, phase, &n) != 3) return;
  if (strcmp(phase, "read") == 0) s_kill_kind = 0;
  else if (strcmp(phase, "write") == 0) s_kill_kind = 1;
  s_kill_gen = gen;
  s_kill_n = n;
}

static void kill_hook(int kind) {
  uint64_t done;
  pthread_mutex_lock(&s_lock);
  done = kind == 0 ? ++s_reads_done : ++s_writes_done;
  if (s_kill_kind == kind && s_write_gen == s_kill_gen && done == s_kill_n) kill(getpid(), SIGKILL);
  pthread_mutex_unlock(&s_lock);
}

/* ---- helpers ------------------------------------------------------------ */

static void put_err(char *err, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void put_err(char *err, size_t n, const char *fmt, ...) {
  va_list ap;
  if (!err || !n) return;
  va_start(ap, fmt);
  vsnprintf(err, n, fmt, ap);
  va_end(ap);
}

static void st_le64(unsigned char *p, uint64_t v) {
  int i;
  for (i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void st_le32(unsigned char *p, uint32_t v) {
  int i;
  for (i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint64_t st_ld64(const unsigned char *p) {
  uint64_t v = 0;
  int i;
  for (i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}
static uint32_t st_ld32(const unsigned char *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void dims_text(char *out, size_t n, uint32_t rank, const int64_t *dims) {
  size_t w = 0;
  uint32_t d;
  out[0] = '\0';
  for (d = 0; d < rank && w + 24 < n; d++)
    w += (size_t)snprintf(out + w, n - w, d ? ",%lld" : "%lld", (long long)dims[d]);
}

ST_EXPORT int poet_state_filename(const char *key, char *out, size_t n) {
  char base[97];
  size_t i, len = strlen(key);
  for (i = 0; i < len && i < 96; i++) {
    char c = key[i];
    int ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
             c == '_' || c == '-';
    base[i] = ok ? c : '_';
  }
  base[i] = '\0';
  if (base[0] == '.') base[0] = '_'; /* no hidden files, no "." / ".." */
  return snprintf(out, n, "%s-%016llx.state", base,
                  (unsigned long long)poet_hash64(key, len, 0)) >= (int)n ? -1 : 0;
}

static int gen_path(char *out, size_t n, const char *dir, uint64_t gen, const char *key) {
  char name[160];
  if (poet_state_filename(key, name, sizeof name) != 0) return -1;
  return snprintf(out, n, "%s/gen-%08llu/%s", dir, (unsigned long long)gen, name) >= (int)n ? -1 : 0;
}

static int frozen_path(char *out, size_t n, const char *dir, const char *key) {
  char name[160];
  if (poet_state_filename(key, name, sizeof name) != 0) return -1;
  return snprintf(out, n, "%s/frozen/%s", dir, name) >= (int)n ? -1 : 0;
}

/* ---- file write / read (also called by the runtime through ctypes) ---- */

/* Writes `data` as the value of `key` at generation `gen` to `path` (created or replaced, mode
 * 0600, not following a symlink); fsyncs it when do_fsync.  0 on success, -1 with `err`. */
ST_EXPORT int poet_state_write_path(const char *path, const char *key, int32_t dtype, uint32_t rank,
                                    const int64_t *dims, uint64_t gen, uint32_t flags,
                                    const unsigned char mackey[16], const void *data, int do_fsync,
                                    char *err, size_t errn) {
  unsigned char h[ST_HEADER_BYTES];
  uint64_t nbytes = 0;
  poet_err pe;
  uint32_t d;
  int fd;
  if (strlen(key) >= ST_KEY_BYTES) {
    put_err(err, errn, "state key '%.80s...' is longer than %d bytes", key, ST_KEY_BYTES - 1);
    return -1;
  }
  if (poet_payload_bytes(dtype, rank, dims, &nbytes, &pe) != POET_OK) {
    put_err(err, errn, "state tensor '%s': %s", key, pe.msg);
    return -1;
  }
  memset(h, 0, sizeof h);
  memcpy(h, ST_MAGIC, 8);
  st_le32(h + 8, ST_VERSION);
  st_le32(h + 12, (uint32_t)dtype);
  st_le32(h + 16, rank);
  st_le32(h + 20, flags);
  st_le64(h + 24, nbytes);
  st_le64(h + 32, gen);
  st_le64(h + 40, poet_siphash24(mackey, data, (size_t)nbytes));
  for (d = 0; d < rank; d++) st_le64(h + 48 + 8 * d, (uint64_t)dims[d]);
  memcpy(h + 176, key, strlen(key));
  st_le64(h + ST_MAC_OFFSET, poet_siphash24(mackey, h, ST_MAC_OFFSET));
  fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    put_err(err, errn, "cannot create state file '%s': %s", path, strerror(errno));
    return -1;
  }
  if (poet_write_all(fd, h, sizeof h, path, &pe) != POET_OK ||
      (nbytes && poet_write_all(fd, data, (size_t)nbytes, path, &pe) != POET_OK)) {
    close(fd);
    put_err(err, errn, "%s", pe.msg);
    return -1;
  }
  if (do_fsync && fsync(fd) != 0) {
    put_err(err, errn, "fsync of state file '%s' failed: %s", path, strerror(errno));
    close(fd);
    return -1;
  }
  if (close(fd) != 0) {
    put_err(err, errn, "closing state file '%s' failed: %s", path, strerror(errno));
    return -1;
  }
  return 0;
}

/* Reads the header of `path` and checks everything but the payload: magic, version, header MAC,
 * key, generation (and frozen flag when want_frozen >= 0), dtype, and rank/dims if want_rank >= 0
 * (-1: accept the file's shape, returned in *rank / dims).  Returns an open fd or -1 with `err`;
 * *missing is set when the file does not exist. */
static int open_checked(const char *path, const char *key, int32_t dtype, int want_rank,
                        uint32_t *rank, int64_t *dims, uint64_t gen, int want_frozen,
                        const unsigned char mackey[16], uint64_t *nbytes, uint64_t *pmac,
                        int *missing, char *err, size_t errn) {
  unsigned char h[ST_HEADER_BYTES];
  char kbuf[ST_KEY_BYTES + 1];
  char got[256], want[256];
  poet_err pe;
  struct stat sb;
  uint32_t d, frank, flags;
  int64_t fdims[POET_SPILL_MAX_RANK];
  uint64_t fgen, expect_bytes = 0;
  int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (missing) *missing = 0;
  if (fd < 0) {
    if (errno == ENOENT && missing) *missing = 1;
    put_err(err, errn, "cannot open state file '%s': %s", path, strerror(errno));
    return -1;
  }
#define FAIL(...)                 \
  do {                            \
    put_err(err, errn, __VA_ARGS__); \
    close(fd);                    \
    return -1;                    \
  } while (0)
  if (fstat(fd, &sb) != 0) FAIL("cannot stat state file '%s': %s", path, strerror(errno));
  if (!S_ISREG(sb.st_mode)) FAIL("state file '%s' is not a regular file", path);
  if ((uint64_t)sb.st_size < ST_HEADER_BYTES)
    FAIL("state file '%s' is truncated: %lld bytes, shorter than its %d-byte header (a torn write)",
         path, (long long)sb.st_size, ST_HEADER_BYTES);
  if (poet_read_all(fd, h, sizeof h, path, &pe) != POET_OK) FAIL("%s", pe.msg);
  if (memcmp(h, ST_MAGIC, 8) != 0) FAIL("'%s' is not a poetc state file (bad magic)", path);
  if (st_ld32(h + 8) != ST_VERSION)
    FAIL("state file '%s' has format version %u; this poetc reads version %u", path,
         st_ld32(h + 8), ST_VERSION);
  if (st_ld64(h + ST_MAC_OFFSET) != poet_siphash24(mackey, h, ST_MAC_OFFSET))
    FAIL("state file '%s' fails its header check: it was altered, or it belongs to another state "
         "directory (its MAC key differs)", path);
  memcpy(kbuf, h + 176, ST_KEY_BYTES);
  kbuf[ST_KEY_BYTES] = '\0';
  if (strcmp(kbuf, key) != 0)
    FAIL("state file '%s' holds tensor '%s', not '%s' (a file mix-up)", path, kbuf, key);
  fgen = st_ld64(h + 32);
  flags = st_ld32(h + 20);
  if (fgen != gen)
    FAIL("state file '%s' is of generation %llu, expected %llu (a stale or mixed-generation file)",
         path, (unsigned long long)fgen, (unsigned long long)gen);
  if (want_frozen >= 0 && !!(flags & ST_FLAG_FROZEN) != want_frozen)
    FAIL("state file '%s' is %s, expected %s", path, (flags & ST_FLAG_FROZEN) ? "frozen" : "not frozen",
         want_frozen ? "a frozen parameter" : "a trainable tensor");
  if ((int32_t)st_ld32(h + 12) != dtype)
    FAIL("state file '%s' holds %s data, expected %s", path, poet_dtype_name((int32_t)st_ld32(h + 12)),
         poet_dtype_name(dtype));
  frank = st_ld32(h + 16);
  if (frank > POET_SPILL_MAX_RANK) FAIL("state file '%s' has invalid rank %u", path, frank);
  for (d = 0; d < frank; d++) fdims[d] = (int64_t)st_ld64(h + 48 + 8 * d);
  if (want_rank >= 0) {
    int same = frank == (uint32_t)want_rank;
    for (d = 0; same && d < frank; d++) same = fdims[d] == dims[d];
    if (!same) {
      dims_text(got, sizeof got, frank, fdims);
      dims_text(want, sizeof want, (uint32_t)want_rank, dims);
      FAIL("state file '%s' holds a [%s] tensor, expected [%s]", path, got, want);
    }
  } else {
    *rank = frank;
    for (d = 0; d < frank; d++) dims[d] = fdims[d];
  }
  if (poet_payload_bytes(dtype, frank, fdims, &expect_bytes, &pe) != POET_OK)
    FAIL("state file '%s': %s", path, pe.msg);
  if (st_ld64(h + 24) != expect_bytes)
    FAIL("state file '%s' declares %llu payload bytes, its shape needs %llu", path,
         (unsigned long long)st_ld64(h + 24), (unsigned long long)expect_bytes);
  if ((uint64_t)sb.st_size != ST_HEADER_BYTES + expect_bytes)
    FAIL("state file '%s' is %lld bytes, expected %llu (truncated or torn)", path,
         (long long)sb.st_size, (unsigned long long)(ST_HEADER_BYTES + expect_bytes));
#undef FAIL
  *nbytes = expect_bytes;
  *pmac = st_ld64(h + 40);
  return fd;
}

static int read_payload(int fd, const char *path, void *out, uint64_t nbytes, uint64_t pmac,
                        const unsigned char mackey[16], char *err, size_t errn) {
  poet_err pe;
  if (nbytes && poet_read_all(fd, out, (size_t)nbytes, path, &pe) != POET_OK) {
    put_err(err, errn, "%s", pe.msg);
    return -1;
  }
  if (poet_siphash24(mackey, out, (size_t)nbytes) != pmac) {
    put_err(err, errn, "state file '%s' fails its payload check (torn, altered or foreign data)", path);
    return -1;
  }
  return 0;
}

/* Reads the value of `key` (dtype, rank, dims given) at generation `gen` from `path` into `out`
 * (payload bytes).  want_frozen: 1 frozen, 0 not frozen, -1 either.  0, or -1 with `err`. */
ST_EXPORT int poet_state_read_path(const char *path, const char *key, int32_t dtype, uint32_t rank,
                                   const int64_t *dims, uint64_t gen, int want_frozen,
                                   const unsigned char mackey[16], void *out, char *err,
                                   size_t errn) {
  uint64_t nbytes, pmac;
  uint32_t r = rank;
  int64_t dd[POET_SPILL_MAX_RANK];
  int rc, fd;
  if (rank > POET_SPILL_MAX_RANK) {
    put_err(err, errn, "state tensor '%s': rank %u exceeds %d", key, rank, POET_SPILL_MAX_RANK);
    return -1;
  }
  memcpy(dd, dims, sizeof(int64_t) * rank);
  fd = open_checked(path, key, dtype, (int)rank, &r, dd, gen, want_frozen, mackey, &nbytes, &pmac,
                    NULL, err, errn);
  if (fd < 0) return -1;
  rc = read_payload(fd, path, out, nbytes, pmac, mackey, err, errn);
  close(fd);
  return rc;
}

/* Sets the state directory, its MAC key and the generations the ops read (g) and write (g+1).
 * Called by the runtime before each step; dir NULL clears the configuration. */
ST_EXPORT int poet_state_configure(const char *dir, const unsigned char key[16], uint64_t read_gen,
                                   uint64_t write_gen, char *err, size_t errn) {
  struct stat sb;
  pthread_mutex_lock(&s_lock);
  if (!dir) {
    s_configured = 0;
    pthread_mutex_unlock(&s_lock);
    return 0;
  }
  if (strlen(dir) + 200 >= sizeof s_dir) {
    pthread_mutex_unlock(&s_lock);
    put_err(err, errn, "state directory path too long");
    return -1;
  }
  if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
    pthread_mutex_unlock(&s_lock);
    put_err(err, errn, "state directory '%s' does not exist or is not a directory", dir);
    return -1;
  }
  snprintf(s_dir, sizeof s_dir, "%s", dir);
  memcpy(s_key, key, 16);
  s_read_gen = read_gen;
  s_write_gen = write_gen;
  s_configured = 1;
  kill_hook_configure();
  pthread_mutex_unlock(&s_lock);
  return 0;
}

static int snapshot(char *dir, unsigned char key[16], uint64_t *rg, uint64_t *wg) {
  int ok;
  pthread_mutex_lock(&s_lock);
  ok = s_configured;
  if (ok) {
    memcpy(dir, s_dir, POET_PATH_BYTES);
    memcpy(key, s_key, 16);
    *rg = s_read_gen;
    *wg = s_write_gen;
  }
  pthread_mutex_unlock(&s_lock);
  return ok;
}

/* ---- the custom ops ----------------------------------------------------- */

enum { ST_READ = 0, ST_WRITE = 1 };

typedef struct {
  OrtCustomOp base; /* must be first */
  int kind;
  int32_t dtype; /* StateRead: produced element type */
  const char *name;
} StateOp;

typedef struct {
  const StateOp *op;
  char key[ST_KEY_BYTES];
  int has_shape;
  uint32_t exp_rank;
  int64_t exp_dims[POET_SPILL_MAX_RANK];
} StateKernel;

static OrtStatus *st_status(const StateKernel *k, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static OrtStatus *st_status(const StateKernel *k, const char *fmt, ...) {
  char msg[POET_ERR_MSG_BYTES + 600];
  int off = snprintf(msg, sizeof msg, "poetc %s[key=%s]: ", k->op->name, k->key);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg + off, sizeof msg - (size_t)off, fmt, ap);
  va_end(ap);
  return s_ort->CreateStatus(ORT_RUNTIME_EXCEPTION, msg);
}

static OrtStatus *st_wrap(const StateKernel *k, OrtStatus *st, const char *what) {
  OrtStatus *out;
  if (!st) return NULL;
  out = st_status(k, "%s failed: %s", what, s_ort->GetErrorMessage(st));
  s_ort->ReleaseStatus(st);
  return out;
}

static const char *ORT_API_CALL sop_name(const OrtCustomOp *op) { return ((const StateOp *)op)->name; }
static const char *ORT_API_CALL sop_ep(const OrtCustomOp *op) {
  (void)op;
  return NULL;
}
static size_t ORT_API_CALL sop_input_count(const OrtCustomOp *op) {
  return ((const StateOp *)op)->kind == ST_WRITE ? 2 : 1;
}
static ONNXTensorElementDataType ORT_API_CALL sop_input_type(const OrtCustomOp *op, size_t i) {
  (void)op;
  (void)i;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL sop_input_char(const OrtCustomOp *op, size_t i) {
  const StateOp *p = (const StateOp *)op;
  return (p->kind == ST_WRITE && i == 0) ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_VARIADIC;
}
static size_t ORT_API_CALL sop_one(const OrtCustomOp *op) {
  (void)op;
  return 1;
}
static ONNXTensorElementDataType ORT_API_CALL sop_output_type(const OrtCustomOp *op, size_t i) {
  const StateOp *p = (const StateOp *)op;
  (void)i;
  return p->kind == ST_WRITE ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : (ONNXTensorElementDataType)p->dtype;
}
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL sop_output_char(const OrtCustomOp *op, size_t i) {
  (void)op;
  (void)i;
  return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL sop_mem(const OrtCustomOp *op, size_t i) {
  (void)op;
  (void)i;
  return OrtMemTypeDefault;
}
static int ORT_API_CALL sop_min_arity(const OrtCustomOp *op) {
  (void)op;
  return 0;
}
static int ORT_API_CALL sop_zero(const OrtCustomOp *op) {
  (void)op;
  return 0;
}
static int ORT_API_CALL sop_start(const OrtCustomOp *op) {
  (void)op;
  return 1;
}
static int ORT_API_CALL sop_end(const OrtCustomOp *op) {
  (void)op;
  return INT_MAX;
}

static OrtStatusPtr ORT_API_CALL sop_infer_shape(const OrtCustomOp *op, OrtShapeInferContext *ctx) {
  const StateOp *p = (const StateOp *)op;
  OrtTensorTypeAndShapeInfo *info = NULL;
  OrtStatus *st;
  int64_t one = 1;
  if (p->kind != ST_WRITE) return NULL;
  st = s_ort->CreateTensorTypeAndShapeInfo(&info);
  if (st) return st;
  st = s_ort->SetTensorElementType(info, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
  if (!st) st = s_ort->SetDimensions(info, &one, 1);
  if (!st) st = s_ort->ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
  s_ort->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

static OrtStatusPtr ORT_API_CALL sop_create_kernel(const OrtCustomOp *op, const OrtApi *api,
                                                   const OrtKernelInfo *info, void **kernel) {
  const StateOp *p = (const StateOp *)op;
  StateKernel *k;
  size_t sz = 0;
  OrtStatus *st;
  (void)api;
  *kernel = NULL;
  k = (StateKernel *)calloc(1, sizeof *k);
  if (!k) return s_ort->CreateStatus(ORT_FAIL, "poetc state op: out of memory creating kernel");
  k->op = p;
  st = s_ort->KernelInfoGetAttribute_string(info, "key", NULL, &sz);
  if (!st && sz > 0 && sz <= ST_KEY_BYTES) st = s_ort->KernelInfoGetAttribute_string(info, "key", k->key, &sz);
  if (st || sz == 0 || sz > ST_KEY_BYTES || !k->key[0]) {
    char msg[300];
    if (st) s_ort->ReleaseStatus(st);
    snprintf(msg, sizeof msg, "poetc %s: the node needs a string attribute 'key' (the state tensor's "
             "name, at most %d bytes)", p->name, ST_KEY_BYTES - 1);
    free(k);
    return s_ort->CreateStatus(ORT_INVALID_ARGUMENT, msg);
  }
  if (p->kind == ST_READ) {
    OrtTypeInfo *ti = NULL;
    const OrtTensorTypeAndShapeInfo *tsi = NULL;
    size_t n = 0, d;
    st = s_ort->KernelInfo_GetOutputTypeInfo(info, 0, &ti);
    if (!st) st = s_ort->CastTypeInfoToTensorInfo(ti, &tsi);
    if (!st && tsi) st = s_ort->GetDimensionsCount(tsi, &n);
    if (!st && tsi && n > 0 && n <= POET_SPILL_MAX_RANK) {
      st = s_ort->GetDimensions(tsi, k->exp_dims, n);
      if (!st) {
        k->has_shape = 1;
        k->exp_rank = (uint32_t)n;
        for (d = 0; d < n; d++)
          if (k->exp_dims[d] < 0) k->has_shape = 0;
      }
    }
    if (st) s_ort->ReleaseStatus(st);
    if (ti) s_ort->ReleaseTypeInfo(ti);
  }
  *kernel = k;
  return NULL;
}

static void ORT_API_CALL sop_destroy_kernel(void *kernel) { free(kernel); }

static const char *k_not_configured =
    "no state directory is configured for this step: a graph with state ops runs only under "
    "poetc's runtime (poetc train / verify), which calls poet_state_configure before each step";

static OrtStatus *read_compute(StateKernel *k, OrtKernelContext *ctx) {
  char dir[POET_PATH_BYTES], path[POET_PATH_BYTES], err[POET_ERR_MSG_BYTES];
  unsigned char key[16];
  uint64_t rg, wg, nbytes, pmac;
  uint32_t rank = k->exp_rank;
  int64_t dims[POET_SPILL_MAX_RANK];
  int missing = 0, fd, frozen = 0;
  OrtValue *y = NULL;
  void *ydata = NULL;
  OrtStatus *st;
  if (!snapshot(dir, key, &rg, &wg)) return st_status(k, "%s", k_not_configured);
  memcpy(dims, k->exp_dims, sizeof dims);
  if (gen_path(path, sizeof path, dir, rg, k->key) != 0) return st_status(k, "state path too long");
  fd = open_checked(path, k->key, k->op->dtype, k->has_shape ? (int)k->exp_rank : -1, &rank, dims, rg,
                    0, key, &nbytes, &pmac, &missing, err, sizeof err);
  if (fd < 0 && missing) {
    char fpath[POET_PATH_BYTES];
    int fmissing = 0;
    if (frozen_path(fpath, sizeof fpath, dir, k->key) != 0) return st_status(k, "state path too long");
    fd = open_checked(fpath, k->key, k->op->dtype, k->has_shape ? (int)k->exp_rank : -1, &rank, dims, 0,
                      1, key, &nbytes, &pmac, &fmissing, err, sizeof err);
    if (fd < 0 && fmissing)
      return st_status(k, "the state directory has no value for this tensor: neither '%s' (generation "
                       "%llu) nor the frozen parameter '%s' exists", path, (unsigned long long)rg, fpath);
    if (fd >= 0) {
      frozen = 1;
      snprintf(path, sizeof path, "%s", fpath);
    }
  }
  (void)frozen;
  if (fd < 0) return st_status(k, "%s; the step was not run and nothing was trained on it", err);
  st = s_ort->KernelContext_GetOutput(ctx, 0, dims, rank, &y);
  if (!st && nbytes > 0) st = s_ort->GetTensorMutableData(y, &ydata);
  if (st) {
    close(fd);
    return st_wrap(k, st, "allocating output Y");
  }
  if (read_payload(fd, path, ydata, nbytes, pmac, key, err, sizeof err) != 0) {
    close(fd);
    return st_status(k, "%s; the step was not run and nothing was trained on it", err);
  }
  close(fd);
  kill_hook(0);
  return NULL;
}

static OrtStatus *write_compute(StateKernel *k, OrtKernelContext *ctx) {
  char dir[POET_PATH_BYTES], path[POET_PATH_BYTES], err[POET_ERR_MSG_BYTES];
  unsigned char key[16];
  uint64_t rg, wg;
  const OrtValue *x = NULL;
  OrtValue *t = NULL;
  OrtTensorTypeAndShapeInfo *ti = NULL;
  ONNXTensorElementDataType et;
  size_t n = 0;
  int64_t dims[POET_SPILL_MAX_RANK], one = 1, *tdata = NULL;
  void *xdata = NULL;
  OrtStatus *st;
  if (!snapshot(dir, key, &rg, &wg)) return st_status(k, "%s", k_not_configured);
  st = s_ort->KernelContext_GetInput(ctx, 0, &x);
  if (st) return st_wrap(k, st, "KernelContext_GetInput");
  if (!x) return st_status(k, "missing input X");
  st = s_ort->GetTensorTypeAndShape(x, &ti);
  if (!st) st = s_ort->GetTensorElementType(ti, &et);
  if (!st) st = s_ort->GetDimensionsCount(ti, &n);
  if (!st && n > POET_SPILL_MAX_RANK) {
    s_ort->ReleaseTensorTypeAndShapeInfo(ti);
    return st_status(k, "tensor rank %zu exceeds %d", n, POET_SPILL_MAX_RANK);
  }
  if (!st && n > 0) st = s_ort->GetDimensions(ti, dims, n);
  if (ti) s_ort->ReleaseTensorTypeAndShapeInfo(ti);
  if (st) return st_wrap(k, st, "reading X's type and shape");
  st = s_ort->GetTensorMutableData((OrtValue *)x, &xdata);
  if (st) return st_wrap(k, st, "GetTensorMutableData(X)");
  if (gen_path(path, sizeof path, dir, wg, k->key) != 0) return st_status(k, "state path too long");
  if (poet_state_write_path(path, k->key, (int32_t)et, (uint32_t)n, dims, wg, 0, key, xdata, 0, err,
                            sizeof err) != 0)
    return st_status(k, "%s", err);
  st = s_ort->KernelContext_GetOutput(ctx, 0, &one, 1, &t);
  if (!st) st = s_ort->GetTensorMutableData(t, (void **)&tdata);
  if (st) return st_wrap(k, st, "allocating output T");
  tdata[0] = (int64_t)wg;
  kill_hook(1);
  return NULL;
}

static OrtStatusPtr ORT_API_CALL sop_compute(void *kernel, OrtKernelContext *ctx) {
  StateKernel *k = (StateKernel *)kernel;
  return k->op->kind == ST_READ ? read_compute(k, ctx) : write_compute(k, ctx);
}

static void *ORT_API_CALL sop_create_kernel_v1(const OrtCustomOp *op, const OrtApi *api,
                                               const OrtKernelInfo *info) {
  void *k = NULL;
  OrtStatus *st = sop_create_kernel(op, api, info, &k);
  if (st) s_ort->ReleaseStatus(st);
  return k;
}

static void ORT_API_CALL sop_compute_v1(void *kernel, OrtKernelContext *ctx) {
  OrtStatus *st = sop_compute(kernel, ctx);
  if (st) s_ort->ReleaseStatus(st);
}

#define STATE_OP_INIT(KIND, DTYPE, NAME)                                      \
  {                                                                           \
    .base = {                                                                 \
        .version = POET_ORT_API_VERSION,                                      \
        .CreateKernel = sop_create_kernel_v1,                                 \
        .GetName = sop_name,                                                  \
        .GetExecutionProviderType = sop_ep,                                   \
        .GetInputType = sop_input_type,                                       \
        .GetInputTypeCount = sop_input_count,                                 \
        .GetOutputType = sop_output_type,                                     \
        .GetOutputTypeCount = sop_one,                                        \
        .KernelCompute = sop_compute_v1,                                      \
        .KernelDestroy = sop_destroy_kernel,                                  \
        .GetInputCharacteristic = sop_input_char,                             \
        .GetOutputCharacteristic = sop_output_char,                           \
        .GetInputMemoryType = sop_mem,                                        \
        .GetVariadicInputMinArity = sop_min_arity,                            \
        .GetVariadicInputHomogeneity = sop_zero,                              \
        .GetVariadicOutputMinArity = sop_min_arity,                           \
        .GetVariadicOutputHomogeneity = sop_zero,                             \
        .CreateKernelV2 = sop_create_kernel,                                  \
        .KernelComputeV2 = sop_compute,                                       \
        .InferOutputShapeFn = sop_infer_shape,                                \
        .GetStartVersion = sop_start,                                         \
        .GetEndVersion = sop_end,                                             \
    },                                                                        \
    .kind = (KIND), .dtype = (DTYPE), .name = (NAME)                          \
  }

static StateOp s_ops[] = {
    STATE_OP_INIT(ST_WRITE, 0, "StateWrite"),
    STATE_OP_INIT(ST_READ, POET_DT_FLOAT, "StateRead"),
    STATE_OP_INIT(ST_READ, POET_DT_DOUBLE, "StateRead_double"),
    STATE_OP_INIT(ST_READ, POET_DT_FLOAT16, "StateRead_float16"),
    STATE_OP_INIT(ST_READ, POET_DT_INT64, "StateRead_int64"),
    STATE_OP_INIT(ST_READ, POET_DT_INT32, "StateRead_int32"),
    STATE_OP_INIT(ST_READ, POET_DT_INT8, "StateRead_int8"),
    STATE_OP_INIT(ST_READ, POET_DT_UINT8, "StateRead_uint8"),
    STATE_OP_INIT(ST_READ, POET_DT_BOOL, "StateRead_bool"),
};

OrtStatus *poet_register_state_ops(OrtCustomOpDomain *domain, const OrtApi *api);
OrtStatus *poet_register_state_ops(OrtCustomOpDomain *domain, const OrtApi *api) {
  size_t i;
  OrtStatus *st;
  s_ort = api;
  for (i = 0; i < sizeof s_ops / sizeof s_ops[0]; i++) {
    st = api->CustomOpDomain_Add(domain, &s_ops[i].base);
    if (st) return st;
  }
  return NULL;
}
