//! With the `torch` feature, the binary (and its test binaries) record libtorch's directory (`$LIBTORCH/lib`) as its
//! run path, so it starts without LD_LIBRARY_PATH (torch-sys links libtorch but sets none).

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_some()
        && let Some(libtorch) = std::env::var_os("LIBTORCH")
    {
        let lib = std::path::Path::new(&libtorch).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
