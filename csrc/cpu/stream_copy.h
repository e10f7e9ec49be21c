// Streaming (non-temporal) copies, shared by runs.c and landing.c.
#ifndef KVLINK_STREAM_COPY_H
#define KVLINK_STREAM_COPY_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
#include <immintrin.h>
#endif

// Copy n bytes with non-temporal stores where the destination is aligned: a large copy then
// writes memory once instead of reading each line first (read-for-ownership).
static inline void copy_stream(char* dst, const char* src, size_t n) {
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

#endif
