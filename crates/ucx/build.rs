//! Links libucp/libucs and checks this crate's hand-written FFI against the
//! installed UCX headers: a small C program, compiled against
//! `<ucp/api/ucp.h>` and run here, prints one Rust `const` assertion per
//! struct size, field offset and constant value that `src/sys.rs` declares.
//! A layout that drifts from the headers then fails the build, not a run.

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=probe/layout.c");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-lib=ucp");
    println!("cargo:rustc-link-lib=ucs");

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let exe = out.join("ucx_layout_probe");
    let compiler = cc::Build::new().cargo_metadata(false).get_compiler();
    let status = compiler
        .to_command()
        .arg("probe/layout.c")
        .arg("-o")
        .arg(&exe)
        .status()
        .expect("running the C compiler for the UCX layout probe");
    assert!(status.success(), "the UCX layout probe did not compile: are the libucx-dev headers installed?");
    let output = Command::new(&exe).output().expect("running the UCX layout probe");
    assert!(output.status.success(), "the UCX layout probe failed");
    fs::write(out.join("layout_checks.rs"), output.stdout).expect("writing layout_checks.rs");
}
