//! With the `libtorch` feature, this crate's test binaries record libtorch's directory
//! (`$LIBTORCH/lib`) as their run path, as the server binary does (see crates/oxserve/build.rs).

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_LIBTORCH").is_some()
        && let Some(libtorch) = std::env::var_os("LIBTORCH")
    {
        let lib = std::path::Path::new(&libtorch).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
