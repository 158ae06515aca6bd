//! README.md's commands, run as written: every `sh` block's command against a copy of the
//! repository's project served on a free port (`cargo run --release --` is the built binary,
//! `localhost:8080` that port), and every command of the CLI table against the binary's own
//! `--help`. A README change that breaks a command fails here.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::support::repo;

/// Commands that are not examples of lambda-ctl: the suite itself and the linters.
const NOT_RUN_HERE: &[&str] = &["cargo test", "cargo fmt", ".ci/run"];

/// `(section, command)` for each command line of the README's `sh` blocks; `#` comments are
/// dropped and `\`-continued lines joined.
fn sh_commands(readme: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for line in readme.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            section = h.trim().to_string();
        }
        if line.starts_with("```") {
            in_sh = !in_sh && line.trim() == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let code = match line.find(" #") {
            Some(i) => &line[..i],
            None => line,
        };
        let code = code.trim();
        if code.is_empty() || code.starts_with('#') {
            continue;
        }
        if let Some(cont) = code.strip_suffix('\\') {
            pending.push_str(cont);
            continue;
        }
        pending.push_str(code);
        out.push((section.clone(), std::mem::take(&mut pending)));
    }
    out
}

/// A README command as run here: the built binary for `cargo run --release --` and
/// `lambda-ctl`, the test server's address for the default one.
fn as_run_here(command: &str, addr: &str) -> String {
    let bin = env!("CARGO_BIN_EXE_lambda-ctl");
    let c = command
        .replace("cargo run --release --", bin)
        .replace("localhost:8080", addr)
        .replace("127.0.0.1:8080", addr);
    match c.strip_prefix("lambda-ctl ") {
        Some(rest) => format!("{bin} {rest}"),
        None => c,
    }
}

/// A copy of the repository's project (pipelines, workflows) listening on a free port.
fn served_copy(dir: &Path) -> String {
    for sub in ["pipelines", "workflows", "reference"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        for f in std::fs::read_dir(repo().join(sub)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.join(sub).join(f.file_name().unwrap())).unwrap();
        }
    }
    assert!(
        !repo().join("lambda.yaml").exists(),
        "the repository's lambda.yaml would need merging here"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    std::fs::write(
        dir.join("lambda.yaml"),
        format!("serve:\n  listen: {addr}\n"),
    )
    .unwrap();
    addr
}

/// Kills the README's `serve` when the test ends.
struct Background(std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn readme_shell_commands_run_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let commands = sh_commands(&readme);
    assert!(
        commands.iter().any(|(s, _)| s == "Quick start"),
        "no quick start commands found: {commands:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let addr = served_copy(dir.path());
    let mut server = None;
    let mut ran = 0;
    for (section, command) in &commands {
        if NOT_RUN_HERE.iter().any(|p| command.starts_with(p)) {
            continue;
        }
        let line = as_run_here(command, &addr);
        let is_serve = line.split_whitespace().nth(1) == Some("serve");
        if is_serve {
            assert!(server.is_none(), "two `serve` commands: {command}");
            let mut child = Command::new("sh")
                .args(["-c", &format!("exec {line}")])
                .current_dir(dir.path())
                .env_remove("LAMBDA_PROJECT")
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let out = std::io::BufReader::new(child.stdout.take().unwrap());
            let guard = Background(child);
            let mut lines = out.lines();
            let serving = lines
                .by_ref()
                .map_while(Result::ok)
                .any(|l| l.contains(&format!("serving on http://{addr}")));
            assert!(serving, "[{section}] `{command}` did not serve on {addr}");
            std::thread::spawn(move || for _ in lines {});
            server = Some(guard);
            ran += 1;
            continue;
        }
        assert!(
            server.is_some(),
            "[{section}] `{command}` comes before any `serve` command"
        );
        let o = Command::new("sh")
            .args(["-c", &line])
            .current_dir(dir.path())
            .env_remove("LAMBDA_PROJECT")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
        );
        assert!(
            o.status.success(),
            "[{section}] `{command}` failed ({}):\n{out}{err}",
            o.status
        );
        assert!(
            !out.trim().is_empty(),
            "[{section}] `{command}` printed nothing"
        );
        if command.starts_with("curl") {
            assert!(!out.contains("\"error\""), "[{section}] `{command}`: {out}");
        }
        ran += 1;
    }
    assert!(ran >= 4, "only {ran} README commands ran: {commands:?}");
}

/// Every command of the README's CLI table exists, with every flag it shows.
#[test]
fn readme_cli_table_matches_the_binary() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let rows: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `lambda-ctl "))
        .collect();
    assert!(rows.len() >= 10, "CLI table not found");
    for row in rows {
        let cell = &row[..row.find('`').unwrap()];
        // `runs [WORKFLOW]` / `lambda-ctl logs RUN_ID`: one cell may show two commands.
        let cells = std::iter::once(cell).chain(
            row.split("`lambda-ctl ")
                .skip(1)
                .map(|c| &c[..c.find('`').unwrap()]),
        );
        for cell in cells {
            let name = cell.split_whitespace().next().unwrap();
            let o = crate::support::lambda_ctl(&[name, "--help"]);
            let help = String::from_utf8_lossy(&o.stdout);
            assert!(o.status.success(), "`lambda-ctl {cell}`: no such command");
            for flag in cell
                .split(|c: char| c.is_whitespace() || "[]|".contains(c))
                .filter(|w| w.starts_with("--"))
            {
                assert!(
                    help.contains(flag),
                    "`lambda-ctl {cell}`: `{name} --help` does not know {flag}:\n{help}"
                );
            }
        }
    }
}

#[test]
fn sh_blocks_are_read_as_commands() {
    let md = "## A\n```sh\nx --y 1     # comment\n# only a comment\n\nz \\\n  --w\n```\n```\nnot sh\n```\n";
    assert_eq!(
        sh_commands(md),
        vec![
            ("A".to_string(), "x --y 1".to_string()),
            ("A".to_string(), "z --w".to_string())
        ]
    );
}
