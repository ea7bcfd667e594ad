//! The control plane as one process.
//!
//! The directory source feeds the model; every change the watcher reports becomes a new
//! snapshot (only the namespaces it touched are re-translated) published to all xDS
//! streams; the placement of enrolled pods feeds the CA, so a node's ztunnel can obtain
//! certificates for exactly the pods scheduled there. xDS and the CA share one gRPC port
//! over TLS (Istio's 15012), both authenticating callers by their Bearer credential.
//! Policy statuses, config errors and each proxy's sync state are served as JSON on the
//! admin endpoint (localhost), which `trellisctl` reads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Status;
use trellis_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use trellis_proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer;

use crate::ca::auth::{Authenticator, LocalCredentials, NodeWorkloads};
use crate::ca::service::{CaService, serving_certificate};
use crate::ca::store::DirStore;
use crate::ca::{CaConfig, CaError, CertificateAuthority, RootOfTrust};
use crate::config::authz::{PolicyState, PolicyStatus};
use crate::config::dir::{Change, DirSource, watch as watch_dir};
use crate::config::load::{ConfigError, ObjectRef};
use crate::config::model::{MeshConfig, Model};
use crate::config::snapshot::Snapshot;
use crate::xds::{AckTracker, Publisher, XdsServer};

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The manifests.
    pub config_dir: PathBuf,
    /// Mesh-wide settings.
    pub mesh: MeshConfig,
    /// Where the CA keeps its root (`ca/`) and the issued credentials (`credentials/`).
    pub state_dir: PathBuf,
    /// xDS and CA (gRPC over TLS).
    pub grpc: SocketAddr,
    /// Admin endpoint (plain HTTP, unauthenticated: `/debug/status` shows every policy and
    /// proxy; keep it on localhost).
    pub admin: SocketAddr,
    /// Readiness only (`/ready`, nothing else): what a kubelet probes on the pod's address
    /// while the admin endpoint stays on localhost. `None`: not served.
    pub readiness: Option<SocketAddr>,
    /// DNS names and IPs in the serving certificate (what clients dial).
    pub serving_names: Vec<String>,
    /// How often the directory is polled.
    pub poll_interval: Duration,
    /// Write the trust bundle (PEM) here at start and whenever the root of trust changes,
    /// for clients to use (local mode's equivalent of the trust-bundle ConfigMap).
    pub write_roots: Option<PathBuf>,
    /// How often the CA's files (`<state_dir>/ca`, or the CA Secrets on Kubernetes) are
    /// re-read, so an operator rotates the root by replacing them (docs/identity.md).
    pub ca_poll_interval: Duration,
    /// How long the directory must stay unchanged before a burst of edits is applied.
    pub debounce: Duration,
    /// Read the configuration from the Kubernetes API with this client instead of
    /// `config_dir`.
    pub kubernetes: Option<KubeClient>,
    /// With `kubernetes`: write statuses and deploy waypoints (one replica at a time).
    pub controller: Option<crate::controller::ControllerConfig>,
    /// With `kubernetes`: the audience of the ServiceAccount tokens proxies present.
    pub token_audience: String,
    /// With `kubernetes`: ztunnel's ServiceAccount (namespace, name); default
    /// `trellis-ztunnel` in the client's namespace.
    pub ztunnel_service_account: Option<(String, String)>,
}

/// A Kubernetes API client (for [`Options::kubernetes`]).
#[derive(Clone)]
pub struct KubeClient(pub kube::Client);

impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeClient")
    }
}

impl Options {
    /// Defaults for everything but the config directory.
    pub fn new(config_dir: impl Into<PathBuf>) -> Options {
        Options {
            config_dir: config_dir.into(),
            mesh: MeshConfig::default(),
            state_dir: PathBuf::from("/var/lib/trellis/control-plane"),
            grpc: SocketAddr::from(([0, 0, 0, 0], 15012)),
            admin: SocketAddr::from(([127, 0, 0, 1], 15014)),
            readiness: None,
            serving_names: vec!["localhost".into(), "127.0.0.1".into()],
            poll_interval: Duration::from_millis(500),
            write_roots: None,
            ca_poll_interval: Duration::from_secs(2),
            debounce: Duration::from_millis(200),
            kubernetes: None,
            controller: None,
            token_audience: "trellis-ca".into(),
            ztunnel_service_account: None,
        }
    }
}

