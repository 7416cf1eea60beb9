//! Listeners that accept and answer, probes that say what became of a
//! connection (TCP, SCTP) or a datagram (UDP) within a timeout, and a
//! receiver that records who reached it: what policy tests and
//! `margay-lab probe` run inside pods (`margay-lab netcheck
//! serve|probe|recv`).
//!
//! A probe's [`Outcome`] tells a policy drop from a closed port: a TCP or
//! SCTP probe is `ok` when the connection is accepted (SCTP's one-to-one
//! sockets, where the kernel has SCTP), a UDP probe when the datagram is
//! echoed back; `refused` when the destination answered that nothing
//! listens (a TCP RST, an SCTP ABORT, ICMP port unreachable); `timeout`
//! when nothing came back (dropped on the way, as a NetworkPolicy drops);
//! `unreachable` when the network said so (ICMP host or net unreachable).
//!
//! A UDP probe may be sent from a given source address ([`probe_from`]):
//! one of the prober's own, or one it has no right to (added to its
//! interface to forge another pod's). Its echo, if any, goes to whoever
//! owns the address, so a forged datagram is seen at the receiver:
//! [`receive`] reports every datagram's source and payload.

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

/// What became of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Accepted (TCP, SCTP) or echoed (UDP).
    Ok,
    /// The destination answered that nothing listens there (a TCP RST, an
    /// SCTP ABORT, ICMP port unreachable): nothing dropped the probe.
    Refused,
    /// Nothing came back in time: dropped on the way (as a NetworkPolicy
    /// drops, silently), or nobody there.
    Timeout,
    /// The network answered that the destination cannot be reached (ICMP
    /// host or net unreachable), or there is no route.
    Unreachable,
}

impl Outcome {
    /// The word `netcheck probe` prints for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Timeout => "timeout",
            Outcome::Unreachable => "unreachable",
        }
    }

    /// The outcome an error of a socket call reports, if it is one (and
    /// not a local failure).
    fn of(e: &std::io::Error) -> Option<Self> {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => Some(Outcome::Refused),
            K::TimedOut | K::WouldBlock => Some(Outcome::Timeout),
            K::HostUnreachable | K::NetworkUnreachable => Some(Outcome::Unreachable),
            _ => None,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Outcome {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        [
            Outcome::Ok,
            Outcome::Refused,
            Outcome::Timeout,
            Outcome::Unreachable,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
        .ok_or_else(|| Error::Other(format!("{s:?}: not ok|refused|timeout|unreachable")))
    }
}

/// The UDP probe's datagram unless another is given.
pub const PAYLOAD: &[u8] = b"margay-probe";

/// How probes are sent.
#[derive(Debug, Clone)]
pub struct ProbeOpts {
    /// How long to wait for each.
    pub timeout: Duration,
    /// UDP only: the source address, bound before sending. It must be one
    /// of the prober's (added to an interface, IPv6 without DAD) for the
    /// kernel to send from it.
    pub from: Option<IpAddr>,
    /// UDP only: the datagram (and the echo expected).
    pub payload: Vec<u8>,
}

impl Default for ProbeOpts {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(1),
            from: None,
            payload: PAYLOAD.to_vec(),
        }
    }
}

/// A socket call's error: an outcome, or a local failure.
fn answer<T>(r: std::io::Result<T>) -> Result<std::result::Result<T, Outcome>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e) => Outcome::of(&e).map(Err).ok_or(Error::Io(e)),
    }
}

/// What became of a probe of `t`; an error when it could not be sent (a
/// source address the prober does not have, a family mismatch).
pub fn probe_one(t: &Target, o: &ProbeOpts) -> Result<Outcome> {
    if o.from.is_some() && t.transport != Transport::Udp {
        return Err(Error::Other(format!(
            "{t}: a source address is for UDP probes only"
        )));
    }
    match t.transport {
        Transport::Tcp => match answer(TcpStream::connect_timeout(&t.addr, o.timeout))? {
            Ok(mut s) => {
                // Accepted is enough; read the greeting if it comes.
                let _ = s.set_read_timeout(Some(o.timeout));
                let mut b = [0u8; 8];
                let _ = s.read(&mut b);
                Ok(Outcome::Ok)
            }
            Err(out) => Ok(out),
        },
        Transport::Udp => udp(t.addr, o),
        Transport::Sctp => sctp::connects(t.addr, o.timeout),
    }
}

fn udp(to: SocketAddr, o: &ProbeOpts) -> Result<Outcome> {
    let any = if to.is_ipv4() {
        IpAddr::from([0u8; 4])
    } else {
        IpAddr::from([0u8; 16])
    };
    let s = UdpSocket::bind(SocketAddr::new(o.from.unwrap_or(any), 0))?;
    if let Err(out) = answer(s.connect(to))? {
        return Ok(out);
    }
    if let Err(out) = answer(s.send(&o.payload))? {
        return Ok(out);
    }
    let deadline = std::time::Instant::now() + o.timeout;
    let mut b = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(Outcome::Timeout);
        }
        s.set_read_timeout(Some(left))?;
        match answer(s.recv(&mut b))? {
            Ok(n) if b[..n] == o.payload[..] => return Ok(Outcome::Ok),
            // Not the echo: wait on.
            Ok(_) => {}
            Err(out) => return Ok(out),
        }
    }
}

