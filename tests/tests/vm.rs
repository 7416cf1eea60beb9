//! `scripts/in-vm.sh`, the way tests use kernel features this host lacks:
//! one VM boot with a stock Debian kernel runs a script that loads `ipip`
//! inside the VM, builds two namespaces joined by a veth with `tunl0`
//! routes between them and pings across (the path Calico's IPIP mode uses),
//! writes to the VM's /tmp, and exits 7. The host sees the status, the
//! output, no file, and no VM left running.

use std::process::Command;

#[test]
fn a_vm_runs_ipip_and_reports_the_commands_status() {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let marker = format!("/tmp/margay-vm-marker-{}", std::process::id());
    let script = format!(
        r#"set -e
modprobe ipip
ip netns add a; ip netns add b
ip link add va netns a type veth peer name vb netns b
ip -n a addr add 10.0.0.1/24 dev va; ip -n b addr add 10.0.0.2/24 dev vb
ip -n a link set va up; ip -n b link set vb up
for n in a b; do ip -n $n link set lo up; ip -n $n link set tunl0 up; done
ip -n a addr add 10.244.1.1/32 dev tunl0; ip -n b addr add 10.244.2.1/32 dev tunl0
ip -n a route add 10.244.2.0/24 via 10.0.0.2 dev tunl0 onlink
ip -n b route add 10.244.1.0/24 via 10.0.0.1 dev tunl0 onlink
ip netns exec a ping -c 2 -W 2 -I 10.244.1.1 10.244.2.1
echo "tunl0 mtu $(cat /sys/class/net/tunl0/mtu 2>/dev/null || ip netns exec a cat /sys/class/net/tunl0/mtu)"
touch {marker}
exit 7"#
    );
    let out = Command::new(format!("{repo}/scripts/in-vm.sh"))
        .args(["--memory", "1G", "--cpus", "1", "--", "bash", "-c", &script])
        .output()
        .expect("scripts/in-vm.sh");
    let text = margay_tests::output_text(&out);
    assert_eq!(out.status.code(), Some(7), "{text}");
    assert!(text.contains("2 received"), "{text}");
    assert!(text.contains("tunl0 mtu 1480"), "{text}");
    // The VM's writes stay in the VM.
    assert!(!std::path::Path::new(&marker).exists());
}