/// Why the control plane did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config directory cannot be read.
    #[error("config directory {}: {error}", path.display())]
    ConfigDir {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        error: std::io::Error,
    },
    /// The CA's root or credentials.
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    /// A port is taken.
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    /// The TLS settings of the gRPC server.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The trust bundle file (`write_roots`) cannot be written.
    #[error("cannot write the trust bundle file: {0}")]
    Roots(std::io::Error),
}

/// The status of one policy, with where it is in effect.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyReport {
    /// Which policy.
    pub id: ObjectRef,
    /// Its status.
    pub status: PolicyStatus,
    /// Connected proxies that have not yet ACKed the policy's current version (empty: in
    /// effect everywhere; only for policies ztunnel enforces).
    pub pending_at: Vec<String>,
}

/// What the admin endpoint reports.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    /// Snapshot generation served now.
    pub generation: u64,
    /// Every policy.
    pub policies: Vec<PolicyReport>,
    /// Documents that did not load (their objects keep their last good version).
    pub errors: Vec<ConfigError>,
    /// Connected proxies.
    pub proxies: Vec<String>,
}

struct Shared {
    /// Whether the configuration has been read in full once (every Kubernetes kind listed;
    /// the directory: at start).
    ready: std::sync::atomic::AtomicBool,
    publisher: Publisher,
    acks: Arc<AckTracker>,
    outstanding: RwLock<Vec<ConfigError>>,
    object_warnings: RwLock<BTreeMap<ObjectRef, Vec<String>>>,
}

