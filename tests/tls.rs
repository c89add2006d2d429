//! TLS termination with real TLS clients (`openssl s_client`, `curl`, and
//! reqwest/rustls), on certificates made by a test CA (rcgen): SNI picks the
//! certificate, TLS 1.1 is refused, ALPN h2 routes, Django sees
//! `X-Forwarded-Proto: https`, a rotation under continuous TLS load fails
//! nothing and new handshakes show the new serial within 2 s, and a broken
//! new key keeps the old certificate serving.

mod support;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SerialNumber};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "Switchyard test CA");
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// (cert PEM, key PEM) for `names`, with serial `serial`.
    fn leaf(&self, names: &[&str], serial: u8) -> (String, String) {
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, names[0]);
        p.serial_number = Some(SerialNumber::from(vec![0x42, serial]));
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A proxy whose listener terminates TLS with `site.pem` (the default,
/// www.example.test) and `api.pem` (*.api.example.test).
fn start(ca: &Ca, upstream: &Upstream, without_sni: &str) -> Proxy {
    start_with(ca, upstream, without_sni, "")
}

/// As [`start`], with `sections` (such as `[limits]`) in the config too.
fn start_with(ca: &Ca, upstream: &Upstream, without_sni: &str, sections: &str) -> Proxy {
    let (site_c, site_k) = ca.leaf(&["www.example.test"], 1);
    let (api_c, api_k) = ca.leaf(&["*.api.example.test"], 2);
    Proxy::builder(&format!(
        "tls = {{ cert = \"site.pem\", key = \"site.key\", without_sni = \"{without_sni}\", certificates = [{{ cert = \"api.pem\", key = \"api.key\" }}] }}\n\n\
         {sections}\n[[routes]]\ncluster = \"web\"\n[clusters.web]\nstatic = [\"{}\"]\n",
        upstream.addr
    ))
    .file("site.pem", &site_c)
    .file("site.key", &site_k)
    .file("api.pem", &api_c)
    .file("api.key", &api_k)
    .file("ca.pem", &ca.cert.pem())
    .start()
}

/// The serial (hex) of the certificate a handshake gets, or None if the
/// handshake failed. `sni` None: no SNI; `extra`: more s_client flags.
fn serial(p: &Proxy, sni: Option<&str>, extra: &[&str]) -> Option<String> {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &p.addr.to_string()]);
    match sni {
        Some(n) => cmd.args(["-servername", n]),
        None => cmd.arg("-noservername"),
    };
    let out = cmd.args(extra).stdin(Stdio::null()).stderr(Stdio::null()).output().expect("openssl is installed (.ci/run)");
    let text = String::from_utf8_lossy(&out.stdout);
    let pem_start = text.find("-----BEGIN CERTIFICATE-----")?;
    let pem_end = text.find("-----END CERTIFICATE-----")? + "-----END CERTIFICATE-----".len();
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    x509.stdin.take().unwrap().write_all(text[pem_start..pem_end].as_bytes()).unwrap();
    let out = x509.wait_with_output().unwrap();
    Some(String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("serial=").to_string())
}

fn https_client(p: &Proxy, fresh: bool) -> reqwest::blocking::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(p.path("ca.pem")).unwrap()).unwrap();
    let mut b = reqwest::blocking::Client::builder()
        .add_root_certificate(ca)
        .tls_built_in_root_certs(false)
        .resolve("www.example.test", p.addr)
        .resolve("v1.api.example.test", p.addr)
        .no_proxy()
        .timeout(Duration::from_secs(5));
    if fresh {
        b = b.pool_max_idle_per_host(0);
    }
    b.build().unwrap()
}

fn url(p: &Proxy, host: &str, path: &str) -> String {
    format!("https://{host}:{}{path}", p.addr.port())
}

