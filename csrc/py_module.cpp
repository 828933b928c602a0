// Makes the op library importable as the Python module cdal_fast._C; importing it runs the
// TORCH_LIBRARY registrations. Not part of the CMake (C++-only) build.
#include <Python.h>

static struct PyModuleDef cdal_module = {PyModuleDef_HEAD_INIT, "_C",
                                         "cdal-fast custom ops (registered as torch.ops.cdal.*)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&cdal_module); }
