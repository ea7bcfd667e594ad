//! ztunnel's HBONE port (15008) facing peers that are not ztunnels: a peer holding a real
//! mesh certificate that sends what a ztunnel never would (a CONNECT for another pod, a
//! malformed authority, a GET), a peer with a certificate from another CA, and a node
//! asking the CA for an identity that is not on it. Runs as root on the namespace cluster.
//!
//! The test process itself is the peer: it runs its HBONE client on a thread inside an
//! unenrolled pod's network namespace (so its traffic is not captured), with a certificate
//! it obtained from the control plane's CA as node1 would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use bytes::Bytes;
use trellis_core::SpiffeId;
use trellis_core::cert::{CertConfig, CertManager, GrpcCaClient, GrpcCaConfig};
use trellis_core::hbone;
use trellis_core::testing::TestCa;
use trellis_core::tls::{TrustBundle, WorkloadCert};
use trellis_e2e::mesh::{Mesh, eventually};
use trellis_e2e::{Cluster, Node, Pod, with_cluster};
use trellis_e2e::{Netns, in_netns};

fn runtime() -> Result<tokio::runtime::Runtime> {
    // Current-thread: every socket is created on the calling thread, which is inside the
    // namespace.
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A certificate for `ns/sa` obtained from the mesh CA with `node`'s credential, from
/// inside `node`'s namespace (as that node's ztunnel asks).
fn issue(mesh: &Mesh, c: &Cluster, node: &Node, ns: &str, sa: &str) -> Result<Arc<WorkloadCert>> {
    issue_with(mesh, c, node, mesh.node_credential(node)?, ns, sa)
}

/// A certificate for `ns/sa` obtained with `credential`, asking from `node`'s namespace.
fn issue_with(
    mesh: &Mesh,
    c: &Cluster,
    node: &Node,
    credential: String,
    ns: &str,
    sa: &str,
) -> Result<Arc<WorkloadCert>> {
    let roots = mesh.roots_pem()?;
    let (endpoint, server_name) = mesh.control_plane_url(c);
    let id = SpiffeId::new("cluster.local", ns, sa)?;
    in_netns(node.netns(), move || -> Result<Arc<WorkloadCert>> {
        runtime()?.block_on(async move {
            let ca = GrpcCaClient::new(&GrpcCaConfig {
                endpoint,
                roots: trellis_core::channel::ControlPlaneRoots::Pem(roots.clone()),
                server_name,
                credential: credential.into(),
                connect_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_secs(10),
            })?;
            let bundle = Arc::new(TrustBundle::from_pem("cluster.local", &roots)?);
            let certs = CertManager::new(
                ca,
                bundle,
                CertConfig {
                    max_backoff: Duration::from_millis(200),
                    ..CertConfig::default()
                },
            );
            let cert = tokio::time::timeout(Duration::from_secs(10), certs.fetch(&id))
                .await
                .map_err(|_| anyhow!("no answer from the CA"))?;
            certs.shutdown();
            Ok(cert?)
        })
    })?
}

/// What the peer observed.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// The HBONE server answered the request with this status.
    Status(u16),
    /// The connection ended before any answer (TLS refused, or closed).
    Refused(String),
}

/// From inside `from`, opens mutual TLS to `server` with `cert` (expecting the server to
/// be `expect`) and sends one request: `method` with `uri`.
fn request(
    from: &Pod,
    server: SocketAddr,
    cert: Arc<WorkloadCert>,
    roots: Arc<TrustBundle>,
    expect: SpiffeId,
    method: &str,
    uri: &str,
) -> Result<Seen> {
    let (method, uri) = (method.to_string(), uri.to_string());
    in_netns(from.netns(), move || -> Result<Seen> {
        runtime()?.block_on(async move {
            let cfg = trellis_core::tls::client_config(&cert, roots, expect)?;
            let tcp = tokio::net::TcpStream::connect(server).await?;
            let name = rustls::pki_types::ServerName::IpAddress(server.ip().into());
            let tls = match tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
            {
                Ok(t) => t,
                Err(e) => return Ok(Seen::Refused(format!("TLS: {e}"))),
            };
            let (send, conn) = match h2::client::handshake(tls).await {
                Ok(x) => x,
                Err(e) => return Ok(Seen::Refused(format!("HTTP/2: {e}"))),
            };
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let req = http::Request::builder()
                .method(method.as_str())
                .uri(uri.as_str())
                .body(())?;
            let answer = async {
                let (resp, mut body) = send.ready().await?.send_request(req, false)?;
                let status = resp.await?.status().as_u16();
                let _ = body.send_data(Bytes::new(), true);
                Ok::<_, h2::Error>(status)
            };
            Ok(
                match tokio::time::timeout(Duration::from_secs(10), answer).await {
                    Ok(Ok(status)) => Seen::Status(status),
                    Ok(Err(e)) => Seen::Refused(format!("HTTP/2: {e}")),
                    Err(_) => Seen::Refused("no answer in 10 s".into()),
                },
            )
        })
    })?
}

