//! `switchyard demo`: the proxy on the embedded default, with nothing else to
//! install. Two sample upstreams (answering with their own name) run in the
//! same process; a file catalog listing them is written to a temp directory;
//! editing that file moves traffic at once.

use crate::server::Extras;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::{HttpServer, ServeHttp};
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

/// A tiny HTTP server that answers every request with its own name.
pub struct SampleUpstream {
    pub name: String,
}

#[async_trait]
impl ServeHttp for SampleUpstream {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let _ = session.drain_request_body().await;
        let body = format!("hello from {}\n", self.name).into_bytes();
        Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .header("content-length", body.len())
            .header("x-upstream", self.name.as_str())
            .body(body)
            .expect("static response parts are valid")
    }
}

/// Ask the kernel for a free loopback port.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub struct Demo {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub catalog_path: PathBuf,
    pub upstreams: Vec<(String, SocketAddr)>,
}

/// Write the demo's catalog and config into `dir`.
pub fn prepare(dir: &Path, listen: SocketAddr, admin: SocketAddr) -> std::io::Result<Demo> {
    let upstreams: Vec<(String, SocketAddr)> = ["upstream-a", "upstream-b"]
        .iter()
        .map(|n| Ok((n.to_string(), SocketAddr::from(([127, 0, 0, 1], free_port()?)))))
        .collect::<std::io::Result<_>>()?;
    let catalog_path = dir.join("catalog.json");
    let instances: Vec<String> = upstreams
        .iter()
        .map(|(n, a)| {
            format!(
                "    {{ \"address\": \"{}\", \"port\": {}, \"weight\": 1, \"tags\": [\"demo\"], \"meta\": {{ \"name\": \"{n}\" }} }}",
                a.ip(),
                a.port()
            )
        })
        .collect();
    std::fs::write(&catalog_path, format!("{{\n  \"web\": [\n{}\n  ]\n}}\n", instances.join(",\n")))?;
    let config_path = dir.join("switchyard.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"# Written by `switchyard demo`.
[server]
threads = 1
drain_timeout = "2s"

[admin]
listen = "{admin}"

[access_log]
path = "access.log"

[[listeners]]
address = "{listen}"

[[routes]]
name = "web"
cluster = "web"

[clusters.web]
file = {{ catalog = "catalog.json" }}
selection = "round_robin"
connect_timeout = "1s"
"#
        ),
    )?;
    Ok(Demo {
        dir: dir.to_path_buf(),
        config_path,
        catalog_path,
        upstreams,
    })
}

impl Demo {
    pub fn extras(&self) -> Extras {
        let mut extras = Extras::default();
        for (name, addr) in &self.upstreams {
            let mut svc = Service::new(
                format!("sample {name}"),
                HttpServer::new_app(SampleUpstream { name: name.clone() }),
            );
            svc.add_tcp(&addr.to_string());
            extras.services.push(Box::new(svc));
        }
        extras
    }

    pub fn instructions(&self, listen: SocketAddr, admin: SocketAddr) -> String {
        let (a, b) = (&self.upstreams[0], &self.upstreams[1]);
        format!(
            r#"
Switchyard demo
  proxy   http://{listen}/        (round robin over two sample upstreams)
  admin   http://{admin}/status   /metrics  /readyz  /healthz
  catalog {catalog}
  config  {config}
  access log {dir}/access.log

Try:
  curl -s http://{listen}/                 # "hello from upstream-a", then upstream-b, ...
  curl -s http://{admin}/status
  curl -s http://{admin}/metrics | grep switchyard_requests_total

Remove a backend: delete the {b_name} line from the catalog (keep the JSON valid):
  {editor} {catalog}
Traffic follows within a second; `curl http://{listen}/` then only answers "hello from {a_name}".
A broken edit (invalid JSON) is refused: the last good catalog keeps serving and /status shows why.
Add it back ({b_addr}) the same way. Stop with Ctrl-C.
"#,
            catalog = self.catalog_path.display(),
            config = self.config_path.display(),
            dir = self.dir.display(),
            a_name = a.0,
            b_name = b.0,
            b_addr = b.1,
            editor = std::env::var("EDITOR").unwrap_or_else(|_| "vi".into()),
        )
    }
}
