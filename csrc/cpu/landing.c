// Landing received bytes with their hash taken on the way: a receiving socket's bytes go through
// a small bounce buffer that stays in the reader core's cache, and one pass over them there both
// hashes them (xxh3-64 into a running state) and writes them to their destination with
// non-temporal stores.
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

#define LAND_STREAM_MIN (16 << 10)  // smaller landings use plain stores

// ---- hashing and streaming in one pass
// XXH3 reads its input in 64-byte stripes. Each stripe it takes also stores one destination cache
// line with a streaming store, loaded from the bounce buffer at the line's offset (an L1 hit: the
// line overlaps the stripe just hashed). Each byte is read once from L2 and the hash's arithmetic
// overlaps the stores' drain to memory, at any alignment of the destination. Measured with perf on
// the 2-core VM's receiver, per 293 MiB transfer: 21.5-22.2 ms in the landing, against 26.2 ms
// hashing a 64 KiB piece, then streaming it. hash_and_stream is XXH3_update (xxhash.h 0.8) step for
// step with the stores added; tests check its digests against xxhash's at several alignments.
#if defined(__SSE2__)
#define LAND_FUSED 1

typedef struct {
  ptrdiff_t delta;    // destination minus source
  size_t skew;        // from a stripe to the source of the aligned line it stores
  const xxh_u8* end;  // lines reaching past the input are left to the caller
} line_sink;

static inline void store_line(xxh_u8* dst, const xxh_u8* src) {
#if defined(__AVX512F__)
  _mm512_stream_si512((void*)dst, _mm512_loadu_si512((const void*)src));
#elif defined(__AVX2__)
  _mm256_stream_si256((__m256i*)dst, _mm256_loadu_si256((const __m256i*)src));
  _mm256_stream_si256((__m256i*)(dst + 32), _mm256_loadu_si256((const __m256i*)(src + 32)));
#else
  for (int i = 0; i < 64; i += 16)
    _mm_stream_si128((__m128i*)(dst + i), _mm_loadu_si128((const __m128i*)(src + i)));
#endif
}

static inline void accumulate_and_store(xxh_u64* XXH_RESTRICT acc, const xxh_u8* XXH_RESTRICT in,
                                        const xxh_u8* XXH_RESTRICT secret, size_t nb_stripes,
                                        const line_sink* sink) {
  for (size_t n = 0; n < nb_stripes; n++) {
    const xxh_u8* stripe = in + n * XXH_STRIPE_LEN;
    XXH3_accumulate_512(acc, stripe, secret + n * XXH_SECRET_CONSUME_RATE);
    const xxh_u8* line = stripe + sink->skew;
    if (line + 64 <= sink->end) store_line((xxh_u8*)line + sink->delta, line);
  }
}

// XXH3_consumeStripes, storing a line per stripe.
static const xxh_u8* consume_and_store(xxh_u64* XXH_RESTRICT acc, XXH3_state_t* state, const xxh_u8* in,
                                       size_t nb_stripes, const xxh_u8* secret, const line_sink* sink) {
  size_t per_block = state->nbStripesPerBlock;
  const xxh_u8* first_secret = secret + state->nbStripesSoFar * XXH_SECRET_CONSUME_RATE;
  if (nb_stripes >= per_block - state->nbStripesSoFar) {
    size_t k = per_block - state->nbStripesSoFar;  // the rest of the block under way, then whole blocks
    do {
      accumulate_and_store(acc, in, first_secret, k, sink);
      XXH3_scrambleAcc(acc, secret + state->secretLimit);
      in += k * XXH_STRIPE_LEN;
      nb_stripes -= k;
      k = per_block;
      first_secret = secret;
    } while (nb_stripes >= per_block);
    state->nbStripesSoFar = 0;
  }
  if (nb_stripes > 0) {
    accumulate_and_store(acc, in, first_secret, nb_stripes, sink);
    in += nb_stripes * XXH_STRIPE_LEN;
    state->nbStripesSoFar += nb_stripes;
  }
  return in;
}
#endif

