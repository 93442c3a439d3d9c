/*
 * heap_counter.c -- LD_PRELOAD heap instrument for poetc measurements.
 *
 * Wraps malloc, calloc, realloc, reallocarray, free, posix_memalign, memalign,
 * aligned_alloc, valloc and pvalloc, forwarding to the next definition
 * (glibc) and keeping a live-byte count of malloc_usable_size() of every
 * block plus its high-water mark.  Exported for ctypes
 * (ctypes.CDLL(None) finds them once the library is preloaded):
 *
 *   void     poetc_heap_reset_peak(void);    peak := current (both counters below)
 *   uint64_t poetc_heap_peak_bytes(void);
 *   uint64_t poetc_heap_current_bytes(void);
 *   uint64_t poetc_heap_large_peak_bytes(void);     the same, blocks >= 65536 bytes only, in pages
 *   uint64_t poetc_heap_large_current_bytes(void);
 *   uint64_t poetc_heap_mid_peak_bytes(void);       the same, blocks >= 4096 bytes, in pages (kernel
 *   uint64_t poetc_heap_mid_current_bytes(void);    scratch below 64 KiB: poetc.runtime.workspace)
 *   uint64_t poetc_heap_alloc_count(void);   calls that returned a block
 *   int      poetc_heap_active(void);        1 once the real allocator is bound
 *
 * Thread-safe: counters are updated with atomics; the peak with a CAS loop.
 * No recursion: the real functions are found with dlsym(RTLD_NEXT) in a
 * constructor; allocations made while dlsym itself allocates are served from
 * a static bootstrap buffer and never returned to glibc.
 *
 * Counted bytes are usable sizes, i.e. what the allocator actually hands
 * out; chunk headers and allocator metadata are not counted.  Blocks that
 * existed before the counter was bound (none in practice for LD_PRELOAD)
 * would make "current" drift low, so current is clamped at 0 when read.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

typedef void *(*malloc_fn)(size_t);
typedef void *(*calloc_fn)(size_t, size_t);
typedef void *(*realloc_fn)(void *, size_t);
typedef void (*free_fn)(void *);
typedef int (*posix_memalign_fn)(void **, size_t, size_t);
typedef void *(*memalign_fn)(size_t, size_t);
typedef void *(*aligned_alloc_fn)(size_t, size_t);

static malloc_fn real_malloc;
static calloc_fn real_calloc;
static realloc_fn real_realloc;
static free_fn real_free;
static posix_memalign_fn real_posix_memalign;
static memalign_fn real_memalign;
static aligned_alloc_fn real_aligned_alloc;

static int64_t g_current;   /* live usable bytes */
static int64_t g_peak;      /* high-water mark of g_current */
/* The same for blocks of at least LARGE_BLOCK bytes only, in whole pages: tensors and kernel
 * scratch, without the small bookkeeping allocations whose sizes vary from run to run. */
#define LARGE_BLOCK 65536
static int64_t g_large_current;
static int64_t g_large_peak;
/* Blocks of at least MID_BLOCK bytes (including the large ones), in whole pages: application buffers
 * (ORT tensors, kernel scratch) whose page count is the same from run to run, unlike the small
 * bookkeeping blocks below it. */
#define MID_BLOCK 4096
static int64_t g_mid_current;
static int64_t g_mid_peak;
static uint64_t g_allocs;   /* successful allocation calls */
static int g_bound;         /* real functions resolved */
static int g_binding;       /* inside bind_real() */

/* ---- bootstrap arena for allocations made by dlsym during binding -------- */
#define BOOT_BYTES (64 * 1024)
static unsigned char g_boot[BOOT_BYTES] __attribute__((aligned(64)));
static size_t g_boot_used;

static int is_boot(const void *p) {
  return (const unsigned char *)p >= g_boot && (const unsigned char *)p < g_boot + BOOT_BYTES;
}

/* Layout of a bootstrap block: [size_t size][pad to 16] data */
static void *boot_alloc(size_t n, size_t align) {
  size_t hdr = 16, start, end;
  if (align < 16) align = 16;
  start = __atomic_load_n(&g_boot_used, __ATOMIC_RELAXED);
  for (;;) {
    size_t data = (start + hdr + align - 1) & ~(align - 1);
    end = data + ((n + 15) & ~(size_t)15);
    if (end > BOOT_BYTES) return NULL;
    if (__atomic_compare_exchange_n(&g_boot_used, &start, end, 0, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED)) {
      memcpy(g_boot + data - sizeof(size_t), &n, sizeof(size_t));
      return g_boot + data; /* static storage is zeroed and never reused */
    }
  }
}