/// A running control plane.
pub struct ControlPlane {
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
    readiness_addr: Option<SocketAddr>,
    /// The trust bundle handed out now (the CA's `root-cert.pem`); follows rotations.
    roots_pem: watch::Sender<String>,
    credentials: Arc<LocalCredentials>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("grpc_addr", &self.grpc_addr)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Reads the directory, loads (or creates) the CA, binds the ports and starts serving.
    pub async fn start(opts: Options) -> Result<ControlPlane, StartError> {
        let mesh = opts.mesh.clone();
        // The CA: on Kubernetes its root is in a Secret (shared by the replicas), else in
        // the state directory.
        let root = match &opts.kubernetes {
            Some(KubeClient(client)) => {
                use crate::ca::secret::{Origin, load_or_generate};
                let (root, origin) = load_or_generate(client, &mesh.trust_domain).await?;
                let ns = client.default_namespace();
                match origin {
                    Origin::Plugged => {
                        tracing::info!(secret = %format!("{ns}/cacerts"), "signing with the plugged-in CA")
                    }
                    Origin::Stored => {
                        tracing::info!(secret = %format!("{ns}/trellis-ca"), "signing with the stored root of trust")
                    }
                    Origin::Generated => {
                        tracing::info!(secret = %format!("{ns}/trellis-ca"), "generated a new self-signed root of trust")
                    }
                }
                root
            }
            None => {
                let store = DirStore::new(opts.state_dir.join("ca"));
                let (root, generated) = RootOfTrust::load_or_generate(&store, &mesh.trust_domain)?;
                if generated {
                    tracing::info!(dir = %opts.state_dir.join("ca").display(), "generated a new self-signed root of trust");
                }
                root
            }
        };
        let roots_pem = root.roots_pem().to_string();
        if let Some(path) = &opts.write_roots {
            write_file_atomically(path, &roots_pem).map_err(StartError::Roots)?;
        }
        let (shared_roots, _) = watch::channel(roots_pem.clone());
        let ca = Arc::new(CertificateAuthority::new(
            CaConfig {
                trust_domain: mesh.trust_domain.clone(),
                ..CaConfig::default()
            },
            root,
        ));
        let credentials = Arc::new(LocalCredentials::open(opts.state_dir.join("credentials"))?);
        let placement = Arc::new(NodeWorkloads::default());

        // The configuration.
        let mut source = DirSource::new(&opts.config_dir);
        let mut model = Model::default();
        let first = if opts.kubernetes.is_some() {
            // Filled by the watchers below; not ready until every kind has been listed.
            Change::default()
        } else {
            source
                .scan(&mut model)
                .map_err(|error| StartError::ConfigDir {
                    path: opts.config_dir.clone(),
                    error,
                })?
        };
        report(&first);
        model.take_dirty();
        placement.replace_all(model.identities_by_node(&mesh));
        let (publisher, snapshots) = Publisher::new(Snapshot::build(&model, &mesh));
        let acks = Arc::new(AckTracker::default());
        let shared = Arc::new(Shared {
            ready: std::sync::atomic::AtomicBool::new(opts.kubernetes.is_none()),
            publisher,
            acks: acks.clone(),
            outstanding: RwLock::new(first.outstanding.clone()),
            object_warnings: RwLock::new(first.object_warnings.clone()),
        });
        if opts.kubernetes.is_none() {
            tracing::info!(
                dir = %opts.config_dir.display(),
                objects = first.applied.len(),
                errors = first.outstanding.len(),
                "configuration loaded"
            );
        }

        let (shutdown, stopped) = watch::channel(false);
        let mut tasks = Vec::new();

        // Watch the Kubernetes API; publish each change.
        if let Some(KubeClient(client)) = opts.kubernetes.clone() {
            let shared = shared.clone();
            let placement = placement.clone();
            let mesh = mesh.clone();
            let controller = opts.controller.clone();
            let roots = shared_roots.subscribe();
            let mut stop = stopped.clone();
            tasks.push(tokio::spawn(async move {
                tokio::select! {
                    () = run_kube_source(client, model, shared, placement, mesh, controller, roots) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            }));
        } else
        // Watch the directory; publish each change.
        {
            let shared = shared.clone();
            let placement = placement.clone();
            let mesh = mesh.clone();
            let mut stop = stopped.clone();
            let watcher = watch_dir(
                source,
                model,
                opts.poll_interval,
                opts.debounce,
                move |model, change| {
                    report(&change);
                    *shared
                        .outstanding
                        .write()
                        .unwrap_or_else(|e| e.into_inner()) = change.outstanding.clone();
                    *shared
                        .object_warnings
                        .write()
                        .unwrap_or_else(|e| e.into_inner()) = change.object_warnings.clone();
                    if change.changed() {
                        let dirty = model.take_dirty();
                        let prev = shared.publisher.current();
                        let next = Snapshot::rebuild(&prev, model, &mesh, &dirty);
                        shared.publisher.publish(next);
                        placement.replace_all(model.identities_by_node(&mesh));
                        tracing::info!(
                            generation = shared.publisher.current().generation,
                            applied = change.applied.len(),
                            deleted = change.deleted.len(),
                            namespaces = dirty.len(),
                            "configuration change published"
                        );
                    }
                    true
                },
            );
            tasks.push(tokio::spawn(async move {
                tokio::select! {
                    () = watcher => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            }));
        }

        // The root of trust follows its files (`<state_dir>/ca`, or the `cacerts` /
        // `trellis-ca` Secret on Kubernetes): the operator rotates it by replacing them; an
        // invalid set is refused and the current root kept.
        {
            let (ca, roots, write_roots) =
                (ca.clone(), shared_roots.clone(), opts.write_roots.clone());
            let every = opts.ca_poll_interval;
            let mut stop = stopped.clone();
            let kube = opts.kubernetes.clone();
            let store = DirStore::new(opts.state_dir.join("ca"));
            tasks.push(tokio::spawn(async move {
                let load = move || {
                    let (kube, store) = (kube.clone(), store.clone());
                    async move {
                        match kube {
                            Some(KubeClient(client)) => {
                                crate::ca::secret::current_files(&client).await
                            }
                            None => crate::ca::store::CaStore::load(&store),
                        }
                    }
                };
                let reload = follow_root_of_trust(load, ca, roots, write_roots, every);
                tokio::select! {
                    () = reload => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            }));
        }

        // gRPC: xDS and CA on one TLS port.
        let listener = TcpListener::bind(opts.grpc)
            .await
            .map_err(|e| StartError::Listen(opts.grpc, e))?;
        let grpc_addr = listener
            .local_addr()
            .map_err(|e| StartError::Listen(opts.grpc, e))?;
        let names: Vec<&str> = opts.serving_names.iter().map(String::as_str).collect();
        // One year, or less when the root ends sooner (the CA caps it); renewed on restart.
        let (cert_pem, key_pem) =
            serving_certificate(&ca, &names, Duration::from_secs(365 * 24 * 3600))?;
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem))
            .timeout(Duration::from_secs(10));
        // Proxies authenticate with issued credentials; on Kubernetes with their projected
        // ServiceAccount tokens (issued credentials still work, for proxies outside).
        let auth: Arc<dyn Authenticator> = match &opts.kubernetes {
            Some(KubeClient(client)) => {
                let ztunnel = opts.ztunnel_service_account.clone().unwrap_or_else(|| {
                    (
                        client.default_namespace().to_string(),
                        "trellis-ztunnel".to_string(),
                    )
                });
                Arc::new(
                    crate::ca::token_review::TokenReviewAuth::new(
                        client.clone(),
                        &opts.token_audience,
                        &mesh.trust_domain,
                        ztunnel,
                    )
                    .with_local(credentials.clone()),
                )
            }
            None => credentials.clone(),
        };
        let xds_auth = auth.clone();
        let xds = Authenticated {
            inner: AggregatedDiscoveryServiceServer::new(
                XdsServer::new(snapshots, acks).with_shutdown(stopped.clone()),
            ),
            auth: xds_auth,
        };
        let ca_service = IstioCertificateServiceServer::new(CaService::new(ca, auth, placement));
        let router = tonic::transport::Server::builder()
            .tls_config(tls)?
            .max_concurrent_streams(256)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .tcp_keepalive(Some(Duration::from_secs(60)))
            .add_service(xds)
            .add_service(ca_service);
        {
            let mut stop = stopped.clone();
            tasks.push(tokio::spawn(async move {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let result = router
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = result {
                    tracing::error!(error = %e, "gRPC server stopped");
                }
            }));
        }

        // Admin.
        let admin = TcpListener::bind(opts.admin)
            .await
            .map_err(|e| StartError::Listen(opts.admin, e))?;
        let admin_addr = admin
            .local_addr()
            .map_err(|e| StartError::Listen(opts.admin, e))?;
        let mut listeners = vec![(admin, Endpoints::Admin)];
        let mut readiness_addr = None;
        if let Some(addr) = opts.readiness {
            let ready = TcpListener::bind(addr)
                .await
                .map_err(|e| StartError::Listen(addr, e))?;
            readiness_addr = Some(
                ready
                    .local_addr()
                    .map_err(|e| StartError::Listen(addr, e))?,
            );
            listeners.push((ready, Endpoints::ReadinessOnly));
        }
        for (listener, endpoints) in listeners {
            let shared = shared.clone();
            let mut stopped = stopped.clone();
            tasks.push(tokio::spawn(async move {
                tokio::select! {
                    () = serve_admin(listener, shared, endpoints) => {}
                    _ = stopped.wait_for(|s| *s) => {}
                }
            }));
        }
        tracing::info!(%grpc_addr, %admin_addr, ?readiness_addr, "control plane serving");
        Ok(ControlPlane {
            grpc_addr,
            admin_addr,
            readiness_addr,
            roots_pem: shared_roots,
            credentials,
            shared,
            shutdown,
            tasks,
        })
    }

    /// Where xDS and the CA are served.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Where the admin endpoint is served.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Where readiness alone is served, if asked for.
    pub fn readiness_addr(&self) -> Option<SocketAddr> {
        self.readiness_addr
    }

    /// The trust bundle (PEM roots) clients verify the server and each other with.
    pub fn roots_pem(&self) -> String {
        self.roots_pem.borrow().clone()
    }

    /// Issued credentials (for a node's ztunnel or a waypoint).
    pub fn credentials(&self) -> &LocalCredentials {
        &self.credentials
    }

    /// The snapshot served now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.publisher.current()
    }

