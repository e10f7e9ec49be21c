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

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
#include <immintrin.h>
#endif

#define PIECE (64 << 10)
#define STREAM_MIN (256 << 10)  // below this total, regular stores (the bytes are likely read soon)

// Copy n bytes with non-temporal stores where the destination is aligned: a large copy then
// writes memory once instead of reading each line first (read-for-ownership).
static void copy_stream(char* dst, const char* src, size_t n) {
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
#if defined(__AVX512F__)
  const size_t W = 64;
#elif defined(__AVX2__)
  const size_t W = 32;
#else
  const size_t W = 16;
#endif
  size_t head = (W - ((uintptr_t)dst & (W - 1))) & (W - 1);
  if (head > n) head = n;
  memcpy(dst, src, head);
  dst += head; src += head; n -= head;
  size_t body = n & ~(W - 1);
  for (size_t i = 0; i < body; i += W) {
#if defined(__AVX512F__)
    _mm512_stream_si512((void*)(dst + i), _mm512_loadu_si512((const void*)(src + i)));
#elif defined(__AVX2__)
    _mm256_stream_si256((__m256i*)(dst + i), _mm256_loadu_si256((const __m256i*)(src + i)));
#else
    _mm_stream_si128((__m128i*)(dst + i), _mm_loadu_si128((const __m128i*)(src + i)));
#endif
  }
  memcpy(dst + body, src + body, n - body);
#else
  memcpy(dst, src, n);
#endif
}

static uint64_t run_job(const int64_t* src, const int64_t* dst, const int64_t* len, int64_t a, int64_t z,
                        int hash, int copy, int stream) {
  XXH3_state_t state;
  if (hash) XXH3_64bits_reset(&state);
  for (int64_t r = a; r < z; r++) {
    const char* s = (const char*)(intptr_t)src[r];
    char* d = (char*)(intptr_t)dst[r];
    size_t n = (size_t)len[r];
    for (size_t off = 0; off < n; off += PIECE) {
      size_t k = n - off < PIECE ? n - off : PIECE;
      if (hash) XXH3_64bits_update(&state, s + off, k);
      if (copy) {
        if (stream) copy_stream(d + off, s + off, k);
        else memcpy(d + off, s + off, k);
      }
    }
  }
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

// xxh3-64 of one buffer (the same value as the Python xxhash package's xxh3_64).
uint64_t kvlink_xxh3(const void* data, int64_t n) { return XXH3_64bits(data, (size_t)n); }
