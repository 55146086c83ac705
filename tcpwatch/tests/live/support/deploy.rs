//! Helpers for the tests of `deploy/`: its files, the virtualenv of the
//! Kubernetes validator, and commands whose whole output is the verdict.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tcpwatch/ has a parent")
        .to_path_buf()
}

/// A file under `deploy/`.
pub fn deploy_file(rel: &str) -> PathBuf {
    repo_root().join("deploy").join(rel)
}

pub fn read_deploy(rel: &str) -> String {
    let path = deploy_file(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Where `cargo xtask setup --test-tools` puts PyPI's kubernetes-validate.
pub fn kubernetes_validate_venv() -> PathBuf {
    repo_root().join("target/test-tools/kubernetes-validate")
}

/// What a command printed, and whether it succeeded.
pub struct Ran {
    pub ok: bool,
    pub output: String,
}

/// Runs a command to completion, stdout and stderr together.
pub fn output_of(cmd: &mut Command) -> Ran {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    Ran {
        ok: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Where `cargo xtask setup --test-tools` puts npm's typescript and
/// @grafana/schema.
pub fn grafana_schema_dir() -> PathBuf {
    repo_root().join("target/test-tools/grafana-schema")
}

/// The Grafana dashboard shipped in deploy/.
pub const DASHBOARD: &str = "grafana/tcpwatch.json";

/// One query of a dashboard panel.
#[derive(Clone, Debug)]
pub struct PanelQuery {
    pub panel: String,
    pub ref_id: String,
    pub expr: String,
}

/// Every panel query of the dashboard, rows left out.
pub fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<PanelQuery> {
    let panels = dashboard["panels"].as_array().expect("panels");
    panels
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("").to_string();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |t| PanelQuery {
                    panel: title.clone(),
                    ref_id: t["refId"].as_str().unwrap_or("").to_string(),
                    expr: t["expr"].as_str().unwrap_or("").to_string(),
                })
        })
        .collect()
}
