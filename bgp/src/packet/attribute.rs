//! Path attributes (RFC 4271 §4.3, §5; RFC 4456; RFC 6793; RFC 4760) and the
//! revised error handling of RFC 7606.
//!
//! `decode_attrs` returns the attributes plus what RFC 7606 decided: an
//! attribute may be discarded silently ("attribute-discard"), the whole
//! UPDATE may turn into a withdrawal of its NLRI ("treat-as-withdraw"), or
//! the session must be reset (an `Err`, naming the NOTIFICATION).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::Ctx;
use super::consts::{AFI_IPV4, AFI_IPV6, AS_TRANS, SAFI_UNICAST, attr, err, flag, seg};
use super::error::DecodeError;
use super::prefix::{Prefix, decode_prefixes};

/// MP_REACH_NLRI for IPv4 or IPv6 unicast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpReach {
    /// AFI.
    pub afi: u16,
    /// SAFI.
    pub safi: u8,
    /// Next hop(s): one address, or IPv6 global + link-local.
    pub next_hop: Vec<IpAddr>,
    /// Reachable prefixes.
    pub nlri: Vec<Prefix>,
}

/// MP_UNREACH_NLRI for IPv4 or IPv6 unicast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpUnreach {
    /// AFI.
    pub afi: u16,
    /// SAFI.
    pub safi: u8,
    /// Withdrawn prefixes.
    pub withdrawn: Vec<Prefix>,
}

/// ORIGIN values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Origin {
    /// Learned from an IGP (0): the most preferred.
    #[default]
    Igp,
    /// Learned from EGP (1).
    Egp,
    /// Learned some other way (2).
    Incomplete,
}

impl Origin {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Igp),
            1 => Some(Self::Egp),
            2 => Some(Self::Incomplete),
            _ => None,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::Igp => 0,
            Self::Egp => 1,
            Self::Incomplete => 2,
        }
    }
}

/// AS_PATH segment kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SegmentKind {
    /// Unordered set (counts as one hop).
    Set,
    /// Ordered sequence.
    Sequence,
    /// Confederation sequence (does not count).
    ConfedSequence,
    /// Confederation set (does not count).
    ConfedSet,
}

impl SegmentKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            seg::AS_SET => Some(Self::Set),
            seg::AS_SEQUENCE => Some(Self::Sequence),
            seg::AS_CONFED_SEQUENCE => Some(Self::ConfedSequence),
            seg::AS_CONFED_SET => Some(Self::ConfedSet),
            _ => None,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::Set => seg::AS_SET,
            Self::Sequence => seg::AS_SEQUENCE,
            Self::ConfedSequence => seg::AS_CONFED_SEQUENCE,
            Self::ConfedSet => seg::AS_CONFED_SET,
        }
    }
}

/// One AS_PATH segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Segment {
    /// Its kind.
    pub kind: SegmentKind,
    /// Its AS numbers (always held as 4-octet values).
    pub asns: Vec<u32>,
}

/// An AS_PATH.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct AsPath {
    /// Segments, leftmost (most recent) first.
    pub segments: Vec<Segment>,
}

impl AsPath {
    /// A path of one sequence.
    pub fn sequence(asns: Vec<u32>) -> Self {
        if asns.is_empty() {
            return Self::default();
        }
        Self {
            segments: vec![Segment {
                kind: SegmentKind::Sequence,
                asns,
            }],
        }
    }

    /// Path length for the decision process (RFC 4271 §9.1.2.2 a): a set
    /// counts as one, confederation segments not at all.
    pub fn hop_count(&self) -> usize {
        self.segments
            .iter()
            .map(|s| match s.kind {
                SegmentKind::Sequence => s.asns.len(),
                SegmentKind::Set => 1,
                _ => 0,
            })
            .sum()
    }

