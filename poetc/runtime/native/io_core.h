/*
 * io_core.h -- spill-file format and I/O core for poetc's Spill/Restore ops.
 *
 * Plain C (C11 + POSIX), no ONNX Runtime dependency, so that it can be unit
 * tested natively and under qemu-aarch64 (see test_io_core.c).
 *
 * File layout (all integers little-endian, independent of host byte order):
 *
 *   offset  size  field
 *        0     8  magic "POETSPL\0"
 *        8     4  u32 format version (POET_SPILL_VERSION)
 *       12     4  i32 ONNX TensorProto element type
 *       16     4  u32 rank (<= POET_SPILL_MAX_RANK)
 *       20     4  u32 reserved, must be 0
 *       24     8  u64 payload byte count
 *       32     8  u64 payload MAC: poet_mac64 (SipHash-2-4) over the payload
 *       40     8  u64 token (the id that also names the file)
 *       48   128  i64 dims[16] (unused entries are 0)
 *      176     8  u64 header MAC: poet_mac64 over bytes [0, 176)
 *      184     .  payload (raw tensor bytes, host layout)
 *
 * Both MACs are keyed with a 128-bit key drawn from getrandom(2) once per
 * process (poet_mac_key), never written anywhere: a spill file authenticates
 * only in the process that wrote it.  A file replaced, forged or corrupted
 * by anyone else fails Restore.  Spill directories must be private: owned
 * by the effective user, not a symlink, no group/other permissions
 * (poet_ensure_dir); files are opened with O_NOFOLLOW.
 *
 * Every function reports failure through a poet_err (errno-style code plus a
 * human readable message naming the file and the problem) and never aborts.
 */
#ifndef POETC_IO_CORE_H
#define POETC_IO_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

#define POET_SPILL_MAGIC "POETSPL"      /* 7 chars + NUL = 8 bytes on disk */
#define POET_SPILL_VERSION 2u
#define POET_SPILL_MAX_RANK 16
#define POET_SPILL_HEADER_BYTES 184
#define POET_ERR_MSG_BYTES 1024
#define POET_PATH_BYTES 4096

/* ONNX TensorProto.DataType values the spill format accepts. */
enum {
  POET_DT_FLOAT = 1,
  POET_DT_UINT8 = 2,
  POET_DT_INT8 = 3,
  POET_DT_INT32 = 6,
  POET_DT_INT64 = 7,
  POET_DT_BOOL = 9,
  POET_DT_FLOAT16 = 10,
  POET_DT_DOUBLE = 11
};

/* Problem classes (stored in poet_err.kind) so callers and tests can tell
 * failures apart without parsing messages. */
typedef enum {
  POET_OK = 0,
  POET_E_IO = 1,          /* a system call failed; poet_err.sys_errno is set */
  POET_E_SHORT = 2,       /* file shorter than header + payload */
  POET_E_MAGIC = 3,       /* not a spill file */
  POET_E_VERSION = 4,     /* unknown format version */
  POET_E_HEADER = 5,      /* header checksum or field validation failed */
  POET_E_MISMATCH = 6,    /* dtype / shape / token differs from the expected */
  POET_E_CHECKSUM = 7,    /* payload checksum mismatch */
  POET_E_ARG = 8,         /* invalid argument (unsupported dtype, rank, ...) */
  POET_E_UNSAFE = 9       /* spill directory or file not private to this user */
} poet_err_kind;

typedef struct {
  int kind;       /* poet_err_kind */
  int sys_errno;  /* errno for POET_E_IO, else 0 */
  char msg[POET_ERR_MSG_BYTES];
} poet_err;

typedef struct {
  uint32_t version;
  int32_t dtype;
  uint32_t rank;
  uint64_t payload_bytes;
  uint64_t checksum;
  uint64_t token;
  int64_t dims[POET_SPILL_MAX_RANK];
} poet_spill_header;

/* Open spill file being restored. */
typedef struct {
  int fd;
  char path[POET_PATH_BYTES];
  poet_spill_header hdr;
} poet_spill_reader;

/* Byte size of one element of an accepted dtype; 0 if unsupported. */
size_t poet_dtype_size(int32_t dtype);
/* Short lowercase name ("float", "int64", ...); "unsupported" otherwise. */
const char *poet_dtype_name(int32_t dtype);

