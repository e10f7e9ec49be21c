// Copy runs with the checksum fused in: the bytes are hashed (xxh3-64) while they are in cache.
//
// A job is a list of runs (src, dst, len); its digest is xxh3-64 over the source bytes of its runs
// in order, which is the checksum of the segment the runs assemble (pack: cache rows -> a packed
// segment) or take apart (unpack: a segment -> cache rows). Each run is processed in pieces of
// PIECE bytes: hash the piece (it comes into L1/L2), then copy it from cache. Apart, a copy and a
// hash each read the bytes from memory; fused, they read them once.
//
// Jobs run in parallel on `threads` OpenMP threads (one job per thread at a time; the
// Python launcher makes one job per segment). Built on demand by kvlink/ops/native.py; the
// launcher (kvlink/ops/runs.py) builds every address from checked tensors and buffers.
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#define XXH_STATIC_LINKING_ONLY
#include "../third_party/xxhash/xxhash.h"
#include "stream_copy.h"  // copy_stream, and the intrinsics

#define PIECE (64 << 10)
#define STREAM_MIN (256 << 10)  // below this total, regular stores (the bytes are likely read soon)
#define NEXT_CELL_PREFETCH 1024  // bytes of the next block's row asked for ahead (gathers)


// Hash then copy n bytes, PIECE at a time, so the copy reads what the hash just brought into cache.
static void piece(XXH3_state_t* state, const char* s, char* d, size_t n, int hash, int copy, int stream) {
  for (size_t off = 0; off < n; off += PIECE) {
    size_t k = n - off < PIECE ? n - off : PIECE;
    if (hash) XXH3_64bits_update(state, s + off, k);
    if (copy) {
      if (stream) copy_stream(d + off, s + off, k);
      else memcpy(d + off, s + off, k);
    }
  }
}

static uint64_t run_job(const int64_t* src, const int64_t* dst, const int64_t* len, int64_t a, int64_t z,
                        int hash, int copy, int stream) {
  XXH3_state_t state;
  if (hash) XXH3_64bits_reset(&state);
  for (int64_t r = a; r < z; r++)
    piece(&state, (const char*)(intptr_t)src[r], (char*)(intptr_t)dst[r], (size_t)len[r], hash, copy, stream);
#if defined(__SSE2__)
  if (copy && stream) _mm_sfence();  // streamed stores are visible before the job is reported done
#endif
  return hash ? XXH3_64bits_digest(&state) : 0;
}

// starts has njobs + 1 entries: job j is runs [starts[j], starts[j + 1]).
// flags: 1 = hash (digests[j] gets the digest), 2 = copy, 4 = non-temporal stores for large jobs.
void kvlink_copy_runs(const int64_t* src, const int64_t* dst, const int64_t* len, const int64_t* starts,
                      int64_t njobs, uint64_t* digests, int flags, int threads) {
  int hash = flags & 1, copy = (flags >> 1) & 1, stream = (flags >> 2) & 1;
  if (threads < 1) threads = 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && njobs > 1)
  for (int64_t j = 0; j < njobs; j++) {
    int64_t total = 0;
    for (int64_t r = starts[j]; r < starts[j + 1]; r++) total += len[r];
    uint64_t h = run_job(src, dst, len, starts[j], starts[j + 1], hash, copy, stream && total >= STREAM_MIN);
    if (hash) digests[j] = h;
  }
}

// Plane jobs: a packed segment <-> token rows of a paged plane, described by 8 int64 per job:
//   flat      address of the packed segment
//   base      address of the plane (block 0)
//   stride    bytes from one block's row to the next
//   row       bytes of one block's row that hold tokens (block_size * bytes per token)
//   skip      bytes of the first block's row before the segment's first token
//   length    bytes of the segment
//   ids       index into `ids` of the segment's first block id
//   scatter   0: rows -> packed (pack), 1: packed -> rows (unpack)
// The digest is xxh3-64 of the packed segment either way: the rows are hashed in token order.
void kvlink_plane_runs(const int64_t* desc, int64_t njobs, const int64_t* ids, uint64_t* digests, int flags,
                       int threads) {
  int hash = flags & 1, copy = (flags >> 1) & 1, stream = (flags >> 2) & 1;
  if (threads < 1) threads = 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && njobs > 1)
  for (int64_t j = 0; j < njobs; j++) {
    const int64_t* d = desc + j * 8;
    char* flat = (char*)(intptr_t)d[0];
    const char* base = (const char*)(intptr_t)d[1];
    int64_t stride = d[2], row = d[3], pos = d[4], left = d[5];
    const int64_t* block = ids + d[6];
    int scatter = (int)d[7], st = stream && left >= STREAM_MIN;
    XXH3_state_t state;
    if (hash) XXH3_64bits_reset(&state);
    while (left > 0) {
      int64_t n = row - pos < left ? row - pos : left;
      char* cell = (char*)base + *block * stride + pos;
      if (!scatter && left > n) {
        // Gathering, the next cell is another block's row somewhere else: ask for its first
        // lines now, so the hardware prefetcher is streaming it by the time this one is done
        // (measured on the host-tier store: 0.89x -> 0.93x of memcpy; 1 KiB did as well as 16).
        const char* next = base + block[1] * stride;
        int64_t ahead = row < NEXT_CELL_PREFETCH ? row : NEXT_CELL_PREFETCH;
        for (int64_t k = 0; k < ahead; k += 64) __builtin_prefetch(next + k, 0, 3);
      }
      if (scatter) piece(&state, flat, cell, (size_t)n, hash, copy, st);
      else piece(&state, cell, flat, (size_t)n, hash, copy, st);
      flat += n;
      left -= n;
      pos = 0;
      block++;
    }
#if defined(__SSE2__)
    if (copy && st) _mm_sfence();
#endif
    if (hash) digests[j] = XXH3_64bits_digest(&state);
  }
}

// xxh3-64 of one buffer (the same value as the Python xxhash package's xxh3_64).
uint64_t kvlink_xxh3(const void* data, int64_t n) { return XXH3_64bits(data, (size_t)n); }
