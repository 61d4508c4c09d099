//! Which device a worker process computes on: one GPU per local rank, as torchrun does.
//!
//! `--device cuda` (and `auto` when libtorch sees a CUDA device) puts local rank `i` on `cuda:i`
//! among the *visible* devices: libtorch numbers the devices that `CUDA_VISIBLE_DEVICES` leaves
//! visible from 0, so `CUDA_VISIBLE_DEVICES=4,5 arbor-worker train --nproc 2` runs local rank 0 on
//! physical GPU 4 and local rank 1 on GPU 5. A local rank without a device of its own is refused
//! before the worker joins the job: two ranks on one GPU would make NCCL refuse the communicator
//! and would silently halve the throughput of each.
//!
//! [`device_for_local_rank`] is the pure mapping; [`DeviceChoice::resolve`] feeds it libtorch's
//! device count.

use tch::{Device, Tensor};

use crate::error::{Result, WorkerError};

/// Where the model runs (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// `cuda:<local rank>` when libtorch sees a CUDA device, else the CPU.
    Auto,
    Cpu,
    /// `cuda:<local rank>`; an error when that device is not visible.
    Cuda,
}

impl DeviceChoice {
    /// The device of `local_rank` on this machine (libtorch's visible CUDA device count).
    pub fn resolve(self, local_rank: u32) -> Result<Device> {
        let visible = if self == DeviceChoice::Cpu {
            0
        } else {
            visible_cuda_devices()
        };
        device_for_local_rank(self, local_rank, visible)
    }
}

/// How many CUDA devices libtorch sees (after `CUDA_VISIBLE_DEVICES`); 0 without CUDA.
pub fn visible_cuda_devices() -> usize {
    if !tch::Cuda::is_available() {
        return 0;
    }
    usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
}

/// The device of local rank `local_rank` when `visible_cuda_devices` CUDA devices are visible.
pub fn device_for_local_rank(
    choice: DeviceChoice,
    local_rank: u32,
    visible_cuda_devices: usize,
) -> Result<Device> {
    let wants_cuda = match choice {
        DeviceChoice::Cpu => return Ok(Device::Cpu),
        DeviceChoice::Auto => visible_cuda_devices > 0,
        DeviceChoice::Cuda => true,
    };
    if !wants_cuda {
        return Ok(Device::Cpu);
    }
    let index = local_rank as usize;
    if index >= visible_cuda_devices {
        return Err(WorkerError::Input {
            name: "--device".to_string(),
            message: format!(
                "local rank {local_rank} needs cuda:{local_rank}, but {visible_cuda_devices} CUDA \
                 device(s) are visible{}; start at most {visible_cuda_devices} local rank(s) per \
                 node (--nproc) or make more devices visible",
                visible_devices_note()
            ),
        });
    }
    Ok(Device::Cuda(index))
}

/// ` (CUDA_VISIBLE_DEVICES=…)` when the variable is set, so the error shows why.
fn visible_devices_note() -> String {
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(value) => format!(" (CUDA_VISIBLE_DEVICES={value})"),
        Err(_) => String::new(),
    }
}

/// A host tensor on `device` without making the host wait: on CUDA it is copied into pinned
/// (page-locked) memory and from there with `non_blocking`, so the copy is queued on the
/// device's stream like a kernel (a pageable copy would synchronise the stream first). The
/// pinned block returns to libtorch's pinned-memory cache once the copy has run. On the CPU the
/// tensor is returned as is.
pub fn host_to_device(tensor: &Tensor, device: Device) -> Result<Tensor> {
    if device == Device::Cpu {
        return Ok(tensor.shallow_clone());
    }
    tensor
        .f_pin_memory(device)
        .and_then(|pinned| pinned.f_to_device_(device, pinned.kind(), true, false))
        .map_err(WorkerError::torch(format!(
            "copying a {:?} {:?} tensor to {}",
            tensor.size(),
            tensor.kind(),
            device_name(device)
        )))
}

/// Waits until every operation queued on `device` has run (nothing to wait for on the CPU).
pub fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// `cpu` or `cuda:N`, as logs and errors write a device.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(index) => format!("cuda:{index}"),
        Device::Cpu => "cpu".to_string(),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_local_rank_takes_the_visible_device_of_its_number() {
        for choice in [DeviceChoice::Cuda, DeviceChoice::Auto] {
            for local_rank in 0..8u32 {
                let device = device_for_local_rank(choice, local_rank, 8).unwrap();
                assert_eq!(device, Device::Cuda(local_rank as usize), "{choice:?}");
            }
        }
    }

    #[test]
    fn a_local_rank_beyond_the_visible_devices_is_refused_naming_both_numbers() {
        for choice in [DeviceChoice::Cuda, DeviceChoice::Auto] {
            let error = device_for_local_rank(choice, 2, 2).unwrap_err().to_string();
            assert!(error.contains("local rank 2"), "{error}");
            assert!(error.contains("cuda:2"), "{error}");
            assert!(error.contains("2 CUDA device(s) are visible"), "{error}");
        }
        let error = device_for_local_rank(DeviceChoice::Cuda, 0, 0)
            .unwrap_err()
            .to_string();
        assert!(error.contains("0 CUDA device(s) are visible"), "{error}");
    }

    #[test]
    fn cpu_is_always_the_cpu_and_auto_without_cuda_is_the_cpu() {
        assert_eq!(
            device_for_local_rank(DeviceChoice::Cpu, 5, 8).unwrap(),
            Device::Cpu
        );
        assert_eq!(
            device_for_local_rank(DeviceChoice::Auto, 5, 0).unwrap(),
            Device::Cpu
        );
    }

    #[test]
    fn host_to_device_on_the_cpu_is_the_same_tensor() {
        let tensor = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let moved = host_to_device(&tensor, Device::Cpu).unwrap();
        assert_eq!(moved.data_ptr(), tensor.data_ptr());
    }

    #[test]
    fn devices_are_named_as_torch_writes_them() {
        assert_eq!(device_name(Device::Cuda(3)), "cuda:3");
        assert_eq!(device_name(Device::Cpu), "cpu");
    }
}
