/*
 * io_core.c -- spill-file format and I/O core (see io_core.h).
 * No ONNX Runtime dependency.
 */
#define _GNU_SOURCE
#include "io_core.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------ */
/* errors                                                                   */

static int set_err(poet_err *err, int kind, int sys_errno, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int set_err(poet_err *err, int kind, int sys_errno, const char *fmt, ...) {
  if (err) {
    va_list ap;
    err->kind = kind;
    err->sys_errno = sys_errno;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
  }
  return kind;
}

static const char *errno_text(int e, char *buf, size_t n) {
  /* GNU strerror_r returns a char* that may or may not be buf. */
  const char *s = strerror_r(e, buf, n);
  return s ? s : "unknown error";
}

static const char *show_path(const char *path) { return path ? path : "<spill file>"; }

/* ------------------------------------------------------------------------ */
/* dtypes                                                                   */

size_t poet_dtype_size(int32_t dtype) {
  switch (dtype) {
    case POET_DT_FLOAT: return 4;
    case POET_DT_DOUBLE: return 8;
    case POET_DT_FLOAT16: return 2;
    case POET_DT_INT64: return 8;
    case POET_DT_INT32: return 4;
    case POET_DT_INT8: return 1;
    case POET_DT_UINT8: return 1;
    case POET_DT_BOOL: return 1;
    default: return 0;
  }
}

const char *poet_dtype_name(int32_t dtype) {
  switch (dtype) {
    case POET_DT_FLOAT: return "float";
    case POET_DT_DOUBLE: return "double";
    case POET_DT_FLOAT16: return "float16";
    case POET_DT_INT64: return "int64";
    case POET_DT_INT32: return "int32";
    case POET_DT_INT8: return "int8";
    case POET_DT_UINT8: return "uint8";
    case POET_DT_BOOL: return "bool";
    default: return "unsupported";
  }
}

/* ------------------------------------------------------------------------ */
/* little-endian helpers                                                    */

static inline uint64_t bswap64_if_be(uint64_t v) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  return __builtin_bswap64(v);
#else
  return v;
#endif
}

static inline uint32_t bswap32_if_be(uint32_t v) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  return __builtin_bswap32(v);
#else
  return v;
#endif
}

static inline uint64_t load_le64(const unsigned char *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return bswap64_if_be(v);
}

static inline uint32_t load_le32(const unsigned char *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return bswap32_if_be(v);
}

static inline void store_le64(unsigned char *p, uint64_t v) {
  v = bswap64_if_be(v);
  memcpy(p, &v, 8);
}

static inline void store_le32(unsigned char *p, uint32_t v) {
  v = bswap32_if_be(v);
  memcpy(p, &v, 4);
}

/* ------------------------------------------------------------------------ */
/* checksum: the xxHash64 algorithm                                           */

#define PH1 0x9E3779B185EBCA87ULL
#define PH2 0xC2B2AE3D27D4EB4FULL
#define PH3 0x165667B19E3779F9ULL
#define PH4 0x85EBCA77C2B2AE63ULL
#define PH5 0x27D4EB2F165667C5ULL

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t lane_round(uint64_t acc, uint64_t input) {
  acc += input * PH2;
  acc = rotl64(acc, 31);
  return acc * PH1;
}

static inline uint64_t lane_merge(uint64_t h, uint64_t lane) {
  h ^= lane_round(0, lane);
  return h * PH1 + PH4;
}

