//! Compiles the C++ shim (shim/arbor_c10d.cpp, shim/arbor_aten.cpp) against the headers of the libtorch that tch links
//! (docs/architecture.md §5, §8) and links it with libtorch's own libraries. The Gloo headers come
//! from Debian's `libgloo-dev` (headers only; Gloo itself is inside libtorch_cpu). With the `nccl`
//! feature the shim also compiles ProcessGroupNCCL against the CUDA and NCCL headers of the nvidia
//! wheels.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=shim/arbor_c10d.cpp");
    println!("cargo:rerun-if-changed=shim/arbor_c10d.h");
    println!("cargo:rerun-if-changed=shim/arbor_aten.cpp");
    println!("cargo:rerun-if-changed=shim/arbor_aten.h");
    println!("cargo:rerun-if-changed=shim/guarded.h");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=ARBOR_GLOO_INCLUDE_DIR");
    println!("cargo:rerun-if-env-changed=ARBOR_CUDA_INCLUDE_DIRS");

    let libtorch = match std::env::var("LIBTORCH") {
        Ok(value) => PathBuf::from(value),
        Err(_) => panic!(
            "LIBTORCH is not set: source scripts/env.sh or build inside the repository (.cargo/config.toml sets it)"
        ),
    };
    let include_dir = libtorch.join("include");
    let api_include_dir = include_dir.join("torch/csrc/api/include");
    let lib_dir = libtorch.join("lib");
    if !include_dir
        .join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp")
        .is_file()
    {
        panic!(
            "LIBTORCH={} has no c10d headers (include/torch/csrc/distributed/c10d); run scripts/setup.sh",
            libtorch.display()
        );
    }

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("shim/arbor_c10d.cpp")
        .file("shim/arbor_aten.cpp")
        .include(&include_dir)
        .include(&api_include_dir)
        .flag("-std=c++20")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .warnings(false)
        .extra_warnings(false);
    match std::env::var("ARBOR_GLOO_INCLUDE_DIR") {
        Ok(gloo_include_dir) => {
            build.include(gloo_include_dir);
        }
        Err(_) => {
            if !Path::new("/usr/include/gloo/config.h").is_file() {
                println!(
                    "cargo:warning=gloo headers not found in /usr/include/gloo: install libgloo-dev (scripts/setup.sh) or set ARBOR_GLOO_INCLUDE_DIR"
                );
            }
        }
    }

    let nccl = std::env::var_os("CARGO_FEATURE_NCCL").is_some();
    if nccl {
        build
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .define("ARBOR_C10D_NCCL", None);
        for cuda_include_dir in cuda_include_dirs(&libtorch) {
            build.include(cuda_include_dir);
        }
    }
    build.compile("arbor_c10d");

    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    if nccl {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    // torch-sys's rpath does not reach the final binaries; this covers this crate's tests and
    // examples (dependent binaries set their own, as arbor-worker's build.rs does).
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    println!("cargo:lib_dir={}", lib_dir.display());
}

/// The CUDA and NCCL include folders: ARBOR_CUDA_INCLUDE_DIRS (colon-separated) when set, otherwise
/// every `nvidia/*/include` folder of the site-packages that holds LIBTORCH (the cu13 runtime,
/// nccl and, where installed, cccl wheels).
fn cuda_include_dirs(libtorch: &Path) -> Vec<PathBuf> {
    if let Ok(dirs) = std::env::var("ARBOR_CUDA_INCLUDE_DIRS") {
        return std::env::split_paths(&dirs).collect();
    }
    let Some(site_packages) = libtorch.parent() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(site_packages.join("nvidia")) else {
        println!("cargo:warning=no nvidia wheels next to LIBTORCH; set ARBOR_CUDA_INCLUDE_DIRS");
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("include"))
        .filter(|dir| dir.is_dir())
        .collect();
    dirs.sort();
    dirs
}
