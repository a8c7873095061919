#include "cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace qk::cpu {

bool env_switch_on(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

bool use_avx512() {
  if (env_switch_on("QUANTKERN_NO_AVX512")) return false;
  const Isa& s = isa();
  return s.avx512f && s.avx512bw && s.avx512vl;
}

}  // namespace qk::cpu