uint64_t poet_hash64(const void *data, size_t len, uint64_t seed) {
  const unsigned char *p = (const unsigned char *)data;
  const unsigned char *end = p + len;
  uint64_t h;

  if (len >= 32) {
    const unsigned char *limit = end - 32;
    uint64_t a = seed + PH1 + PH2;
    uint64_t b = seed + PH2;
    uint64_t c = seed;
    uint64_t d = seed - PH1;
    do {
      a = lane_round(a, load_le64(p));
      b = lane_round(b, load_le64(p + 8));
      c = lane_round(c, load_le64(p + 16));
      d = lane_round(d, load_le64(p + 24));
      p += 32;
    } while (p <= limit);
    h = rotl64(a, 1) + rotl64(b, 7) + rotl64(c, 12) + rotl64(d, 18);
    h = lane_merge(h, a);
    h = lane_merge(h, b);
    h = lane_merge(h, c);
    h = lane_merge(h, d);
  } else {
    h = seed + PH5;
  }
  h += (uint64_t)len;

  while (p + 8 <= end) {
    h ^= lane_round(0, load_le64(p));
    h = rotl64(h, 27) * PH1 + PH4;
    p += 8;
  }
  if (p + 4 <= end) {
    h ^= (uint64_t)load_le32(p) * PH1;
    h = rotl64(h, 23) * PH2 + PH3;
    p += 4;
  }
  while (p < end) {
    h ^= (uint64_t)(*p) * PH5;
    h = rotl64(h, 11) * PH1;
    p++;
  }
  h ^= h >> 33;
  h *= PH2;
  h ^= h >> 29;
  h *= PH3;
  h ^= h >> 32;
  return h;
}

/* ------------------------------------------------------------------------ */
/* keyed MAC: SipHash-2-4 (Aumasson & Bernstein), per-process random key     */

#define SIPROUND                                                  \
  do {                                                            \
    v0 += v1; v1 = rotl64(v1, 13); v1 ^= v0; v0 = rotl64(v0, 32); \
    v2 += v3; v3 = rotl64(v3, 16); v3 ^= v2;                      \
    v0 += v3; v3 = rotl64(v3, 21); v3 ^= v0;                      \
    v2 += v1; v1 = rotl64(v1, 17); v1 ^= v2; v2 = rotl64(v2, 32); \
  } while (0)

uint64_t poet_siphash24(const unsigned char key[16], const void *data, size_t len) {
  const unsigned char *p = (const unsigned char *)data;
  const unsigned char *end = p + (len & ~(size_t)7);
  uint64_t k0 = load_le64(key), k1 = load_le64(key + 8);
  uint64_t v0 = 0x736f6d6570736575ULL ^ k0;
  uint64_t v1 = 0x646f72616e646f6dULL ^ k1;
  uint64_t v2 = 0x6c7967656e657261ULL ^ k0;
  uint64_t v3 = 0x7465646279746573ULL ^ k1;
  uint64_t b = ((uint64_t)len) << 56, m;
  size_t left = len & 7;
  for (; p != end; p += 8) {
    m = load_le64(p);
    v3 ^= m;
    SIPROUND;
    SIPROUND;
    v0 ^= m;
  }
  switch (left) {
    case 7: b |= ((uint64_t)p[6]) << 48; /* fall through */
    case 6: b |= ((uint64_t)p[5]) << 40; /* fall through */
    case 5: b |= ((uint64_t)p[4]) << 32; /* fall through */
    case 4: b |= ((uint64_t)p[3]) << 24; /* fall through */
    case 3: b |= ((uint64_t)p[2]) << 16; /* fall through */
    case 2: b |= ((uint64_t)p[1]) << 8;  /* fall through */
    case 1: b |= ((uint64_t)p[0]); break;
    default: break;
  }
  v3 ^= b;
  SIPROUND;
  SIPROUND;
  v0 ^= b;
  v2 ^= 0xff;
  SIPROUND;
  SIPROUND;
  SIPROUND;
  SIPROUND;
  return v0 ^ v1 ^ v2 ^ v3;
}

static unsigned char g_key[16];
static int g_key_state = 0; /* 0 unset, 1 set, -1 no randomness */
static pthread_mutex_t g_key_mu = PTHREAD_MUTEX_INITIALIZER;

static int draw_random(unsigned char *buf, size_t n) {
  size_t got = 0;
  while (got < n) {
#ifdef SYS_getrandom
    long r = syscall(SYS_getrandom, buf + got, n - got, 0);
#else
    long r = -1;
    errno = ENOSYS;
#endif
    if (r < 0) {
      if (errno == EINTR) continue;
      break;
    }
    got += (size_t)r;
  }
  if (got < n) { /* old kernel: /dev/urandom */
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return -1;
    while (got < n) {
      ssize_t r = read(fd, buf + got, n - got);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        close(fd);
        return -1;
      }
      got += (size_t)r;
    }
    close(fd);
  }
  return 0;
}

