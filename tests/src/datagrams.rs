//! UDP datagrams sent and seen inside network namespaces through
//! `margay-lab netcheck` (`probe --from`, `recv`): who reached a receiver,
//! whatever source address a sender claims. Replies to a forged source go
//! to its owner, so a forged datagram can only be seen where it arrives.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Stdio};
use std::time::Duration;

use margay_harness::Netns;
use margay_harness::paths;

fn lab() -> PathBuf {
    paths::workspace_bin("margay-lab").expect("margay-lab built")
}

/// `netcheck recv udp:PORT` running in a namespace for a window: every
/// datagram that reaches it.
#[derive(Debug)]
pub struct Receiver {
    child: Child,
    lines: BufReader<ChildStdout>,
}

impl Receiver {
    /// Started in `ns` on `port` for `window`; returns once its socket is
    /// bound.
    pub fn start(ns: &Netns, port: u16, window: Duration) -> Self {
        let mut child = ns
            .cmd(lab())
            .args(["netcheck", "recv", &format!("udp:{port}"), "--for-ms"])
            .arg(window.as_millis().to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("netcheck recv");
        let mut lines = BufReader::new(child.stdout.take().expect("piped"));
        let mut first = String::new();
        lines.read_line(&mut first).expect("recv's first line");
        assert!(first.starts_with("listening"), "recv said {first:?}");
        Self { child, lines }
    }

    /// Each datagram received (its source and payload), once the window
    /// has ended.
    pub fn finish(mut self) -> Vec<(IpAddr, String)> {
        let mut got = Vec::new();
        for l in (&mut self.lines).lines() {
            let l = l.expect("recv's output");
            let (src, payload) = l.split_once(' ').expect("SOURCE PAYLOAD");
            got.push((src.parse().expect("a source address"), payload.to_string()));
        }
        assert!(self.child.wait().expect("recv").success(), "recv failed");
        got
    }
}

/// Starts sending `payload` from `ns` to `to`, from address `src` (bound:
/// `ns` must have it on an interface). Nothing echoes a receiver's
/// datagrams: the send waits 50 ms for nothing.
pub fn send(ns: &Netns, src: &str, to: SocketAddr, payload: &str) -> Child {
    ns.cmd(lab())
        .args(["netcheck", "probe", "--timeout-ms", "50", "--from", src])
        .args(["--payload", payload])
        .arg(format!("{to}/udp"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("netcheck probe")
}

/// Waits for sends; each must have gone out (`probe` exits 2 when it
/// could not send, e.g. from an address its namespace lacks).
pub fn sent(children: Vec<Child>) {
    for ch in children {
        let o = ch.wait_with_output().expect("netcheck probe");
        let text = String::from_utf8_lossy(&o.stdout);
        assert_ne!(o.status.code(), Some(2), "not sent: {text}");
    }
}
