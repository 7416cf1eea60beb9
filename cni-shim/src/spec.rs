//! The CNI side of the plugin, pure: the network configuration and
//! environment as the runtime passes them, the error codes, and results
//! rendered for each spec version (0.3.0 .. 1.1.0).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// Spec versions this plugin speaks.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// CNI error codes: the table the agent answers with too.
pub use margay_api::cni as code;

/// A CNI error, printed as the spec's error JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// The CNI code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer details.
    pub details: String,
}

impl CniError {
    /// An error with no details.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// The JSON the runtime reads from stdout.
    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({"cniVersion": version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

/// The verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// ADD
    Add,
    /// DEL
    Del,
    /// CHECK
    Check,
    /// VERSION
    Version,
    /// STATUS
    Status,
    /// GC
    Gc,
}

/// Everything the runtime passed in the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// CNI_COMMAND
    pub command: Command,
    /// CNI_CONTAINERID
    pub container_id: String,
    /// CNI_NETNS
    pub netns: String,
    /// CNI_IFNAME
    pub ifname: String,
    /// CNI_ARGS, parsed.
    pub args: BTreeMap<String, String>,
}

/// Reads the environment through `get` (so tests need not touch the real
/// one) and checks what the verb requires.
pub fn parse_env(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
    let invalid = |m: String| CniError::new(code::INVALID_ENV, m);
    let command = match get("CNI_COMMAND").as_deref() {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("VERSION") => Command::Version,
        Some("STATUS") => Command::Status,
        Some("GC") => Command::Gc,
        Some(other) => return Err(invalid(format!("CNI_COMMAND {other:?} is not a CNI verb"))),
        None => return Err(invalid("CNI_COMMAND is not set".into())),
    };
    let var = |name: &str| get(name).unwrap_or_default();
    let env = Env {
        command,
        container_id: var("CNI_CONTAINERID"),
        netns: var("CNI_NETNS"),
        ifname: var("CNI_IFNAME"),
        args: parse_args(&var("CNI_ARGS"))?,
    };
    let need: &[(&str, &String)] = match command {
        Command::Add | Command::Check => &[
            ("CNI_CONTAINERID", &env.container_id),
            ("CNI_NETNS", &env.netns),
            ("CNI_IFNAME", &env.ifname),
        ],
        Command::Del => &[
            ("CNI_CONTAINERID", &env.container_id),
            ("CNI_IFNAME", &env.ifname),
        ],
        _ => &[],
    };
    for (name, v) in need {
        if v.is_empty() {
            return Err(invalid(format!("{name} is required for {command:?}")));
        }
    }
    // Checked as the spec says when given (the agent checks them again).
    if !env.container_id.is_empty() && !code::valid_id(&env.container_id) {
        return Err(invalid(
            code::BadAttachment::ContainerId(env.container_id.clone()).to_string(),
        ));
    }
    if !env.ifname.is_empty() && !code::valid_ifname(&env.ifname) {
        return Err(invalid(
            code::BadAttachment::Ifname(env.ifname.clone()).to_string(),
        ));
    }
    Ok(env)
}

/// CNI_ARGS as keys and values.
pub type CniArgs = BTreeMap<String, String>;

/// `K=V;K=V` as in CNI_ARGS.
pub fn parse_args(s: &str) -> Result<CniArgs, CniError> {
    let mut out = BTreeMap::new();
    for kv in s.split(';').filter(|kv| !kv.is_empty()) {
        let Some((k, v)) = kv.split_once('=') else {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS: {kv:?} is not KEY=VALUE"),
            ));
        };
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Keys a network configuration may carry: the spec's own, those runtimes
/// add, and Margay's.
const KNOWN_KEYS: &[&str] = &[
    "cniVersion",
    "cniVersions",
    "name",
    "type",
    "args",
    "ipMasq",
    "ipam",
    "dns",
    "runtimeConfig",
    "capabilities",
    "prevResult",
    "disableCheck",
    "disableGC",
    "cni.dev/valid-attachments",
    "cni.dev/attachments",
    // Margay's own:
    "socket",
    "mtu",
    "timeoutSeconds",
];

/// The parts of the network configuration the plugin uses.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// cniVersion
    pub version: String,
    /// name
    pub name: String,
    /// The agent's socket.
    pub socket: String,
    /// MTU for the pod interface (0: the agent's default).
    pub mtu: u32,
    /// How long to wait for the agent.
    pub timeout_seconds: u64,
    /// prevResult, when chained.
    pub prev_result: Option<Value>,
    /// cni.dev/valid-attachments (GC); `None` when the key is missing.
    pub valid_attachments: Option<Vec<(String, String)>>,
}