    /// The leftmost AS of the path (the neighbor AS), if it starts with a sequence.
    pub fn first_as(&self) -> Option<u32> {
        match self.segments.first() {
            Some(s) if s.kind == SegmentKind::Sequence => s.asns.first().copied(),
            _ => None,
        }
    }

    /// True when `asn` appears anywhere (loop detection).
    pub fn contains(&self, asn: u32) -> bool {
        self.segments.iter().any(|s| s.asns.contains(&asn))
    }

    /// A copy with `asn` prepended (eBGP export, RFC 4271 §5.1.2).
    pub fn prepend(&self, asn: u32) -> Self {
        let mut p = self.clone();
        match p.segments.first_mut() {
            Some(s) if s.kind == SegmentKind::Sequence && s.asns.len() < 255 => {
                s.asns.insert(0, asn)
            }
            _ => p.segments.insert(
                0,
                Segment {
                    kind: SegmentKind::Sequence,
                    asns: vec![asn],
                },
            ),
        }
        p
    }

    fn needs_as4(&self) -> bool {
        self.segments
            .iter()
            .any(|s| s.asns.iter().any(|&a| a > 0xffff))
    }

    fn encode(&self, out: &mut Vec<u8>, four: bool) {
        for s in &self.segments {
            for chunk in s.asns.chunks(255) {
                out.push(s.kind.to_u8());
                out.push(chunk.len() as u8);
                for &a in chunk {
                    if four {
                        out.extend_from_slice(&a.to_be_bytes());
                    } else {
                        let a2 = if a > 0xffff { AS_TRANS } else { a as u16 };
                        out.extend_from_slice(&a2.to_be_bytes());
                    }
                }
            }
        }
    }

    fn decode(mut buf: &[u8], four: bool) -> Option<Self> {
        let size = if four { 4 } else { 2 };
        let mut segments = Vec::new();
        while !buf.is_empty() {
            if buf.len() < 2 {
                return None;
            }
            let kind = SegmentKind::from_u8(buf[0])?;
            let n = buf[1] as usize;
            if n == 0 || buf.len() < 2 + n * size {
                return None;
            }
            let asns = buf[2..2 + n * size]
                .chunks_exact(size)
                .map(|c| {
                    if four {
                        u32::from_be_bytes([c[0], c[1], c[2], c[3]])
                    } else {
                        u16::from_be_bytes([c[0], c[1]]) as u32
                    }
                })
                .collect();
            segments.push(Segment { kind, asns });
            buf = &buf[2 + n * size..];
        }
        Some(Self { segments })
    }

    /// RFC 6793 §4.2.3: rebuild the true path from AS_PATH and AS4_PATH
    /// received from a 2-octet speaker.
    fn merge_as4(self, as4: AsPath) -> AsPath {
        let n = self.hop_count();
        let n4 = as4.hop_count();
        if n4 > n {
            return self;
        }
        let mut keep = n - n4;
        let mut segments = Vec::new();
        for s in self.segments {
            if keep == 0 {
                break;
            }
            match s.kind {
                SegmentKind::Sequence => {
                    let take = keep.min(s.asns.len());
                    keep -= take;
                    segments.push(Segment {
                        kind: s.kind,
                        asns: s.asns[..take].to_vec(),
                    });
                }
                SegmentKind::Set => {
                    keep -= 1;
                    segments.push(s);
                }
                _ => segments.push(s),
            }
        }
        segments.extend(as4.segments);
        AsPath { segments }
    }
}

/// An attribute Margay does not interpret, kept to pass on when transitive.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawAttr {
    /// Flags as received (partial is set on re-advertisement).
    pub flags: u8,
    /// Type code.
    pub code: u8,
    /// Value.
    pub data: Vec<u8>,
}

