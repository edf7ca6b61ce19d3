// Cache tensors [B, H, n, C] as the kernels read them: rows (dims 2 and 3) contiguous, batch and
// head strides free. Shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/core/Tensor.h>

namespace kivi {

// t itself when its rows are contiguous (or it is empty), else a contiguous copy. The kernels
// address each (batch, head) through the strides, so a view of a larger buffer (row_buffer's spare
// rows, a static cache's slice) is read in place: copying it would cost a pass over the whole
// history on every decode step.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  if (t.size(2) == 0 || t.size(3) == 0) return t;
  if ((t.size(3) == 1 || t.stride(3) == 1) && (t.size(2) == 1 || t.stride(2) == t.size(3))) return t;
  return t.contiguous();
}

}  // namespace kivi
