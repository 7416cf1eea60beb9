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

    // On a node, margayctl runs with the lab's kubeconfig; `ipam show`
    // tells the pods' addresses from the spares.
    let show = lab(
        dir.path(),
        &["exec", "node1", "--", "margayctl", "ipam", "show"],
    );
    let text = String::from_utf8_lossy(&show.stdout).into_owned();
    assert!(
        show.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&show.stderr)
    );
    let row = text
        .lines()
        .skip_while(|l| !l.starts_with("NODE"))
        .find(|l| l.starts_with("node1 "))
        .unwrap_or_else(|| panic!("{text}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[2], "2", "two pods on node1: {text}");
    assert!(cells[3].parse::<u32>().unwrap() > 0, "spares: {text}");

    // A dead agent is started again, as a kubelet would, and counted.
    let agent = v["nodes"][1]["agent_pid"].as_u64().unwrap();
    let _ = Command::new("kill")
        .args(["-9", &agent.to_string()])
        .status();
    let t = std::time::Instant::now();
    let restarted = loop {
        let st = lab(dir.path(), &["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
        let n = &v["nodes"][1];
        if n["restarts"] == 1 && n["agent_pid"].as_u64() != Some(agent) {
            break n.clone();
        }
        assert!(t.elapsed().as_secs() < 30, "not restarted: {n}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    assert!(
        restarted["last_exit"]
            .as_str()
            .unwrap_or("")
            .contains("signal: 9"),
        "{restarted}"
    );
    let table = String::from_utf8_lossy(&lab(dir.path(), &["status"]).stdout).into_owned();
    assert!(
        table.contains("RESTARTS") && table.contains("signal: 9"),
        "{table}"
    );
    let t = std::time::Instant::now();
    while !lab(dir.path(), &["check"]).status.success() {
        assert!(t.elapsed().as_secs() < 60, "the lab did not recover");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    // Logs are plain text.
    for f in ["lab.log", "work/node1.log", "work/node2.log"] {
        let log = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(!log.contains('\u{1b}'), "{f} has terminal escapes");
        assert!(!log.is_empty(), "{f} is empty");
    }

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
