// Python bindings of the block (4- or 8-bit levels) x int8 matmul (`qmatmul.h`, which the decode step includes too).
#include "qmatmul.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("qmatmul", &tricklm_q::qmatmul, "x [rows, k] float32 @ block weight [n, k]^T -> [rows, n] float32",
             pybind11::arg("x"), pybind11::arg("levels"), pybind11::arg("d"), pybind11::arg("m"),
             pybind11::arg("n"), pybind11::arg("isa") = "");
  module.def("refine_top", &tricklm_q::refine_top,
             "out [rows, n] (x times the weight, int8) with each row's `top` largest recomputed from float x",
             pybind11::arg("x"), pybind11::arg("out"), pybind11::arg("levels"), pybind11::arg("d"), pybind11::arg("m"),
             pybind11::arg("top"));
  module.def("weight_rows", &tricklm_q::weight_rows, "rows ids [r] of the block weight [n, k] as float32 [r, k]",
             pybind11::arg("ids"), pybind11::arg("levels"), pybind11::arg("d"), pybind11::arg("m"), pybind11::arg("n"));
  module.def("isa", &tricklm_q::isa_name, "the int8 kernel that runs: avx512vnni, avx2 or scalar (TRICKLM_ISA may lower it)");
  module.def("cpu_isa", &tricklm_q::cpu_isa, "the best int8 kernel this CPU has, whatever TRICKLM_ISA says");
  module.def("amx", &tricklm_q::amx_usable, "whether chunks of many rows run on AMX tiles (kernel \"amx\")");
  module.def("cpu_amx", &tricklm_q::cpu_has_amx, "whether this CPU has AMX, whatever TRICKLM_ISA says");
  module.attr("AMX_MIN_ROWS") = tricklm_q::kAmxMinRows;
}