/// A UDP socket on one port, both families, that records who sends to it.
#[derive(Debug)]
pub struct Receiver(UdpSocket);

impl Receiver {
    /// Bound to `port` on every address of both families.
    pub fn bind(port: u16) -> Result<Self> {
        Ok(Self(UdpSocket::bind(SocketAddr::new(
            IpAddr::from([0u8; 16]),
            port,
        ))?))
    }

    /// Hands every datagram that arrives within `window` to `seen`, with
    /// its source address (an IPv4 one as such, not IPv4-mapped).
    pub fn run(&self, window: Duration, mut seen: impl FnMut(IpAddr, &[u8])) -> Result<()> {
        let deadline = std::time::Instant::now() + window;
        let mut b = [0u8; 1500];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            self.0.set_read_timeout(Some(left))?;
            match self.0.recv_from(&mut b) {
                Ok((n, from)) => seen(from.ip().to_canonical(), &b[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
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

    use super::Outcome;
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

    /// What becomes of an association to `addr` within `timeout`.
    pub fn connects(addr: SocketAddr, timeout: Duration) -> Result<Outcome> {
        let fd = socket(
            family(addr),
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::Sctp,
        )?;
        let errno = |e: Errno| match e {
            Errno::ECONNREFUSED => Ok(Outcome::Refused),
            Errno::ETIMEDOUT => Ok(Outcome::Timeout),
            Errno::EHOSTUNREACH | Errno::ENETUNREACH => Ok(Outcome::Unreachable),
            e => Err(Error::Nix(e)),
        };
        match connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
            Ok(()) => return Ok(Outcome::Ok),
            Err(Errno::EINPROGRESS) => {}
            Err(e) => return errno(e),
        }
        let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let mut p = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
        if poll(&mut p, ms)? == 0 {
            return Ok(Outcome::Timeout);
        }
        match getsockopt(&fd, sockopt::SocketError)? {
            0 => Ok(Outcome::Ok),
            e => errno(Errno::from_raw(e)),
        }
    }
}

/// Probes every target at once; what became of each, in order.
pub fn probe(targets: &[Target], o: &ProbeOpts) -> Vec<Result<Outcome>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = targets
            .iter()
            .map(|t| s.spawn(move || probe_one(t, o)))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Other("the probe panicked".into())))
            })
            .collect()
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
        // Closed ports answer at once: nothing dropped the probe.
        let closed: Target = "127.0.0.1:1/udp".parse().unwrap();
        let closed_tcp: Target = "127.0.0.1:1/tcp".parse().unwrap();
        let o = ProbeOpts {
            timeout: Duration::from_millis(500),
            ..Default::default()
        };
        let mut got = Vec::new();
        for _ in 0..50 {
            got = probe(&[ok, u, closed, closed_tcp], &o)
                .into_iter()
                .map(Result::unwrap)
                .collect();
            if got[..2] == [Outcome::Ok, Outcome::Ok] {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        use Outcome::{Ok as Yes, Refused};
        assert_eq!(got, [Yes, Yes, Refused, Refused]);
        assert!("1.2.3.4:80/quic".parse::<Target>().is_err());
        assert_eq!(
            "1.2.3.4:80/sctp".parse::<Target>().unwrap().transport,
            Transport::Sctp
        );
        for o in [Yes, Refused, Outcome::Timeout, Outcome::Unreachable] {
            assert_eq!(o.to_string().parse::<Outcome>().unwrap(), o);
        }
    }

    /// A datagram sent from another of the prober's addresses arrives from
    /// that address, with its payload; one the prober does not have cannot
    /// be sent from.
    #[test]
    fn receiver_sees_the_source_a_probe_was_sent_from() {
        let r = Receiver::bind(0).unwrap();
        let port = r.0.local_addr().unwrap().port();
        let to: Target = format!("127.0.0.1:{port}/udp").parse().unwrap();
        let o = ProbeOpts {
            timeout: Duration::from_millis(50),
            from: Some("127.0.0.2".parse().unwrap()),
            payload: b"from-two".to_vec(),
        };
        // No echo: the receiver only records.
        assert_eq!(probe_one(&to, &o).unwrap(), Outcome::Timeout);
        let plain = ProbeOpts {
            timeout: Duration::from_millis(50),
            ..Default::default()
        };
        assert_eq!(probe_one(&to, &plain).unwrap(), Outcome::Timeout);
        let mut seen = Vec::new();
        r.run(Duration::from_millis(200), |src, p| {
            seen.push((src, p.to_vec()))
        })
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            seen,
            [
                (ip("127.0.0.2"), b"from-two".to_vec()),
                (ip("127.0.0.1"), PAYLOAD.to_vec())
            ]
        );
        let not_ours = ProbeOpts {
            from: Some("192.0.2.1".parse().unwrap()),
            ..o.clone()
        };
        assert!(probe_one(&to, &not_ours).is_err());
        let tcp: Target = format!("127.0.0.1:{port}/tcp").parse().unwrap();
        assert!(probe_one(&tcp, &o).is_err());
    }
}
