//! `cni-noop`: a CNI plugin that does nothing and answers at once. The CNI
//! benchmark runs it exactly like the real plugins to measure the runtime's
//! own cost (libcni, process start-up), the floor under every plugin.
//!
//! With `"fakeAddress": true` in its configuration an ADD answers with an
//! `eth0` holding a made-up /32 (100.64.0.0/10, from a hash of the
//! container ID), wired nowhere: enough for a kubelet to mark the pod
//! Ready, so `margay-lab up --kubernetes --install noop` measures what a
//! pod start costs without any network (`bench/kube-pods.sh`).

use std::io::Read;

fn main() {
    let mut input = String::new();
    let _ = std::io::stdin().read_to_string(&mut input);
    let conf = serde_json::from_str::<serde_json::Value>(&input).unwrap_or_default();
    let version = conf["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
    match std::env::var("CNI_COMMAND").as_deref() {
        Ok("ADD") if conf["fakeAddress"].as_bool() == Some(true) => {
            let id = std::env::var("CNI_CONTAINERID").unwrap_or_default();
            let netns = std::env::var("CNI_NETNS").unwrap_or_default();
            println!("{}", fake_result(&version, &id, &netns));
        }
        Ok("ADD") => println!("{{\"cniVersion\":\"{version}\",\"ips\":[]}}"),
        Ok("VERSION") => println!(
            "{{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"0.3.1\",\"0.4.0\",\"1.0.0\"]}}"
        ),
        _ => {}
    }
}

/// An ADD result for `version`: `eth0` in `netns` with a /32 of
/// 100.64.0.0/10 chosen by an FNV-1a hash of container `id`.
fn fake_result(version: &str, id: &str, netns: &str) -> serde_json::Value {
    let h = id.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let a = std::net::Ipv4Addr::from(0x6440_0000 | (h & 0x003f_ffff));
    let mut ip = serde_json::json!({"address": format!("{a}/32"), "interface": 0});
    if version.starts_with("0.") {
        ip["version"] = "4".into();
    }
    serde_json::json!({
        "cniVersion": version,
        "interfaces": [{"name": "eth0", "sandbox": netns}],
        "ips": [ip],
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_fake_address_is_in_the_shared_range_and_stable_per_container() {
        let r = super::fake_result("0.4.0", "abc", "/var/run/netns/x");
        let a = r["ips"][0]["address"].as_str().expect("address");
        assert_eq!(
            a,
            super::fake_result("0.4.0", "abc", "")["ips"][0]["address"]
        );
        assert_ne!(
            a,
            super::fake_result("0.4.0", "abd", "")["ips"][0]["address"]
        );
        let ip: std::net::Ipv4Addr = a.trim_end_matches("/32").parse().expect("ip");
        assert_eq!(ip.octets()[0], 100);
        assert!((64..128).contains(&ip.octets()[1]));
        assert_eq!(r["ips"][0]["version"], "4");
        assert!(
            super::fake_result("1.0.0", "abc", "")["ips"][0]
                .get("version")
                .is_none()
        );
    }
}
