//! `arbor coordinator`: serve one job (docs/architecture.md §6).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use arbor_common::config::JobConfig;
use arbor_proto::v1::coordinator_server::CoordinatorServer;
use clap::Args;
use tokio::sync::watch;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tracing::{error, info};

use crate::dataset::Dataset;
use crate::job_config::{job_token, local_path, ConfigFlags};
use crate::object_file::split_object_url;
use crate::server::auth::TokenCheck;
use crate::server::job_state::JobState;
use crate::server::membership::{Membership, Phase};
use crate::server::metrics::Metrics;
use crate::server::run_store::open_run_store;
use crate::server::service::{CoordinatorService, Shared};

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub config: ConfigFlags,
    /// Keep serving Status, /metrics and the health endpoints after the job finishes or fails,
    /// until SIGTERM or Ctrl-C (for a Kubernetes Deployment, which would restart an exited
    /// coordinator). Without it the coordinator exits shortly after the job ends.
    #[arg(long, env = "ARBOR_KEEP_SERVING")]
    pub keep_serving: bool,
}

pub fn run(args: CoordinatorArgs) -> anyhow::Result<std::process::ExitCode> {
    let config = args.config.load()?;
    serve_job(config, args.config.base_dir(), args.keep_serving)
}

/// Serves the job of `config` (relative paths are relative to `base`, the config file's folder)
/// until it ends; `keep_serving` as `--keep-serving`.
pub fn serve_job(
    config: JobConfig,
    base: PathBuf,
    keep_serving: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config, base, keep_serving))
}

async fn serve(
    config: JobConfig,
    base: PathBuf,
    keep_serving: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let config = Arc::new(config);
    let token = job_token(&config, &base)?;
    let run_store = open_run_store(&config.job.run_dir, &base)?;
    let run_dir = run_store.location();
    let manifest_is_remote = is_remote(&config.data.manifest);
    let manifest = if manifest_is_remote {
        config.data.manifest.clone()
    } else {
        local_path(&config.data.manifest, &base, "data.manifest")?
            .display()
            .to_string()
    };
    let dataset = Arc::new(Dataset::load(&manifest, &config)?);
    // Workers may run elsewhere: they get the folder or prefix the manifest's keys are
    // relative to as an absolute path. Checked before the job's state is written, so a job
    // that could load none of its images leaves nothing behind.
    // `data.root`, else the manifest's header, else the manifest's folder.
    let data_root = match config.data.root.as_ref().or(dataset.image_root.as_ref()) {
        Some(root) if is_remote(root) => root.clone(),
        Some(root) if config.data.root.is_some() => {
            local_path(root, &base, "data.root")?.display().to_string()
        }
        Some(root) => {
            let manifest_folder = std::path::Path::new(&manifest)
                .parent()
                .unwrap_or(std::path::Path::new("."));
            local_path(root, manifest_folder, "the manifest's image_root")?
                .display()
                .to_string()
        }
        None if manifest_is_remote => split_object_url(&manifest)?.0.to_string(),
        None => std::path::Path::new(&manifest)
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    };
    if !is_remote(&data_root) {
        crate::dataset::check_local_items_exist(
            &dataset.records,
            std::path::Path::new(&data_root),
        )?;
    }

    let state = match JobState::load(run_store.as_ref())? {
        Some(state) => {
            if state.manifest_digest != dataset.digest {
                bail!(
                    "the manifest changed under the job in {}: digest {} != {} recorded; use a new run_dir",
                    run_dir, dataset.digest, state.manifest_digest
                );
            }
            if state.config_digest != config.digest() {
                bail!(
                    "the config changed under the job in {}: digest {} != {} recorded (see {}/job.toml); use a new run_dir",
                    run_dir, config.digest(), state.config_digest, run_dir
                );
            }
            info!(
                epoch = state.epoch,
                generation = state.generation,
                step = state.step,
                "resuming job state"
            );
            state
        }
        None => {
            let state = JobState::new(&config.job.name, &dataset.digest, &config.digest());
            state.save(run_store.as_ref())?;
            run_store.write("job.toml", config.to_toml().as_bytes())?;
            state
        }
    };

    let metrics = Metrics::new();
    let membership = Membership::new(
        config.clone(),
        dataset.clone(),
        run_store.clone(),
        metrics.clone(),
        state,
        Arc::new(crate::server::membership::clock::SystemClock),
    )?;
    // Workers may run elsewhere: send them absolute paths.
    let mut worker_config = (*config).clone();
    worker_config.data.manifest = manifest.clone();
    worker_config.data.root = Some(data_root);
    worker_config.job.run_dir = run_dir.clone();
    // The latent cache too: the run directory's `latent-cache`, or `data.latent_cache` with a
    // relative path made the job file's.
    if config.train.cache_latents {
        let location = match &config.data.latent_cache {
            Some(location) if !is_remote(location) => {
                local_path(location, &base, "data.latent_cache")?
                    .display()
                    .to_string()
            }
            _ => config.data.latent_cache_location(&run_dir),
        };
        info!(cache = %location, fill_only = config.train.fill_cache_only, "latent cache");
        worker_config.data.latent_cache = Some(location);
    }
    // Like the manifest and run_dir, a relative model path is the job file's, not each
    // worker's working directory's.
    if !config.model.path.is_empty() && !is_remote(&config.model.path) {
        worker_config.model.path = local_path(&config.model.path, &base, "model.path")?
            .display()
            .to_string();
    }
    let (changed, _) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        membership: Mutex::new(membership),
        changed,
        config_toml: worker_config.to_toml(),
        dataset,
        metrics: metrics.clone(),
        wait_limit: Duration::from_secs(config.cluster.join_timeout_s),
    });

    let listen: SocketAddr = config.cluster.listen.parse().with_context(|| {
        format!(
            "cluster.listen `{}` is not host:port",
            config.cluster.listen
        )
    })?;
    let metrics_listen: SocketAddr = config.cluster.metrics_listen.parse().with_context(|| {
        format!(
            "cluster.metrics_listen `{}` is not host:port",
            config.cluster.metrics_listen
        )
    })?;

    let (shutdown_sender, shutdown) = watch::channel(false);
    tokio::spawn(ticker(
        shared.clone(),
        config.clone(),
        shutdown_sender.clone(),
        keep_serving,
    ));
    tokio::spawn(stop_on_signal(shutdown_sender.clone()));
    let metrics_listener = tokio::net::TcpListener::bind(metrics_listen)
        .await
        .with_context(|| format!("binding cluster.metrics_listen {metrics_listen}"))?;
    tokio::spawn(serve_http(
        metrics_listener,
        shared.clone(),
        shutdown.clone(),
    ));

    let check = TokenCheck::new(&token, metrics.clone());
    let service = tonic::service::interceptor::InterceptedService::new(
        CoordinatorServer::new(CoordinatorService {
            shared: shared.clone(),
        })
        .max_decoding_message_size(config.cluster.max_request_bytes),
        move |request| check.check(request),
    );
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .timeout(Duration::from_secs(config.cluster.join_timeout_s + 60));
    if let (Some(cert), Some(key)) = (&config.cluster.tls_cert, &config.cluster.tls_key) {
        let cert = std::fs::read(local_path(cert, &base, "cluster.tls_cert")?)
            .context("reading cluster.tls_cert")?;
        let key = std::fs::read(local_path(key, &base, "cluster.tls_key")?)
            .context("reading cluster.tls_key")?;
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .context("configuring TLS")?;
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding cluster.listen {listen}"))?;
    info!(listen = %listener.local_addr()?, metrics = %metrics_listen, run_dir = %run_dir, "coordinator serving");
    let mut shutdown_wait = shutdown.clone();
    builder
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                let _ = shutdown_wait.wait_for(|stop| *stop).await;
            },
        )
        .await
        .context("serving gRPC")?;
    let phase = shared
        .membership
        .lock()
        .map(|m| m.phase().clone())
        .unwrap_or(Phase::Forming);
    match phase {
        Phase::Finished => {
            info!(run_dir = %run_dir, "job finished");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Phase::Failed(reason) => {
            error!(%reason, "job failed");
            Ok(std::process::ExitCode::FAILURE)
        }
        _ => {
            info!(
                "coordinator stopped; the job resumes from {} when restarted",
                run_dir
            );
            Ok(std::process::ExitCode::from(130))
        }
    }
}

