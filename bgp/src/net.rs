//! Socket options BGP needs beyond what tokio offers: TCP MD5 signatures
//! (RFC 2385) and GTSM (RFC 5082), plus connecting with them set.
//!
//! These are `setsockopt` calls with kernel structs, the one place this
//! crate uses `unsafe`; each call passes a pointer to a properly sized,
//! initialised value that lives across the call.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

/// Longest key the kernel accepts (TCP_MD5SIG_MAXKEYLEN).
pub const MD5_MAX_KEY: usize = 80;

/// `struct tcp_md5sig` from `<linux/tcp.h>`.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: i32,
    key: [u8; MD5_MAX_KEY],
}

fn storage_for(addr: IpAddr, v6_socket: bool) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    #[allow(unsafe_code)]
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let addr = match addr {
        IpAddr::V4(a) if v6_socket => IpAddr::V6(a.to_ipv6_mapped()),
        a => a,
    };
    match addr {
        IpAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage (16 <= 128 bytes)
            // and both are plain old data.
            #[allow(unsafe_code)]
            unsafe {
                std::ptr::write(std::ptr::addr_of_mut!(ss).cast::<libc::sockaddr_in>(), sin)
            };
        }
        IpAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage (28 <= 128 bytes).
            #[allow(unsafe_code)]
            unsafe {
                std::ptr::write(
                    std::ptr::addr_of_mut!(ss).cast::<libc::sockaddr_in6>(),
                    sin6,
                )
            };
        }
    }
    ss
}

fn setsockopt<T>(fd: RawFd, level: i32, name: i32, value: &T) -> std::io::Result<()> {
    // SAFETY: `value` points to a live, initialised T of the given size for
    // the duration of the call; the kernel only reads it.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets (or with `None` removes) the TCP MD5 key used with `peer` on the
/// socket `fd` (a listener or a not-yet-connected socket).
pub fn set_md5(
    fd: &impl AsRawFd,
    peer: IpAddr,
    key: Option<&str>,
    v6_socket: bool,
) -> std::io::Result<()> {
    let key = key.unwrap_or("").as_bytes();
    if key.len() > MD5_MAX_KEY {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "TCP MD5 key longer than 80 bytes",
        ));
    }
    let mut sig = TcpMd5Sig {
        addr: storage_for(peer, v6_socket),
        flags: 0,
        prefixlen: 0,
        keylen: key.len() as u16,
        ifindex: 0,
        key: [0; MD5_MAX_KEY],
    };
    sig.key[..key.len()].copy_from_slice(key);
    setsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_MD5SIG, &sig)
}

/// GTSM (RFC 5082): send with TTL 255 and accept only packets that crossed
/// at most `hops` routers.
pub fn set_gtsm(fd: &impl AsRawFd, v6: bool, hops: u8) -> std::io::Result<()> {
    let min: libc::c_int = 255 - hops.min(254) as libc::c_int;
    let ttl: libc::c_int = 255;
    if v6 {
        setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_UNICAST_HOPS,
            &ttl,
        )?;
        setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_MINHOPCOUNT,
            &min,
        )
    } else {
        setsockopt(fd.as_raw_fd(), libc::IPPROTO_IP, libc::IP_TTL, &ttl)?;
        setsockopt(fd.as_raw_fd(), libc::IPPROTO_IP, libc::IP_MINTTL, &min)
    }
}

/// Connects to `addr` with the MD5 key and GTSM set before the SYN leaves.
pub async fn connect(
    addr: SocketAddr,
    md5: Option<&str>,
    gtsm_hops: Option<u8>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let v6 = addr.is_ipv6();
    let sock = if v6 {
        TcpSocket::new_v6()?
    } else {
        TcpSocket::new_v4()?
    };
    if md5.is_some() {
        set_md5(&sock, addr.ip(), md5, v6)?;
    }
    if let Some(h) = gtsm_hops {
        set_gtsm(&sock, v6, h)?;
    }
    sock.set_nodelay(true)?;
    tokio::time::timeout(timeout, sock.connect(addr))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// IPv4-mapped IPv6 addresses (from a dual-stack listener) as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
