//! `margay`: the CNI plugin. Parses CNI stdin/env and forwards to the agent.
//!
//! This build answers VERSION and reports every other verb as "plugin not
//! available" (CNI code 50) until the agent API lands.

use std::io::Write;

const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn main() -> std::process::ExitCode {
    let cmd = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut out = std::io::stdout().lock();
    if cmd == "VERSION" {
        let v = serde_json::json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED});
        let _ = writeln!(out, "{v}");
        return std::process::ExitCode::SUCCESS;
    }
    let e = serde_json::json!({
        "cniVersion": "1.1.0", "code": 50,
        "msg": format!("margay: {cmd:?} is not available in this build yet"),
    });
    let _ = writeln!(out, "{e}");
    std::process::ExitCode::from(1)
}
