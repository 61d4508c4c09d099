//! Gives every binary, test and bench of this crate an rpath to libtorch's `lib/` folder, so they
//! run without LD_LIBRARY_PATH (torch-sys's own rpath does not reach the final binaries).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!(
            "cargo:warning=LIBTORCH is not set; source scripts/env.sh (binaries will need LD_LIBRARY_PATH)"
        );
        return;
    };
    let lib_dir = PathBuf::from(libtorch).join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
}
