//! Listeners that accept and answer, and probes that say whether a
//! connection (TCP) or a reply (UDP) got through within a timeout: what
//! policy tests and `margay-lab probe` run inside pods
//! (`margay-lab netcheck serve|probe`).
//!
//! A TCP probe succeeds when the connection is accepted; a UDP probe when
//! the datagram is echoed back. A policy drop shows as a timeout, a closed
//! port as a refusal: both fail.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::str::FromStr;
use std::time::Duration;

use crate::{Error, Result};

/// A transport a probe or listener uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// `tcp:80`, `udp:80`: a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// Its transport.
    pub transport: Transport,
    /// Its port.
    pub port: u16,
}

fn transport(s: &str) -> Result<Transport> {
    match s {
        "tcp" | "TCP" => Ok(Transport::Tcp),
        "udp" | "UDP" => Ok(Transport::Udp),
        other => Err(Error::Other(format!(
            "transport {other:?}: tcp or udp (SCTP needs a kernel with it)"
        ))),
    }
}

impl FromStr for Listen {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (t, p) = s
            .split_once(':')
            .ok_or_else(|| Error::Other(format!("{s:?}: want tcp:PORT or udp:PORT")))?;
        Ok(Self {
            transport: transport(t)?,
            port: p
                .parse()
                .map_err(|e| Error::Other(format!("{s:?}: port: {e}")))?,
        })
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        })
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.transport, self.port)
    }
}

/// `IP:PORT/tcp` (TCP if no transport): a probe target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Where.
    pub addr: SocketAddr,
    /// How.
    pub transport: Transport,
}

impl FromStr for Target {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (a, t) = s.rsplit_once('/').unwrap_or((s, "tcp"));
        Ok(Self {
            addr: a
                .parse()
                .map_err(|e| Error::Other(format!("{s:?}: {e} (want IP:PORT[/tcp|udp])")))?,
            transport: transport(t)?,
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.transport)
    }
}

/// Serves every listener until the process ends: TCP connections are
/// accepted, answered with a line and closed; UDP datagrams echoed.
pub fn serve(listen: &[Listen]) -> Result<()> {
    let mut threads = Vec::new();
    for l in listen {
        let any = SocketAddr::new(IpAddr::from([0u8; 16]), l.port);
        match l.transport {
            Transport::Tcp => {
                let sock = TcpListener::bind(any)?;
                threads.push(std::thread::spawn(move || {
                    for s in sock.incoming().flatten() {
                        let mut s = s;
                        let _ = s.write_all(b"margay\n");
                    }
                }));
            }
            Transport::Udp => {
                let sock = UdpSocket::bind(any)?;
                threads.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 1500];
                    while let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }));
            }
        }
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Whether `t` answers within `timeout`.
pub fn probe_one(t: &Target, timeout: Duration) -> bool {
    match t.transport {
        Transport::Tcp => match TcpStream::connect_timeout(&t.addr, timeout) {
            Ok(mut s) => {
                // Accepted is enough; read the greeting if it comes.
                let _ = s.set_read_timeout(Some(timeout));
                let mut b = [0u8; 8];
                let _ = s.read(&mut b);
                true
            }
            Err(_) => false,
        },
        Transport::Udp => {
            let local: SocketAddr = if t.addr.is_ipv4() {
                "0.0.0.0:0".parse().unwrap_or_else(|_| unreachable!())
            } else {
                "[::]:0".parse().unwrap_or_else(|_| unreachable!())
            };
            let Ok(s) = UdpSocket::bind(local) else {
                return false;
            };
            if s.set_read_timeout(Some(timeout)).is_err() || s.connect(t.addr).is_err() {
                return false;
            }
            if s.send(b"margay-probe").is_err() {
                return false;
            }
            let mut b = [0u8; 64];
            matches!(s.recv(&mut b), Ok(n) if &b[..n] == b"margay-probe")
        }
    }
}

/// Probes every target at once; the answers in order.
pub fn probe(targets: &[Target], timeout: Duration) -> Vec<bool> {
    std::thread::scope(|s| {
        let hs: Vec<_> = targets
            .iter()
            .map(|t| s.spawn(move || probe_one(t, timeout)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(false)).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_tcp_and_udp() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let tport = tcp.local_addr().unwrap().port();
        drop(tcp);
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let uport = udp.local_addr().unwrap().port();
        drop(udp);
        let l = vec![
            format!("tcp:{tport}").parse().unwrap(),
            format!("udp:{uport}").parse().unwrap(),
        ];
        std::thread::spawn(move || serve(&l));
        let ok: Target = format!("127.0.0.1:{tport}").parse().unwrap();
        let u: Target = format!("127.0.0.1:{uport}/udp").parse().unwrap();
        let closed: Target = "127.0.0.1:1/udp".parse().unwrap();
        let t = Duration::from_millis(500);
        let mut got = vec![false];
        for _ in 0..50 {
            got = probe(&[ok, u, closed], t);
            if got[0] && got[1] {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(got, [true, true, false]);
        assert!("1.2.3.4:80/sctp".parse::<Target>().is_err());
    }
}
