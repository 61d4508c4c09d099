//! Compiles `arbor/v1/*.proto` with the protoc binary vendored by `protoc-bin-vendored`, so a
//! fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; tonic-prost-build reads PROTOC afterwards.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    tonic_prost_build::configure().compile_protos(&["arbor/v1/coordinator.proto"], &["."])?;
    println!("cargo:rerun-if-changed=arbor/v1/coordinator.proto");
    Ok(())
}
