//! BGP messages: framing, OPEN with capabilities, UPDATE, NOTIFICATION,
//! KEEPALIVE and ROUTE-REFRESH (RFC 4271 §4, RFC 5492, RFC 2918, RFC 4724,
//! RFC 6793), plus End-of-RIB markers (RFC 4724 §2).

use std::net::{IpAddr, Ipv4Addr};

use super::Ctx;
use super::attribute::{Attrs, MpReach, MpUnreach, decode_attrs, encode_attrs};
use super::consts::{
    AFI_IPV4, AFI_IPV6, AS_TRANS, BGP_VERSION, HEADER_LEN, MAX_MSG_LEN, SAFI_UNICAST, attr, cap,
    err, msg,
};
use super::error::DecodeError;
use super::prefix::{Prefix, decode_prefixes};

/// A BGP message.
// UPDATE is the hot, large variant; boxing it would cost an allocation per
// message for no gain.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// OPEN.
    Open(Open),
    /// UPDATE.
    Update(Update),
    /// NOTIFICATION.
    Notification(Notification),
    /// KEEPALIVE.
    Keepalive,
    /// ROUTE-REFRESH.
    RouteRefresh(RouteRefresh),
}

/// Capabilities we understand; others are kept as [`Capability::Unknown`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// Multiprotocol extensions (RFC 4760).
    Multiprotocol {
        /// AFI.
        afi: u16,
        /// SAFI.
        safi: u8,
    },
    /// Route refresh (RFC 2918).
    RouteRefresh,
    /// Graceful restart (RFC 4724).
    GracefulRestart(GracefulRestartCap),
    /// 4-octet AS numbers (RFC 6793), with our real AS.
    FourOctetAs(u32),
    /// Anything else (ADD-PATH, extended message, hostname, LLGR...): tolerated.
    Unknown {
        /// Capability code.
        code: u8,
        /// Value.
        data: Vec<u8>,
    },
}

/// The graceful restart capability.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GracefulRestartCap {
    /// R bit: the sender has restarted.
    pub restarting: bool,
    /// N bit (RFC 8538): graceful notification supported.
    pub notification: bool,
    /// Restart time in seconds (12 bits).
    pub restart_time: u16,
    /// Families with their F bit (forwarding state preserved).
    pub families: Vec<(u16, u8, bool)>,
}

/// OPEN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The sender's AS (from the 4-octet capability when present).
    pub asn: u32,
    /// Proposed hold time in seconds (0 or at least 3).
    pub hold_time: u16,
    /// BGP identifier.
    pub router_id: Ipv4Addr,
    /// Capabilities, in order.
    pub capabilities: Vec<Capability>,
}

impl Open {
    /// The plainest OPEN a speaker sends: IPv4 unicast (multiprotocol) and
    /// 4-octet AS, nothing else (test clients and benches).
    pub fn ipv4_unicast(asn: u32, hold_time: u16, router_id: Ipv4Addr) -> Self {
        Self {
            asn,
            hold_time,
            router_id,
            capabilities: vec![
                Capability::Multiprotocol {
                    afi: super::consts::AFI_IPV4,
                    safi: super::consts::SAFI_UNICAST,
                },
                Capability::FourOctetAs(asn),
            ],
        }
    }

    /// True when the peer advertised 4-octet AS support.
    pub fn four_octet_as(&self) -> bool {
        self.capabilities
            .iter()
            .any(|c| matches!(c, Capability::FourOctetAs(_)))
    }

    /// The multiprotocol families advertised; IPv4 unicast when none are
    /// (RFC 4760 §8 implies the classic family).
    pub fn families(&self) -> Vec<(u16, u8)> {
        let v: Vec<_> = self
            .capabilities
            .iter()
            .filter_map(|c| match c {
                Capability::Multiprotocol { afi, safi } => Some((*afi, *safi)),
                _ => None,
            })
            .collect();
        if v.is_empty() {
            vec![(AFI_IPV4, SAFI_UNICAST)]
        } else {
            v
        }
    }

    /// The graceful restart capability, if advertised.
    pub fn graceful_restart(&self) -> Option<&GracefulRestartCap> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::GracefulRestart(g) => Some(g),
            _ => None,
        })
    }

    /// True when route refresh was advertised.
    pub fn route_refresh(&self) -> bool {
        self.capabilities
            .iter()
            .any(|c| matches!(c, Capability::RouteRefresh))
    }
}