int poet_mac_key(unsigned char out[16]) {
  int rc;
  pthread_mutex_lock(&g_key_mu);
  if (g_key_state == 0) g_key_state = draw_random(g_key, sizeof g_key) == 0 ? 1 : -1;
  rc = g_key_state == 1 ? 0 : -1;
  if (rc == 0) memcpy(out, g_key, sizeof g_key);
  pthread_mutex_unlock(&g_key_mu);
  return rc;
}

void poet_mac_set_key(const unsigned char key[16]) {
  pthread_mutex_lock(&g_key_mu);
  if (key) {
    memcpy(g_key, key, sizeof g_key);
    g_key_state = 1;
  } else {
    g_key_state = draw_random(g_key, sizeof g_key) == 0 ? 1 : -1;
  }
  pthread_mutex_unlock(&g_key_mu);
}

uint64_t poet_mac64(const void *data, size_t len) {
  unsigned char key[16];
  if (poet_mac_key(key) != 0) return 0; /* callers check poet_mac_key first */
  return poet_siphash24(key, data, len);
}

/* ------------------------------------------------------------------------ */
/* header                                                                   */

int poet_payload_bytes(int32_t dtype, uint32_t rank, const int64_t *dims,
                       uint64_t *out_bytes, poet_err *err) {
  size_t esize = poet_dtype_size(dtype);
  uint64_t count = 1;
  uint32_t i;
  if (esize == 0)
    return set_err(err, POET_E_ARG, 0, "unsupported element type %d (supported: float, double, "
                   "float16, int64, int32, int8, uint8, bool)", (int)dtype);
  if (rank > POET_SPILL_MAX_RANK)
    return set_err(err, POET_E_ARG, 0, "tensor rank %u exceeds the supported maximum %d",
                   rank, POET_SPILL_MAX_RANK);
  for (i = 0; i < rank; i++) {
    if (dims[i] < 0)
      return set_err(err, POET_E_ARG, 0, "negative dimension %lld at axis %u",
                     (long long)dims[i], i);
    if (dims[i] != 0 && count > UINT64_MAX / (uint64_t)dims[i])
      return set_err(err, POET_E_ARG, 0, "tensor element count overflows 64 bits");
    count *= (uint64_t)dims[i];
  }
  if (count > (UINT64_MAX >> 4))
    return set_err(err, POET_E_ARG, 0, "tensor byte size overflows 64 bits");
  *out_bytes = count * esize;
  return POET_OK;
}

void poet_header_encode(const poet_spill_header *hdr,
                        unsigned char out[POET_SPILL_HEADER_BYTES]) {
  int i;
  memset(out, 0, POET_SPILL_HEADER_BYTES);
  memcpy(out, POET_SPILL_MAGIC, 8); /* includes the terminating NUL */
  store_le32(out + 8, hdr->version);
  store_le32(out + 12, (uint32_t)hdr->dtype);
  store_le32(out + 16, hdr->rank);
  store_le32(out + 20, 0);
  store_le64(out + 24, hdr->payload_bytes);
  store_le64(out + 32, hdr->checksum);
  store_le64(out + 40, hdr->token);
  for (i = 0; i < POET_SPILL_MAX_RANK; i++) {
    int64_t d = (uint32_t)i < hdr->rank ? hdr->dims[i] : 0;
    store_le64(out + 48 + 8 * i, (uint64_t)d);
  }
  store_le64(out + 176, poet_mac64(out, 176));
}