#[test]
fn sni_picks_the_certificate_and_old_protocols_are_refused() {
    let ca = Ca::new();
    let up = Upstream::start("web");
    let p = start(&ca, &up, "default");
    assert_eq!(serial(&p, Some("www.example.test"), &[]).as_deref(), Some("4201"));
    assert_eq!(serial(&p, Some("v1.api.example.test"), &[]).as_deref(), Some("4202"), "wildcard SAN");
    assert_eq!(serial(&p, Some("WWW.Example.Test"), &[]).as_deref(), Some("4201"), "names ignore case");
    assert_eq!(serial(&p, None, &[]).as_deref(), Some("4201"), "no SNI: the default certificate");
    assert_eq!(serial(&p, Some("other.test"), &[]).as_deref(), Some("4201"), "an unknown name: the default");
    assert_eq!(serial(&p, Some("www.example.test"), &["-tls1_2"]).as_deref(), Some("4201"), "TLS 1.2 is accepted");
    // SECLEVEL=0: OpenSSL 3 would not even offer TLS 1.1 otherwise, and the
    // refusal must be the server's.
    assert_eq!(serial(&p, Some("www.example.test"), &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]), None, "TLS 1.1 is refused");
    assert_eq!(serial(&p, Some("www.example.test"), &["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"]), None, "TLS 1.0 is refused");
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &p.addr.to_string(), "-servername", "www.example.test", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("protocol version") || said.contains("alert"), "the server answered TLS 1.1 with an alert: {said}");

    let refusing = start(&ca, &up, "refuse");
    assert_eq!(serial(&refusing, None, &[]), None, "without_sni = refuse: no SNI, no handshake");
    assert_eq!(serial(&refusing, Some("other.test"), &[]), None);
    assert_eq!(serial(&refusing, Some("www.example.test"), &[]).as_deref(), Some("4201"));

    // /status and the expiry metric name every certificate.
    let status = p.status();
    let certs = status["tls"][0]["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 2);
    assert_eq!(certs[1]["sans"][0], "*.api.example.test");
    assert!(certs[0]["subject"].as_str().unwrap().contains("www.example.test"));
    let m = parse_metrics(&p.metrics());
    let name = certs[0]["name"].as_str().unwrap();
    assert_eq!(sample(&m, "switchyard_tls_certificate_expiry_timestamp_seconds", &[("name", name)]), certs[0]["not_after_unix"].as_f64());
}

#[test]
fn https_and_h2_over_alpn_route_and_tell_the_backend_it_was_https() {
    let ca = Ca::new();
    let up = Upstream::start("web");
    let p = start(&ca, &up, "default");
    let c = https_client(&p, false);
    let r = c.get(url(&p, "www.example.test", "/hello")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN picked h2");
    assert_eq!(r.text().unwrap(), "web");
    let (_, headers) = up.last_request().unwrap();
    assert_eq!(headers["x-forwarded-proto"], "https", "Django's SECURE_PROXY_SSL_HEADER sees https");
    // HTTP/1.1 over TLS too, and a real client: curl.
    let curl = |version: &str| {
        let out = Command::new("curl")
            .args(["-sS", version, "--cacert"])
            .arg(p.path("ca.pem"))
            .args(["--resolve", &format!("www.example.test:{}:127.0.0.1", p.addr.port()), "-w", " %{http_version}", &url(&p, "www.example.test", "/x")])
            .output()
            .unwrap();
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (out, err) = curl("--http1.1");
    assert_eq!(out, "web 1.1", "{err}");
    let (out, err) = curl("--http2");
    assert_eq!(out, "web 2", "{err}");
    // Cleartext listeners still say http.
    let plain = Proxy::start(&format!("[[routes]]\ncluster = \"web\"\n[clusters.web]\nstatic = [\"{}\"]\n", up.addr));
    assert_eq!(plain.fetch("/").0, 200);
    assert_eq!(up.last_request().unwrap().1["x-forwarded-proto"], "http");
}

#[test]
fn a_rotation_under_tls_load_fails_nothing_and_a_broken_key_keeps_the_old_certificate() {
    let ca = Ca::new();
    let up = Upstream::start("web");
    let p = start(&ca, &up, "default");
    // Continuous load, a new TLS connection (a full handshake) per request.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let loader = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let c = https_client(&p, true);
        let u = url(&p, "www.example.test", "/");
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            let end = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                match c.get(&u).send() {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        if errors.len() < 10 {
                            errors.push(format!("{other:?}"));
                        }
                    }
                }
            }
            errors
        })
    };
    assert!(wait_until(Duration::from_secs(5), || ok.load(Ordering::SeqCst) > 20));

    // Rotate: a new certificate and key for the same name, each file replaced by rename.
    let (c2, k2) = ca.leaf(&["www.example.test"], 9);
    write_atomic(&p.path("site.key"), &k2);
    write_atomic(&p.path("site.pem"), &c2);
    let rotated = Instant::now();
    assert!(wait_until(Duration::from_secs(2), || serial(&p, Some("www.example.test"), &[]).as_deref() == Some("4209")), "new handshakes show the new serial within 2 s");
    let took = rotated.elapsed();
    let before = ok.load(Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(5), || ok.load(Ordering::SeqCst) > before + 20));

    // A broken key: refused, the old (new) certificate keeps serving.
    write_atomic(&p.path("site.key"), "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n");
    assert!(wait_until(Duration::from_secs(3), || !p.status()["tls"][0]["last_error"].is_null()), "{}", p.stderr());
    let err = p.status()["tls"][0]["last_error"].as_str().unwrap().to_string();
    assert!(err.contains("site.key"), "{err}");
    assert_eq!(sample(&parse_metrics(&p.metrics()), "switchyard_tls_reload_errors", &[("listener", &p.addr.to_string())]), Some(1.0));
    assert!(p.stderr().contains("TLS certificates not reloaded"), "the refusal is logged");
    assert_eq!(serial(&p, Some("www.example.test"), &[]).as_deref(), Some("4209"));
    // A key that parses but belongs to another certificate: refused too.
    let (_, other_key) = ca.leaf(&["www.example.test"], 10);
    write_atomic(&p.path("site.key"), &other_key);
    assert!(wait_until(Duration::from_secs(3), || p.status()["tls"][0]["last_error"].as_str().is_some_and(|e| e.contains("do not belong together"))));
    assert_eq!(serial(&p, Some("www.example.test"), &[]).as_deref(), Some("4209"));
    // SIGHUP re-reads at once; the good pair is back.
    write_atomic(&p.path("site.key"), &k2);
    p.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(3), || p.status()["tls"][0]["last_error"].is_null()));

    stop.store(true, Ordering::SeqCst);
    let errors = loader.join().unwrap();
    assert_eq!(failed.load(Ordering::SeqCst), 0, "{errors:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn a_broken_certificate_is_a_config_error_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (c, _) = ca.leaf(&["www.example.test"], 1);
    let (_, other) = ca.leaf(&["www.example.test"], 2);
    std::fs::write(dir.path().join("site.pem"), c).unwrap();
    std::fs::write(dir.path().join("site.key"), other).unwrap();
    let cfg = dir.path().join("s.toml");
    std::fs::write(
        &cfg,
        "[[listeners]]\naddress = \"127.0.0.1:8443\"\ntls = { cert = \"site.pem\", key = \"site.key\", without_sni = \"maybe\", certificates = [{ cert = \"none.pem\", key = \"none.key\" }] }\n\
         [[routes]]\ncluster = \"web\"\n[clusters.web]\nstatic = [\"127.0.0.1:9000\"]\n",
    )
    .unwrap();
    let out = Command::new(bin()).args(["check", "--config"]).arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("listeners[0].tls.cert") && err.contains("do not belong together"), "{err}");
    assert!(err.contains("listeners[0].tls.certificates[0].cert") && err.contains("none.pem"), "{err}");
    assert!(err.contains("listeners[0].tls.without_sni") && err.contains("maybe"), "{err}");
}