    /// Statuses, errors and proxies now.
    pub fn status(&self) -> StatusReport {
        status_report(&self.shared)
    }

    /// Stops serving: ends the xDS streams (proxies reconnect elsewhere or later), lets
    /// requests in flight finish for up to five seconds, then stops.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        for mut t in self.tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                t.abort();
            }
        }
    }
}

/// The Kubernetes source: watchers → model → snapshots. Events arriving together are applied
/// as one change; the control plane is ready once every kind has been listed.
async fn run_kube_source(
    client: kube::Client,
    mut model: Model,
    shared: Arc<Shared>,
    placement: Arc<NodeWorkloads>,
    mesh: crate::config::model::MeshConfig,
    controller: Option<crate::controller::ControllerConfig>,
    mut roots: watch::Receiver<String>,
) {
    use crate::config::kube::{Event, KINDS, KubeState, watch as watch_kinds};
    let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
    // The control plane's own namespace gets the trust bundle too (ztunnel mounts it).
    let own_namespace = client.default_namespace().to_string();
    let watchers = tokio::spawn(watch_kinds(client.clone(), KINDS, tx));
    // The writer side: statuses and waypoints, from what this replica reads.
    let (inputs, inputs_rx) = watch::channel(crate::controller::Inputs::default());
    let writer = controller.map(|c| tokio::spawn(crate::controller::run(client, c, inputs_rx)));
    let mut state = KubeState::default();
    let mut listed = std::collections::BTreeSet::new();
    // What the writer's inputs were last computed from (they are recomputed only when it
    // changed: a batch of events that changed nothing costs nothing).
    type InputsFrom = (
        u64,
        Vec<crate::config::load::ConfigError>,
        BTreeMap<crate::config::load::ObjectRef, Vec<String>>,
        bool,
        String,
    );
    let mut inputs_from: Option<InputsFrom> = None;
    let mut roots_followed = true;
    loop {
        // An API event, or a new trust bundle (root rotation) to write out.
        let first = tokio::select! {
            event = rx.recv() => match event {
                Some(e) => Some(e),
                None => break,
            },
            r = roots.changed(), if roots_followed => {
                roots_followed = r.is_ok();
                None
            }
        };
        let roots_pem = roots.borrow_and_update().clone();
        let mut changed = false;
        let mut next = first;
        while let Some(event) = next {
            // Ready once every kind has been listed, or is not served at all (a missing
            // CRD must not keep the mesh from starting; the kind is read once it appears).
            if let Event::ListDone(kind) | Event::Absent(kind, _) = &event {
                listed.insert(kind.kind);
            }
            changed |= state.apply(event, &mut model);
            next = rx.try_recv().ok();
        }
        // Objects that do not load, and kinds that cannot be read, on the status page.
        let mut errors = state.errors();
        errors.extend(state.watch_errors().into_iter().map(|(kind, reason)| {
            crate::config::load::ConfigError {
                file: "kubernetes".into(),
                object: format!("every {kind}"),
                field: "-".into(),
                reason,
                id: None,
            }
        }));
        let warnings = state.object_warnings();
        let from = (
            state.status_changes(),
            errors.clone(),
            warnings.clone(),
            listed.len() == KINDS.len(),
            roots_pem.clone(),
        );
        *shared
            .outstanding
            .write()
            .unwrap_or_else(|e| e.into_inner()) = errors;
        *shared
            .object_warnings
            .write()
            .unwrap_or_else(|e| e.into_inner()) = warnings;
        if changed {
            let dirty = model.take_dirty();
            let prev = shared.publisher.current();
            shared
                .publisher
                .publish(Snapshot::rebuild(&prev, &model, &mesh, &dirty));
            placement.replace_all(model.identities_by_node(&mesh));
            tracing::info!(
                generation = shared.publisher.current().generation,
                namespaces = dirty.len(),
                "configuration change published"
            );
        }
        if listed.len() == KINDS.len()
            && !shared.ready.swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            tracing::info!(
                objects = state.objects().len(),
                errors = state.errors().len(),
                "configuration read from the Kubernetes API"
            );
        }
        if writer.is_some() && (changed || inputs_from.as_ref() != Some(&from)) {
            inputs_from = Some(from);
            let mut now = controller_inputs(
                &model,
                &state,
                &mesh,
                &shared,
                listed.len() == KINDS.len(),
                &roots_pem,
            );
            if let Some((_, namespaces)) = now.trust_bundle.as_mut() {
                namespaces.insert(own_namespace.clone());
            }
            inputs.send_if_modified(|current| {
                let modified = *current != now;
                *current = now;
                modified
            });
        }
    }
    watchers.abort();
    if let Some(w) = writer {
        w.abort();
    }
}