int poet_header_decode(const unsigned char in[POET_SPILL_HEADER_BYTES],
                       poet_spill_header *hdr, const char *path, poet_err *err) {
  uint64_t expect_bytes = 0;
  uint64_t stored_hsum, hsum;
  int i, rc;
  if (memcmp(in, POET_SPILL_MAGIC, 8) != 0)
    return set_err(err, POET_E_MAGIC, 0, "'%s' is not a poetc spill file (bad magic)",
                   show_path(path));
  memset(hdr, 0, sizeof(*hdr));
  hdr->version = load_le32(in + 8);
  if (hdr->version != POET_SPILL_VERSION)
    return set_err(err, POET_E_VERSION, 0,
                   "spill file '%s' has format version %u, this build reads version %u",
                   show_path(path), hdr->version, POET_SPILL_VERSION);
  stored_hsum = load_le64(in + 176);
  hsum = poet_mac64(in, 176);
  if (stored_hsum != hsum)
    return set_err(err, POET_E_HEADER, 0,
                   "spill file '%s' has a corrupted header or was not written by this process "
                   "(its keyed header MAC does not authenticate: stored %016llx, computed %016llx)",
                   show_path(path), (unsigned long long)stored_hsum, (unsigned long long)hsum);
  hdr->dtype = (int32_t)load_le32(in + 12);
  hdr->rank = load_le32(in + 16);
  if (load_le32(in + 20) != 0)
    return set_err(err, POET_E_HEADER, 0, "spill file '%s' has a non-zero reserved field",
                   show_path(path));
  hdr->payload_bytes = load_le64(in + 24);
  hdr->checksum = load_le64(in + 32);
  hdr->token = load_le64(in + 40);
  if (hdr->rank > POET_SPILL_MAX_RANK)
    return set_err(err, POET_E_HEADER, 0, "spill file '%s' declares rank %u (max %d)",
                   show_path(path), hdr->rank, POET_SPILL_MAX_RANK);
  for (i = 0; i < POET_SPILL_MAX_RANK; i++) {
    hdr->dims[i] = (int64_t)load_le64(in + 48 + 8 * i);
    if ((uint32_t)i >= hdr->rank && hdr->dims[i] != 0)
      return set_err(err, POET_E_HEADER, 0, "spill file '%s' has dims beyond its rank",
                     show_path(path));
  }
  rc = poet_payload_bytes(hdr->dtype, hdr->rank, hdr->dims, &expect_bytes, err);
  if (rc != POET_OK) {
    char inner[POET_ERR_MSG_BYTES];
    snprintf(inner, sizeof(inner), "%s", err ? err->msg : "");
    return set_err(err, POET_E_HEADER, 0, "spill file '%s' has an invalid header: %s",
                   show_path(path), inner);
  }
  if (expect_bytes != hdr->payload_bytes)
    return set_err(err, POET_E_HEADER, 0,
                   "spill file '%s' declares %llu payload bytes but its dtype/shape need %llu",
                   show_path(path), (unsigned long long)hdr->payload_bytes,
                   (unsigned long long)expect_bytes);
  return POET_OK;
}

/* ------------------------------------------------------------------------ */
/* read / write loops                                                       */

static poet_write_fn g_write = NULL;
static poet_read_fn g_read = NULL;

void poet_io_set_hooks(poet_write_fn w, poet_read_fn r) {
  g_write = w;
  g_read = r;
}

#define POET_IO_CHUNK ((size_t)1 << 30)

int poet_write_all(int fd, const void *buf, size_t len, const char *path, poet_err *err) {
  const unsigned char *p = (const unsigned char *)buf;
  size_t done = 0;
  char eb[256];
  while (done < len) {
    size_t want = len - done;
    ssize_t n;
    if (want > POET_IO_CHUNK) want = POET_IO_CHUNK;
    n = g_write ? g_write(fd, p + done, want) : write(fd, p + done, want);
    if (n < 0) {
      int e = errno;
      if (e == EINTR) continue;
      return set_err(err, POET_E_IO, e, "cannot write spill file '%s': %s (errno %d) after "
                     "%zu of %zu bytes", show_path(path), errno_text(e, eb, sizeof eb), e,
                     done, len);
    }
    if (n == 0)
      return set_err(err, POET_E_IO, ENOSPC, "cannot write spill file '%s': write returned 0 "
                     "after %zu of %zu bytes (treated as: %s)", show_path(path), done, len,
                     errno_text(ENOSPC, eb, sizeof eb));
    done += (size_t)n;
  }
  return POET_OK;
}

