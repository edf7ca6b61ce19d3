// Schemas of the quantize / Q_MatMul ops, defined once in C++ so that AOTInductor packages
// loaded from C++ (no Python) can run them. Implementations register per dispatch key at the
// end of each source file (csrc/cpu/*.cpp, csrc/cuda/*.cu). Layout: kivi_ops/ops/layout.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing kivi_ops._C from Python runs the static registrations below; the module is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(kivi, m) {
  // k [B,H,T,D] -> codes uint8 [B,H,T*bits/8,D], scale/zero [B,H,T/G,D] (per-channel groups)
  m.def("quantize_keys(Tensor k, int bits, int group_size) -> (Tensor codes, Tensor scale, Tensor zero)");
  // v [B,H,T,D] -> codes uint8 [B,H,T,D*bits/8], scale/zero [B,H,T,D/G] (per-token groups)
  m.def("quantize_values(Tensor v, int bits, int group_size) -> (Tensor codes, Tensor scale, Tensor zero)");
  m.def("dequantize_keys(Tensor codes, Tensor scale, Tensor zero, int bits, int group_size) -> Tensor");
  m.def("dequantize_values(Tensor codes, Tensor scale, Tensor zero, int bits, int group_size) -> Tensor");
  // q [B,Hq,M,D] @ dequant(K)^T -> [B,Hq,M,T]; Hq a multiple of the KV heads
  m.def("qmatmul_keys(Tensor q, Tensor codes, Tensor scale, Tensor zero, int bits, int group_size) -> Tensor");
  // p [B,Hq,M,T] @ dequant(V) -> [B,Hq,M,D]
  m.def("qmatmul_values(Tensor p, Tensor codes, Tensor scale, Tensor zero, int bits, int group_size) -> Tensor");
  // softmax(q [Kq ‖ Kres]^T * scale) [Vq ‖ Vres] -> [B,Hq,M,D]; lengths int32 [B] masks t >= lengths[b]
  m.def(
      "decode_attention(Tensor q, Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor v_codes, "
      "Tensor v_scale, Tensor v_zero, Tensor k_residual, Tensor v_residual, int k_bits, int v_bits, "
      "int group_size, float scale, Tensor? lengths) -> Tensor");
  // One decode step of the dynamic KIVI cache (csrc/dynamic_append.h): returns k_residual ‖ k and
  // v_residual[:, :, 1:] ‖ v; the leaving value row is quantized into row `row` of the buffers.
  m.def(
      "_dynamic_append_one_(Tensor k_residual, Tensor v_residual, Tensor k, Tensor v, Tensor(a!) v_codes, "
      "Tensor(b!) v_scale, Tensor(c!) v_zero, int row, int bits, int group_size) -> (Tensor, Tensor)");
}