/// UPDATE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    /// Withdrawn IPv4 routes (classic field).
    pub withdrawn: Vec<Prefix>,
    /// Path attributes; `None` when the message carries none besides MP_*.
    pub attrs: Option<Attrs>,
    /// IPv4 NLRI (classic field).
    pub nlri: Vec<Prefix>,
    /// MP_REACH_NLRI.
    pub mp_reach: Option<MpReach>,
    /// MP_UNREACH_NLRI.
    pub mp_unreach: Option<MpUnreach>,
    /// Set on decode when RFC 7606 treat-as-withdraw turned this UPDATE's
    /// NLRI into withdrawals; the cause, for logs and counters.
    pub treat_as_withdraw: Option<String>,
    /// Attribute codes discarded on decode (RFC 7606 attribute-discard).
    pub discarded: Vec<u8>,
}

impl Update {
    /// The End-of-RIB marker for a family (RFC 4724 §2).
    pub fn end_of_rib(afi: u16, safi: u8) -> Self {
        if (afi, safi) == (AFI_IPV4, SAFI_UNICAST) {
            Self::default()
        } else {
            Self {
                mp_unreach: Some(MpUnreach {
                    afi,
                    safi,
                    withdrawn: Vec::new(),
                }),
                ..Self::default()
            }
        }
    }

    /// The family this UPDATE marks End-of-RIB for, if it is a marker.
    pub fn is_end_of_rib(&self) -> Option<(u16, u8)> {
        if self.attrs.is_some()
            || !self.withdrawn.is_empty()
            || !self.nlri.is_empty()
            || self.mp_reach.is_some()
        {
            return None;
        }
        match &self.mp_unreach {
            None => Some((AFI_IPV4, SAFI_UNICAST)),
            Some(u) if u.withdrawn.is_empty() => Some((u.afi, u.safi)),
            _ => None,
        }
    }
}

/// NOTIFICATION.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Error code.
    pub code: u8,
    /// Error subcode.
    pub subcode: u8,
    /// Data.
    pub data: Vec<u8>,
}

impl DecodeError {
    /// The NOTIFICATION to send for this error.
    pub fn notification(&self) -> Notification {
        Notification {
            code: self.code,
            subcode: self.subcode,
            data: self.data.clone(),
        }
    }
}

impl Notification {
    /// A notification with empty data.
    pub fn new(code: u8, subcode: u8) -> Self {
        Self {
            code,
            subcode,
            data: Vec::new(),
        }
    }

    /// Human-readable name of the code/subcode (RFC 4271 §6, RFC 4486).
    pub fn describe(&self) -> String {
        let c = match self.code {
            err::HEADER => "message header error",
            err::OPEN => "OPEN message error",
            err::UPDATE => "UPDATE message error",
            err::HOLD_TIMER_EXPIRED => "hold timer expired",
            err::FSM => "finite state machine error",
            err::CEASE => "cease",
            err::ROUTE_REFRESH => "ROUTE-REFRESH message error",
            _ => "unknown error",
        };
        let s = match (self.code, self.subcode) {
            (err::OPEN, err::OPEN_BAD_PEER_AS) => Some("bad peer AS"),
            (err::OPEN, err::OPEN_BAD_HOLD_TIME) => Some("unacceptable hold time"),
            (err::OPEN, err::OPEN_BAD_ID) => Some("bad BGP identifier"),
            (err::CEASE, err::CEASE_MAX_PREFIX) => Some("maximum number of prefixes reached"),
            (err::CEASE, err::CEASE_ADMIN_SHUTDOWN) => Some("administrative shutdown"),
            (err::CEASE, err::CEASE_PEER_DECONFIGURED) => Some("peer de-configured"),
            (err::CEASE, err::CEASE_ADMIN_RESET) => Some("administrative reset"),
            (err::CEASE, err::CEASE_CONNECTION_REJECTED) => Some("connection rejected"),
            (err::CEASE, err::CEASE_COLLISION) => Some("connection collision resolution"),
            (err::CEASE, err::CEASE_BFD_DOWN) => Some("BFD down"),
            _ => None,
        };
        match s {
            Some(s) => format!("{c}: {s} ({}/{})", self.code, self.subcode),
            None => format!("{c} ({}/{})", self.code, self.subcode),
        }
    }
}

/// ROUTE-REFRESH (RFC 2918).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRefresh {
    /// AFI.
    pub afi: u16,
    /// SAFI.
    pub safi: u8,
}