/// The path attributes of a route. MP_REACH/MP_UNREACH are not here: they
/// carry NLRI and travel in [`super::Update`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Attrs {
    /// ORIGIN.
    pub origin: Origin,
    /// AS_PATH (merged with AS4_PATH where that applies).
    pub as_path: AsPath,
    /// Next hop: NEXT_HOP for IPv4 NLRI, the MP_REACH next hop for others.
    pub next_hop: Option<IpAddr>,
    /// MULTI_EXIT_DISC.
    pub med: Option<u32>,
    /// LOCAL_PREF.
    pub local_pref: Option<u32>,
    /// ATOMIC_AGGREGATE present.
    pub atomic_aggregate: bool,
    /// AGGREGATOR (AS, router id).
    pub aggregator: Option<(u32, Ipv4Addr)>,
    /// COMMUNITIES.
    pub communities: Vec<u32>,
    /// ORIGINATOR_ID (RFC 4456).
    pub originator_id: Option<Ipv4Addr>,
    /// CLUSTER_LIST (RFC 4456).
    pub cluster_list: Vec<Ipv4Addr>,
    /// Unrecognised optional transitive attributes.
    pub unknown: Vec<RawAttr>,
}

/// What decoding the attribute section produced.
#[derive(Debug, Default)]
pub(crate) struct Decoded {
    pub attrs: Attrs,
    /// Any attribute other than MP_REACH/MP_UNREACH was present.
    pub any: bool,
    /// The type codes present (the first of each is the one kept).
    pub seen: Codes,
    pub mp_reach: Option<MpReach>,
    pub mp_unreach: Option<MpUnreach>,
    /// Set when RFC 7606 says treat-as-withdraw; the cause.
    pub withdraw: Option<String>,
    /// Attributes discarded under RFC 7606 attribute-discard.
    pub discarded: Vec<u8>,
}

impl Decoded {
    /// RFC 7606 §3 d: the first well-known mandatory attribute missing
    /// from an UPDATE that reaches prefixes (NEXT_HOP only where it has
    /// classic IPv4 NLRI, LOCAL_PREF only on iBGP). Meaningful only while
    /// nothing is treat-as-withdraw already: an attribute present but
    /// malformed is that, not missing.
    pub fn missing_well_known(&self, v4_nlri: bool, ibgp: bool) -> Option<&'static str> {
        [
            (attr::ORIGIN, "ORIGIN", true),
            (attr::AS_PATH, "AS_PATH", true),
            (attr::NEXT_HOP, "NEXT_HOP", v4_nlri),
            (attr::LOCAL_PREF, "LOCAL_PREF", ibgp),
        ]
        .into_iter()
        .find(|&(code, _, needed)| needed && !self.seen.contains(code))
        .map(|(_, name, _)| name)
    }
}

/// A set of attribute type codes.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Codes([u64; 4]);

impl Codes {
    /// Adds `code`; false when it was there already.
    fn insert(&mut self, code: u8) -> bool {
        let (word, bit) = (code as usize / 64, 1u64 << (code % 64));
        let new = self.0[word] & bit == 0;
        self.0[word] |= bit;
        new
    }

    fn contains(&self, code: u8) -> bool {
        self.0[code as usize / 64] & (1u64 << (code % 64)) != 0
    }
}

fn expected_flags(code: u8) -> Option<u8> {
    use attr::*;
    Some(match code {
        ORIGIN | AS_PATH | NEXT_HOP | LOCAL_PREF | ATOMIC_AGGREGATE => flag::TRANSITIVE,
        MED | ORIGINATOR_ID | CLUSTER_LIST | MP_REACH_NLRI | MP_UNREACH_NLRI => flag::OPTIONAL,
        AGGREGATOR | COMMUNITIES | AS4_PATH | AS4_AGGREGATOR => flag::OPTIONAL | flag::TRANSITIVE,
        _ => return None,
    })
}