/// What the Kubernetes writer works from: every policy's status, and the waypoint
/// Gateways with their Services' addresses.
fn controller_inputs(
    model: &Model,
    state: &crate::config::kube::KubeState,
    mesh: &crate::config::model::MeshConfig,
    shared: &Shared,
    synced: bool,
    roots_pem: &str,
) -> crate::controller::Inputs {
    use crate::controller::status;
    let mut statuses: BTreeMap<_, _> = status_report(shared)
        .policies
        .iter()
        .filter_map(|p| {
            let target = status::target(&p.id)?;
            let mut body = status::policy_status(
                &p.id,
                &p.status,
                model.generation(&p.id),
                state.observed_status(&p.id),
            );
            // The object the status was computed for, as a precondition: never written onto
            // a policy deleted and re-created under the same name meanwhile.
            if let Some(uid) = model.metadata(&p.id).and_then(|m| m.uid.clone()) {
                body["metadata"]["uid"] = uid.into();
            }
            Some((target, body))
        })
        .collect();
    statuses.extend(crate::controller::routes::route_statuses(model, mesh));
    let waypoints = crate::controller::waypoints(model);
    let bundle_namespaces = crate::controller::bundle_namespaces(model, &waypoints);
    crate::controller::Inputs {
        synced,
        statuses,
        waypoints,
        trust_bundle: Some((roots_pem.to_string(), bundle_namespaces)),
    }
}

