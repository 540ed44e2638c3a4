// The library target only lets profiler/ list this package as a
// build-dependency (cargo depends on libraries), as aya-build expects; the
// programs are the binary target, main.rs.
#![no_std]