/// Checks a message header at the start of `buf`: `Ok(None)` when fewer
/// than 19 octets are buffered, `Ok(Some(len))` with the whole message's
/// length, or the header error to send.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16].iter().any(|&b| b != 0xff) {
        return Err(DecodeError::new(
            err::HEADER,
            err::HEADER_NOT_SYNC,
            "connection not synchronized (bad marker)",
        ));
    }
    let len = u16::from_be_bytes([buf[16], buf[17]]) as usize;
    let typ = buf[18];
    let min = match typ {
        msg::OPEN => 29,
        msg::UPDATE => 23,
        msg::NOTIFICATION => 21,
        msg::KEEPALIVE => 19,
        msg::ROUTE_REFRESH => 23,
        _ => {
            return Err(DecodeError::with_data(
                err::HEADER,
                err::HEADER_BAD_TYPE,
                vec![typ],
                format!("bad message type {typ}"),
            ));
        }
    };
    if len < min || len > MAX_MSG_LEN || (typ == msg::KEEPALIVE && len != HEADER_LEN) {
        return Err(DecodeError::bad_length(len));
    }
    Ok(Some(len))
}

impl Message {
    /// Decodes one whole message (header included), as [`frame_len`] framed it.
    pub fn decode(buf: &[u8], ctx: &Ctx) -> Result<Self, DecodeError> {
        match frame_len(buf)? {
            Some(len) if len == buf.len() => {}
            _ => return Err(DecodeError::bad_length(buf.len())),
        }
        let body = &buf[HEADER_LEN..];
        match buf[18] {
            msg::OPEN => decode_open(body).map(Message::Open),
            msg::UPDATE => decode_update(body, ctx).map(Message::Update),
            msg::NOTIFICATION => Ok(Message::Notification(Notification {
                code: body[0],
                subcode: body[1],
                data: body[2..].to_vec(),
            })),
            msg::KEEPALIVE => Ok(Message::Keepalive),
            msg::ROUTE_REFRESH => {
                if body.len() != 4 {
                    return Err(DecodeError::with_data(
                        err::ROUTE_REFRESH,
                        err::ROUTE_REFRESH_BAD_LENGTH,
                        buf.to_vec(),
                        "ROUTE-REFRESH of wrong length",
                    ));
                }
                Ok(Message::RouteRefresh(RouteRefresh {
                    afi: u16::from_be_bytes([body[0], body[1]]),
                    safi: body[3],
                }))
            }
            _ => unreachable!("frame_len rejects other types"),
        }
    }

    /// Encodes the message with its header. UPDATEs must fit in 4096
    /// octets: build them with [`UpdateBuilder`]
    /// when packing many prefixes.
    pub fn encode(&self, ctx: &Ctx) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&[0xff; 16]);
        out.extend_from_slice(&[0, 0]);
        match self {
            Message::Open(o) => {
                out.push(msg::OPEN);
                encode_open(o, &mut out);
            }
            Message::Update(u) => {
                out.push(msg::UPDATE);
                encode_update(u, ctx, &mut out);
            }
            Message::Notification(n) => {
                out.push(msg::NOTIFICATION);
                out.push(n.code);
                out.push(n.subcode);
                // Data that echoes a large offending attribute is cut so
                // the message fits in 4096 octets (RFC 4271 §4.1, §4.5).
                let room = MAX_MSG_LEN.saturating_sub(out.len());
                out.extend_from_slice(&n.data[..n.data.len().min(room)]);
            }
            Message::Keepalive => out.push(msg::KEEPALIVE),
            Message::RouteRefresh(r) => {
                out.push(msg::ROUTE_REFRESH);
                out.extend_from_slice(&r.afi.to_be_bytes());
                out.push(0);
                out.push(r.safi);
            }
        }
        let len = out.len() as u16;
        out[16..18].copy_from_slice(&len.to_be_bytes());
        out
    }
}

fn open_err(sub: u8, reason: impl Into<String>) -> DecodeError {
    DecodeError::new(err::OPEN, sub, reason)
}