/// Forms groups, detects lost workers, and shuts down a little after the job ends (so every
/// worker hears STOP on its next heartbeat), unless `keep_serving`.
async fn ticker(
    shared: Arc<Shared>,
    config: Arc<arbor_common::config::JobConfig>,
    shutdown: watch::Sender<bool>,
    keep_serving: bool,
) {
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    let mut ended_at: Option<tokio::time::Instant> = None;
    let grace = Duration::from_secs_f64(config.cluster.heartbeat_interval_s * 2.0 + 1.0);
    loop {
        interval.tick().await;
        let (changed, ended) = {
            let mut membership = shared.membership.lock().unwrap_or_else(|p| p.into_inner());
            let changed = match membership.tick() {
                Ok(changed) => changed,
                Err(error) => {
                    error!(error = format!("{error:#}"), "coordinator tick failed");
                    false
                }
            };
            let ended = matches!(membership.phase(), Phase::Finished | Phase::Failed(_));
            (changed, ended)
        };
        if changed {
            shared.notify();
        }
        if ended && keep_serving {
            if ended_at.is_none() {
                info!("the job has ended; serving status until SIGTERM (--keep-serving)");
                ended_at = Some(tokio::time::Instant::now());
            }
            continue;
        }
        if ended {
            let since = *ended_at.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= grace {
                let _ = shutdown.send(true);
                return;
            }
        }
    }
}

async fn stop_on_signal(shutdown: watch::Sender<bool>) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    let _ = shutdown.send(true);
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    info!("signal received: stopping the coordinator");
    let _ = shutdown.send(true);
}

/// `/metrics` (Prometheus text), `/healthz` (the process serves) and `/readyz` (the job has not
/// failed).
async fn serve_http(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    use axum::routing::get;
    let metrics_state = shared.clone();
    let ready_state = shared.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let shared = metrics_state.clone();
                async move { shared.metrics.render() }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let shared = ready_state.clone();
                async move {
                    let phase = shared
                        .membership
                        .lock()
                        .map(|m| m.phase().clone())
                        .unwrap_or(Phase::Forming);
                    match phase {
                        Phase::Failed(reason) => (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            format!("failed: {reason}\n"),
                        ),
                        _ => (axum::http::StatusCode::OK, "ready\n".to_string()),
                    }
                }
            }),
        );
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await;
}

/// Whether a config value is an object-store URL (`file://` counts as local).
fn is_remote(value: &str) -> bool {
    value.contains("://") && !value.starts_with("file://")
}
