//! Talking to a running `lambda-ctl serve` (for `ingest`, `query` and `restatements`).

use anyhow::Context;

use super::CliError;
use crate::spec::Project;

pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// The server of `project` (its `serve.listen`), or `server` when given.
    pub fn new(project: &Project, server: Option<&str>) -> Result<Client, CliError> {
        let base = match server {
            Some(s) if s.starts_with("http://") || s.starts_with("https://") => {
                s.trim_end_matches('/').to_string()
            }
            Some(s) => format!("http://{}", s.trim_end_matches('/')),
            None => format!("http://{}", project.settings.serve.listen),
        };
        let http = reqwest::Client::builder()
            .build()
            .context("building the HTTP client")?;
        Ok(Client {
            base,
            token: project.settings.serve.token.clone(),
            http,
        })
    }

    /// The server's base URL, e.g. `http://127.0.0.1:8080`.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    /// `GET path?params` from a one-shot command (its own runtime): the answer as JSON.
    pub fn get_json(
        &self,
        path: &str,
        params: &[(String, String)],
    ) -> Result<serde_json::Value, CliError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let req = self.request(reqwest::Method::GET, path).query(params);
        let body = rt.block_on(self.send(req))?;
        Ok(serde_json::from_slice(&body).context("decoding the server's answer")?)
    }

    /// Sends and returns the body; non-2xx answers become user errors with the server's message.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<bytes::Bytes, CliError> {
        let resp = req.send().await.map_err(|e| {
            CliError::User(format!(
                "cannot reach lambda-ctl at {}: {e} (is `lambda-ctl serve` running? use --server)",
                self.base
            ))
        })?;
        self.answer(resp).await
    }

    /// The body of a response; non-2xx answers become user errors with the server's message.
    pub async fn answer(&self, resp: reqwest::Response) -> Result<bytes::Bytes, CliError> {
        let status = resp.status();
        let body = resp.bytes().await.context("reading the server's answer")?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(CliError::User(format!("server answered {status}: {msg}")));
        }
        Ok(body)
    }
}
