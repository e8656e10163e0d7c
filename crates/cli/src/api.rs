//! The HTTP client of the provisioning API (`spec/provisioning.md`). The CLI
//! is the only HTTP client in the workspace.

use anyhow::{Context, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use ureq::Agent;

/// A provisioning server at a base URL, with an optional admin token.
pub struct Api {
    base: String,
    admin_token: Option<String>,
    agent: Agent,
}

impl Api {
    /// A client of the server at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str, admin_token: Option<String>) -> Api {
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .build()
            .into();
        Api {
            base: base.trim_end_matches('/').to_owned(),
            admin_token,
            agent,
        }
    }

    /// POSTs `body` to `path` and parses the answer, turning an API error into a one-line message.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.post(&url);
        if let Some(token) = &self.admin_token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let response = request.send_json(body);
        self.answer(response)
    }

    /// GETs `path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.get(&url);
        if let Some(token) = &self.admin_token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        self.answer(request.call())
    }

    fn answer<T: DeserializeOwned>(
        &self,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<T> {
        let mut response = response.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the provisioning server at {} ({e}); check the URL and that the server is running, then retry",
                self.base
            )
        })?;
        let status = response.status();
        let body: serde_json::Value = response.body_mut().read_json().with_context(|| {
            format!(
                "the server at {} did not answer with JSON (HTTP {status})",
                self.base
            )
        })?;
        if !status.is_success() {
            let code = body["error"]["code"].as_str().unwrap_or("unknown");
            let message = body["error"]["message"].as_str().unwrap_or("no message");
            bail!("the server refused ({code}): {message}");
        }
        serde_json::from_value(body).context("the server's answer does not have the expected shape")
    }
}

/// The admin token from `--token` or `MLCAPSULE_TOKEN`.
pub fn admin_token(flag: Option<String>) -> anyhow::Result<String> {
    flag.or_else(|| std::env::var("MLCAPSULE_TOKEN").ok())
        .filter(|t| !t.trim().is_empty())
        .map(|t| t.trim().to_owned())
        .context(
            "this is an admin command: pass --token TOKEN or set MLCAPSULE_TOKEN (the server wrote it to DATA/admin-token)",
        )
}
