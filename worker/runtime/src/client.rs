//! The coordinator client: a tonic channel with the job token on every call.

use std::time::Duration;

use arbor_proto::v1::coordinator_client::CoordinatorClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::error::RuntimeError;

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct BearerToken {
    value: AsciiMetadataValue,
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.value.clone());
        Ok(request)
    }
}

pub type Client = CoordinatorClient<InterceptedService<Channel, BearerToken>>;

/// A lazily connecting client: calls fail with `Unavailable` while the coordinator is down and
/// succeed again once it is back, so callers retry with backoff.
pub fn connect(
    address: &str,
    token: &str,
    tls_ca_pem: Option<Vec<u8>>,
) -> Result<Client, RuntimeError> {
    let invalid = |reason: String| RuntimeError::InvalidAddress {
        address: address.to_string(),
        reason,
    };
    let url = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    let mut endpoint = Endpoint::from_shared(url)
        .map_err(|error| invalid(error.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(pem) = tls_ca_pem {
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|error| invalid(error.to_string()))?;
    }
    let value = AsciiMetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| RuntimeError::Token("the token must be printable ASCII".into()))?;
    let channel = endpoint.connect_lazy();
    Ok(
        CoordinatorClient::with_interceptor(channel, BearerToken { value })
            .max_decoding_message_size(64 << 20),
    )
}

/// Whether a failed call is worth retrying (the coordinator is restarting or unreachable).
pub fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}
