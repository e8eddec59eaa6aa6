//! py_decode embeds Python: link libpython with an rpath so the fuzz binary finds it at run
//! time without LD_LIBRARY_PATH.
fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
}
