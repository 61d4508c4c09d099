//! The `arbor.v1` protocol: messages and the `Coordinator` service's client and server.

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod v1 {
    tonic::include_proto!("arbor.v1");
}