// ---- TLS to backends ----------------------------------------------------

/// An HTTPS backend: terminates TLS with rustls (optionally requiring a
/// client certificate signed by `client_ca`) and passes the bytes to a
/// cleartext `Upstream`, which records the requests.
struct TlsBackend {
    addr: std::net::SocketAddr,
    /// Per accepted handshake: the SNI the client sent and whether it
    /// presented a client certificate.
    seen: Arc<std::sync::Mutex<Vec<(Option<String>, bool)>>>,
    failed_handshakes: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsBackend {
    fn start(cert_pem: &str, key_pem: &str, client_ca: Option<&str>, to: std::net::SocketAddr) -> TlsBackend {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes()).unwrap().unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().unwrap();
        let builder = match client_ca {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls_pemfile::certs(&mut pem.as_bytes()) {
                    roots.add(c.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = Arc::new(builder.with_single_cert(certs, key).unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let failed_handshakes = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (s, f) = (seen.clone(), failed_handshakes.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                loop {
                    let tcp = tokio::select! {
                        _ = &mut stopped => return,
                        a = listener.accept() => match a { Ok((tcp, _)) => tcp, Err(_) => continue },
                    };
                    let (acceptor, s, f) = (acceptor.clone(), s.clone(), f.clone());
                    tokio::spawn(async move {
                        let mut tls = match acceptor.accept(tcp).await {
                            Ok(t) => t,
                            Err(_) => {
                                f.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                        };
                        let conn = tls.get_ref().1;
                        s.lock().unwrap().push((conn.server_name().map(str::to_string), conn.peer_certificates().is_some()));
                        let Ok(mut up) = tokio::net::TcpStream::connect(to).await else { return };
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                    });
                }
            });
        });
        TlsBackend { addr, seen, failed_handshakes, stop: Some(stop), thread: Some(thread) }
    }

    fn last_handshake(&self) -> Option<(Option<String>, bool)> {
        self.seen.lock().unwrap().last().cloned()
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn backend_tls_proxy(server: &str, backend: std::net::SocketAddr, tls: &str, files: &[(&str, &str)]) -> Proxy {
    backend_tls_proxy_with(server, backend, tls, "", files)
}

/// [`backend_tls_proxy`] with more lines for the cluster.
fn backend_tls_proxy_with(server: &str, backend: std::net::SocketAddr, tls: &str, extra: &str, files: &[(&str, &str)]) -> Proxy {
    let mut b = Proxy::builder(&format!(
        "[[routes]]\ncluster = \"web\"\n[clusters.web]\nstatic = [\"{backend}\"]\nretries = 0\ntls = {{ {tls} }}\n{extra}"
    ))
    .server(server);
    for (name, text) in files {
        b = b.file(name, text);
    }
    b.start()
}

/// A TLS backend for `app.internal` that asks for a client certificate
/// (from the same CA), in front of `up`.
struct MutualBackend {
    up: Upstream,
    backend: TlsBackend,
    ca_pem: String,
    client: (String, String),
}

impl MutualBackend {
    /// The cluster's TLS settings that reach it: name, CA and client
    /// certificate, in the files of [`MutualBackend::files`].
    const FULL: &'static str = "server_name = \"app.internal\", ca = \"ca.pem\", client_cert = \"client.pem\", client_key = \"client.key\"";
    /// The same without the client certificate (the backend refuses it).
    const NO_CLIENT_CERT: &'static str = "server_name = \"app.internal\", ca = \"ca.pem\"";

    fn start() -> MutualBackend {
        let ca = Ca::new();
        let up = Upstream::start("secure-app");
        let (c, k) = ca.leaf(&["app.internal"], 7);
        let backend = TlsBackend::start(&c, &k, Some(&ca.cert.pem()), up.addr);
        MutualBackend { up, backend, ca_pem: ca.cert.pem(), client: ca.leaf(&["switchyard.client"], 8) }
    }

    fn files(&self) -> [(&str, &str); 3] {
        [("ca.pem", &self.ca_pem), ("client.pem", &self.client.0), ("client.key", &self.client.1)]
    }
}

#[test]
fn tls_to_backends_verifies_the_name_and_presents_a_client_certificate() {
    let m = MutualBackend::start();
    let (up, backend, ca_pem) = (&m.up, &m.backend, &m.ca_pem);
    for (path, server) in PATHS {
        let p = backend_tls_proxy(server, backend.addr, MutualBackend::FULL, &m.files());
        for i in 0..3 {
            let (status, body) = p.fetch(&format!("/tls/{i}"));
            assert_eq!((status, body.as_str()), (200, "secure-app"), "{path}");
            assert_eq!(up.last_request().unwrap().0, format!("/tls/{i}"));
        }
        assert_eq!(backend.last_handshake(), Some((Some("app.internal".to_string()), true)), "{path}: SNI and client certificate");
        let m = parse_metrics(&p.metrics());
        assert_eq!(
            sample(&m, "switchyard_upstream_requests_total", &[("cluster", "web"), ("backend", &backend.addr.to_string()), ("outcome", "ok")]),
            Some(3.0),
            "{path}"
        );
        // Without the client certificate the backend refuses the handshake: 502.
        let p = backend_tls_proxy(server, backend.addr, MutualBackend::NO_CLIENT_CERT, &[("ca.pem", ca_pem)]);
        let before = up.hits();
        assert_eq!(p.fetch("/no-client-cert").0, 502, "{path}");
        assert_eq!(up.hits(), before, "{path}: nothing reached the app");
    }
    assert!(backend.failed_handshakes.load(Ordering::Relaxed) >= 2);
}

/// Active health checks go over TLS with the cluster's own settings (name,
/// CA, client certificate); a handshake the backend refuses fails the check.
#[test]
fn health_checks_use_the_cluster_tls_settings() {
    let m = MutualBackend::start();
    let (up, backend) = (&m.up, &m.backend);
    let check = "health_check = { path = \"/healthz\", interval = \"100ms\", timeout = \"100ms\" }\n";
    let health = |p: &Proxy| p.status()["clusters"][0]["backends"][0]["health"].as_str().map(str::to_string);
    let with = |tls: &str, files: &[(&str, &str)]| backend_tls_proxy_with("", backend.addr, tls, check, files);
    let p = with(MutualBackend::FULL, &m.files());
    assert!(wait_until(Duration::from_secs(5), || health(&p).as_deref() == Some("passing")), "{}", p.status());
    assert!(up.health_hits() >= 1);
    assert_eq!(backend.last_handshake(), Some((Some("app.internal".to_string()), true)));
    drop(p);
    // Without the client certificate the handshake is refused: failing.
    let p = with(MutualBackend::NO_CLIENT_CERT, &[("ca.pem", &m.ca_pem)]);
    assert!(wait_until(Duration::from_secs(5), || health(&p).as_deref() == Some("failing")), "{}", p.status());
    assert!(p.stderr().contains("health check failing"), "{}", p.stderr());
}

#[test]
fn tls_to_a_backend_with_a_wrong_ca_is_a_502_with_a_clear_log_line() {
    let ours = Ca::new();
    let theirs = Ca::new();
    let up = Upstream::start("app");
    let (c, k) = theirs.leaf(&["app.internal"], 9);
    let backend = TlsBackend::start(&c, &k, None, up.addr);
    let ours_pem = ours.cert.pem();
    for (path, server) in PATHS {
        let p = backend_tls_proxy(server, backend.addr, "server_name = \"app.internal\", ca = \"ca.pem\"", &[("ca.pem", &ours_pem)]);
        let before = up.hits();
        for _ in 0..3 {
            let (status, body) = p.fetch("/");
            assert_eq!(status, 502, "{path}: {body}");
        }
        assert_eq!(up.hits(), before, "{path}: nothing reached the app");
        let logged = || {
            let log = p.stderr();
            log.lines()
                .filter(|l| l.contains("TLS to backend failed") && l.contains("web") && l.contains(&backend.addr.to_string()))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert!(wait_until(Duration::from_secs(3), || !logged().is_empty()), "{path}: {}", p.stderr());
        let lines = logged();
        eprintln!("{path}: {}", lines[0]);
        assert_eq!(lines.len(), 1, "{path}: logged once per 10 s, not per request: {lines:?}");
        assert!(lines[0].contains("app.internal") && lines[0].to_lowercase().contains("certificate"), "{path}: {}", lines[0]);
        let m = parse_metrics(&p.metrics());
        assert_eq!(
            sample(&m, "switchyard_upstream_requests_total", &[("cluster", "web"), ("backend", &backend.addr.to_string()), ("outcome", "tls_error")]),
            Some(3.0),
            "{path}"
        );
        // The same backend with verification off (no name needed) serves.
        let p = backend_tls_proxy(server, backend.addr, "verify = false", &[]);
        assert_eq!(p.fetch("/unverified"), (200, "app".to_string()), "{path}");
        assert_eq!(backend.last_handshake(), Some((None, false)), "{path}: no SNI without a server_name");
    }
}

#[test]
fn backend_tls_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("junk.pem"), "not a certificate\n").unwrap();
    let cfg = dir.path().join("s.toml");
    std::fs::write(
        &cfg,
        "[[routes]]\ncluster = \"a\"\n[[routes]]\npath_prefix = \"/b\"\ncluster = \"b\"\n[[routes]]\npath_prefix = \"/c\"\ncluster = \"c\"\n\
         [clusters.a]\nstatic = [\"127.0.0.1:9000\"]\ntls = { ca = \"missing.pem\" }\n\
         [clusters.b]\nstatic = [\"127.0.0.1:9001\"]\ntls = { server_name = \"b.internal\", ca = \"junk.pem\", client_cert = \"c.pem\" }\n\
         [clusters.c]\nstatic = [\"127.0.0.1:9002\"]\ntls = { server_name = \"bad name!\", verify = \"yes\" }\n",
    )
    .unwrap();
    let out = Command::new(bin()).args(["check", "--config"]).arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("clusters.a.tls.server_name") && err.contains("required"), "{err}");
    assert!(err.contains("clusters.a.tls.ca") && err.contains("missing.pem"), "{err}");
    assert!(err.contains("clusters.b.tls.client_key") && err.contains("client_cert"), "{err}");
    assert!(err.contains("clusters.b.tls.ca") && err.contains("junk.pem"), "{err}");
    assert!(err.contains("clusters.c") && err.contains("verify"), "{err}");
}

// ---- HTTP → HTTPS redirect ----------------------------------------------

const REDIRECT_ROUTES: &str = "[[routes]]\nhosts = [\"www.example.test\"]\ncluster = \"web\"\nhttps_redirect = true\n\
     [[routes]]\nhosts = [\"shop.example.test\"]\ncluster = \"web\"\nhttps_redirect = { port = 8443, status = 301 }\n\
     [[routes]]\nhosts = [\"plain.example.test\"]\ncluster = \"web\"\n";

#[test]
fn https_redirect_sends_cleartext_requests_to_https_on_both_paths() {
    let up = Upstream::start("app");
    for (path, server) in PATHS {
        let p = Proxy::builder(&format!("{REDIRECT_ROUTES}[clusters.web]\nstatic = [\"{}\"]\n", up.addr)).server(server).start();
        let before = up.hits();
        let ask = |req: &str| parse_raw_response(&raw_exchange(p.addr, req.as_bytes(), Duration::from_secs(3)));
        let location = |h: &[(String, String)]| h.iter().find(|(k, _)| k == "location").map(|(_, v)| v.clone());
        let (status, h, body) = ask("GET /a/b?x=1&y=%20 HTTP/1.1\r\nHost: www.example.test:8080\r\nConnection: close\r\n\r\n");
        assert!(status.starts_with("HTTP/1.1 308"), "{path}: {status}");
        assert_eq!(location(&h).as_deref(), Some("https://www.example.test/a/b?x=1&y=%20"), "{path}: port dropped, query kept");
        assert!(body.contains("HTTPS"), "{path}: {body}");
        let (status, h, _) = ask("HEAD / HTTP/1.1\r\nHost: shop.example.test\r\nConnection: close\r\n\r\n");
        assert!(status.starts_with("HTTP/1.1 301"), "{path}: {status}");
        assert_eq!(location(&h).as_deref(), Some("https://shop.example.test:8443/"), "{path}");
        let (status, _, body) = ask("GET / HTTP/1.1\r\nHost: plain.example.test\r\nConnection: close\r\n\r\n");
        assert!(status.starts_with("HTTP/1.1 200") && body == "app", "{path}: a route without the option is proxied");
        assert_eq!(up.hits(), before + 1, "{path}: redirects never reach the backend");
        // A redirect keeps the connection: the next request on it is served.
        let resp = raw_exchange(
            p.addr,
            b"GET /first HTTP/1.1\r\nHost: www.example.test\r\n\r\n",
            Duration::from_millis(300),
        );
        assert!(resp.starts_with("HTTP/1.1 308") && !resp.to_ascii_lowercase().contains("connection: close"), "{path}: {resp}");
        let m = parse_metrics(&p.metrics());
        assert!(
            wait_until(Duration::from_secs(3), || sample(&parse_metrics(&p.metrics()), "switchyard_requests_total", &[("route", "route0"), ("cluster", "web"), ("code_class", "3xx")]) == Some(2.0)),
            "{path}: {m:?}"
        );
    }
}

#[test]
fn https_redirect_routes_are_served_over_tls() {
    let ca = Ca::new();
    let up = Upstream::start("app");
    let (c, k) = ca.leaf(&["www.example.test"], 3);
    let p = Proxy::builder(&format!("tls = {{ cert = \"site.pem\", key = \"site.key\" }}\n{REDIRECT_ROUTES}[clusters.web]\nstatic = [\"{}\"]\n", up.addr))
        .file("site.pem", &c)
        .file("site.key", &k)
        .file("ca.pem", &ca.cert.pem())
        .start();
    let r = https_client(&p, false).get(url(&p, "www.example.test", "/secure?q=1")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "app");
    assert_eq!(up.last_request().unwrap().0, "/secure?q=1");
}

#[test]
fn pipelined_requests_over_tls_are_answered_in_order() {
    let ca = Ca::new();
    let up = Upstream::start("app");
    let p = start(&ca, &up, "default");
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &p.addr.to_string(), "-servername", "www.example.test", "-quiet", "-ign_eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is installed (.ci/run)");
    use std::io::{Read, Write};
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(
            b"GET /1 HTTP/1.1\r\nHost: www.example.test\r\nX-Request-Id: tls-1\r\n\r\n\
              POST /2 HTTP/1.1\r\nHost: www.example.test\r\nX-Request-Id: tls-2\r\nContent-Length: 2\r\n\r\nhi\
              GET /3 HTTP/1.1\r\nHost: www.example.test\r\nX-Request-Id: tls-3\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    stdin.flush().unwrap();
    // The proxy closes after the third response; s_client then exits.
    let done = wait_until(Duration::from_secs(10), || child.try_wait().ok().flatten().is_some());
    if !done {
        let _ = child.kill();
    }
    let _ = child.wait();
    drop(stdin);
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let ids: Vec<&str> = out.lines().filter_map(|l| l.trim_end().strip_prefix("x-request-id: ")).collect();
    assert_eq!(ids, ["tls-1", "tls-2", "tls-3"], "every request answered, in order:\n{out}");
    assert!(done, "the connection closed after the last response");
}

/// `limits.max_body_bytes` holds for request bodies without a declared
/// length over TLS too: a streamed body over HTTP/2 (no `content-length`)
/// and a chunked one over HTTP/1.1, each at and one byte over the limit.
#[test]
fn bodies_without_a_length_over_the_limit_get_413_over_tls() {
    let ca = Ca::new();
    let up = Upstream::start("web");
    let p = start_with(&ca, &up, "default", "[limits]\nmax_body_bytes = 1000\n");
    for (h2, c) in [(true, https_client(&p, true)), (false, reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(p.path("ca.pem")).unwrap()).unwrap())
        .tls_built_in_root_certs(false)
        .resolve("www.example.test", p.addr)
        .no_proxy()
        .http1_only()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap())]
    {
        for (len, status) in [(1000usize, 200u16), (1001, 413)] {
            // A reader: the body's length is not known in advance.
            let body = reqwest::blocking::Body::new(std::io::Cursor::new(vec![b'x'; len]));
            let r = c.post(url(&p, "www.example.test", "/up")).body(body).send();
            let r = r.unwrap_or_else(|e| panic!("h2 {h2}, {len} bytes: {e:?}"));
            assert_eq!(r.version() == reqwest::Version::HTTP_2, h2);
            assert_eq!(r.status().as_u16(), status, "h2 {h2}, {len} bytes");
        }
    }
    assert!(!up.bodies().contains(&1001), "no backend got a whole body over the limit: {:?}", up.bodies());
    let m = parse_metrics(&p.metrics());
    assert_eq!(sample(&m, "switchyard_requests_rejected_total", &[("reason", "body_too_large")]), Some(2.0));
}

