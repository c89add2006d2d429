//! A TLS front for test servers: terminates TLS (optionally requiring a
//! client certificate) and relays bytes to a plain TCP backend. Certificates
//! come from a throw-away CA made with rcgen.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls;

pub struct TlsFiles {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

pub struct TlsFront {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Start a TLS front for `backend`, with a server certificate for
/// `server_name`. Writes the CA and a client certificate into `dir`.
pub fn start(backend: SocketAddr, server_name: &str, require_client_cert: bool, dir: &Path) -> (TlsFront, TlsFiles) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let srv_key = KeyPair::generate().unwrap();
    let srv = CertificateParams::new(vec![server_name.to_string()]).unwrap().signed_by(&srv_key, &ca, &ca_key).unwrap();
    let cli_key = KeyPair::generate().unwrap();
    let cli = CertificateParams::new(vec!["switchyard-client".to_string()]).unwrap().signed_by(&cli_key, &ca, &ca_key).unwrap();
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
    };
    std::fs::write(&files.ca, ca.pem()).unwrap();
    std::fs::write(&files.client_cert, cli.pem()).unwrap();
    std::fs::write(&files.client_key, cli_key.serialize_pem()).unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let builder = rustls::ServerConfig::builder();
    let builder = if require_client_cert {
        builder.with_client_cert_verifier(rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build().unwrap())
    } else {
        builder.with_no_client_auth()
    };
    let key = rustls::pki_types::PrivateKeyDer::try_from(srv_key.serialize_der()).unwrap();
    let config = Arc::new(builder.with_single_cert(vec![srv.der().clone()], key).unwrap());

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    acc = listener.accept() => {
                        let Ok((tcp, _)) = acc else { continue };
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                            let Ok(mut up) = tokio::net::TcpStream::connect(backend).await else { return };
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                        });
                    }
                }
            }
        });
    });
    (TlsFront { addr, stop: Some(tx) }, files)
}