fn u32_at(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn v4_at(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

fn family(afi: u16, safi: u8) -> Option<bool> {
    match (afi, safi) {
        (AFI_IPV4, SAFI_UNICAST) => Some(false),
        (AFI_IPV6, SAFI_UNICAST) => Some(true),
        _ => None,
    }
}

fn optional_error(reason: String) -> DecodeError {
    DecodeError::new(err::UPDATE, err::UPDATE_OPTIONAL_ATTR, reason)
}

/// The AFI and SAFI that start the value `v` of MP attribute `what`,
/// which must be at least `min` octets long.
fn mp_header(what: &str, v: &[u8], min: usize) -> Result<(u16, u8), DecodeError> {
    if v.len() < min {
        return Err(optional_error(format!(
            "{what} too short ({} octets)",
            v.len()
        )));
    }
    Ok((u16::from_be_bytes([v[0], v[1]]), v[2]))
}

fn decode_mp_reach(v: &[u8]) -> Result<Option<MpReach>, DecodeError> {
    let (afi, safi) = mp_header("MP_REACH_NLRI", v, 5)?;
    let nh_len = v[3] as usize;
    if v.len() < 4 + nh_len + 1 {
        return Err(optional_error(
            "MP_REACH_NLRI next hop overruns the attribute".into(),
        ));
    }
    let Some(v6) = family(afi, safi) else {
        return Ok(None); // a family we did not negotiate: ignored (RFC 4760 §7)
    };
    let nh = &v[4..4 + nh_len];
    let next_hop: Vec<IpAddr> = match (v6, nh_len) {
        (false, 4) => vec![IpAddr::V4(v4_at(nh))],
        (true, 16) | (true, 32) => nh
            .chunks_exact(16)
            .map(|c| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(c).expect("16 octets"))))
            .collect(),
        _ => {
            return Err(optional_error(format!(
                "MP_REACH_NLRI next hop length {nh_len} invalid for AFI {afi}"
            )));
        }
    };
    // One reserved octet (formerly SNPAs) follows the next hop.
    let nlri = decode_prefixes(&v[4 + nh_len + 1..], v6)
        .ok_or_else(|| optional_error("MP_REACH_NLRI prefixes malformed".into()))?;
    Ok(Some(MpReach {
        afi,
        safi,
        next_hop,
        nlri,
    }))
}

fn decode_mp_unreach(v: &[u8]) -> Result<Option<MpUnreach>, DecodeError> {
    let (afi, safi) = mp_header("MP_UNREACH_NLRI", v, 3)?;
    let Some(v6) = family(afi, safi) else {
        return Ok(None);
    };
    let withdrawn = decode_prefixes(&v[3..], v6)
        .ok_or_else(|| optional_error("MP_UNREACH_NLRI prefixes malformed".into()))?;
    Ok(Some(MpUnreach {
        afi,
        safi,
        withdrawn,
    }))
}

