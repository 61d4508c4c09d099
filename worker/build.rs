//! Gives every binary, test and bench of this crate an rpath to libtorch's `lib/` folder, so they
//! run without LD_LIBRARY_PATH (torch-sys's own rpath does not reach the final binaries).
//! `ARBOR_NO_RPATH=1` leaves it out, for binaries that run against another machine's libtorch
//! (scripts/gpu-bundle.sh: the node's `torch/lib` comes through LD_LIBRARY_PATH).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=ARBOR_NO_RPATH");
    if std::env::var_os("ARBOR_NO_RPATH").is_some_and(|value| !value.is_empty() && value != "0") {
        return;
    }
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!(
            "cargo:warning=LIBTORCH is not set; source scripts/env.sh (binaries will need LD_LIBRARY_PATH)"
        );
        return;
    };
    let lib_dir = PathBuf::from(libtorch).join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
}