fn decode_open(b: &[u8]) -> Result<Open, DecodeError> {
    // frame_len guarantees at least 10 octets.
    if b[0] != BGP_VERSION {
        return Err(DecodeError::with_data(
            err::OPEN,
            err::OPEN_BAD_VERSION,
            (BGP_VERSION as u16).to_be_bytes().to_vec(),
            format!("unsupported BGP version {}", b[0]),
        ));
    }
    let my_as = u16::from_be_bytes([b[1], b[2]]);
    let hold_time = u16::from_be_bytes([b[3], b[4]]);
    if hold_time == 1 || hold_time == 2 {
        return Err(open_err(
            err::OPEN_BAD_HOLD_TIME,
            format!("unacceptable hold time {hold_time}"),
        ));
    }
    let router_id = Ipv4Addr::new(b[5], b[6], b[7], b[8]);
    let opt_len = b[9] as usize;
    if b.len() != 10 + opt_len {
        return Err(DecodeError::bad_length(HEADER_LEN + b.len()));
    }
    let mut params = &b[10..];
    let mut capabilities = Vec::new();
    while !params.is_empty() {
        let (ptype, value) = next_tlv(&mut params, "optional parameter")?;
        if ptype != 2 {
            return Err(open_err(
                err::OPEN_BAD_OPT_PARAM,
                format!("unsupported optional parameter {ptype}"),
            ));
        }
        decode_capabilities(value, &mut capabilities)?;
    }
    let asn = capabilities
        .iter()
        .find_map(|c| match c {
            Capability::FourOctetAs(a) => Some(*a),
            _ => None,
        })
        .unwrap_or(my_as as u32);
    if router_id.is_unspecified() {
        return Err(open_err(err::OPEN_BAD_ID, "BGP identifier 0.0.0.0"));
    }
    Ok(Open {
        asn,
        hold_time,
        router_id,
        capabilities,
    })
}

/// The first type-length-value of `rest` (a one-octet type and length, as
/// OPEN's optional parameters and capabilities are) as its type and value;
/// `rest` goes on past it.
fn next_tlv<'a>(rest: &mut &'a [u8], what: &str) -> Result<(u8, &'a [u8]), DecodeError> {
    if rest.len() < 2 || rest.len() < 2 + rest[1] as usize {
        return Err(open_err(0, format!("malformed {what}")));
    }
    let (kind, len) = (rest[0], rest[1] as usize);
    let value = &rest[2..2 + len];
    *rest = &rest[2 + len..];
    Ok((kind, value))
}

fn decode_capabilities(mut v: &[u8], out: &mut Vec<Capability>) -> Result<(), DecodeError> {
    while !v.is_empty() {
        let (code, d) = next_tlv(&mut v, "capability")?;
        let len = d.len();
        let c = match (code, len) {
            (cap::MULTIPROTOCOL, 4) => Capability::Multiprotocol {
                afi: u16::from_be_bytes([d[0], d[1]]),
                safi: d[3],
            },
            (cap::ROUTE_REFRESH, 0) => Capability::RouteRefresh,
            (cap::FOUR_OCTET_AS, 4) => {
                Capability::FourOctetAs(u32::from_be_bytes([d[0], d[1], d[2], d[3]]))
            }
            (cap::GRACEFUL_RESTART, n) if n >= 2 && (n - 2) % 4 == 0 => {
                let hdr = u16::from_be_bytes([d[0], d[1]]);
                Capability::GracefulRestart(GracefulRestartCap {
                    restarting: hdr & 0x8000 != 0,
                    notification: hdr & 0x4000 != 0,
                    restart_time: hdr & 0x0fff,
                    families: d[2..]
                        .chunks_exact(4)
                        .map(|f| (u16::from_be_bytes([f[0], f[1]]), f[2], f[3] & 0x80 != 0))
                        .collect(),
                })
            }
            (
                cap::MULTIPROTOCOL
                | cap::ROUTE_REFRESH
                | cap::FOUR_OCTET_AS
                | cap::GRACEFUL_RESTART,
                _,
            ) => {
                return Err(open_err(
                    0,
                    format!("capability {code} has bad length {len}"),
                ));
            }
            _ => Capability::Unknown {
                code,
                data: d.to_vec(),
            },
        };
        out.push(c);
    }
    Ok(())
}