/// Decodes the path attribute section of an UPDATE.
pub(crate) fn decode_attrs(mut buf: &[u8], ctx: &Ctx) -> Result<Decoded, DecodeError> {
    let mut d = Decoded::default();
    let mut as4_path: Option<AsPath> = None;
    let mut as4_aggregator: Option<(u32, Ipv4Addr)> = None;
    let withdraw = |d: &mut Decoded, why: String| {
        if d.withdraw.is_none() {
            d.withdraw = Some(why);
        }
    };
    while !buf.is_empty() {
        if buf.len() < 3 {
            withdraw(&mut d, "truncated attribute header".into());
            break;
        }
        let flags = buf[0];
        let code = buf[1];
        let (len, hdr) = if flags & flag::EXTENDED != 0 {
            if buf.len() < 4 {
                withdraw(&mut d, "truncated attribute header".into());
                break;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        } else {
            (buf[2] as usize, 3)
        };
        if buf.len() < hdr + len {
            // RFC 7606 §4: an attribute running past the section.
            withdraw(
                &mut d,
                format!("attribute {code} length {len} overruns the attribute list"),
            );
            break;
        }
        let v = &buf[hdr..hdr + len];
        let whole = &buf[..hdr + len];
        buf = &buf[hdr + len..];

        let is_mp = code == attr::MP_REACH_NLRI || code == attr::MP_UNREACH_NLRI;
        if !d.seen.insert(code) {
            if is_mp {
                return Err(DecodeError::malformed_attrs(format!(
                    "attribute {code} appears twice"
                )));
            }
            d.discarded.push(code); // RFC 7606 §3 g: keep the first
            continue;
        }
        if !is_mp {
            d.any = true;
        }

        let Some(want) = expected_flags(code) else {
            if flags & flag::OPTIONAL == 0 {
                return Err(DecodeError::with_data(
                    err::UPDATE,
                    err::UPDATE_UNRECOGNIZED_WELL_KNOWN,
                    whole.to_vec(),
                    format!("unrecognized well-known attribute {code}"),
                ));
            }
            if flags & flag::TRANSITIVE != 0 {
                d.attrs.unknown.push(RawAttr {
                    // The low four bits are unused: ignored on receipt,
                    // zero when sent (RFC 4271 §4.3).
                    flags: flags & (flag::OPTIONAL | flag::TRANSITIVE | flag::PARTIAL),
                    code,
                    data: v.to_vec(),
                });
            }
            continue;
        };
        if flags & (flag::OPTIONAL | flag::TRANSITIVE) != want {
            if is_mp {
                return Err(DecodeError::with_data(
                    err::UPDATE,
                    err::UPDATE_ATTR_FLAGS,
                    whole.to_vec(),
                    format!("attribute {code} has flags {flags:#04x}"),
                ));
            }
            withdraw(&mut d, format!("attribute {code} has flags {flags:#04x}"));
            continue;
        }

        match code {
            attr::ORIGIN => match (len, v.first().and_then(|&o| Origin::from_u8(o))) {
                (1, Some(o)) => {
                    d.attrs.origin = o;
                }
                _ => withdraw(&mut d, format!("malformed ORIGIN {v:?}")),
            },
            attr::AS_PATH => match AsPath::decode(v, ctx.four_octet_as) {
                Some(p) => {
                    d.attrs.as_path = p;
                }
                None => withdraw(&mut d, "malformed AS_PATH".into()),
            },
            attr::NEXT_HOP => {
                if len != 4 {
                    withdraw(&mut d, format!("NEXT_HOP length {len}"));
                    continue;
                }
                let nh = v4_at(v);
                if nh.is_unspecified() || nh.is_multicast() || nh.is_broadcast() {
                    withdraw(&mut d, format!("invalid NEXT_HOP {nh}"));
                    continue;
                }
                d.attrs.next_hop = Some(IpAddr::V4(nh));
            }
            attr::MED => {
                if len == 4 {
                    d.attrs.med = Some(u32_at(v));
                } else {
                    withdraw(&mut d, format!("MED length {len}"));
                }
            }
            attr::LOCAL_PREF => {
                if !ctx.ibgp {
                    d.discarded.push(code); // RFC 7606 §7.5
                } else if len == 4 {
                    d.attrs.local_pref = Some(u32_at(v));
                } else {
                    withdraw(&mut d, format!("LOCAL_PREF length {len}"));
                }
            }
            attr::ATOMIC_AGGREGATE => {
                if len == 0 {
                    d.attrs.atomic_aggregate = true;
                } else {
                    d.discarded.push(code);
                }
            }
            attr::AGGREGATOR => {
                let want = if ctx.four_octet_as { 8 } else { 6 };
                if len != want {
                    d.discarded.push(code);
                } else if ctx.four_octet_as {
                    d.attrs.aggregator = Some((u32_at(v), v4_at(&v[4..])));
                } else {
                    d.attrs.aggregator =
                        Some((u16::from_be_bytes([v[0], v[1]]) as u32, v4_at(&v[2..])));
                }
            }
            attr::COMMUNITIES => {
                if len == 0 || len % 4 != 0 {
                    withdraw(&mut d, format!("COMMUNITIES length {len}"));
                } else {
                    d.attrs.communities = v.chunks_exact(4).map(u32_at).collect();
                }
            }
            attr::ORIGINATOR_ID => {
                if !ctx.ibgp {
                    d.discarded.push(code);
                } else if len == 4 {
                    d.attrs.originator_id = Some(v4_at(v));
                } else {
                    withdraw(&mut d, format!("ORIGINATOR_ID length {len}"));
                }
            }
            attr::CLUSTER_LIST => {
                if !ctx.ibgp {
                    d.discarded.push(code);
                } else if len == 0 || len % 4 != 0 {
                    withdraw(&mut d, format!("CLUSTER_LIST length {len}"));
                } else {
                    d.attrs.cluster_list = v.chunks_exact(4).map(v4_at).collect();
                }
            }
            attr::MP_REACH_NLRI => d.mp_reach = decode_mp_reach(v)?,
            attr::MP_UNREACH_NLRI => d.mp_unreach = decode_mp_unreach(v)?,
            attr::AS4_PATH => {
                // A 4-octet speaker must ignore AS4_PATH from another (RFC 6793 §4.1).
                match (ctx.four_octet_as, AsPath::decode(v, true)) {
                    (false, Some(p)) => as4_path = Some(p),
                    _ => d.discarded.push(code),
                }
            }
            attr::AS4_AGGREGATOR => {
                if !ctx.four_octet_as && len == 8 {
                    as4_aggregator = Some((u32_at(v), v4_at(&v[4..])));
                } else {
                    d.discarded.push(code);
                }
            }
            _ => unreachable!("every code with expected flags is handled"),
        }
    }
    if let Some(p4) = as4_path {
        d.attrs.as_path = std::mem::take(&mut d.attrs.as_path).merge_as4(p4);
    }
    if let (Some(a4), Some((AS_TRANS_U32, _))) = (as4_aggregator, d.attrs.aggregator) {
        d.attrs.aggregator = Some(a4);
    }
    Ok(d)
}

const AS_TRANS_U32: u32 = AS_TRANS as u32;

fn put_attr(out: &mut Vec<u8>, flags: u8, code: u8, value: &[u8]) {
    if value.len() > 255 {
        out.push(flags | flag::EXTENDED);
        out.push(code);
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    } else {
        out.push(flags & !flag::EXTENDED);
        out.push(code);
        out.push(value.len() as u8);
    }
    out.extend_from_slice(value);
}

/// Appends the encoded attributes (without MP_REACH/MP_UNREACH, which the
/// caller places via `mp`). `v4_next_hop` controls whether NEXT_HOP is
/// written (only when IPv4 NLRI is carried in the classic field).
pub(crate) fn encode_attrs(
    a: &Attrs,
    ctx: &Ctx,
    v4_next_hop: bool,
    mp: &[(u8, Vec<u8>)],
    out: &mut Vec<u8>,
) {
    let wk = flag::TRANSITIVE;
    let ot = flag::OPTIONAL | flag::TRANSITIVE;
    let on = flag::OPTIONAL;
    put_attr(out, wk, attr::ORIGIN, &[a.origin.to_u8()]);
    let mut v = Vec::with_capacity(64);
    a.as_path.encode(&mut v, ctx.four_octet_as);
    put_attr(out, wk, attr::AS_PATH, &v);
    if v4_next_hop && let Some(IpAddr::V4(nh)) = a.next_hop {
        put_attr(out, wk, attr::NEXT_HOP, &nh.octets());
    }
    if let Some(med) = a.med {
        put_attr(out, on, attr::MED, &med.to_be_bytes());
    }
    if ctx.ibgp
        && let Some(lp) = a.local_pref
    {
        put_attr(out, wk, attr::LOCAL_PREF, &lp.to_be_bytes());
    }
    if a.atomic_aggregate {
        put_attr(out, wk, attr::ATOMIC_AGGREGATE, &[]);
    }
    if let Some((asn, id)) = a.aggregator {
        v.clear();
        if ctx.four_octet_as {
            v.extend_from_slice(&asn.to_be_bytes());
        } else {
            let a2 = if asn > 0xffff { AS_TRANS } else { asn as u16 };
            v.extend_from_slice(&a2.to_be_bytes());
        }
        v.extend_from_slice(&id.octets());
        put_attr(out, ot, attr::AGGREGATOR, &v);
    }
    if !a.communities.is_empty() {
        v.clear();
        for c in &a.communities {
            v.extend_from_slice(&c.to_be_bytes());
        }
        put_attr(out, ot, attr::COMMUNITIES, &v);
    }
    if ctx.ibgp {
        if let Some(id) = a.originator_id {
            put_attr(out, on, attr::ORIGINATOR_ID, &id.octets());
        }
        if !a.cluster_list.is_empty() {
            v.clear();
            for c in &a.cluster_list {
                v.extend_from_slice(&c.octets());
            }
            put_attr(out, on, attr::CLUSTER_LIST, &v);
        }
    }
    for (code, value) in mp {
        put_attr(out, on, *code, value);
    }
    if !ctx.four_octet_as {
        if a.as_path.needs_as4() {
            v.clear();
            a.as_path.encode(&mut v, true);
            put_attr(out, ot, attr::AS4_PATH, &v);
        }
        if let Some((asn, id)) = a.aggregator
            && asn > 0xffff
        {
            v.clear();
            v.extend_from_slice(&asn.to_be_bytes());
            v.extend_from_slice(&id.octets());
            put_attr(out, ot, attr::AS4_AGGREGATOR, &v);
        }
    }
    for u in &a.unknown {
        // Passed on: optional transitive, marked partial (RFC 4271 §5).
        put_attr(out, u.flags | flag::PARTIAL, u.code, &u.data);
    }
}

/// Writes an MP_REACH/MP_UNREACH attribute on its own (UPDATEs whose only
/// attributes are multiprotocol ones: withdrawals and End-of-RIB).
pub(crate) fn put_mp(out: &mut Vec<u8>, code: u8, value: &[u8]) {
    put_attr(out, flag::OPTIONAL, code, value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as4_merge_restores_the_true_path() {
        // AS_PATH from a 2-octet speaker: 65001 AS_TRANS AS_TRANS; AS4_PATH: 4200000001 4200000002
        let two = AsPath::sequence(vec![65001, 23456, 23456]);
        let four = AsPath::sequence(vec![4_200_000_001, 4_200_000_002]);
        let merged = two.merge_as4(four);
        assert_eq!(
            merged.segments.concat_asns(),
            vec![65001, 4_200_000_001, 4_200_000_002]
        );
    }

    #[test]
    fn as4_longer_than_as_path_is_ignored() {
        let two = AsPath::sequence(vec![23456]);
        let four = AsPath::sequence(vec![1, 2]);
        assert_eq!(two.clone().merge_as4(four), two);
    }

    #[test]
    fn hop_count_and_prepend() {
        let p = AsPath {
            segments: vec![
                Segment {
                    kind: SegmentKind::Sequence,
                    asns: vec![1, 2],
                },
                Segment {
                    kind: SegmentKind::Set,
                    asns: vec![3, 4, 5],
                },
            ],
        };
        assert_eq!(p.hop_count(), 3);
        assert_eq!(p.prepend(9).first_as(), Some(9));
        assert_eq!(p.prepend(9).hop_count(), 4);
        assert_eq!(AsPath::default().prepend(7), AsPath::sequence(vec![7]));
    }

    trait Concat {
        fn concat_asns(&self) -> Vec<u32>;
    }
    impl Concat for Vec<Segment> {
        fn concat_asns(&self) -> Vec<u32> {
            self.iter().flat_map(|s| s.asns.clone()).collect()
        }
    }
}