int poet_read_all(int fd, void *buf, size_t len, const char *path, poet_err *err) {
  unsigned char *p = (unsigned char *)buf;
  size_t done = 0;
  char eb[256];
  while (done < len) {
    size_t want = len - done;
    ssize_t n;
    if (want > POET_IO_CHUNK) want = POET_IO_CHUNK;
    n = g_read ? g_read(fd, p + done, want) : read(fd, p + done, want);
    if (n < 0) {
      int e = errno;
      if (e == EINTR) continue;
      return set_err(err, POET_E_IO, e, "cannot read spill file '%s': %s (errno %d) after "
                     "%zu of %zu bytes", show_path(path), errno_text(e, eb, sizeof eb), e,
                     done, len);
    }
    if (n == 0)
      return set_err(err, POET_E_SHORT, 0, "short read from spill file '%s': got %zu of %zu "
                     "bytes (file truncated)", show_path(path), done, len);
    done += (size_t)n;
  }
  return POET_OK;
}

/* ------------------------------------------------------------------------ */
/* paths, tokens                                                            */

int poet_ensure_dir(const char *dir, poet_err *err) {
  char buf[POET_PATH_BYTES];
  char eb[256];
  size_t n, i;
  struct stat st;
  if (!dir || !*dir)
    return set_err(err, POET_E_ARG, 0, "empty spill directory path");
  n = strlen(dir);
  if (n >= sizeof(buf))
    return set_err(err, POET_E_ARG, 0, "spill directory path too long (%zu bytes)", n);
  memcpy(buf, dir, n + 1);
  for (i = 1; i <= n; i++) {
    if (buf[i] == '/' || buf[i] == '\0') {
      char saved = buf[i];
      buf[i] = '\0';
      if (mkdir(buf, 0700) != 0) {
        int e = errno;
        if (e != EEXIST)
          return set_err(err, POET_E_IO, e, "cannot create spill directory '%s' (at '%s'): "
                         "%s (errno %d)", dir, buf, errno_text(e, eb, sizeof eb), e);
      }
      buf[i] = saved;
    }
  }
  if (lstat(dir, &st) != 0) {
    int e = errno;
    return set_err(err, POET_E_IO, e, "cannot access spill directory '%s': %s (errno %d)",
                   dir, errno_text(e, eb, sizeof eb), e);
  }
  if (S_ISLNK(st.st_mode))
    return set_err(err, POET_E_UNSAFE, 0, "spill directory '%s' is a symbolic link; poetc spills only "
                   "into a private directory of the user running it (remove the link, or set "
                   "POETC_SPILL_DIR to a directory of yours with mode 0700)", dir);
  if (!S_ISDIR(st.st_mode))
    return set_err(err, POET_E_IO, ENOTDIR, "spill directory '%s' is not a directory", dir);
  if (st.st_uid != geteuid())
    return set_err(err, POET_E_UNSAFE, 0, "spill directory '%s' is owned by uid %u, not by this user "
                   "(uid %u): another user could replace the spill files; set POETC_SPILL_DIR to a "
                   "directory of yours with mode 0700", dir, (unsigned)st.st_uid, (unsigned)geteuid());
  if (st.st_mode & 077)
    return set_err(err, POET_E_UNSAFE, 0, "spill directory '%s' has mode 0%03o: other users can "
                   "reach the spill files; poetc needs it private (chmod 700 '%s', or set "
                   "POETC_SPILL_DIR to a directory of yours with mode 0700)", dir,
                   (unsigned)(st.st_mode & 0777), dir);
  if (access(dir, W_OK | X_OK) != 0) {
    int e = errno;
    return set_err(err, POET_E_IO, e, "spill directory '%s' is not writable: %s (errno %d)",
                   dir, errno_text(e, eb, sizeof eb), e);
  }
  return POET_OK;
}