static size_t boot_size(const void *p) {
  size_t n;
  memcpy(&n, (const unsigned char *)p - sizeof(size_t), sizeof(size_t));
  return n;
}

static void bind_real(void) {
  if (__atomic_load_n(&g_bound, __ATOMIC_ACQUIRE)) return;
  g_binding = 1;
  real_malloc = (malloc_fn)dlsym(RTLD_NEXT, "malloc");
  real_calloc = (calloc_fn)dlsym(RTLD_NEXT, "calloc");
  real_realloc = (realloc_fn)dlsym(RTLD_NEXT, "realloc");
  real_free = (free_fn)dlsym(RTLD_NEXT, "free");
  real_posix_memalign = (posix_memalign_fn)dlsym(RTLD_NEXT, "posix_memalign");
  real_memalign = (memalign_fn)dlsym(RTLD_NEXT, "memalign");
  real_aligned_alloc = (aligned_alloc_fn)dlsym(RTLD_NEXT, "aligned_alloc");
  g_binding = 0;
  if (real_malloc && real_calloc && real_realloc && real_free && real_posix_memalign &&
      real_memalign && real_aligned_alloc)
    __atomic_store_n(&g_bound, 1, __ATOMIC_RELEASE);
}

__attribute__((constructor)) static void heap_counter_init(void) { bind_real(); }

/* Returns 1 if the real allocator can be used, else 0 (serve from boot). */
static int ready(void) {
  if (__atomic_load_n(&g_bound, __ATOMIC_ACQUIRE)) return 1;
  if (g_binding) return 0;
  bind_real();
  return __atomic_load_n(&g_bound, __ATOMIC_ACQUIRE);
}

/* ---- accounting ---------------------------------------------------------- */

/* Large blocks count in whole pages: glibc serves one either from a free heap chunk (usable size the
 * request plus a few bytes) or by mmap (the request plus header, rounded to pages), depending on the
 * heap's history, and both round up to the same number of pages. */
static inline int64_t page_round(int64_t n) { return (n + 4095) & ~(int64_t)4095; }

