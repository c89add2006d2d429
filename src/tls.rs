//! TLS termination: the certificates of one listener, chosen per handshake
//! by SNI, and reloaded live.
//!
//! Each certificate's DNS names (its SANs, exact or `*.` wildcard) say which
//! server names it answers. The first certificate of the listener is the
//! default: for a client without SNI, or a name no certificate has, unless
//! the listener refuses those handshakes (`without_sni = "refuse"`).
//!
//! The table of loaded certificates is swapped whole (arc-swap): a handshake
//! reads it once. The files are checked every second (and on SIGHUP and
//! `switchyard reload`): a set that loads and whose keys match their
//! certificates replaces the old one for new handshakes; open connections
//! keep theirs. A broken or mismatched pair is refused with the reason in
//! the log, `/status` and a metric, and the old certificates keep serving.

use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// One certificate chain and its key, as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What `/status` shows of a loaded certificate.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CertInfo {
    /// The certificate file, which names it in the metric.
    pub name: String,
    pub subject: String,
    pub sans: Vec<String>,
    pub serial: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

struct Loaded {
    key: Arc<CertifiedKey>,
    info: CertInfo,
}

/// The certificates of a listener, indexed by server name.
struct Table {
    certs: Vec<Loaded>,
    exact: HashMap<String, usize>,
    /// `*.example.com` → the index, keyed by `example.com`.
    wildcard: HashMap<String, usize>,
}

impl Table {
    fn build(certs: Vec<Loaded>) -> Table {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, c) in certs.iter().enumerate() {
            for san in &c.info.sans {
                let san = san.to_ascii_lowercase();
                match san.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_insert(i),
                    None => exact.entry(san).or_insert(i),
                };
            }
        }
        Table { certs, exact, wildcard }
    }

    fn find(&self, name: &str) -> Option<usize> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(i) = self.exact.get(&name) {
            return Some(*i);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).copied()
    }
}

/// The CA certificates and client certificate of a cluster's backend TLS,
/// in the form Pingora's connector takes them.
pub struct BackendTlsMaterial {
    /// None: the connector's roots (the system's).
    pub ca: Option<Arc<pingora::protocols::tls::CaType>>,
    pub client: Option<Arc<pingora::utils::tls::CertKey>>,
    /// Every DER the files held: what two loads are compared by.
    ders: Vec<Vec<u8>>,
}

impl PartialEq for BackendTlsMaterial {
    fn eq(&self, other: &Self) -> bool {
        self.ders == other.ders
    }
}

impl std::fmt::Debug for BackendTlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("BackendTlsMaterial")
            .field("ca_certificates", &self.ca.as_ref().map(|c| c.len()))
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

impl BackendTlsMaterial {
    /// Read and check the files; an error names the field (`ca`,
    /// `client_cert`) and says what is wrong.
    pub fn load(ca: Option<&std::path::Path>, client: Option<&CertFiles>) -> Result<Self, (&'static str, String)> {
        let mut ders = Vec::new();
        let ca = match ca {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| ("ca", format!("cannot read {}: {e}", path.display())))?;
                let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
                    .collect::<Result<_, _>>()
                    .map_err(|e| ("ca", format!("{}: not a PEM certificate file: {e}", path.display())))?;
                if certs.is_empty() {
                    return Err(("ca", format!("{}: no certificate in the file", path.display())));
                }
                let mut wrapped = Vec::with_capacity(certs.len());
                for c in certs {
                    // Checked here: Pingora's wrapper panics on a bad one.
                    describe(&c, path).map_err(|e| ("ca", e))?;
                    ders.push(c.to_vec());
                    wrapped.push(pingora::utils::tls::WrappedX509::new(c.to_vec(), pingora::utils::tls::parse_x509));
                }
                Some(Arc::from(wrapped.into_boxed_slice()))
            }
        };
        let client = match client {
            None => None,
            Some(files) => {
                let (certified, _, key) = read_pair(files).map_err(|e| ("client_cert", e))?;
                let chain: Vec<Vec<u8>> = certified.cert.iter().map(|c| c.to_vec()).collect();
                ders.extend(chain.iter().cloned());
                ders.push(key.secret_der().to_vec());
                Some(Arc::new(pingora::utils::tls::CertKey::new(chain, key.secret_der().to_vec())))
            }
        };
        Ok(BackendTlsMaterial { ca, client, ders })
    }
}

/// Parse and check one pair: the chain, the key, and that they belong together.
pub fn load_pair(files: &CertFiles) -> Result<(Arc<CertifiedKey>, CertInfo), String> {
    read_pair(files).map(|(certified, info, _)| (certified, info))
}

/// [`load_pair`], also handing back the key as read (for a client certificate).
fn read_pair(files: &CertFiles) -> Result<(Arc<CertifiedKey>, CertInfo, rustls::pki_types::PrivateKeyDer<'static>), String> {
    let cert_pem = std::fs::read(&files.cert).map_err(|e| format!("cannot read {}: {e}", files.cert.display()))?;
    let key_pem = std::fs::read(&files.key).map_err(|e| format!("cannot read {}: {e}", files.key.display()))?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", files.cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", files.cert.display()));
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("{}: not a PEM private key: {e}", files.key.display()))?
        .ok_or_else(|| format!("{}: no private key in the file", files.key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| format!("{}: unusable private key: {e}", files.key.display()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| {
        format!("{} and {} do not belong together: {e}", files.cert.display(), files.key.display())
    })?;
    let info = describe(&certified.cert[0], &files.cert)?;
    Ok((Arc::new(certified), info, key))
}

fn describe(der: &[u8], path: &std::path::Path) -> Result<CertInfo, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("{}: not an X.509 certificate: {e}", path.display()))?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            if let GeneralName::DNSName(d) = n {
                sans.push(d.to_string());
            }
        }
    }
    if sans.is_empty() {
        // Old certificates name their host in the subject's CN only.
        sans.extend(cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_string));
    }
    Ok(CertInfo {
        name: path.display().to_string(),
        subject: cert.subject().to_string(),
        sans,
        serial: cert.raw_serial_as_string(),
        not_before_unix: cert.validity().not_before.timestamp(),
        not_after_unix: cert.validity().not_after.timestamp(),
    })
}

