//! CNI error codes: the one table the plugin and the agent answer with
//! (CNI spec 1.1, section "Error"; 100 and up are Margay's own).

/// Incompatible CNI version.
pub const INCOMPATIBLE_VERSION: u32 = 1;
/// Unsupported field in the network configuration.
pub const UNSUPPORTED_FIELD: u32 = 2;
/// Container unknown or does not exist (its network namespace is gone).
pub const UNKNOWN_CONTAINER: u32 = 3;
/// Invalid necessary environment variables (CNI_COMMAND, CNI_CONTAINERID, ...).
pub const INVALID_ENV: u32 = 4;
/// I/O failure.
pub const IO: u32 = 5;
/// Failed to decode content.
pub const DECODE: u32 = 6;
/// Invalid network configuration.
pub const INVALID_CONFIG: u32 = 7;
/// Try again later (a transient condition).
pub const TRY_AGAIN: u32 = 11;
/// The plugin is not available: it cannot serve ADD requests (STATUS).
pub const NOT_AVAILABLE: u32 = 50;
/// Not available, and existing containers may be affected (STATUS).
pub const NOT_AVAILABLE_EXISTING_AFFECTED: u32 = 51;
/// Margay: no address could be allocated.
pub const IPAM: u32 = 100;
/// Margay: the dataplane (kernel) refused or failed.
pub const DATAPLANE: u32 = 101;

/// The short name of a code, for logs and messages.
pub fn name(code: u32) -> &'static str {
    match code {
        INCOMPATIBLE_VERSION => "incompatible CNI version",
        UNSUPPORTED_FIELD => "unsupported field",
        UNKNOWN_CONTAINER => "unknown container",
        INVALID_ENV => "invalid environment",
        IO => "I/O failure",
        DECODE => "decode failure",
        INVALID_CONFIG => "invalid configuration",
        TRY_AGAIN => "try again later",
        NOT_AVAILABLE => "plugin not available",
        NOT_AVAILABLE_EXISTING_AFFECTED => "plugin not available, existing containers affected",
        IPAM => "address allocation failed",
        DATAPLANE => "dataplane failed",
        _ => "error",
    }
}

/// What one CNI call acts on (spec 1.1): the network's name, the
/// container's ID and the interface's name. Only an attachment whose
/// identity matches is ever touched by DEL, CHECK or GC.
///
/// Its [`Attachment::handle`] is the IPAM handle and what the host
/// interface's alias records: the three parts joined with `/`, a character
/// none of them may hold (checked by [`Attachment::new`]), so two
/// attachments never share a handle.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Attachment {
    /// The network configuration's `name`.
    pub network: String,
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_IFNAME.
    pub ifname: String,
}

/// The longest handle: it must fit the host interface's alias (255 bytes)
/// with the tag and one address of each family.
pub const MAX_HANDLE: usize = 191;

/// Why an attachment's identity is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadAttachment {
    /// The network name is missing or not as the spec says.
    #[error(
        "network name {0:?} is not valid: it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'"
    )]
    Network(String),
    /// CNI_CONTAINERID is missing or not as the spec says.
    #[error(
        "CNI_CONTAINERID {0:?} is not valid: it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'"
    )]
    ContainerId(String),
    /// CNI_IFNAME is not a Linux interface name.
    #[error(
        "CNI_IFNAME {0:?} is not a valid interface name: 1-15 bytes, not '.' or '..', no '/', ':' or white space"
    )]
    Ifname(String),
    /// The parts together are too long to record.
    #[error(
        "network name and CNI_CONTAINERID are too long together ({0} bytes with the interface name; at most {MAX_HANDLE})"
    )]
    TooLong(usize),
}

impl BadAttachment {
    /// The CNI code: 7 for the network configuration, 4 for the
    /// environment.
    pub fn code(&self) -> u32 {
        match self {
            BadAttachment::Network(_) => INVALID_CONFIG,
            _ => INVALID_ENV,
        }
    }
}