static inline void raise_peak(int64_t *peak_var, int64_t cur) {
  int64_t peak = __atomic_load_n(peak_var, __ATOMIC_RELAXED);
  while (cur > peak &&
         !__atomic_compare_exchange_n(peak_var, &peak, cur, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

static inline void account_add(void *p) {
  int64_t n;
  if (!p) return;
  n = (int64_t)malloc_usable_size(p);
  __atomic_add_fetch(&g_allocs, 1, __ATOMIC_RELAXED);
  raise_peak(&g_peak, __atomic_add_fetch(&g_current, n, __ATOMIC_RELAXED));
  if (n >= LARGE_BLOCK)
    raise_peak(&g_large_peak, __atomic_add_fetch(&g_large_current, page_round(n), __ATOMIC_RELAXED));
  if (n >= MID_BLOCK)
    raise_peak(&g_mid_peak, __atomic_add_fetch(&g_mid_current, page_round(n), __ATOMIC_RELAXED));
}

static inline void account_sub_size(size_t n) {
  __atomic_sub_fetch(&g_current, (int64_t)n, __ATOMIC_RELAXED);
  if ((int64_t)n >= LARGE_BLOCK) __atomic_sub_fetch(&g_large_current, page_round((int64_t)n), __ATOMIC_RELAXED);
  if ((int64_t)n >= MID_BLOCK) __atomic_sub_fetch(&g_mid_current, page_round((int64_t)n), __ATOMIC_RELAXED);
}

/* ---- exported counters --------------------------------------------------- */

/* a counter's value as bytes (a transient negative reads as 0) */
static uint64_t load_bytes(const int64_t *counter) {
  int64_t v = __atomic_load_n(counter, __ATOMIC_RELAXED);
  return v < 0 ? 0 : (uint64_t)v;
}

EXPORT void poetc_heap_reset_peak(void) {
  int64_t cur = __atomic_load_n(&g_current, __ATOMIC_RELAXED);
  int64_t large = __atomic_load_n(&g_large_current, __ATOMIC_RELAXED);
  __atomic_store_n(&g_peak, cur < 0 ? 0 : cur, __ATOMIC_RELAXED);
  int64_t mid = __atomic_load_n(&g_mid_current, __ATOMIC_RELAXED);
  __atomic_store_n(&g_large_peak, large < 0 ? 0 : large, __ATOMIC_RELAXED);
  __atomic_store_n(&g_mid_peak, mid < 0 ? 0 : mid, __ATOMIC_RELAXED);
}

EXPORT uint64_t poetc_heap_mid_peak_bytes(void) { return load_bytes(&g_mid_peak); }

EXPORT uint64_t poetc_heap_mid_current_bytes(void) { return load_bytes(&g_mid_current); }

EXPORT uint64_t poetc_heap_large_peak_bytes(void) { return load_bytes(&g_large_peak); }

EXPORT uint64_t poetc_heap_large_current_bytes(void) { return load_bytes(&g_large_current); }

EXPORT uint64_t poetc_heap_peak_bytes(void) { return load_bytes(&g_peak); }

EXPORT uint64_t poetc_heap_current_bytes(void) { return load_bytes(&g_current); }

EXPORT uint64_t poetc_heap_alloc_count(void) {
  return __atomic_load_n(&g_allocs, __ATOMIC_RELAXED);
}

EXPORT int poetc_heap_active(void) { return __atomic_load_n(&g_bound, __ATOMIC_ACQUIRE); }

/* ---- interposed allocator ------------------------------------------------ */

EXPORT void *malloc(size_t n) {
  void *p;
  if (!ready()) return boot_alloc(n, 16);
  p = real_malloc(n);
  account_add(p);
  return p;
}

EXPORT void *calloc(size_t nmemb, size_t size) {
  void *p;
  if (!ready()) {
    if (size && nmemb > SIZE_MAX / size) return NULL;
    return boot_alloc(nmemb * size, 16);
  }
  p = real_calloc(nmemb, size);
  account_add(p);
  return p;
}

EXPORT void free(void *p) {
  if (!p || is_boot(p)) return;
  if (!ready()) return; /* cannot happen for blocks we handed out */
  account_sub_size(malloc_usable_size(p));
  real_free(p);
}

EXPORT void *realloc(void *p, size_t n) {
  void *q;
  size_t old;
  if (p && is_boot(p)) {
    size_t keep = boot_size(p);
    q = malloc(n);
    if (q) memcpy(q, p, keep < n ? keep : n);
    return q;
  }
  if (!ready()) return p ? NULL : boot_alloc(n, 16);
  if (!p) return malloc(n);
  old = malloc_usable_size(p);
  q = real_realloc(p, n);
  if (q) {
    account_sub_size(old);
    account_add(q);
  } else if (n == 0) {
    account_sub_size(old); /* glibc realloc(p, 0) frees p and returns NULL */
  }
  return q;
}

EXPORT void *reallocarray(void *p, size_t nmemb, size_t size) {
  if (size && nmemb > SIZE_MAX / size) {
    errno = ENOMEM;
    return NULL;
  }
  return realloc(p, nmemb * size);
}

EXPORT int posix_memalign(void **out, size_t align, size_t n) {
  int rc;
  if (!ready()) {
    void *p;
    if (align == 0 || (align & (align - 1)) || align % sizeof(void *)) return EINVAL;
    p = boot_alloc(n, align);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
  }
  rc = real_posix_memalign(out, align, n);
  if (rc == 0) account_add(*out);
  return rc;
}

EXPORT void *memalign(size_t align, size_t n) {
  void *p;
  if (!ready()) return boot_alloc(n, align);
  p = real_memalign(align, n);
  account_add(p);
  return p;
}

EXPORT void *aligned_alloc(size_t align, size_t n) {
  void *p;
  if (!ready()) return boot_alloc(n, align);
  p = real_aligned_alloc(align, n);
  account_add(p);
  return p;
}

EXPORT void *valloc(size_t n) { return memalign((size_t)sysconf(_SC_PAGESIZE), n); }

EXPORT void *pvalloc(size_t n) {
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  size_t rounded = (n + page - 1) & ~(page - 1);
  if (rounded < n) {
    errno = ENOMEM;
    return NULL;
  }
  return memalign(page, rounded ? rounded : page);
}
