// Looking up a named kernel in a table of {name, need, ...} rows (qgemm.cpp, solver.cpp): the name
// quantkern/kernels.py chose, refused with a clear error if this build or CPU cannot run it.
#pragma once
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstddef>
#include <string>

#include "cpu_features.h"

namespace qk::cpu {

template <class T, size_t N>
const T& find_kernel(const T (&table)[N], c10::string_view name, const char* op) {
  for (const T& k : table)
    if (name == k.name) {
      TORCH_CHECK(cpu_has(k.need), op, ": kernel ", k.name, " needs ", need_name(k.need),
                  ", which this CPU lacks (quantkern.kernels.select() picks one that runs here)");
      return k;
    }
  std::string have;
  for (const T& k : table) have += std::string(have.empty() ? "" : ", ") + k.name;
  TORCH_CHECK(false, op, ": no kernel named '", std::string(name), "' in this build (have: ", have, ")");
  return table[0];  // (not reached)
}

}  // namespace qk::cpu