/// A network name or container ID as the spec allows them: an ASCII letter
/// or digit, then letters, digits, `_`, `.` or `-`.
pub fn valid_id(s: &str) -> bool {
    let mut b = s.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// A Linux interface name (the kernel's `dev_valid_name`): 1-15 bytes, not
/// `.` or `..`, no `/`, `:`, white space or NUL.
pub fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s
            .bytes()
            .any(|c| c == b'/' || c == b':' || c == 0 || c.is_ascii_whitespace())
}

impl Attachment {
    /// An attachment, its parts checked.
    pub fn new(network: &str, container_id: &str, ifname: &str) -> Result<Self, BadAttachment> {
        if !valid_id(network) {
            return Err(BadAttachment::Network(network.to_string()));
        }
        if !valid_id(container_id) {
            return Err(BadAttachment::ContainerId(container_id.to_string()));
        }
        if !valid_ifname(ifname) {
            return Err(BadAttachment::Ifname(ifname.to_string()));
        }
        let len = network.len() + container_id.len() + ifname.len() + 2;
        if len > MAX_HANDLE {
            return Err(BadAttachment::TooLong(len));
        }
        Ok(Self {
            network: network.to_string(),
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
        })
    }

    /// The IPAM handle and alias record: `network/container_id/ifname`.
    pub fn handle(&self) -> String {
        format!("{}/{}/{}", self.network, self.container_id, self.ifname)
    }

    /// The attachment a handle names; `None` for a handle that is not an
    /// attachment's (spares, tunnel addresses, handles of older versions).
    pub fn from_handle(h: &str) -> Option<Self> {
        let mut it = h.split('/');
        let (n, c, i) = (it.next()?, it.next()?, it.next()?);
        if it.next().is_some() {
            return None;
        }
        Self::new(n, c, i).ok()
    }

    /// The handle versions before 2026-12 gave it (`container_id.ifname`,
    /// ambiguous, without the network): pods made then are still found and
    /// released by it.
    pub fn legacy_handle(&self) -> String {
        format!("{}.{}", self.container_id, self.ifname)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_unambiguous_and_parse_back() {
        let a = Attachment::new("k8s-pod-network", "a.b", "c").unwrap();
        let b = Attachment::new("k8s-pod-network", "a", "b.c").unwrap();
        assert_ne!(a.handle(), b.handle());
        // The old form collided.
        assert_eq!(a.legacy_handle(), b.legacy_handle());
        assert_eq!(Attachment::from_handle(&a.handle()), Some(a.clone()));
        assert_eq!(Attachment::from_handle(&b.handle()), Some(b));
        assert_eq!(Attachment::from_handle("spare.n1.3"), None);
        assert_eq!(Attachment::from_handle("tunnel.vxlan.n1"), None);
        assert_eq!(Attachment::from_handle("a/b/c/d"), None);
        assert_eq!(Attachment::from_handle("a//c"), None);
    }

    #[test]
    fn identities_are_checked_as_the_spec_says() {
        for (n, c, i, code) in [
            ("", "c1", "eth0", INVALID_CONFIG),
            ("-net", "c1", "eth0", INVALID_CONFIG),
            ("net/x", "c1", "eth0", INVALID_CONFIG),
            ("net", "", "eth0", INVALID_ENV),
            ("net", "_c", "eth0", INVALID_ENV),
            ("net", "c/1", "eth0", INVALID_ENV),
            ("net", "c 1", "eth0", INVALID_ENV),
            ("net", "c1", "", INVALID_ENV),
            ("net", "c1", ".", INVALID_ENV),
            ("net", "c1", "..", INVALID_ENV),
            ("net", "c1", "eth:0", INVALID_ENV),
            ("net", "c1", "eth 0", INVALID_ENV),
            ("net", "c1", "a-very-long-name", INVALID_ENV),
            ("net", &"c".repeat(200), "eth0", INVALID_ENV),
        ] {
            let e = Attachment::new(n, c, i).unwrap_err();
            assert_eq!(e.code(), code, "{n:?} {c:?} {i:?}: {e}");
            assert!(!e.to_string().is_empty());
        }
        let ok = Attachment::new("k8s-pod-network", &"f".repeat(64), "net1").unwrap();
        assert!(ok.handle().len() <= MAX_HANDLE);
        assert!(Attachment::new("n", "A_b.c-1", "eth0.100").is_ok());
    }
}
