// The Python module stub: importing moe_routing._C loads this library, whose
// static initialisers register every op with the dispatcher. The ops are
// reached through torch.ops.moe_routing; the module itself has no methods.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
