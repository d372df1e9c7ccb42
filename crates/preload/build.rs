//! Builds the one C part of the library: execl, execlp and execle, whose
//! variadic arguments stable Rust cannot receive (src/execl.c).

fn main() {
    println!("cargo:rerun-if-changed=src/execl.c");
    cc::Build::new()
        .file("src/execl.c")
        .flag("-fvisibility=hidden")
        .warnings_into_errors(true)
        .compile("vsocket_execl");
}
