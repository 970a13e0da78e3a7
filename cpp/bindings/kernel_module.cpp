// The Python face of one kernel variant, compiled into each sdpa._kernel_<isa>: a module whose
// attribute `table` is a capsule holding the variant's KernelTable. It is imported only after the
// CPU was found to support the variant's instructions, and its symbols stay hidden so variants
// cannot be merged by the linker.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "sdpa/kernel.hpp"

#define SDPA_CAT2(a, b) a##b
#define SDPA_CAT(a, b) SDPA_CAT2(a, b)

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT,
                                     SDPA_MODULE_NAME,
                                     "sdpa attention kernel, one ISA variant",
                                     -1,
                                     nullptr,
                                     nullptr,
                                     nullptr,
                                     nullptr,
                                     nullptr};

PyMODINIT_FUNC SDPA_CAT(PyInit_, SDPA_MODULE_SYMBOL)(void) {
  PyObject* m = PyModule_Create(&kModule);
  if (!m) return nullptr;
  auto* table = const_cast<sdpa::KernelTable*>(sdpa::kernel_table());
  PyObject* cap = PyCapsule_New(table, sdpa::kKernelCapsuleName, nullptr);
  if (!cap || PyModule_AddObject(m, "table", cap) < 0) {
    Py_XDECREF(cap);
    Py_DECREF(m);
    return nullptr;
  }
  if (PyModule_AddStringConstant(m, "isa", table->isa) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