/// A TLS connection to the proxy (no ALPN: HTTP/1.1), verified by the
/// test CA, with reads timing out after `timeout`.
fn tls_connect(p: &Proxy, timeout: Duration) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    tls_connect_alpn(p, timeout, &[])
}

/// As [`tls_connect`], offering the protocols `alpn`.
fn tls_connect_alpn(p: &Proxy, timeout: Duration, alpn: &[&[u8]]) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(p.path("ca.pem")).unwrap();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from("www.example.test").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(p.addr).unwrap();
    tcp.set_read_timeout(Some(timeout)).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    s
}

/// Read from a TLS stream until the proxy closes it, up to `limit`:
/// (what came, time until closed, or None if still open or stalled).
fn tls_read_to_close(s: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>, limit: Duration) -> (String, Option<Duration>) {
    use std::io::Read;
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), Some(t0.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            // Closed without close_notify, or reset.
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), Some(t0.elapsed())),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), None)
}

/// A WebSocket over TLS: after the 101 the connection is a tunnel, and bytes
/// the client sent with the handshake (before the 101) wait for it, then go
/// through.
#[test]
fn a_websocket_over_tls_tunnels_after_the_101() {
    use std::io::{Read, Write};
    let ca = Ca::new();
    let up = Upstream::start("ws");
    let p = start(&ca, &up, "default");
    let mut s = tls_connect(&p, Duration::from_secs(5));
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: www.example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nearly\0\r\n",
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let end = Instant::now() + Duration::from_secs(5);
    while !got.ends_with(b"early\0\r\n") && Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("{e}: {:?}", String::from_utf8_lossy(&got)),
        }
    }
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(got.ends_with(b"\r\n\r\nearly\0\r\n"), "the early bytes came back through the tunnel: {text:?}");
    for msg in [&b"ping-1"[..], b"GET /\0 HTTP/1.1\r\n\r\n"] {
        s.write_all(msg).unwrap();
        let mut echo = vec![0u8; msg.len()];
        s.read_exact(&mut echo).unwrap();
        assert_eq!(echo, msg, "tunnel bytes are not looked at");
    }
}

