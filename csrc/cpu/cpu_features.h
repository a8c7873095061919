// Run-time ISA detection: what this CPU can run. Kernels are compiled per ISA (baseline flags, or a
// per-file/per-function target) and chosen by name from Python (quantkern/kernels.py), which also
// applies the QUANTKERN_NO_* switches; this header reads no environment.
#pragma once
#include <string>
#include <vector>

namespace qk::cpu {

#if defined(__x86_64__) || defined(__i386__)
#define QK_X86 1
#else
#define QK_X86 0
#endif
// The AVX2 kernels are compiled only where the baseline flags allow AVX2 + FMA + F16C (setup.py adds
// them on x86); elsewhere the portable scalar kernels stand in for them.
#if QK_X86 && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QK_AVX2 1
#else
#define QK_AVX2 0
#endif

struct Isa {
  bool avx2 = false, fma = false, f16c = false, avx512f = false, avx512bw = false, avx512vl = false,
       avx512vnni = false, avx512bf16 = false, avxvnni = false;
};

inline const Isa& isa() {
  static const Isa detected = [] {
    Isa s;
#if QK_X86
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

// What a kernel needs from the CPU (the "isa" column of the kernel table).
enum class Need { generic, avx2, avx512, avx512vnni, amx };

namespace qgemm {
bool amx_detected();  // AMX-INT8 + GFNI and the OS granted the tile state, probed once (qgemm_amx.cpp)
}

inline bool cpu_has(Need n) {
  const Isa& s = isa();
  const bool avx2 = s.avx2 && s.fma && s.f16c;
  const bool avx512 = s.avx512f && s.avx512bw && s.avx512vl;  // the AVX-512 kernels need F + BW + VL
  switch (n) {
    case Need::generic: return true;
    case Need::avx2: return QK_AVX2 && avx2;
    case Need::avx512: return QK_X86 && avx512;
    case Need::avx512vnni: return QK_X86 && avx512 && s.avx512vnni;
    case Need::amx: return QK_X86 && avx512 && qgemm::amx_detected();
  }
  return false;
}

inline const char* need_name(Need n) {
  switch (n) {
    case Need::generic: return "generic";
    case Need::avx2: return "avx2";
    case Need::avx512: return "avx512";
    case Need::avx512vnni: return "avx512vnni";
    case Need::amx: return "amx";
  }
  return "?";
}

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

// The named kernels compiled into this build, with what each needs (qgemm.cpp, solver.cpp): Python's
// kernel table (quantkern/kernels.py) must name exactly these (a test checks).
std::vector<std::pair<std::string, std::string>> qgemm_kernels();
std::vector<std::pair<std::string, std::string>> solver_kernels();

}  // namespace qk::cpu