int poet_spill_path(char *out, size_t out_len, const char *dir, int64_t pid,
                    uint64_t token, poet_err *err) {
  int n = snprintf(out, out_len, "%s/poet-%lld-%016llx.spill", dir, (long long)pid,
                   (unsigned long long)token);
  if (n < 0 || (size_t)n >= out_len)
    return set_err(err, POET_E_ARG, 0, "spill file path too long for directory '%s'", dir);
  return POET_OK;
}

static inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

uint64_t poet_new_token(void) {
  static uint64_t counter = 0;
  uint64_t c = __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED);
  struct timespec ts;
  uint64_t t, x;
  clock_gettime(CLOCK_REALTIME, &ts);
  t = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
  x = splitmix64(t ^ ((uint64_t)getpid() << 40) ^ (uint64_t)(uintptr_t)&counter);
  x = splitmix64(x + c * 0xD1B54A32D192ED03ULL);
  return x ? x : 1;
}

/* ------------------------------------------------------------------------ */
/* whole-file operations                                                    */

int poet_spill_write(const char *path, poet_spill_header *hdr, const void *payload,
                     int drop_cache, poet_err *err) {
  unsigned char hbuf[POET_SPILL_HEADER_BYTES];
  uint64_t nbytes = 0;
  char eb[256];
  int fd, rc;

  rc = poet_payload_bytes(hdr->dtype, hdr->rank, hdr->dims, &nbytes, err);
  if (rc != POET_OK) return rc;
  if (nbytes > (uint64_t)SIZE_MAX)
    return set_err(err, POET_E_ARG, 0, "tensor too large for this platform");
  if (nbytes > 0 && payload == NULL)
    return set_err(err, POET_E_ARG, 0, "NULL payload for %llu bytes", (unsigned long long)nbytes);
  hdr->version = POET_SPILL_VERSION;
  hdr->payload_bytes = nbytes;
  {
    unsigned char key[16];
    if (poet_mac_key(key) != 0)
      return set_err(err, POET_E_IO, ENOSYS, "cannot create spill file '%s': no random bytes for the "
                     "per-process MAC key (getrandom and /dev/urandom failed)", show_path(path));
  }
  hdr->checksum = poet_mac64(payload, (size_t)nbytes);
  poet_header_encode(hdr, hbuf);

  fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    int e = errno;
    return set_err(err, POET_E_IO, e, "cannot create spill file '%s': %s (errno %d)",
                   show_path(path), errno_text(e, eb, sizeof eb), e);
  }
  rc = poet_write_all(fd, hbuf, sizeof hbuf, path, err);
  if (rc == POET_OK) rc = poet_write_all(fd, payload, (size_t)nbytes, path, err);
  if (rc == POET_OK && drop_cache) {
    if (fdatasync(fd) != 0) {
      int e = errno;
      rc = set_err(err, POET_E_IO, e, "cannot flush spill file '%s': %s (errno %d)",
                   show_path(path), errno_text(e, eb, sizeof eb), e);
    } else {
      (void)posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    }
  }
  if (close(fd) != 0 && rc == POET_OK) {
    int e = errno;
    rc = set_err(err, POET_E_IO, e, "cannot close spill file '%s': %s (errno %d)",
                 show_path(path), errno_text(e, eb, sizeof eb), e);
  }
  if (rc != POET_OK) unlink(path);
  return rc;
}