/// `limits.keepalive_timeout` over TLS (HTTP/1.1): the idle connection is
/// closed after it.
#[test]
fn idle_tls_connections_close_after_keepalive_timeout() {
    use std::io::Write;
    let ca = Ca::new();
    let up = Upstream::start("web");
    let p = start_with(&ca, &up, "default", "[limits]\nkeepalive_timeout = \"1s\"\n");
    let mut s = tls_connect(&p, Duration::from_millis(100));
    s.write_all(b"GET /k HTTP/1.1\r\nHost: www.example.test\r\n\r\n").unwrap();
    s.flush().unwrap();
    let (got, closed) = tls_read_to_close(&mut s, Duration::from_secs(5));
    assert!(got.starts_with("HTTP/1.1 200") && got.ends_with("web"), "{got}");
    // The response came at once; the close about 1 s later.
    assert!(closed.is_some_and(|t| t >= Duration::from_millis(700)), "closed after the idle timeout: {closed:?}");
}

/// `limits.keepalive_timeout` and `limits.header_timeout` on HTTP/2 over
/// TLS (ALPN `h2`), as on h2c (tests/h2.rs, [`h2_limits_hold`]): the idle
/// connection gets a GOAWAY and is closed, a slow request holds it open, a
/// connection without a request in time is closed; the header deadline
/// counts from the end of the TLS handshake. None counts as a
/// `header_timeout` rejection.
#[test]
fn h2_tls_connections_keep_keepalive_timeout_and_header_timeout() {
    let ca = Ca::new();
    let up = Upstream::start("web");
    let p = start_with(&ca, &up, "default", "[limits]\nkeepalive_timeout = \"2s\"\nheader_timeout = \"1s\"\n");
    let connect = || {
        let s = tls_connect_alpn(&p, Duration::from_millis(100), &[b"h2"]);
        assert_eq!(s.conn.alpn_protocol(), Some(&b"h2"[..]), "ALPN picked h2");
        s
    };
    h2_limits_hold(connect, "https", "www.example.test", &up, "TLS");
    let m = parse_metrics(&p.metrics());
    assert_eq!(sample(&m, "switchyard_requests_rejected_total", &[("reason", "header_timeout")]), Some(0.0));
}

