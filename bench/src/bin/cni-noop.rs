//! `cni-noop`: a CNI plugin that does nothing and answers at once. The CNI
//! benchmark runs it exactly like the real plugins to measure the runtime's
//! own cost (libcni, process start-up), the floor under every plugin.

use std::io::Read;

fn main() {
    let mut input = String::new();
    let _ = std::io::stdin().read_to_string(&mut input);
    let version = serde_json::from_str::<serde_json::Value>(&input)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .unwrap_or_else(|| "1.0.0".into());
    match std::env::var("CNI_COMMAND").as_deref() {
        Ok("ADD") => println!("{{\"cniVersion\":\"{version}\",\"ips\":[]}}"),
        Ok("VERSION") => println!(
            "{{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"0.3.1\",\"0.4.0\",\"1.0.0\"]}}"
        ),
        _ => {}
    }
}
