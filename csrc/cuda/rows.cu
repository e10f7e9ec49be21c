// Row gather/scatter for CUDA tensors. Device code only; the launchers below check their inputs.
// The packed side may be pinned host memory: under unified addressing the kernel writes (or reads)
// it directly over PCIe, so a pack needs no device-side staging copy.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace {

template <typename T>
__global__ void rows_kernel(const char* __restrict__ src, int64_t src_stride, char* __restrict__ dst,
                            int64_t dst_stride, const int64_t* __restrict__ ids, int64_t row_bytes,
                            bool gather) {
  const int64_t i = blockIdx.x;
  const int64_t id = ids[i];
  const char* s = src + (gather ? id * src_stride : i * src_stride);
  char* d = dst + (gather ? i * dst_stride : id * dst_stride);
  const int64_t n = row_bytes / sizeof(T);
  const T* s4 = reinterpret_cast<const T*>(s);
  T* d4 = reinterpret_cast<T*>(d);
  for (int64_t j = blockIdx.y * blockDim.x + threadIdx.x; j < n; j += (int64_t)gridDim.y * blockDim.x) {
    d4[j] = s4[j];
  }
}

bool aligned16(const void* p, int64_t a, int64_t b, int64_t c) {
  return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && a % 16 == 0 && b % 16 == 0 && c % 16 == 0;
}

void launch(const torch::Tensor& src, int64_t src_stride, const torch::Tensor& dst, int64_t dst_stride,
            const torch::Tensor& ids, int64_t row_bytes, bool gather) {
  const int64_t n = ids.numel();
  if (n == 0 || row_bytes == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  const int threads = 256;
  const bool vec = aligned16(s, src_stride, dst_stride, row_bytes) && reinterpret_cast<uintptr_t>(d) % 16 == 0;
  const int64_t elems = vec ? row_bytes / 16 : row_bytes;
  const unsigned chunks = (unsigned)std::min<int64_t>((elems + threads - 1) / threads, 64);
  dim3 grid((unsigned)n, chunks);
  if (vec) {
    rows_kernel<uint4><<<grid, threads, 0, stream>>>(s, src_stride, d, dst_stride, ids.data_ptr<int64_t>(), row_bytes, gather);
  } else {
    rows_kernel<uint8_t><<<grid, threads, 0, stream>>>(s, src_stride, d, dst_stride, ids.data_ptr<int64_t>(), row_bytes, gather);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_common(const torch::Tensor& rows, const torch::Tensor& packed, const torch::Tensor& ids) {
  TORCH_CHECK(rows.dim() == 2 && packed.dim() == 2, "kvlink rows: expected 2-D tensors");
  TORCH_CHECK(rows.stride(1) == 1 && packed.is_contiguous(), "kvlink rows: rows need a contiguous last dim, packed must be contiguous");
  TORCH_CHECK(rows.scalar_type() == packed.scalar_type(), "kvlink rows: dtype mismatch");
  TORCH_CHECK(rows.size(1) == packed.size(1), "kvlink rows: row length mismatch");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == torch::kInt64 && ids.is_cuda() && ids.is_contiguous(), "kvlink rows: ids must be 1-D contiguous int64 on CUDA");
  TORCH_CHECK(ids.numel() == packed.size(0), "kvlink rows: ids and packed rows differ in count");
  TORCH_CHECK(rows.is_cuda(), "kvlink rows: the paged cache must be on CUDA");
  TORCH_CHECK(packed.is_cuda() || packed.is_pinned(), "kvlink rows: packed buffer must be on CUDA or pinned host memory");
}

}  // namespace

void gather_rows(torch::Tensor src, torch::Tensor ids, torch::Tensor out) {
  check_common(src, out, ids);
  const int64_t es = src.element_size();
  launch(src, src.stride(0) * es, out, out.size(1) * es, ids, out.size(1) * es, true);
}

void scatter_rows(torch::Tensor packed, torch::Tensor ids, torch::Tensor dst) {
  check_common(dst, packed, ids);
  const int64_t es = dst.element_size();
  launch(packed, packed.size(1) * es, dst, dst.stride(0) * es, ids, packed.size(1) * es, false);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_rows", &gather_rows, "gather rows[ids] into packed");
  m.def("scatter_rows", &scatter_rows, "scatter packed into rows[ids]");
}