/// Re-reads the CA's files every `every`; a changed, valid set becomes the root of trust:
/// the CA signs with it, the trust bundle handed out (and written to `write_roots`) is its
/// `root-cert.pem`. An invalid set is logged and ignored (the current root stays).
async fn follow_root_of_trust<L, F>(
    mut load: L,
    ca: Arc<CertificateAuthority>,
    roots: watch::Sender<String>,
    write_roots: Option<PathBuf>,
    every: Duration,
) where
    L: FnMut() -> F,
    F: std::future::Future<Output = Result<Option<crate::ca::store::CaFiles>, CaError>>,
{
    // What was last looked at; the first round compares with the root in use (which may
    // have been read before this task started).
    let mut last: Option<crate::ca::store::CaFiles> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let files = match load().await {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the CA's files; still signing with the current root");
                continue;
            }
        };
        if last.as_ref() == Some(&files) {
            continue;
        }
        match RootOfTrust::from_files(&files) {
            Ok(root)
                if {
                    let current = ca.root();
                    current.chain_pem() == root.chain_pem()
                        && current.roots_pem() == root.roots_pem()
                } => {}
            Ok(root) => {
                let pem = root.roots_pem().to_string();
                ca.replace_root(root);
                roots.send_replace(pem.clone());
                if let Some(path) = &write_roots
                    && let Err(e) = write_file_atomically(path, &pem)
                {
                    tracing::error!(file = %path.display(), error = %e, "cannot write the new trust bundle");
                }
                tracing::info!(
                    roots = pem.matches("BEGIN CERTIFICATE").count(),
                    "root of trust reloaded: signing with the new CA certificate, handing out the new trust bundle"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "the CA's files changed but are not a valid root of trust; still signing with the previous one")
            }
        }
        last = Some(files);
    }
}

fn write_file_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path))
}

fn report(change: &Change) {
    for e in &change.errors {
        tracing::error!(file = %e.file, object = %e.object, field = %e.field, reason = %e.reason, "rejected; the object keeps its last good version");
    }
    for w in &change.warnings {
        tracing::warn!("{w}");
    }
}

/// The xDS service behind authentication: every stream carries a credential the CA knows
/// (checked before the stream starts; on Kubernetes that may ask the API server, so this is
/// an async layer rather than tonic's synchronous interceptor).
#[derive(Clone)]
struct Authenticated<S> {
    inner: S,
    auth: Arc<dyn Authenticator>,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tonic::codegen::Service<http::Request<tonic::body::Body>> for Authenticated<S>
where
    S: tonic::codegen::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        // The clone is ready only after poll_ready: call the one that was polled.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let mut req = req;
            let metadata = tonic::metadata::MetadataMap::from_headers(req.headers().clone());
            match auth.authenticate(&metadata).await {
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                    inner.call(req).await
                }
                Err(e) => {
                    tracing::warn!(error = %e, "xDS stream refused");
                    Ok(Status::unauthenticated(e.to_string()).into_http())
                }
            }
        })
    }
}

