//! The shim's ATen helpers that need no second process: the autocast dtype setter the trainer
//! uses for bf16 on CUDA, and the CUDA peak-memory reader's behaviour without CUDA.

use arbor_c10d::aten_ops::{
    autocast_dtype, cuda_max_memory_allocated, set_autocast_dtype, AutocastDevice,
};
use arbor_c10d::C10dError;
use tch::Kind;

#[test]
fn the_autocast_dtype_is_set_per_device_and_read_back() {
    // libtorch's defaults: fp16 on CUDA, bf16 on the CPU.
    set_autocast_dtype(AutocastDevice::Cuda, Kind::BFloat16).unwrap();
    assert_eq!(
        autocast_dtype(AutocastDevice::Cuda).unwrap(),
        Some(Kind::BFloat16)
    );
    set_autocast_dtype(AutocastDevice::Cpu, Kind::Half).unwrap();
    assert_eq!(
        autocast_dtype(AutocastDevice::Cpu).unwrap(),
        Some(Kind::Half)
    );
    // The CUDA setting did not move with the CPU's.
    assert_eq!(
        autocast_dtype(AutocastDevice::Cuda).unwrap(),
        Some(Kind::BFloat16)
    );
    set_autocast_dtype(AutocastDevice::Cuda, Kind::Half).unwrap();
    assert_eq!(
        autocast_dtype(AutocastDevice::Cuda).unwrap(),
        Some(Kind::Half)
    );
    set_autocast_dtype(AutocastDevice::Cpu, Kind::BFloat16).unwrap();
}

#[test]
fn only_half_and_bfloat16_are_autocast_dtypes() {
    match set_autocast_dtype(AutocastDevice::Cuda, Kind::Float) {
        Err(C10dError::InvalidArgument { field, reason }) => {
            assert_eq!(field, "autocast dtype");
            assert!(reason.contains("Float"), "{reason}");
        }
        other => panic!("expected an invalid-argument error, got {other:?}"),
    }
}

#[test]
fn cuda_peak_memory_is_an_error_without_a_cuda_device() {
    if tch::Cuda::is_available() {
        return;
    }
    let error = cuda_max_memory_allocated(0).unwrap_err().to_string();
    assert!(
        error.contains("no CUDA support") || error.contains("visible CUDA devices"),
        "{error}"
    );
}
