// The Python module `dpt_fast._C`. It holds no Python functions: importing it loads this shared library, whose
// static TORCH_LIBRARY registrations make the ops available as torch.ops.dpt_fast.*.
#include <Python.h>

static struct PyModuleDef dpt_fast_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "dpt_fast C++/CUDA ops, registered as torch.ops.dpt_fast.*", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dpt_fast_c_module); }
