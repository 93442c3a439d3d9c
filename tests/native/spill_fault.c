/*
 * spill_fault.c -- test-only LD_PRELOAD shim: damages a poetc spill file between Spill and Restore.
 *
 * It wraps open()/open64(): when a file whose name ends in ".spill" is opened read-only (that is
 * Restore, io_core.c's poet_spill_open), it first applies POETC_TEST_SPILL_FAULT to it:
 *   delete   unlink the file
 *   corrupt  flip one payload byte (the last byte of the file)
 * then performs the real open. Two more modes act on every `.spill` open, reads and writes:
 *   slow       sleep POETC_TEST_SPILL_DELAY_MS (default 150) milliseconds first (slow storage)
 *   failwrite  a create (O_CREAT) fails with EIO (a write that fails on the I/O thread)
 * Nothing else is touched. Used by tests/test_spill_faults.py and tests/test_async_ops.py.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef int (*open_fn)(const char *, int, ...);

/* 0: go on with the real open; -1: fail it (errno set) */
static int damage(const char *path, int flags) {
  const char *fault = getenv("POETC_TEST_SPILL_FAULT");
  size_t n = path ? strlen(path) : 0;
  if (!fault || n < 6 || strcmp(path + n - 6, ".spill") != 0) return 0;
  if (strcmp(fault, "slow") == 0) {
    const char *ms = getenv("POETC_TEST_SPILL_DELAY_MS");
    usleep((useconds_t)((ms && *ms ? atoi(ms) : 150) * 1000));
    return 0;
  }
  if (strcmp(fault, "failwrite") == 0) {
    if (flags & O_CREAT) {
      errno = EIO;
      return -1;
    }
    return 0;
  }
  if ((flags & O_ACCMODE) != O_RDONLY) return 0;
  if (strcmp(fault, "delete") == 0) {
    unlink(path);
  } else if (strcmp(fault, "corrupt") == 0) {
    open_fn real = (open_fn)dlsym(RTLD_NEXT, "open");
    int fd = real(path, O_RDWR);
    struct stat st;
    if (fd >= 0 && fstat(fd, &st) == 0 && st.st_size > 0) {
      unsigned char b;
      if (pread(fd, &b, 1, st.st_size - 1) == 1) {
        b ^= 0x5a;
        (void)pwrite(fd, &b, 1, st.st_size - 1);
      }
    }
    if (fd >= 0) close(fd);
  }
  return 0;
}

#define WRAP(name)                                                  \
  int name(const char *path, int flags, ...) {                      \
    mode_t mode = 0;                                                \
    if (flags & (O_CREAT | O_TMPFILE)) {                            \
      va_list ap;                                                   \
      va_start(ap, flags);                                          \
      mode = (mode_t)va_arg(ap, int);                               \
      va_end(ap);                                                   \
    }                                                               \
    if (damage(path, flags) < 0) return -1;                         \
    return ((open_fn)dlsym(RTLD_NEXT, #name))(path, flags, mode);   \
  }

WRAP(open)
WRAP(open64)