/// Parses the network configuration from stdin.
pub fn parse_conf(bytes: &[u8], default_socket: &str) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        CniError::new(
            code::DECODE,
            format!("network configuration is not JSON: {e}"),
        )
    })?;
    let Value::Object(m) = v else {
        return Err(CniError::new(
            code::DECODE,
            "network configuration is not a JSON object",
        ));
    };
    for k in m.keys() {
        if !KNOWN_KEYS.contains(&k.as_str()) {
            let mut e = CniError::new(
                code::UNSUPPORTED_FIELD,
                format!("unsupported field {k:?} in the margay network configuration"),
            );
            e.details = format!("{k}={}", m[k]);
            return Err(e);
        }
    }
    let str_field = |k: &str| -> Result<Option<String>, CniError> {
        match m.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(CniError::new(
                code::INVALID_CONFIG,
                format!("{k} must be a string, got {other}"),
            )),
        }
    };
    let version = str_field("cniVersion")?
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "cniVersion is missing"))?;
    if !SUPPORTED.contains(&version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {version:?} is not supported (margay speaks {})",
                SUPPORTED.join(", ")
            ),
        ));
    }
    let name = str_field("name")?.unwrap_or_default();
    if !code::valid_id(&name) {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            code::BadAttachment::Network(name).to_string(),
        ));
    }
    let socket = str_field("socket")?.unwrap_or_else(|| default_socket.to_string());
    let num = |k: &str, max: u64| -> Result<u64, CniError> {
        match m.get(k) {
            None => Ok(0),
            Some(v) => v.as_u64().filter(|n| *n <= max).ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("{k} must be a whole number up to {max}, got {v}"),
                )
            }),
        }
    };
    let mtu = num("mtu", 65535)? as u32;
    if mtu != 0 && mtu < 576 {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("mtu {mtu} is below the IPv4 minimum of 576"),
        ));
    }
    let timeout_seconds = match num("timeoutSeconds", 3600)? {
        0 => 120,
        n => n,
    };
    let valid_attachments = match m.get("cni.dev/valid-attachments") {
        None => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| {
                    let s = |k| x.get(k).and_then(Value::as_str).map(str::to_string);
                    match (s("containerID"), s("ifname")) {
                        (Some(c), Some(i)) => Ok((c, i)),
                        _ => Err(CniError::new(
                            code::INVALID_CONFIG,
                            format!("cni.dev/valid-attachments: {x} lacks containerID or ifname"),
                        )),
                    }
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(other) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("cni.dev/valid-attachments must be a list, got {other}"),
            ));
        }
    };
    Ok(NetConf {
        version,
        name,
        socket,
        mtu,
        timeout_seconds,
        prev_result: m.get("prevResult").cloned(),
        valid_attachments,
    })
}

/// One interface of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Name.
    pub name: String,
    /// MAC address.
    pub mac: String,
    /// Netns path (pod side) or empty (host side).
    pub sandbox: String,
    /// MTU (1.1.0 results only).
    pub mtu: u32,
}

/// One address of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ip {
    /// CIDR.
    pub address: String,
    /// Gateway.
    pub gateway: String,
    /// Index into the interfaces.
    pub interface: Option<usize>,
}

/// A result, version-neutral.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    /// Interfaces.
    pub interfaces: Vec<Interface>,
    /// Addresses.
    pub ips: Vec<Ip>,
    /// Routes (dst, gw).
    pub routes: Vec<(String, String)>,
}

/// Renders a result as the runtime expects it for `version`.
pub fn render(result: &CniResult, version: &str) -> Value {
    let legacy = version.starts_with("0.");
    let interfaces: Vec<Value> = result
        .interfaces
        .iter()
        .map(|i| {
            let mut o = Map::new();
            o.insert("name".into(), json!(i.name));
            o.insert("mac".into(), json!(i.mac));
            if !i.sandbox.is_empty() {
                o.insert("sandbox".into(), json!(i.sandbox));
            }
            if version == "1.1.0" && i.mtu != 0 {
                o.insert("mtu".into(), json!(i.mtu));
            }
            Value::Object(o)
        })
        .collect();
    let ips: Vec<Value> = result
        .ips
        .iter()
        .map(|ip| {
            let mut o = Map::new();
            if legacy {
                let v = if ip.address.contains(':') { "6" } else { "4" };
                o.insert("version".into(), json!(v));
            }
            o.insert("address".into(), json!(ip.address));
            if !ip.gateway.is_empty() {
                o.insert("gateway".into(), json!(ip.gateway));
            }
            if let Some(i) = ip.interface {
                o.insert("interface".into(), json!(i));
            }
            Value::Object(o)
        })
        .collect();
    let routes: Vec<Value> = result
        .routes
        .iter()
        .map(|(dst, gw)| {
            if gw.is_empty() {
                json!({"dst": dst})
            } else {
                json!({"dst": dst, "gw": gw})
            }
        })
        .collect();
    json!({
        "cniVersion": version,
        "interfaces": interfaces,
        "ips": ips,
        "routes": routes,
        "dns": {},
    })
}