/// `limits.header_timeout` over TLS, where Pingora reads the heads: a head
/// trickled a line every 200 ms gets 408 and a close about 1 s after the
/// handshake (a new connection) or after its first byte (a kept-alive one,
/// idle for longer than that before); a connection that sends nothing after
/// its handshake is closed quietly after it. Each 408 counts as
/// `header_timeout`.
#[test]
fn heads_not_complete_within_header_timeout_get_408_over_tls() {
    use std::io::Write;
    let ca = Ca::new();
    let up = Upstream::start("web");
    let p = start_with(&ca, &up, "default", "[limits]\nheader_timeout = \"1s\"\n");
    let head = b"GET /slow HTTP/1.1\r\nHost: www.example.test\r\n";
    let slow = |s: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>, what: &str| {
        let (got, took) = trickle(s, head, 40);
        assert!(got.starts_with("HTTP/1.1 408 ") && got.contains("Connection: close"), "{what}: {got}");
        assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "{what}: answered after {took:?}");
    };
    slow(&mut tls_connect(&p, Duration::from_millis(200)), "a new connection");
    let mut s = tls_connect(&p, Duration::from_millis(200));
    s.write_all(b"GET /ka HTTP/1.1\r\nHost: www.example.test\r\n\r\n").unwrap();
    s.flush().unwrap();
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The response, then 1.5 s of quiet on the open connection.
    while t0.elapsed() < Duration::from_millis(1500) {
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => panic!("closed while idle: {}", String::from_utf8_lossy(&got)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    slow(&mut s, "a kept-alive connection");
    let mut idle = tls_connect(&p, Duration::from_millis(200));
    let (got, closed) = tls_read_to_close(&mut idle, Duration::from_secs(5));
    assert!(got.is_empty() && closed.is_some_and(|t| t >= Duration::from_millis(800) && t < Duration::from_secs(3)), "idle: {got:?} {closed:?}");
    let m = parse_metrics(&p.metrics());
    assert_eq!(sample(&m, "switchyard_requests_rejected_total", &[("reason", "header_timeout")]), Some(2.0));
    assert_eq!(up.hits(), 1, "only the whole head reached the backend");
}

/// `limits.max_connections` over TLS: with one connection open, the next
/// (HTTP/1.1) gets 503 after its handshake and is closed; once the first
/// closes, a new one is served.
#[test]
fn tls_connections_over_max_connections_get_503() {
    use std::io::Write;
    let ca = Ca::new();
    let up = Upstream::start("web");
    let p = start_with(&ca, &up, "default", "[limits]\nmax_connections = 1\n");
    let gauge = || sample(&parse_metrics(&p.metrics()), "switchyard_downstream_connections", &[]).unwrap_or(-1.0);
    assert!(wait_until(Duration::from_secs(5), || gauge() == 0.0));
    let mut first = tls_connect(&p, Duration::from_millis(200));
    first.write_all(b"GET /a HTTP/1.1\r\nHost: www.example.test\r\n\r\n").unwrap();
    first.flush().unwrap();
    assert!(wait_until(Duration::from_secs(5), || up.hits() == 1));
    let mut second = tls_connect(&p, Duration::from_millis(200));
    second.write_all(b"GET /b HTTP/1.1\r\nHost: www.example.test\r\n\r\n").unwrap();
    second.flush().unwrap();
    let (got, closed) = tls_read_to_close(&mut second, Duration::from_secs(5));
    assert!(got.starts_with("HTTP/1.1 503 ") && got.contains("Retry-After: ") && got.contains("Connection: close"), "{got}");
    assert!(closed.is_some(), "closed after the 503");
    drop(first);
    assert!(wait_until(Duration::from_secs(5), || gauge() == 0.0));
    let mut third = tls_connect(&p, Duration::from_millis(200));
    third.write_all(b"GET /c HTTP/1.1\r\nHost: www.example.test\r\nConnection: close\r\n\r\n").unwrap();
    third.flush().unwrap();
    let (got, _) = tls_read_to_close(&mut third, Duration::from_secs(5));
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let m = parse_metrics(&p.metrics());
    assert_eq!(sample(&m, "switchyard_downstream_connections_refused_total", &[]), Some(1.0));
}
