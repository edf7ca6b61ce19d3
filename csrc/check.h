// KIVI_CHECK(cond, parts...): TORCH_CHECK whose message is assembled without iostream number
// formatting. On the GPU image (torch 2.11, GCC 13) a failing TORCH_CHECK with an integer argument
// crashed inside std::ostream::operator<<(long) in this extension (see benchmarks/results/
// 2026-11-29-h200/gpu_check_log.txt); numbers are formatted with std::to_string instead, and the
// finished std::string is handed to TORCH_CHECK.
#pragma once
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

namespace kivi {

inline void append_part(std::string& s, const char* x) { s += x; }
inline void append_part(std::string& s, const std::string& x) { s += x; }
inline void append_part(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void append_part(std::string& s, const c10::Device& d) { s += d.str(); }
inline void append_part(std::string& s, c10::IntArrayRef a) {
  s += "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  s += "]";
}
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
inline void append_part(std::string& s, T x) {
  s += std::to_string(x);
}

template <typename... Parts>
std::string check_message(const Parts&... parts) {
  std::string s;
  (append_part(s, parts), ...);
  return s;
}

}  // namespace kivi

#define KIVI_CHECK(cond, ...) TORCH_CHECK(cond, ::kivi::check_message(__VA_ARGS__))