fn encode_open(o: &Open, out: &mut Vec<u8>) {
    out.push(BGP_VERSION);
    let my_as = if o.asn > 0xffff {
        AS_TRANS
    } else {
        o.asn as u16
    };
    out.extend_from_slice(&my_as.to_be_bytes());
    out.extend_from_slice(&o.hold_time.to_be_bytes());
    out.extend_from_slice(&o.router_id.octets());
    let mut caps = Vec::new();
    for c in &o.capabilities {
        let (code, data): (u8, Vec<u8>) = match c {
            Capability::Multiprotocol { afi, safi } => {
                let a = afi.to_be_bytes();
                (cap::MULTIPROTOCOL, vec![a[0], a[1], 0, *safi])
            }
            Capability::RouteRefresh => (cap::ROUTE_REFRESH, vec![]),
            Capability::FourOctetAs(a) => (cap::FOUR_OCTET_AS, a.to_be_bytes().to_vec()),
            Capability::GracefulRestart(g) => {
                let mut hdr = g.restart_time & 0x0fff;
                if g.restarting {
                    hdr |= 0x8000;
                }
                if g.notification {
                    hdr |= 0x4000;
                }
                let mut d = hdr.to_be_bytes().to_vec();
                for (afi, safi, fwd) in &g.families {
                    d.extend_from_slice(&afi.to_be_bytes());
                    d.push(*safi);
                    d.push(if *fwd { 0x80 } else { 0 });
                }
                (cap::GRACEFUL_RESTART, d)
            }
            Capability::Unknown { code, data } => (*code, data.clone()),
        };
        // One capability per optional parameter, as most speakers do.
        caps.push(2);
        caps.push(2 + data.len() as u8);
        caps.push(code);
        caps.push(data.len() as u8);
        caps.extend_from_slice(&data);
    }
    out.push(caps.len() as u8);
    out.extend_from_slice(&caps);
}

fn decode_update(b: &[u8], ctx: &Ctx) -> Result<Update, DecodeError> {
    let bad = || DecodeError::malformed_attrs("withdrawn/attribute lengths exceed the message");
    let wlen = u16::from_be_bytes([b[0], b[1]]) as usize;
    if b.len() < 2 + wlen + 2 {
        return Err(bad());
    }
    let withdrawn_raw = &b[2..2 + wlen];
    let alen = u16::from_be_bytes([b[2 + wlen], b[3 + wlen]]) as usize;
    let rest = &b[4 + wlen..];
    if rest.len() < alen {
        return Err(bad());
    }
    let invalid_net = || {
        DecodeError::new(
            err::UPDATE,
            err::UPDATE_INVALID_NETWORK,
            "malformed prefix in NLRI or withdrawn routes",
        )
    };
    let withdrawn = decode_prefixes(withdrawn_raw, false).ok_or_else(invalid_net)?;
    let nlri = decode_prefixes(&rest[alen..], false).ok_or_else(invalid_net)?;
    let d = decode_attrs(&rest[..alen], ctx)?;
    let missing = d.missing_well_known(!nlri.is_empty(), ctx.ibgp);
    let mut u = Update {
        withdrawn,
        attrs: None,
        nlri,
        mp_reach: d.mp_reach,
        mp_unreach: d.mp_unreach,
        treat_as_withdraw: d.withdraw,
        discarded: d.discarded,
    };
    let reach = !u.nlri.is_empty() || u.mp_reach.as_ref().is_some_and(|m| !m.nlri.is_empty());
    if reach
        && u.treat_as_withdraw.is_none()
        && let Some(m) = missing
    {
        u.treat_as_withdraw = Some(format!("missing well-known attribute {m}"));
    }
    if u.treat_as_withdraw.is_some() {
        u.withdrawn.append(&mut u.nlri);
        if let Some(m) = u.mp_reach.take() {
            let un = u.mp_unreach.get_or_insert_with(|| MpUnreach {
                afi: m.afi,
                safi: m.safi,
                withdrawn: Vec::new(),
            });
            if (un.afi, un.safi) == (m.afi, m.safi) {
                un.withdrawn.extend(m.nlri);
            }
        }
    } else if d.any {
        u.attrs = Some(d.attrs);
    }
    Ok(u)
}

fn encode_mp_reach(m: &MpReach) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&m.afi.to_be_bytes());
    v.push(m.safi);
    let nh: Vec<u8> = m
        .next_hop
        .iter()
        .flat_map(|a| match a {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        })
        .collect();
    v.push(nh.len() as u8);
    v.extend_from_slice(&nh);
    v.push(0);
    for p in &m.nlri {
        p.encode(&mut v);
    }
    v
}

fn encode_mp_unreach(m: &MpUnreach) -> Vec<u8> {
    let mut v = Vec::with_capacity(32);
    v.extend_from_slice(&m.afi.to_be_bytes());
    v.push(m.safi);
    for p in &m.withdrawn {
        p.encode(&mut v);
    }
    v
}

