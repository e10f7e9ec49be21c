// Landing received bytes with their hash taken on the way: a receiving socket's bytes go through
// a small bounce buffer that stays in the reader core's cache, are hashed there (xxh3-64 into a
// running state) and are then written to their destination with non-temporal stores.
//
// Why not recv straight into the destination and hash it there: on a large frame the kernel's
// copy has pushed the first bytes out of cache before the hash reads them, so the hash is a
// second pass over memory (~12 GB/s on the 2-core VM, against ~60 GB/s from L2); and a store to
// a cold destination first reads each line from memory (read-for-ownership), which streaming
// stores skip. Measured with raw sockets on loopback, 4 connections, 2 cores (docs/transport.md):
// hashing in place ran at 0.86-0.89x of not hashing, this path at 0.93-1.00x.
//
// Built on demand with runs.c by kvlink/ops/native.py; the launcher (kvlink/ops/landing.py)
// passes only addresses of buffers it checked, and a socket it owns.
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#define XXH_INLINE_ALL
#define XXH_STATIC_LINKING_ONLY
#include "../third_party/xxhash/xxhash.h"
#include "stream_copy.h"

#define LAND_PIECE (64 << 10)   // hash a piece, then store it, while it is in L1/L2
#define LAND_STREAM_MIN (16 << 10)  // smaller landings use plain stores

// ---- a running xxh3-64 kept in caller-owned memory (size and alignment from the functions below)
int64_t kvlink_xxh3_state_size(void) { return (int64_t)sizeof(XXH3_state_t); }
int64_t kvlink_xxh3_state_align(void) { return (int64_t)_Alignof(XXH3_state_t); }
void kvlink_xxh3_reset(void* state) { XXH3_64bits_reset((XXH3_state_t*)state); }
void kvlink_xxh3_update(void* state, const void* data, int64_t n) {
  XXH3_64bits_update((XXH3_state_t*)state, data, (size_t)n);
}
uint64_t kvlink_xxh3_digest(const void* state) { return XXH3_64bits_digest((const XXH3_state_t*)state); }

// Receive up to n bytes (n > 0) from the non-blocking socket fd into dst, through bounce
// (bounce_len bytes), hashing them into state unless it is NULL. Reads until n bytes are in or
// the socket has nothing more right now.
// Returns the bytes landed (> 0); 0 when the peer closed with nothing landed; -errno when nothing
// landed (-EAGAIN: wait until readable). An error or close after some bytes is reported by the
// next call.
int64_t kvlink_recv_land(int fd, char* dst, int64_t n, char* bounce, int64_t bounce_len, void* state) {
  int64_t got = 0;
  int streamed = 0;
  while (got < n) {
    size_t want = (size_t)(n - got < bounce_len ? n - got : bounce_len);
    ssize_t k = recv(fd, bounce, want, MSG_DONTWAIT);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) {
      if (got) break;
      return k == 0 ? 0 : -(int64_t)errno;
    }
    int stream = k >= LAND_STREAM_MIN;
    streamed |= stream;
    for (ssize_t off = 0; off < k; off += LAND_PIECE) {
      size_t m = (size_t)(k - off < LAND_PIECE ? k - off : LAND_PIECE);
      if (state) XXH3_64bits_update((XXH3_state_t*)state, bounce + off, m);
      if (stream) copy_stream(dst + got + off, bounce + off, m);
      else memcpy(dst + got + off, bounce + off, m);
    }
    got += k;
  }
#if defined(__SSE2__)
  if (streamed) _mm_sfence();  // the streamed stores are visible before the caller reports them landed
#endif
  return got;
}