fn status_report(shared: &Shared) -> StatusReport {
    let snap = shared.publisher.current();
    let errors = shared
        .outstanding
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut statuses = snap.statuses.clone();
    // Fields that were ignored change what a policy means: they are part of its status.
    for (id, warnings) in shared
        .object_warnings
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        if let Some(status) = statuses.get_mut(id) {
            status.reasons.extend(warnings.iter().cloned());
            if status.state == PolicyState::Accepted {
                status.state = PolicyState::AcceptedWithWarnings;
            }
        }
    }
    // A policy whose latest edit did not load: say so on its status.
    crate::config::authz::with_load_errors(&mut statuses, &errors);
    let authz = snap.of_type(trellis_proto::type_url::AUTHORIZATION);
    let policies: BTreeMap<ObjectRef, PolicyReport> = statuses
        .into_iter()
        .map(|(id, status)| {
            let name = format!("{}/{}", id.namespace, id.name);
            let pending_at = match authz.and_then(|a| a.get(&name)) {
                Some(r) if id.kind == "AuthorizationPolicy" => {
                    shared
                        .acks
                        .lagging(trellis_proto::type_url::AUTHORIZATION, &name, &r.version)
                }
                _ => Vec::new(),
            };
            let report = PolicyReport {
                id: id.clone(),
                status,
                pending_at,
            };
            (id, report)
        })
        .collect();
    StatusReport {
        generation: snap.generation,
        policies: policies.into_values().collect(),
        errors,
        proxies: shared.acks.proxies(),
    }
}

fn status_json(r: &StatusReport) -> serde_json::Value {
    let state = |s: &PolicyState| match s {
        PolicyState::Accepted => "Accepted",
        PolicyState::AcceptedWithWarnings => "AcceptedWithWarnings",
        PolicyState::Rejected => "Rejected",
    };
    serde_json::json!({
        "generation": r.generation,
        "policies": r.policies.iter().map(|p| serde_json::json!({
            "kind": p.id.kind,
            "namespace": p.id.namespace,
            "name": p.id.name,
            "state": state(&p.status.state),
            "reasons": p.status.reasons,
            "pendingAt": p.pending_at,
        })).collect::<Vec<_>>(),
        "errors": r.errors.iter().map(|e| serde_json::json!({
            "file": e.file,
            "object": e.object,
            "field": e.field,
            "reason": e.reason,
        })).collect::<Vec<_>>(),
        "proxies": r.proxies,
    })
}

/// What an admin listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoints {
    /// `/ready` and `/debug/status`.
    Admin,
    /// `/ready` only.
    ReadinessOnly,
}

async fn serve_admin(listener: TcpListener, shared: Arc<Shared>, endpoints: Endpoints) {
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(admin(&req, &shared, endpoints)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(Duration::from_secs(5))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(hyper_util::rt::TokioIo::new(conn), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

fn admin<B>(
    req: &hyper::Request<B>,
    shared: &Shared,
    endpoints: Endpoints,
) -> hyper::Response<Full<Bytes>> {
    let reply = |code: u16, kind: &str, body: String| {
        hyper::Response::builder()
            .status(code)
            .header("content-type", kind)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if req.method() != hyper::Method::GET {
        return reply(405, "text/plain", "GET only\n".into());
    }
    match req.uri().path() {
        "/ready" if shared.ready.load(std::sync::atomic::Ordering::Acquire) => {
            reply(200, "text/plain", "ready\n".into())
        }
        "/ready" => reply(
            503,
            "text/plain",
            "not ready: the configuration has not been read in full yet\n".into(),
        ),
        _ if endpoints == Endpoints::ReadinessOnly => reply(
            404,
            "text/plain",
            "not found; this port serves /ready only\n".into(),
        ),
        "/debug/status" => {
            let body = status_json(&status_report(shared));
            reply(
                200,
                "application/json",
                serde_json::to_string_pretty(&body).unwrap_or_default() + "\n",
            )
        }
        _ => reply(
            404,
            "text/plain",
            "not found; try /ready or /debug/status\n".into(),
        ),
    }
}
