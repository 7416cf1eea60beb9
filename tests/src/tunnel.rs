//! Encapsulated packets made by hand, to show which outer sources a node's
//! tunnels take packets from: an IPv4/UDP packet (the inner one), wrapped
//! in VXLAN (UDP to the node's VXLAN port: VXLAN header, inner Ethernet
//! frame) or IPIP (an outer IPv4 header of protocol 4, sent on a raw
//! socket), sent from inside a given network namespace; and a UDP socket in
//! a pod's namespace that says which of them arrived.
//!
//! Sockets are opened on a short-lived thread that entered the namespace
//! (a socket belongs to the namespace of the thread that made it); the
//! test's own threads never change namespace.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use margay_harness::netns::Netns;

/// IP protocol number of IP-in-IP (`ipencap` in /etc/protocols; nft's
/// `ipip` keyword is protocol 94).
pub const IPPROTO_IPIP: u8 = 4;
const IPPROTO_UDP: u8 = 17;

/// The Internet checksum (RFC 1071) of `b`.
fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet of protocol `proto` (TTL 64, DF, header checksum set).
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(20 + payload.len()).expect("a packet under 64 KiB");
    let mut p = Vec::with_capacity(usize::from(len));
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// An IPv4 UDP datagram (UDP checksum 0: none, as IPv4 allows).
pub fn ipv4_udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("a datagram under 64 KiB");
    let mut udp = Vec::with_capacity(usize::from(len));
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    ipv4(*src.ip(), *dst.ip(), IPPROTO_UDP, &udp)
}

/// A VXLAN payload (RFC 7348: flags with the VNI bit, the VNI) carrying an
/// Ethernet frame from `src_mac` to `dst_mac` with the IPv4 packet `inner`.
pub fn vxlan(vni: u32, dst_mac: [u8; 6], src_mac: [u8; 6], inner: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08, 0, 0, 0];
    v.extend_from_slice(&(vni << 8).to_be_bytes());
    v.extend_from_slice(&dst_mac);
    v.extend_from_slice(&src_mac);
    v.extend_from_slice(&[0x08, 0x00]);
    v.extend_from_slice(inner);
    v
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .trim()
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    v.try_into().ok()
}

/// Runs `f` on a fresh thread inside namespace `ns`.
fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns = Netns::borrowed(ns);
    std::thread::spawn(move || ns.enter(f).map_err(io::Error::other)?)
        .join()
        .map_err(|_| io::Error::other("the thread in the namespace panicked"))?
}

/// Sends the VXLAN payload `payload` (see [`vxlan`]) from namespace `ns`
/// to `to` (the node's address and VXLAN port); the outer source is `ns`'s
/// own address towards `to`.
pub fn send_vxlan(ns: &str, to: SocketAddrV4, payload: &[u8]) -> io::Result<()> {
    let payload = payload.to_vec();
    in_ns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.send_to(&payload, to).map(drop)
    })
}

/// Sends `inner` (an IPv4 packet) IPIP-encapsulated from namespace `ns`:
/// an outer IPv4 header from `src` (an address of `ns`) to `to`, protocol
/// 4, written whole on a raw socket.
pub fn send_ipip(ns: &str, src: Ipv4Addr, to: Ipv4Addr, inner: &[u8]) -> io::Result<()> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, sendto, socket,
    };
    let packet = ipv4(src, to, IPPROTO_IPIP, inner);
    in_ns(ns, move || {
        // IPPROTO_RAW: the header is ours (IP_HDRINCL).
        let s = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Raw,
        )?;
        let dst = SockaddrIn::from(SocketAddrV4::new(to, 0));
        sendto(s.as_raw_fd(), &packet, &dst, MsgFlags::empty())?;
        Ok(())
    })
}

/// A UDP socket in a pod's namespace, collecting what arrives.
#[derive(Debug)]
pub struct Catcher {
    sock: UdpSocket,
    /// Every payload received so far, as text.
    pub got: Vec<String>,
}

impl Catcher {
    /// Listens on `port` (every address) in namespace `ns`.
    pub fn bind(ns: &str, port: u16) -> io::Result<Self> {
        let sock = in_ns(ns, move || {
            UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
        })?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Self {
            sock,
            got: Vec::new(),
        })
    }

    /// Reads until `tag` has arrived or `within` has passed, calling
    /// `resend` every second meanwhile (datagrams may be lost); whether it
    /// arrived. Everything else read on the way is kept in [`Catcher::got`].
    pub fn wait_for(
        &mut self,
        tag: &str,
        within: Duration,
        mut resend: impl FnMut() -> io::Result<()>,
    ) -> io::Result<bool> {
        let t = Instant::now();
        let mut sent = Instant::now();
        let mut buf = [0u8; 2048];
        while t.elapsed() < within {
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let done = text == tag;
                    self.got.push(text);
                    if done {
                        return Ok(true);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
            if sent.elapsed() >= Duration::from_secs(1) {
                resend()?;
                sent = Instant::now();
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_well_formed() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), 40000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 7), 7777);
        let p = ipv4_udp(src, dst, b"hi");
        assert_eq!(p.len(), 20 + 8 + 2);
        assert_eq!(checksum(&p[..20]), 0, "header checksum verifies");
        assert_eq!(p[9], 17);
        assert_eq!(&p[12..16], &[10, 244, 0, 5]);
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 7777);
        let v = vxlan(4096, [0x66; 6], [0x02; 6], &p);
        assert_eq!(&v[..8], &[0x08, 0, 0, 0, 0, 0x10, 0, 0]);
        assert_eq!(&v[20..22], &[0x08, 0x00]);
        assert_eq!(&v[22..], &p[..]);
        assert_eq!(
            parse_mac("66:0a:FF:00:01:02"),
            Some([0x66, 10, 255, 0, 1, 2])
        );
        assert_eq!(parse_mac("66:0a"), None);
    }
}
