//! `margay-lab` end to end: up, status, check, down, nothing left behind.

use std::process::Command;

fn lab(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_margay-lab"))
        .env("MARGAY_LAB_DIR", dir)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn up_check_down() {
    let dir = margay_harness::names::temp_dir("labtest").unwrap();
    let up = lab(dir.path(), &["up", "--nodes", "3", "--tor", "bird"]);
    let out = String::from_utf8_lossy(&up.stdout).into_owned();
    let guard = scopeguard(dir.path());
    assert!(
        up.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(out.contains("all 12 pairs reachable"), "{out}");

    let st = lab(dir.path(), &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    let pid = v["supervisor_pid"].as_u64().unwrap();
    let netns: Vec<String> = nodes
        .iter()
        .map(|n| n["netns"].as_str().unwrap().to_owned())
        .collect();

    // The ToR learned every block from the nodes' margay-bgp speakers.
    let r = lab(dir.path(), &["exec", "tor", "ip", "route"]);
    let routes = String::from_utf8_lossy(&r.stdout);
    for b in ["10.244.1.0/26", "10.244.2.0/26", "10.244.3.0/26"] {
        assert!(routes.contains(b), "{routes}");
    }
    assert!(lab(dir.path(), &["check"]).status.success());
    let k = lab(dir.path(), &["kubectl", "get", "nodes", "-o", "name"]);
    assert_eq!(String::from_utf8_lossy(&k.stdout).lines().count(), 3);

    drop(guard);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "supervisor still running"
    );
    for ns in netns {
        assert!(
            !std::path::Path::new("/run/netns").join(&ns).exists(),
            "{ns} left"
        );
    }
    assert!(!lab(dir.path(), &["status"]).status.success());
}

/// Runs `margay-lab down` when dropped, so a failing test tears the lab down.
struct Down(std::path::PathBuf);
fn scopeguard(dir: &std::path::Path) -> Down {
    Down(dir.to_owned())
}
impl Drop for Down {
    fn drop(&mut self) {
        let _ = lab(&self.0, &["down"]);
    }
}