// Hash n bytes of src into state and store them at dst, streaming the destination's whole lines.
static void hash_and_stream(XXH3_state_t* state, xxh_u8* dst, const xxh_u8* src, size_t n) {
#if defined(LAND_FUSED)
  size_t buffered = state->bufferedSize;
  if (n > XXH3_INTERNALBUFFER_SIZE - buffered) {  // else XXH3 only keeps the bytes back
    const xxh_u8* secret = state->extSecret == NULL ? state->customSecret : state->extSecret;
    const xxh_u8* in = src;
    const xxh_u8* end = src + n;
    const xxh_u8* stored = end;  // the lines stored: [stored, stored_end)
    const xxh_u8* stored_end = end;
    XXH_ALIGN(XXH_ACC_ALIGN) xxh_u64 acc[XXH_ACC_NB];
    memcpy(acc, state->acc, sizeof(acc));
    state->totalLen += n;
    if (buffered) {  // complete the bytes XXH3 kept back to whole stripes and take them
      size_t lead = XXH3_INTERNALBUFFER_SIZE - buffered;
      memcpy(state->buffer + buffered, in, lead);
      in += lead;
      XXH3_consumeStripes(acc, &state->nbStripesSoFar, state->nbStripesPerBlock, state->buffer,
                          XXH3_INTERNALBUFFER_SIZE / XXH_STRIPE_LEN, secret, state->secretLimit,
                          XXH3_accumulate, XXH3_scrambleAcc);
      state->bufferedSize = 0;
    }
    if (end - in > XXH3_INTERNALBUFFER_SIZE) {
      size_t nb_stripes = (size_t)(end - 1 - in) / XXH_STRIPE_LEN;  // always keeps a last byte back
      line_sink sink = {dst - src, (size_t)(-(uintptr_t)(dst + (in - src)) & 63), end};
      stored = in + sink.skew;
      size_t lines = (size_t)(end - stored) / 64;
      stored_end = stored + 64 * (lines < nb_stripes ? lines : nb_stripes);
      in = consume_and_store(acc, state, in, nb_stripes, secret, &sink);
      memcpy(state->buffer + sizeof(state->buffer) - XXH_STRIPE_LEN, in - XXH_STRIPE_LEN, XXH_STRIPE_LEN);
    }
    memcpy(state->buffer, in, (size_t)(end - in));
    state->bufferedSize = (XXH32_hash_t)(end - in);
    memcpy(state->acc, acc, sizeof(acc));
    memcpy(dst, src, (size_t)(stored - src));  // the bytes around the stored lines
    memcpy(dst + (stored_end - src), stored_end, (size_t)(end - stored_end));
    return;
  }
#endif
  XXH3_64bits_update(state, src, n);
  memcpy(dst, src, n);
}

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
    // Bytes land in the bounce buffer at the destination's offset within a cache line, so each
    // line stored is also one aligned load (a line split across two costs about twice as much).
    size_t skew = bounce_len > 4096 ? (size_t)((uintptr_t)(dst + got) - (uintptr_t)bounce) & 63 : 0;
    int64_t room = bounce_len - (int64_t)skew;
    size_t want = (size_t)(n - got < room ? n - got : room);
    char* at = bounce + skew;
    ssize_t k = recv(fd, at, want, MSG_DONTWAIT);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) {
      if (got) break;
      return k == 0 ? 0 : -(int64_t)errno;
    }
    int stream = k >= LAND_STREAM_MIN;
    streamed |= stream;
    if (state && stream) hash_and_stream((XXH3_state_t*)state, (xxh_u8*)dst + got, (const xxh_u8*)at, (size_t)k);
    else {
      if (state) XXH3_64bits_update((XXH3_state_t*)state, at, (size_t)k);
      if (stream) copy_stream(dst + got, at, (size_t)k);
      else memcpy(dst + got, at, (size_t)k);
    }
    got += k;
  }
#if defined(__SSE2__)
  if (streamed) _mm_sfence();  // the streamed stores are visible before the caller reports them landed
#endif
  return got;
}
