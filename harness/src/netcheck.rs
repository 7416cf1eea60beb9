//! Listeners that accept and answer, and probes that say whether a
//! connection (TCP) or a reply (UDP) got through within a timeout: what
//! policy tests and `margay-lab probe` run inside pods
//! (`margay-lab netcheck serve|probe`).
//!
//! A TCP or SCTP probe succeeds when the connection is accepted (SCTP's
//! one-to-one sockets, where the kernel has SCTP); a UDP probe when the
//! datagram is echoed back. A policy drop shows as a timeout, a closed
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
    /// SCTP (a kernel with CONFIG_IP_SCTP).
    Sctp,
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
        "sctp" | "SCTP" => Ok(Transport::Sctp),
        other => Err(Error::Other(format!(
            "transport {other:?}: tcp, udp or sctp"
        ))),
    }
}

impl FromStr for Listen {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (t, p) = s
            .split_once(':')
            .ok_or_else(|| Error::Other(format!("{s:?}: want tcp:PORT, udp:PORT or sctp:PORT")))?;
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
            Transport::Sctp => "sctp",
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
                .map_err(|e| Error::Other(format!("{s:?}: {e} (want IP:PORT[/tcp|udp|sctp])")))?,
            transport: transport(t)?,
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.transport)
    }
}

/// Serves every listener until the process ends: TCP and SCTP connections
/// are accepted, answered with a line and closed; UDP datagrams echoed.
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
            Transport::Sctp => {
                let sock = sctp::listen(any)?;
                threads.push(std::thread::spawn(move || sctp::serve(&sock)));
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
        Transport::Sctp => sctp::connects(t.addr, timeout),
    }
}

/// SCTP one-to-one (stream) sockets, which std has no type for.
mod sctp {
    use std::net::SocketAddr;
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    use std::time::Duration;

    use nix::errno::Errno;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::socket::{
        AddressFamily, Backlog, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrStorage,
        accept, bind, connect, getsockopt, listen as listen_on, send, socket, sockopt,
    };

    use crate::{Error, Result};

    fn family(a: SocketAddr) -> AddressFamily {
        if a.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        }
    }

    /// A listening socket on `addr` (`[::]` takes IPv4 too).
    pub fn listen(addr: SocketAddr) -> Result<OwnedFd> {
        let e =
            |e: Errno| Error::Other(format!("SCTP on {addr}: {e} (does the kernel have SCTP?)"));
        let fd = socket(
            family(addr),
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Sctp,
        )
        .map_err(e)?;
        bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(e)?;
        listen_on(&fd, Backlog::new(64).map_err(e)?).map_err(e)?;
        Ok(fd)
    }

    /// Accepts, answers with a line and closes, until the socket fails.
    pub fn serve(fd: &OwnedFd) {
        while let Ok(c) = accept(fd.as_raw_fd()) {
            let _ = send(c, b"margay\n", MsgFlags::empty());
            let _ = nix::unistd::close(c);
        }
    }

    /// Whether an association to `addr` comes up within `timeout`.
    pub fn connects(addr: SocketAddr, timeout: Duration) -> bool {
        let Ok(fd) = socket(
            family(addr),
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::Sctp,
        ) else {
            return false;
        };
        match connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
            Ok(()) => return true,
            Err(Errno::EINPROGRESS) => {}
            Err(_) => return false,
        }
        let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let mut p = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
        matches!(poll(&mut p, ms), Ok(n) if n > 0)
            && matches!(getsockopt(&fd, sockopt::SocketError), Ok(0))
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
        assert!("1.2.3.4:80/quic".parse::<Target>().is_err());
        assert_eq!(
            "1.2.3.4:80/sctp".parse::<Target>().unwrap().transport,
            Transport::Sctp
        );
    }
}
