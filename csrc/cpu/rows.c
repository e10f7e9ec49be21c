// Row gather/scatter between a paged cache and a packed staging buffer, for CPU tensors.
// A "row" is one cache block of one plane: row_bytes contiguous bytes at base + id * stride.
// Built on demand by kvlink/ops/native.py (gcc -O3 -fopenmp); the Python launcher checks every
// argument (dtypes, shapes, strides, id range) before calling in.
#include <stdint.h>
#include <string.h>

void kvlink_gather_rows(const char* src, int64_t src_stride, const int64_t* ids, int64_t n,
                        char* dst, int64_t row_bytes) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i++) memcpy(dst + i * row_bytes, src + ids[i] * src_stride, (size_t)row_bytes);
}

void kvlink_scatter_rows(const char* src, int64_t row_bytes, const int64_t* ids, int64_t n,
                         char* dst, int64_t dst_stride) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i++) memcpy(dst + ids[i] * dst_stride, src + i * row_bytes, (size_t)row_bytes);
}