int poet_spill_open(const char *path, poet_spill_reader *rd, poet_err *err) {
  unsigned char hbuf[POET_SPILL_HEADER_BYTES];
  struct stat st;
  char eb[256];
  int rc;
  size_t plen = strlen(path);

  rd->fd = -1;
  if (plen >= sizeof(rd->path))
    return set_err(err, POET_E_ARG, 0, "spill file path too long");
  memcpy(rd->path, path, plen + 1);
  rd->fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (rd->fd < 0) {
    int e = errno;
    if (e == ENOENT)
      return set_err(err, POET_E_IO, e, "spill file '%s' is missing: %s (errno %d); it was "
                     "deleted or never written", path, errno_text(e, eb, sizeof eb), e);
    if (e == ELOOP)
      return set_err(err, POET_E_UNSAFE, e, "spill file '%s' is a symbolic link; poetc does not "
                     "follow links in its spill directory (someone else replaced the file)", path);
    return set_err(err, POET_E_IO, e, "cannot open spill file '%s': %s (errno %d)", path,
                   errno_text(e, eb, sizeof eb), e);
  }
  if (fstat(rd->fd, &st) != 0) {
    int e = errno;
    rc = set_err(err, POET_E_IO, e, "cannot stat spill file '%s': %s (errno %d)", path,
                 errno_text(e, eb, sizeof eb), e);
    goto fail;
  }
  if (!S_ISREG(st.st_mode) || st.st_uid != geteuid()) {
    rc = set_err(err, POET_E_UNSAFE, 0, "spill file '%s' is %s; poetc restores only regular files "
                 "it wrote itself", path, !S_ISREG(st.st_mode) ? "not a regular file" :
                 "owned by another user");
    goto fail;
  }
  if ((uint64_t)st.st_size < POET_SPILL_HEADER_BYTES) {
    rc = set_err(err, POET_E_SHORT, 0, "spill file '%s' is truncated: %lld bytes, shorter "
                 "than the %d-byte header", path, (long long)st.st_size,
                 POET_SPILL_HEADER_BYTES);
    goto fail;
  }
  rc = poet_read_all(rd->fd, hbuf, sizeof hbuf, path, err);
  if (rc != POET_OK) goto fail;
  rc = poet_header_decode(hbuf, &rd->hdr, path, err);
  if (rc != POET_OK) goto fail;
  if ((uint64_t)st.st_size - POET_SPILL_HEADER_BYTES < rd->hdr.payload_bytes) {
    rc = set_err(err, POET_E_SHORT, 0, "spill file '%s' is truncated: %lld bytes, header "
                 "declares %llu payload bytes", path, (long long)st.st_size,
                 (unsigned long long)rd->hdr.payload_bytes);
    goto fail;
  }
  if ((uint64_t)st.st_size - POET_SPILL_HEADER_BYTES > rd->hdr.payload_bytes) {
    rc = set_err(err, POET_E_HEADER, 0, "spill file '%s' has %llu unexpected trailing bytes",
                 path, (unsigned long long)((uint64_t)st.st_size - POET_SPILL_HEADER_BYTES -
                                            rd->hdr.payload_bytes));
    goto fail;
  }
  (void)posix_fadvise(rd->fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  return POET_OK;
fail:
  close(rd->fd);
  rd->fd = -1;
  return rc;
}

int poet_spill_read_payload(poet_spill_reader *rd, void *dst, poet_err *err) {
  uint64_t sum;
  int rc;
  if (rd->hdr.payload_bytes > (uint64_t)SIZE_MAX)
    return set_err(err, POET_E_ARG, 0, "spill file '%s' payload too large for this platform",
                   rd->path);
  if (rd->hdr.payload_bytes > 0 && dst == NULL)
    return set_err(err, POET_E_ARG, 0, "NULL destination buffer");
  rc = poet_read_all(rd->fd, dst, (size_t)rd->hdr.payload_bytes, rd->path, err);
  if (rc != POET_OK) return rc;
  sum = poet_mac64(dst, (size_t)rd->hdr.payload_bytes);
  if (sum != rd->hdr.checksum)
    return set_err(err, POET_E_CHECKSUM, 0, "checksum mismatch in spill file '%s': stored "
                   "%016llx, computed %016llx over %llu bytes (keyed MAC: the data was corrupted "
                   "on storage, or the file was replaced by a writer other than this process)",
                   rd->path, (unsigned long long)rd->hdr.checksum, (unsigned long long)sum,
                   (unsigned long long)rd->hdr.payload_bytes);
  return POET_OK;
}

void poet_spill_reader_close(poet_spill_reader *rd, int unlink_file) {
  if (rd->fd >= 0) {
    (void)posix_fadvise(rd->fd, 0, 0, POSIX_FADV_DONTNEED);
    close(rd->fd);
    rd->fd = -1;
  }
  if (unlink_file) unlink(rd->path);
}
