//! Sets pyo3's cfgs for the interpreter being built for (`Py_GIL_DISABLED` on a free-threaded
//! build, `Py_3_13`, ...), so the code can take the free-threaded paths where they differ.
fn main() {
    pyo3_build_config::use_pyo3_cfgs();
}
