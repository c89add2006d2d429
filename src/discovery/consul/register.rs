//! Self-registration: each Switchyard instance registers itself in Consul as
//! a service with a TTL check it keeps passing (contract rule 15), so the
//! load-balancer tier shows up next to the app servers.
//!
//! * the TTL check (`service:<id>`) starts critical; we pass it at once and
//!   then every TTL/2 — with `warn` instead while the proxy is not ready;
//! * a 404 on the heartbeat (`Unknown check ID`: the agent restarted and lost
//!   us) re-registers;
//! * on SIGTERM: maintenance first (so Consul stops sending clients here),
//!   then the drain, then deregistration (404 counts as done).

use super::client::{ClientError, ConsulClient};
use super::watch::encode_segment;
use crate::config::RegisterSettings;
use crate::snapshot::Snapshot;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

const WRITE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Registration {
    client: Arc<ConsulClient>,
    settings: RegisterSettings,
    snapshot: Arc<Snapshot>,
}

impl Registration {
    pub fn new(client: Arc<ConsulClient>, settings: RegisterSettings, snapshot: Arc<Snapshot>) -> Self {
        Registration { client, settings, snapshot }
    }

    pub fn check_id(&self) -> String {
        format!("service:{}", self.settings.id)
    }

    fn body(&self) -> Vec<u8> {
        let s = &self.settings;
        let mut v = serde_json::json!({
            "ID": s.id,
            "Name": s.name,
            "Tags": s.tags,
            "Port": s.port,
            "Meta": { "switchyard_version": env!("CARGO_PKG_VERSION") },
            "Check": {
                "CheckID": self.check_id(),
                "Name": "switchyard readiness (TTL)",
                "TTL": format!("{}ms", s.ttl.as_millis()),
                "DeregisterCriticalServiceAfter": format!("{}s", s.deregister_after.as_secs().max(60)),
            },
        });
        if let Some(a) = &s.address {
            v["Address"] = serde_json::Value::String(a.clone());
        }
        serde_json::to_vec(&v).unwrap_or_default()
    }

    async fn put(&self, endpoint: &'static str, path: &str, query: &[(&str, Option<&str>)], body: Option<Vec<u8>>) -> Result<(), ClientError> {
        let r = self.client.request(reqwest::Method::PUT, endpoint, path, query, body, WRITE_TIMEOUT).await;
        if matches!(r, Err(ClientError::Http { status: 403, .. })) {
            // The token may have been rotated: the next attempt uses the file's current one.
            self.client.reload_token();
        }
        r.map(|_| ())
    }

    pub async fn register(&self) -> Result<(), ClientError> {
        self.put("agent_register", "/v1/agent/service/register", &[], Some(self.body())).await?;
        tracing::info!(id = %self.settings.id, name = %self.settings.name, "registered in consul");
        Ok(())
    }

    /// Pass (ready) or warn (not ready) the TTL check; re-register on 404.
    pub async fn heartbeat(&self) -> Result<(), ClientError> {
        let table = self.snapshot.load();
        let pending = table.pending_clusters();
        let (verb, note) = if pending.is_empty() {
            ("pass", format!("ready, routing generation {}", table.generation))
        } else {
            ("warn", format!("not ready: no discovery result yet for {}", pending.join(", ")))
        };
        let path = format!("/v1/agent/check/{verb}/{}", encode_segment(&self.check_id()));
        match self.put("agent_check", &path, &[("note", Some(&note))], None).await {
            Err(ClientError::Http { status: 404, .. }) => {
                tracing::warn!(id = %self.settings.id, "consul lost our registration (agent restart?); registering again");
                self.register().await?;
                self.put("agent_check", &path, &[("note", Some(&note))], None).await
            }
            other => other,
        }
    }

    /// Put our instance into maintenance: clients stop being sent here.
    pub async fn maintenance(&self) {
        let path = format!("/v1/agent/service/maintenance/{}", encode_segment(&self.settings.id));
        match self.put("agent_maintenance", &path, &[("enable", Some("true")), ("reason", Some("switchyard is shutting down"))], None).await {
            Ok(()) => tracing::info!(id = %self.settings.id, "consul maintenance mode on"),
            Err(e) => tracing::warn!(id = %self.settings.id, error = %e, "cannot set consul maintenance mode"),
        }
    }

    pub async fn deregister(&self) {
        let path = format!("/v1/agent/service/deregister/{}", encode_segment(&self.settings.id));
        match self.put("agent_deregister", &path, &[], None).await {
            Ok(()) | Err(ClientError::Http { status: 404, .. }) => tracing::info!(id = %self.settings.id, "deregistered from consul"),
            Err(e) => tracing::warn!(id = %self.settings.id, error = %e, "cannot deregister from consul"),
        }
    }
}

/// The heartbeat loop.
pub struct Heartbeat(pub Arc<Registration>);

#[async_trait]
impl BackgroundService for Heartbeat {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let reg = &self.0;
        let mut registered = false;
        let mut tick = tokio::time::interval(reg.settings.ttl / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            if !registered {
                match reg.register().await {
                    Ok(()) => registered = true,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot register in consul; trying again at the next heartbeat");
                        continue;
                    }
                }
            }
            if let Err(e) = reg.heartbeat().await {
                tracing::warn!(error = %e, "consul heartbeat failed");
            }
        }
    }
}
