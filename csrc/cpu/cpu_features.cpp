#include "cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace qk::cpu {

bool use_avx512() {
  const char* off = std::getenv("QUANTKERN_NO_AVX512");
  if (off != nullptr && std::strcmp(off, "0") != 0 && off[0] != '\0') return false;
  const Isa& s = isa();
  return s.avx512f && s.avx512bw && s.avx512vl;
}

}  // namespace qk::cpu