/* 64-bit payload checksum: the xxHash64 algorithm (4 multiply-rotate lanes
 * over 32-byte stripes, little-endian loads, so the value is the same on
 * every host; equal to the reference XXH64).  Runs at memory speed. */
uint64_t poet_hash64(const void *data, size_t len, uint64_t seed);

/* Keyed 64-bit MAC: SipHash-2-4 with the per-process key (see poet_mac_key). */
uint64_t poet_mac64(const void *data, size_t len);
/* SipHash-2-4 with an explicit 16-byte key (reference test vectors). */
uint64_t poet_siphash24(const unsigned char key[16], const void *data, size_t len);
/* The per-process key: 16 random bytes from getrandom(2) on first use.
 * Returns 0 on success, -1 if no randomness is available (then nothing can
 * be spilled).  Thread-safe. */
int poet_mac_key(unsigned char out[16]);
/* Test hook: use `key` instead of a random one (NULL: draw a fresh random
 * key).  Only meant for test_io_core.c. */
void poet_mac_set_key(const unsigned char key[16]);

/* Element count and byte size for a dtype/shape; POET_E_ARG on overflow,
 * negative dims, rank too large or unsupported dtype. */
int poet_payload_bytes(int32_t dtype, uint32_t rank, const int64_t *dims,
                       uint64_t *out_bytes, poet_err *err);

void poet_header_encode(const poet_spill_header *hdr,
                        unsigned char out[POET_SPILL_HEADER_BYTES]);
/* Decodes and validates magic, version, header checksum, rank, dtype, dims
 * and payload size.  `path` is only used in error messages (may be NULL). */
int poet_header_decode(const unsigned char in[POET_SPILL_HEADER_BYTES],
                       poet_spill_header *hdr, const char *path, poet_err *err);

/* Write/read loops: retry on EINTR, continue after short transfers.  A write
 * returning 0 is reported as ENOSPC; a read returning 0 before `len` bytes is
 * POET_E_SHORT.  `path` is only used in messages. */
int poet_write_all(int fd, const void *buf, size_t len, const char *path,
                   poet_err *err);
int poet_read_all(int fd, void *buf, size_t len, const char *path,
                  poet_err *err);

/* Test hooks: replace the write(2)/read(2) used by the loops (NULL restores
 * the system call).  Only meant for test_io_core.c. */
typedef ssize_t (*poet_write_fn)(int, const void *, size_t);
typedef ssize_t (*poet_read_fn)(int, void *, size_t);
void poet_io_set_hooks(poet_write_fn w, poet_read_fn r);

/* mkdir -p with mode 0700 for missing components, then checks the last one
 * is private: a directory (not a symlink) owned by the effective user with
 * no group/other permission bits; POET_E_UNSAFE otherwise. */
int poet_ensure_dir(const char *dir, poet_err *err);

/* "<dir>/poet-<pid>-<token as 16 hex digits>.spill" */
int poet_spill_path(char *out, size_t out_len, const char *dir, int64_t pid,
                    uint64_t token, poet_err *err);

/* A fresh token: per-process counter mixed with the clock, pid and address
 * entropy through splitmix64; never 0. Thread-safe. */
uint64_t poet_new_token(void);

/* Creates `path` exclusively (O_EXCL, mode 0600), writes header + payload,
 * fills hdr->checksum/payload_bytes/version.  If drop_cache is non-zero the
 * data is fdatasync'ed and POSIX_FADV_DONTNEED is advised so the file does
 * not stay in the page cache.  On any failure the partial file is removed. */
int poet_spill_write(const char *path, poet_spill_header *hdr,
                     const void *payload, int drop_cache, poet_err *err);

/* Opens and validates the header and the file size.  On success the reader
 * owns an open fd; release with poet_spill_reader_close. */
int poet_spill_open(const char *path, poet_spill_reader *rd, poet_err *err);

/* Reads exactly rd->hdr.payload_bytes into dst and verifies the checksum. */
int poet_spill_read_payload(poet_spill_reader *rd, void *dst, poet_err *err);

/* Closes the fd; if unlink_file, removes the file (errors ignored). */
void poet_spill_reader_close(poet_spill_reader *rd, int unlink_file);

#ifdef __cplusplus
}
#endif
#endif /* POETC_IO_CORE_H */
