//! `margay-lab` end to end through its command line: up (real agents and
//! pods), status, check, pod add/del, exec, kubectl, down, nothing left
//! behind.

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
    assert!(out.contains("all 36 pod pairs reachable"), "{out}");

    let st = lab(dir.path(), &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    let pid = v["supervisor_pid"].as_u64().unwrap();
    let netns: Vec<String> = nodes
        .iter()
        .map(|n| n["netns"].as_str().unwrap().to_owned())
        .collect();

    assert_eq!(v["pods"].as_array().unwrap().len(), 6);

    // The ToR learned every node's block from that node.
    let r = lab(
        dir.path(),
        &["exec", "tor", "ip", "route", "show", "proto", "bird"],
    );
    let routes = String::from_utf8_lossy(&r.stdout);
    for i in 1..=3 {
        let via = format!("via 10.99.0.{i} ");
        assert_eq!(routes.matches(&via).count(), 1, "{routes}");
    }
    assert!(lab(dir.path(), &["check"]).status.success());

    // A pod added from the command line is reachable from the others;
    // `exec` runs in pods too; delete removes it.
    let add = lab(dir.path(), &["pod", "add", "node2", "extra"]);
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let ip = String::from_utf8_lossy(&add.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    assert!(ip.starts_with("10.244."), "{ip}");
    let ping = lab(
        dir.path(),
        &["exec", "node1-pod1", "ping", "-c1", "-W2", &ip],
    );
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let dup = lab(dir.path(), &["pod", "add", "node2", "extra"]);
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("exists already"));
    assert!(lab(dir.path(), &["check"]).status.success());
    assert!(lab(dir.path(), &["pod", "del", "extra"]).status.success());
    let st = lab(dir.path(), &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["pods"].as_array().unwrap().len(), 6);
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