#[test]
fn misbehaving_and_forged_peers_are_refused_and_logged() {
    with_cluster("hbone_peer", 2, |c| {
        let (n1, n2) = (&c.nodes()[0], &c.nodes()[1]);
        let mesh = Mesh::start(c)?;
        mesh.namespace("shop", true)?;
        mesh.namespace("outside", false)?;
        let a = c.add_pod(n1, "shop", "a", "a", &[])?;
        let b = c.add_pod(n2, "shop", "b", "b", &[])?;
        let peer = c.add_pod(n1, "outside", "peer", "peer", &[])?;
        for p in [&a, &b, &peer] {
            mesh.register_pod(c, p)?;
        }
        mesh.wait_captured(c, &a, true)?;
        mesh.wait_captured(c, &b, true)?;
        let mut cmd = trellis_e2e::app::testapp();
        cmd.args(["serve", "--tcp-echo", "0.0.0.0:9000"]);
        let mut server = c.spawn(&b, "b-server", cmd)?;
        server.wait_for_output("listening", Duration::from_secs(10))?;

        // A pod's identity is only for its node: node2 cannot get a's (a runs on node1).
        issue(&mesh, c, n2, "shop", "b").context("node2 asks for its own pod b")?;
        let stolen = issue(&mesh, c, n2, "shop", "a");
        ensure!(
            stolen
                .as_ref()
                .is_err_and(|e| format!("{e:#}").contains("may not obtain a certificate")),
            "node2 asked for a pod of node1: {:?}",
            stolen.map(|c| c.identity().to_string())
        );
        let a_cert = issue(&mesh, c, n1, "shop", "a").context("node1 asks for its pod a")?;
        let roots = Arc::new(TrustBundle::from_pem("cluster.local", &mesh.roots_pem()?)?);
        let b_id = SpiffeId::new("cluster.local", "shop", "b")?;
        let hbone: SocketAddr = format!("{}:15008", b.ip).parse()?;
        let ask = |cert: &Arc<WorkloadCert>, method: &str, uri: &str| {
            request(
                &peer,
                hbone,
                cert.clone(),
                roots.clone(),
                b_id.clone(),
                method,
                uri,
            )
        };

        // The probe is sound: a well-formed CONNECT for b with a's certificate succeeds.
        let b_app = format!("{}:9000", b.ip);
        ensure!(ask(&a_cert, "CONNECT", &b_app)? == Seen::Status(200));
        // A CONNECT for another pod's address through b's listener: 403.
        let other = format!("{}:9000", a.ip);
        let seen = ask(&a_cert, "CONNECT", &other)?;
        ensure!(
            seen == Seen::Status(403),
            "CONNECT to another pod: {seen:?}"
        );
        // A malformed authority (not ip:port) and a method other than CONNECT: 400.
        let seen = ask(&a_cert, "CONNECT", "example.invalid:9000")?;
        ensure!(seen == Seen::Status(400), "malformed authority: {seen:?}");
        let seen = ask(&a_cert, "GET", &format!("http://{b_app}/"))?;
        ensure!(seen == Seen::Status(400), "GET: {seen:?}");
        // A certificate for the same identity from another CA: no answer at all.
        let forged = Arc::new(TestCa::new("cluster.local").issue("shop", "a"));
        let seen = ask(&forged, "CONNECT", &b_app)?;
        ensure!(
            matches!(seen, Seen::Refused(_)),
            "a forged certificate got: {seen:?}"
        );

        // Each refusal is logged by b's ztunnel.
        eventually(
            "the refusals in node2's log",
            Duration::from_secs(10),
            || {
                let log = mesh.ztunnel("node2")?.output();
                Ok(log.contains("refusing a malformed HBONE request")
                    && log.contains("HBONE TLS handshake failed"))
            },
        )?;
        let denied = mesh.access_log("node2")?.into_iter().any(|l| {
            l["fields"]["dst"] == other.as_str()
                && l["fields"]["peer_identity"] == "spiffe://cluster.local/ns/shop/sa/a"
                && l["fields"]["result"]
                    .as_str()
                    .unwrap_or("")
                    .contains("not this pod's address")
        });
        ensure!(denied, "the CONNECT for another pod is in the access log");

        // ztunnel is unharmed: mesh traffic still flows from a to b.
        let mut cmd = trellis_e2e::app::testapp();
        cmd.args(["tcp", &b_app, "--bytes", "100000", "--timeout", "30"]);
        let out = c.run(&a, "echo-a-b", cmd)?;
        ensure!(out.contains("\"intact\":true"), "{out}");
        Ok(())
    });
}