/// The VERSION answer.
pub fn version_json() -> Value {
    json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn env_requirements_per_verb() {
        let e = parse_env(env(&[])).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        let e = parse_env(env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c")])).unwrap_err();
        assert!(e.msg.contains("CNI_NETNS"), "{e:?}");
        // DEL may come with an empty netns.
        let ok = parse_env(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ]))
        .unwrap();
        assert_eq!(ok.command, Command::Del);
        let e = parse_env(env(&[("CNI_COMMAND", "FROB")])).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        let e = parse_env(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAME"),
        ]))
        .unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        for (id, ifname) in [("-c", "eth0"), ("c/d", "eth0"), ("c", "eth:0"), ("c", "..")] {
            let e = parse_env(env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", id),
                ("CNI_IFNAME", ifname),
            ]))
            .unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{id} {ifname}");
        }
        let a = parse_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p").unwrap();
        assert_eq!(a["K8S_POD_NAME"], "p");
    }

    #[test]
    fn config_errors_have_the_right_codes() {
        let sock = "/s";
        assert_eq!(parse_conf(b"{nope", sock).unwrap_err().code, code::DECODE);
        assert_eq!(parse_conf(b"[]", sock).unwrap_err().code, code::DECODE);
        let e = parse_conf(
            br#"{"cniVersion":"9.9.9","name":"n","type":"margay"}"#,
            sock,
        )
        .unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = parse_conf(
            br#"{"cniVersion":"1.0.0","name":"n","type":"margay","frob":1}"#,
            sock,
        )
        .unwrap_err();
        assert_eq!(e.code, code::UNSUPPORTED_FIELD);
        assert!(e.msg.contains("frob"));
        let e = parse_conf(br#"{"cniVersion":"1.0.0","name":"n","mtu":100}"#, sock).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        let c = parse_conf(
            br#"{"cniVersion":"1.1.0","name":"n","type":"margay","mtu":1450,"prevResult":{"ips":[]}}"#,
            sock,
        )
        .unwrap();
        assert_eq!(
            (c.mtu, c.socket.as_str(), c.timeout_seconds),
            (1450, sock, 120)
        );
        assert!(c.prev_result.is_some());
        assert_eq!(c.valid_attachments, None);
        // A network without a (valid) name: no attachment can be named.
        for bad in [
            &br#"{"cniVersion":"1.0.0","type":"margay"}"#[..],
            br#"{"cniVersion":"1.0.0","name":"","type":"margay"}"#,
            br#"{"cniVersion":"1.0.0","name":"a/b","type":"margay"}"#,
        ] {
            let e = parse_conf(bad, sock).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{e:?}");
        }
        let c = parse_conf(
            br#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[{"containerID":"c","ifname":"eth0"}]}"#,
            sock,
        )
        .unwrap();
        assert_eq!(c.valid_attachments, Some(vec![("c".into(), "eth0".into())]));
        let c = parse_conf(
            br#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[]}"#,
            sock,
        )
        .unwrap();
        assert_eq!(c.valid_attachments, Some(vec![]));
        let e = parse_conf(
            br#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":{}}"#,
            sock,
        )
        .unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
    }

    #[test]
    fn results_per_version() {
        let r = CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "aa:bb:cc:dd:ee:ff".into(),
                sandbox: "/var/run/netns/x".into(),
                mtu: 1500,
            }],
            ips: vec![
                Ip {
                    address: "10.0.0.5/32".into(),
                    gateway: "169.254.1.1".into(),
                    interface: Some(0),
                },
                Ip {
                    address: "fd00::5/128".into(),
                    gateway: String::new(),
                    interface: Some(0),
                },
            ],
            routes: vec![("0.0.0.0/0".into(), "169.254.1.1".into())],
        };
        let v = render(&r, "0.3.1");
        assert_eq!(v["ips"][0]["version"], "4");
        assert_eq!(v["ips"][1]["version"], "6");
        assert!(v["interfaces"][0].get("mtu").is_none());
        let v = render(&r, "1.0.0");
        assert!(v["ips"][0].get("version").is_none());
        assert!(v["interfaces"][0].get("mtu").is_none());
        let v = render(&r, "1.1.0");
        assert_eq!(v["interfaces"][0]["mtu"], 1500);
        assert_eq!(v["routes"][0]["gw"], "169.254.1.1");
    }
}
