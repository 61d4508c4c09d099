//! The shared job token: every RPC must carry `authorization: Bearer <token>`, compared in
//! constant time.

use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use super::metrics::Metrics;

/// A tonic interceptor that refuses calls without the job token.
#[derive(Clone)]
pub struct TokenCheck {
    expected: std::sync::Arc<Vec<u8>>,
    metrics: Metrics,
}

impl TokenCheck {
    pub fn new(token: &str, metrics: Metrics) -> Self {
        Self {
            expected: std::sync::Arc::new(format!("Bearer {token}").into_bytes()),
            metrics,
        }
    }

    #[allow(clippy::result_large_err)]
    pub fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(value) = request.metadata().get("authorization") else {
            self.metrics.refuse("missing_token");
            return Err(Status::unauthenticated(
                "missing `authorization: Bearer <token>` metadata",
            ));
        };
        if !bool::from(value.as_bytes().ct_eq(self.expected.as_slice())) {
            self.metrics.refuse("wrong_token");
            return Err(Status::unauthenticated("invalid job token"));
        }
        Ok(request)
    }
}