/// A waypoint stand-in: an HBONE server (Trellis's own, `trellis_core::hbone`) on port
/// 15008 of `pod`, with `cert`, on a thread inside the pod's namespace. For every CONNECT it
/// answers 200, then writes `waypoint saw <authority> from <peer identity>` and closes. The
/// L7 waypoint itself is a later issue; this checks what ztunnel puts on the wire for it.
struct FakeWaypoint {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeWaypoint {
    fn start(pod: &Pod, cert: Arc<WorkloadCert>, roots: Arc<TrustBundle>) -> Result<FakeWaypoint> {
        let path = format!("/run/netns/{}", pod.netns());
        let addr: SocketAddr = format!("{}:15008", pod.ip).parse()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::spawn(move || {
            let report = ready_tx.clone();
            let run = || -> Result<()> {
                let ns = std::fs::File::open(&path)?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let rt = runtime()?;
                rt.block_on(async move {
                    let cfg = trellis_core::tls::server_config(&cert, roots)?;
                    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
                    let l = tokio::net::TcpListener::bind(addr).await?;
                    let _ = ready_tx.send(Ok(()));
                    let serve = async move {
                        loop {
                            let Ok((tcp, _)) = l.accept().await else {
                                continue;
                            };
                            let acceptor = acceptor.clone();
                            tokio::spawn(async move {
                                let Ok(tls) = acceptor.accept(tcp).await else {
                                    return;
                                };
                                let peer = trellis_core::tls::peer_identity(tls.get_ref().1)
                                    .map(|p| p.to_string())
                                    .unwrap_or_else(|_| "?".into());
                                let _ = hbone::serve(tls, move |inc| {
                                    let peer = peer.clone();
                                    async move {
                                        use tokio::io::AsyncWriteExt;
                                        let line =
                                            format!("waypoint saw {} from {peer}\n", inc.target);
                                        if let Ok(mut s) = inc.accept() {
                                            let _ = s.write_all(line.as_bytes()).await;
                                            let _ = s.shutdown().await;
                                        }
                                    }
                                })
                                .await;
                            });
                        }
                    };
                    tokio::select! {
                        () = serve => {},
                        _ = stopped => {},
                    }
                    Ok::<_, anyhow::Error>(())
                })
            };
            if let Err(e) = run() {
                let _ = report.send(Err(format!("{e:#}")));
            }
        });
        ready
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("the fake waypoint did not start"))?
            .map_err(|e| anyhow!("the fake waypoint: {e}"))?;
        Ok(FakeWaypoint {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for FakeWaypoint {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A service bound to a waypoint (`istio.io/use-waypoint`) is reached through the
/// waypoint: the client's ztunnel opens HBONE to a waypoint pod (resolved from the
/// waypoint's Service), as the client, asking for the service's VIP and port.
#[test]
fn a_service_bound_to_a_waypoint_is_reached_through_it() {
    with_cluster("waypoint_route", 2, |c| {
        let (n1, n2) = (&c.nodes()[0], &c.nodes()[1]);
        let mesh = Mesh::start(c)?;
        mesh.namespace("shop", true)?;
        let client = c.add_pod(n1, "shop", "client", "client", &[])?;
        let web = c.add_pod(n2, "shop", "web-1", "web", &[("app", "web")])?;
        // The waypoint's pod runs its own HBONE listener: ztunnel does not capture it.
        let wp = c.add_pod(
            n2,
            "shop",
            "waypoint-1",
            "waypoint",
            &[
                ("gateway.networking.k8s.io/gateway-name", "waypoint"),
                ("istio.io/dataplane-mode", "none"),
            ],
        )?;
        for p in [&client, &web, &wp] {
            mesh.register_pod(c, p)?;
        }
        mesh.apply(
            "waypoint.yaml",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: waypoint, namespace: shop}\nspec:\n  clusterIP: 10.96.0.20\n  selector: {gateway.networking.k8s.io/gateway-name: waypoint}\n  ports: [{name: mesh, port: 15008}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
        )?;
        mesh.wait_captured(c, &client, true)?;
        mesh.wait_captured(c, &web, true)?;
        mesh.wait_captured(c, &wp, false)?;

        let id = "spiffe://cluster.local/ns/shop/sa/waypoint";
        let cert = issue_with(
            &mesh,
            c,
            n2,
            mesh.waypoint_credential(id)?,
            "shop",
            "waypoint",
        )
        .context("the waypoint's certificate")?;
        let roots = Arc::new(TrustBundle::from_pem("cluster.local", &mesh.roots_pem()?)?);
        let _wp = FakeWaypoint::start(&wp, cert, roots.clone())?;

        let want = "waypoint saw 10.96.0.10:80 from spiffe://cluster.local/ns/shop/sa/client";
        let mut last = String::new();
        eventually(
            "the service reached through its waypoint",
            Duration::from_secs(20),
            || {
                let mut cmd = trellis_e2e::app::testapp();
                cmd.args([
                    "tcp",
                    "10.96.0.10:80",
                    "--message",
                    "hello",
                    "--timeout",
                    "5",
                ]);
                last = c
                    .run(&client, "client-to-web", cmd)
                    .unwrap_or_else(|e| format!("{e:#}"));
                Ok(last.contains(want))
            },
        )
        .with_context(|| format!("last answer: {last}"))?;
        let out = mesh.access_log("node1")?.into_iter().find(|l| {
            l["fields"]["direction"] == "outbound"
                && l["fields"]["dst"] == "10.96.0.10:80"
                && l["fields"]["route"] == "hbone"
        });
        ensure!(
            out.is_some_and(|l| l["fields"]["peer_identity"] == id),
            "the client's ztunnel logs the waypoint as the peer"
        );

        // The waypoint pod now answers with another identity's certificate (web's, which
        // node2 may obtain): the client refuses it (secure naming), and its log says the
        // TLS handshake failed and what it expected, not that a request was invalid.
        let _wp = {
            drop(_wp);
            let wrong = issue(&mesh, c, n2, "shop", "web").context("web's certificate")?;
            FakeWaypoint::start(&wp, wrong, roots)?
        };
        eventually(
            "the client's ztunnel to refuse the impostor",
            Duration::from_secs(20),
            || {
                let mut cmd = trellis_e2e::app::testapp();
                cmd.args([
                    "tcp",
                    "10.96.0.10:80",
                    "--message",
                    "hello",
                    "--timeout",
                    "5",
                ]);
                let answer = c
                    .run(&client, "client-to-impostor", cmd)
                    .unwrap_or_default();
                ensure!(
                    !answer.contains("waypoint saw"),
                    "the impostor was reached: {answer}"
                );
                Ok(mesh.access_log("node1")?.iter().any(|l| {
                    l["fields"]["result"].as_str().is_some_and(|r| {
                        r.contains("TLS handshake with")
                            && r.contains(&format!("expecting {id}"))
                            && !r.contains("invalid HBONE request")
                    })
                }))
            },
        )?;
        Ok(())
    });
}
