//! `lambda-ctl ingest PIPELINE [FILE|-]`: send NDJSON/CSV events to a running server, in
//! line-aligned chunks; every chunk is acknowledged only once durable.

use std::io::Read;
use std::path::Path;

use anyhow::Context;

use super::CliError;
use super::client::Client;

const CHUNK: usize = 4 * 1024 * 1024;

pub fn run(
    project_dir: &Path,
    pipeline: &str,
    input: Option<&str>,
    server: Option<&str>,
) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    let Some(p) = project.pipeline(pipeline) else {
        let known: Vec<&str> = project.pipelines.iter().map(|p| p.name.as_str()).collect();
        return Err(CliError::User(format!(
            "unknown pipeline `{pipeline}` (pipelines: {})",
            known.join(", ")
        )));
    };
    let mut data = Vec::new();
    match input {
        None | Some("-") => std::io::stdin()
            .read_to_end(&mut data)
            .context("reading stdin")?,
        Some(f) => std::fs::File::open(f)
            .and_then(|mut file| file.read_to_end(&mut data))
            .map_err(|e| CliError::User(format!("cannot read {f}: {e}")))?,
    };
    let csv = p.format == crate::spec::Format::Csv;
    let client = Client::new(&project, server)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (mut accepted, mut rejected, mut duplicates) = (0u64, 0u64, 0u64);
    let header_len = if csv {
        data.iter()
            .position(|b| *b == b'\n')
            .map_or(data.len(), |i| i + 1)
    } else {
        0
    };
    let (header, body) = data.split_at(header_len);
    let mut pos = 0;
    // Line numbers in errors are counted over the whole input.
    let mut line_base = usize::from(csv);
    while pos < body.len() {
        let mut cut = (pos + CHUNK).min(body.len());
        if cut < body.len() {
            cut = body[pos..cut]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(cut, |i| pos + i + 1);
        }
        let mut chunk = header.to_vec();
        chunk.extend_from_slice(&body[pos..cut]);
        let req = client
            .request(
                reqwest::Method::POST,
                &format!("/v1/pipelines/{pipeline}/events"),
            )
            .header(
                reqwest::header::CONTENT_TYPE,
                if csv {
                    "text/csv"
                } else {
                    "application/x-ndjson"
                },
            )
            .body(chunk);
        let answer = rt.block_on(client.send(req))?;
        let v: serde_json::Value =
            serde_json::from_slice(&answer).context("decoding the server's answer")?;
        accepted += v["accepted"].as_u64().unwrap_or(0);
        rejected += v["rejected"].as_u64().unwrap_or(0);
        duplicates += v["duplicates"].as_u64().unwrap_or(0);
        for e in v["errors"].as_array().into_iter().flatten() {
            let line = e["line"].as_u64().unwrap_or(0) as usize - usize::from(csv) + line_base;
            eprintln!(
                "{}:{line}: {}",
                input.unwrap_or("-"),
                e["reason"].as_str().unwrap_or("")
            );
        }
        line_base += body[pos..cut].iter().filter(|b| **b == b'\n').count();
        pos = cut;
    }
    println!("accepted {accepted}, rejected {rejected}, duplicates {duplicates}");
    if rejected > 0 {
        return Err(CliError::User(format!(
            "{rejected} line(s) rejected (kept in the dead-letter area with their reasons)"
        )));
    }
    Ok(())
}
