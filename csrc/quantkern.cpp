// The one pybind11 module (build info). Ops register themselves with TORCH_LIBRARY_FRAGMENT in
// their own files (csrc/cpu/*.cpp, csrc/cuda/*_launch.cpp); this is the only file that includes
// <torch/extension.h>, which is slow to compile.
#include <torch/extension.h>

#include "cpu/cpu_features.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef QK_CUDA_ARCH
#define QK_CUDA_ARCH ""
#endif

namespace py = pybind11;

static py::dict build_info() {
  py::dict d;
#ifdef QK_WITH_CUDA
  d["cuda"] = true;
  d["cuda_arch"] = QK_CUDA_ARCH;
#else
  d["cuda"] = false;
#endif
#ifdef _OPENMP
  d["openmp"] = true;
  d["omp_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["omp_threads"] = 1;
#endif
  d["torch_threads"] = at::get_num_threads();
  d["cpu_isa"] = qk::cpu::isa_names();
  // what the CPU can run (quantkern/_ext.py adds the switch-dependent avx512_kernels / amx_kernels)
  d["cpu_avx2"] = qk::cpu::cpu_has(qk::cpu::Need::avx2);
  d["cpu_avx512"] = qk::cpu::cpu_has(qk::cpu::Need::avx512);
  d["cpu_avx512vnni"] = qk::cpu::cpu_has(qk::cpu::Need::avx512vnni);
  d["cpu_amx"] = qk::cpu::cpu_has(qk::cpu::Need::amx);  // AMX-INT8 + GFNI, tile state granted
  py::dict kernels;  // the named CPU kernels compiled in, with what each needs
  for (const auto& [name, need] : qk::cpu::qgemm_kernels()) kernels[py::str(name)] = need;
  for (const auto& [name, need] : qk::cpu::solver_kernels()) kernels[py::str(name)] = need;
  d["cpu_kernels"] = kernels;
  d["compiler"] = std::string(__VERSION__);
  return d;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "quantkern compiled kernels (ops live under torch.ops.quantkern)";
  m.def("build_info", &build_info, "How this extension was built and what this CPU supports");
}