/// What `/status` shows per TLS listener.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerTlsStatus {
    pub address: String,
    pub certificates: Vec<CertInfo>,
    pub last_reload_unix: Option<f64>,
    /// Why the files on disk are not serving (None: they are).
    pub last_error: Option<String>,
}

/// The certificates of one TLS listener: the rustls resolver, and the reload.
pub struct ListenerCerts {
    pub address: String,
    files: Vec<CertFiles>,
    refuse_without_sni: bool,
    table: ArcSwap<Table>,
    /// Modification times last looked at (to reload only on a change).
    seen: Mutex<Vec<Option<SystemTime>>>,
    status: Mutex<ListenerTlsStatus>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for ListenerCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerCerts").field("address", &self.address).finish()
    }
}

fn mtimes(files: &[CertFiles]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .flat_map(|f| [&f.cert, &f.key])
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

fn load_all(files: &[CertFiles]) -> Result<Vec<Loaded>, String> {
    files.iter().map(|f| load_pair(f).map(|(key, info)| Loaded { key, info })).collect()
}

impl ListenerCerts {
    /// Load every pair; at start an error is fatal (the config names it).
    pub fn load(address: String, files: Vec<CertFiles>, refuse_without_sni: bool, metrics: Arc<Metrics>) -> Result<Arc<Self>, String> {
        let seen = mtimes(&files);
        let certs = load_all(&files)?;
        let status = ListenerTlsStatus {
            address: address.clone(),
            certificates: certs.iter().map(|c| c.info.clone()).collect(),
            last_reload_unix: Some(crate::status::unix(SystemTime::now())),
            last_error: None,
        };
        let me = Arc::new(ListenerCerts {
            address,
            files,
            refuse_without_sni,
            table: ArcSwap::from_pointee(Table::build(certs)),
            seen: Mutex::new(seen),
            status: Mutex::new(status),
            metrics,
        });
        me.export();
        Ok(me)
    }

    fn export(&self) {
        for c in &self.table.load().certs {
            self.metrics.tls_certificate_expiry.with_label_values(&[&c.info.name]).set(c.info.not_after_unix as f64);
        }
    }

    pub fn status(&self) -> ListenerTlsStatus {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-read the files if any changed (`force`: even if none did). A set
    /// that loads replaces the serving one; one that does not is reported
    /// and the serving one stays.
    pub fn reload(&self, force: bool) {
        let now = mtimes(&self.files);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if !force && *seen == now {
                return;
            }
            *seen = now;
        }
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match load_all(&self.files) {
            Ok(certs) => {
                let infos: Vec<CertInfo> = certs.iter().map(|c| c.info.clone()).collect();
                let changed = infos != st.certificates;
                self.table.store(Arc::new(Table::build(certs)));
                if changed || st.last_error.is_some() {
                    tracing::info!(listener = %self.address, serials = ?infos.iter().map(|c| &c.serial).collect::<Vec<_>>(), "TLS certificates reloaded; new handshakes use them");
                }
                st.certificates = infos;
                st.last_error = None;
                st.last_reload_unix = Some(crate::status::unix(SystemTime::now()));
                self.metrics.tls_reload_errors.with_label_values(&[&self.address]).set(0);
                drop(st);
                self.export();
            }
            Err(e) => {
                // Look again next time even if nothing changes (a rename of
                // the key may still be on its way after the certificate's).
                self.seen.lock().unwrap_or_else(|e| e.into_inner()).clear();
                if st.last_error.as_deref() != Some(&e) {
                    tracing::error!(listener = %self.address, error = %e, "TLS certificates not reloaded; the previous ones keep serving");
                }
                st.last_error = Some(e);
                self.metrics.tls_reload_errors.with_label_values(&[&self.address]).set(1);
            }
        }
    }

    /// Pingora's TLS settings for this listener: this resolver, TLS 1.2 and
    /// 1.3 (Pingora's rustls default), ALPN h2 and http/1.1.
    pub fn settings(self: &Arc<Self>) -> pingora::listeners::tls::TlsSettings {
        let mut s = pingora::listeners::tls::TlsSettings::intermediate("", "").expect("no files are read here");
        s.set_cert_resolver(Arc::new(Resolver(self.clone())));
        s.enable_h2();
        s
    }
}

#[derive(Debug)]
struct Resolver(Arc<ListenerCerts>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.0.table.load();
        let found = match hello.server_name() {
            Some(name) => table.find(name),
            None => None,
        };
        match found {
            Some(i) => Some(table.certs[i].key.clone()),
            None if self.0.refuse_without_sni => None,
            None => table.certs.first().map(|c| c.key.clone()),
        }
    }
}

/// Checks every listener's files once a second.
pub struct TlsWatch(pub Vec<Arc<ListenerCerts>>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for TlsWatch {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        if self.0.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    for l in &self.0 {
                        let l = l.clone();
                        let _ = tokio::task::spawn_blocking(move || l.reload(false)).await;
                    }
                }
            }
        }
    }
}