fn encode_update(u: &Update, ctx: &Ctx, out: &mut Vec<u8>) {
    let wpos = out.len();
    out.extend_from_slice(&[0, 0]);
    for p in &u.withdrawn {
        p.encode(out);
    }
    let wlen = (out.len() - wpos - 2) as u16;
    out[wpos..wpos + 2].copy_from_slice(&wlen.to_be_bytes());
    let apos = out.len();
    out.extend_from_slice(&[0, 0]);
    let mut mp = Vec::new();
    if let Some(m) = &u.mp_reach {
        mp.push((attr::MP_REACH_NLRI, encode_mp_reach(m)));
    }
    if let Some(m) = &u.mp_unreach {
        mp.push((attr::MP_UNREACH_NLRI, encode_mp_unreach(m)));
    }
    match &u.attrs {
        Some(a) => encode_attrs(a, ctx, !u.nlri.is_empty(), &mp, out),
        None => {
            for (code, value) in &mp {
                super::attribute::put_mp(out, *code, value);
            }
        }
    }
    let alen = (out.len() - apos - 2) as u16;
    out[apos..apos + 2].copy_from_slice(&alen.to_be_bytes());
    for p in &u.nlri {
        p.encode(out);
    }
}

/// Packs many prefixes sharing one set of attributes into as few UPDATEs as
/// fit in 4096 octets each.
#[derive(Debug)]
pub struct UpdateBuilder;

impl UpdateBuilder {
    /// UPDATEs announcing `prefixes` (one family) with `attrs`. IPv4 goes in
    /// the classic NLRI field; IPv6 in MP_REACH_NLRI with `attrs.next_hop`
    /// (and `next_hop_ll` when given). Every message fits in 4096 octets;
    /// when the attributes leave no room for even one prefix the answer is
    /// `Err(size of one such UPDATE)`: the routes cannot be sent, and must
    /// be withdrawn instead (RFC 7606 section 7).
    pub fn announce(
        attrs: &Attrs,
        prefixes: &[Prefix],
        next_hop_ll: Option<std::net::Ipv6Addr>,
        ctx: &Ctx,
    ) -> Result<Vec<Vec<u8>>, usize> {
        Self::packed(prefixes, ctx, |v6, chunk| {
            let mut u = Update {
                attrs: Some(attrs.clone()),
                ..Update::default()
            };
            if v6 {
                let mut next_hop: Vec<IpAddr> = attrs.next_hop.into_iter().collect();
                next_hop.extend(next_hop_ll.map(IpAddr::V6));
                u.mp_reach = Some(MpReach {
                    afi: AFI_IPV6,
                    safi: SAFI_UNICAST,
                    next_hop,
                    nlri: chunk.to_vec(),
                });
            } else {
                u.nlri = chunk.to_vec();
            }
            u
        })
    }

    /// UPDATEs withdrawing `prefixes` (one family).
    pub fn withdraw(prefixes: &[Prefix], ctx: &Ctx) -> Vec<Vec<u8>> {
        let packed = Self::packed(prefixes, ctx, |v6, chunk| {
            if v6 {
                Update {
                    mp_unreach: Some(MpUnreach {
                        afi: AFI_IPV6,
                        safi: SAFI_UNICAST,
                        withdrawn: chunk.to_vec(),
                    }),
                    ..Update::default()
                }
            } else {
                Update {
                    withdrawn: chunk.to_vec(),
                    ..Update::default()
                }
            }
        });
        // Without attributes the widest prefix always fits.
        packed.unwrap_or_default()
    }

    /// `prefixes` (one family) in as few UPDATEs as fit in 4096 octets,
    /// each the one `mk` builds of its chunk (told whether the family is
    /// IPv6); `Err(size)` when not even one prefix fits beside what `mk`
    /// adds.
    fn packed(
        prefixes: &[Prefix],
        ctx: &Ctx,
        mk: impl Fn(bool, &[Prefix]) -> Update,
    ) -> Result<Vec<Vec<u8>>, usize> {
        let Some(first) = prefixes.first() else {
            return Ok(Vec::new());
        };
        let v6 = !first.is_v4();
        let enc = |chunk: &[Prefix]| Message::Update(mk(v6, chunk)).encode(ctx);
        let base = enc(&[]).len() + 8; // MP headroom
        let widest = prefixes.iter().map(Prefix::encoded_len).max().unwrap_or(0);
        if base + widest > MAX_MSG_LEN {
            return Err(base + widest);
        }
        let mut out = Vec::new();
        let mut start = 0;
        let mut size = base;
        for (i, p) in prefixes.iter().enumerate() {
            let n = p.encoded_len();
            if size + n > MAX_MSG_LEN && i > start {
                out.push(enc(&prefixes[start..i]));
                start = i;
                size = base;
            }
            size += n;
        }
        out.push(enc(&prefixes[start..]));
        Ok(out)
    }
}
