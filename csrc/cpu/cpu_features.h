// Run-time ISA detection: kernels are compiled for AVX2+FMA and choose AVX-512 paths when present.
#pragma once
#include <string>
#include <vector>

namespace qk::cpu {

struct Isa {
  bool avx2 = false, fma = false, f16c = false, avx512f = false, avx512bw = false, avx512vl = false,
       avx512vnni = false, avx512bf16 = false, avxvnni = false;
};

inline const Isa& isa() {
  static const Isa detected = [] {
    Isa s;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    s.avx2 = __builtin_cpu_supports("avx2");
    s.fma = __builtin_cpu_supports("fma");
    s.f16c = __builtin_cpu_supports("f16c");
    s.avx512f = __builtin_cpu_supports("avx512f");
    s.avx512bw = __builtin_cpu_supports("avx512bw");
    s.avx512vl = __builtin_cpu_supports("avx512vl");
    s.avx512vnni = __builtin_cpu_supports("avx512vnni");
    s.avx512bf16 = __builtin_cpu_supports("avx512bf16");
    s.avxvnni = __builtin_cpu_supports("avxvnni");
#endif
    return s;
  }();
  return detected;
}

// AVX-512 kernels need F + BW + VL; QUANTKERN_NO_AVX512=1 forces the AVX2 path (for tests).
bool use_avx512();
// An opt-out switch such as QUANTKERN_NO_AVX512: set to anything but "" or "0". Read at each call, so
// tests can flip it between calls.
bool env_switch_on(const char* name);

inline std::vector<std::string> isa_names() {
  const Isa& s = isa();
  std::vector<std::string> out;
  if (s.avx2 && s.fma) out.push_back("avx2+fma");
  if (s.avx512f && s.avx512bw && s.avx512vl) out.push_back("avx512");
  if (s.avx512vnni) out.push_back("avx512vnni");
  if (s.avx512bf16) out.push_back("avx512bf16");
  if (s.avxvnni) out.push_back("avxvnni");
  return out;
}

}  // namespace qk::cpu
